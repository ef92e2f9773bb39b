//! The released versions of the Envelope schema, `schemas/released/envelope-v<N>.json`:
//! every composed schema that shipped on `main`, oldest first. A change to any
//! `.avsc` file adds the next version (`make schema-release`) in the same
//! commit; `tests/tests/schema_compat.rs` registers them in order under one
//! subject of the real registry with `BACKWARD_TRANSITIVE` and then the
//! current schema, so a change that cannot read every earlier record fails
//! `make test` with the registry's explanation.

use std::path::Path;

/// `(N, text)` of every `envelope-v<N>.json` in `dir`, ascending by N.
pub fn versions(dir: &Path) -> std::io::Result<Vec<(u32, String)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix("envelope-v"))
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        out.push((n, std::fs::read_to_string(dir.join(&name))?));
    }
    out.sort_by_key(|(n, _)| *n);
    Ok(out)
}

/// The directory of this crate's released versions.
pub fn dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/released"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_versions_are_numbered_from_1_without_gaps_and_parse_as_avro() {
        let versions = versions(dir()).unwrap();
        assert!(!versions.is_empty());
        for (i, (n, text)) in versions.iter().enumerate() {
            assert_eq!(
                *n as usize,
                i + 1,
                "envelope-v{n}.json: numbers must be 1, 2, 3, ..."
            );
            apache_avro::Schema::parse_str(text)
                .unwrap_or_else(|e| panic!("envelope-v{n}.json is not a valid Avro schema: {e}"));
        }
    }

    #[test]
    fn the_current_schema_is_the_newest_released_version() {
        let versions = versions(dir()).unwrap();
        let (n, newest) = versions.last().unwrap();
        let newest: serde_json::Value = serde_json::from_str(newest).unwrap();
        let current: serde_json::Value =
            serde_json::from_str(crate::envelope_schema_json()).unwrap();
        assert!(
            newest == current,
            "the .avsc files changed since released version {n}: run `make schema-release` \
             to add it, and `make test` checks it against every earlier version"
        );
    }
}
