//! Prints the composed Envelope schema, or records it as the next released
//! version.
//!
//!   cargo run -p chat-schemas --example envelope            print it
//!   cargo run -p chat-schemas --example envelope -- --release
//!       write `schemas/released/envelope-v<N+1>.json` when the current schema
//!       differs from the newest released one (what `make schema-release` runs)
//!
//! The released files are what `tests/tests/schema_compat.rs` checks every
//! change against through the registry (BACKWARD_TRANSITIVE).

use std::path::Path;

fn main() -> Result<(), String> {
    let current = chat_schemas::envelope_schema_json();
    if std::env::args().nth(1).as_deref() != Some("--release") {
        println!("{current}");
        return Ok(());
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("released");
    let released = chat_schemas::released::versions(&dir).map_err(|e| e.to_string())?;
    let parsed =
        |text: &str| serde_json::from_str::<serde_json::Value>(text).map_err(|e| e.to_string());
    if let Some((n, text)) = released.last() {
        if parsed(text)? == parsed(current)? {
            println!("unchanged: the current schema is released version {n}");
            return Ok(());
        }
    }
    let next = released.last().map_or(1, |(n, _)| n + 1);
    let path = dir.join(format!("envelope-v{next}.json"));
    std::fs::write(&path, format!("{current}\n"))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}
