//! Composing the `.avsc` files into the one registered Envelope schema.
//!
//! Each file holds one named type. References between files are full names
//! (`chat.v1.Role`). Avro requires every named type to be defined exactly
//! once in a schema and referred to by name afterwards, so the composer walks
//! `Envelope.avsc` depth first and replaces the first reference to each named
//! type by its definition (itself composed recursively), leaving later
//! references as names.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use apache_avro::Schema;
use serde_json::{Map, Value as Json};

macro_rules! avsc_files {
    ($($name:literal),+ $(,)?) => {
        /// Every `.avsc` file of `schemas/avro/`: (file stem, contents).
        pub(crate) const AVSC_FILES: &[(&str, &str)] =
            &[$(($name, include_str!(concat!("../avro/", $name, ".avsc")))),+];
    };
}

avsc_files![
    "Envelope",
    "Role",
    "ChatKind",
    "MessageKind",
    "RemovalReason",
    "PresenceStatus",
    "MediaRef",
    "ChatMember",
    "MessageSent",
    "MessageEdited",
    "MessageDeleted",
    "ReactionChanged",
    "DeliveryReceipt",
    "ReadReceipt",
    "ChatCreated",
    "MemberAdded",
    "MemberRemoved",
    "MemberRoleChanged",
    "PresenceChanged",
    "Typing",
    "SessionOpened",
    "SessionClosed",
    "PushTask",
    "CommandOutcome",
    "CommandResult",
    "SessionRouted",
    "GatewayHeartbeat",
    "PresenceSettingChanged",
    "DeviceRevoked",
    "MuteChanged",
    "PushRegistrationChanged",
];

/// Full name of the root record.
pub(crate) const ENVELOPE: &str = "chat.v1.Envelope";

/// The composed, self-contained Envelope schema as JSON: the text to register
/// under each topic's value subject. Computed once.
pub fn envelope_schema_json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(compose)
}

/// [`envelope_schema_json`] parsed once.
pub fn envelope_schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        Schema::parse_str(envelope_schema_json()).expect("composed Envelope schema is valid Avro")
    })
}

/// `namespace.name` of a named type definition (None for anything else).
pub(crate) fn full_name(def: &Json) -> Option<String> {
    def.as_object().and_then(full_name_of)
}

fn full_name_of(def: &Map<String, Json>) -> Option<String> {
    let name = def.get("name")?.as_str()?;
    Some(match def.get("namespace").and_then(Json::as_str) {
        Some(ns) if !name.contains('.') => format!("{ns}.{name}"),
        _ => name.to_owned(),
    })
}

fn compose() -> String {
    let defs: HashMap<String, Json> = AVSC_FILES
        .iter()
        .map(|(file, text)| {
            let def: Json = serde_json::from_str(text)
                .unwrap_or_else(|e| panic!("avro/{file}.avsc is not JSON: {e}"));
            let name = full_name(&def).unwrap_or_else(|| panic!("avro/{file}.avsc has no name"));
            (name, def)
        })
        .collect();
    let mut defined = HashSet::new();
    let root = inline(Json::String(ENVELOPE.to_owned()), &defs, &mut defined);
    serde_json::to_string(&root).expect("JSON values serialize")
}

/// Replaces the first reference to each file-defined named type by its
/// definition; recurses through unions, `type`, `items`, `values` and fields.
fn inline(schema: Json, defs: &HashMap<String, Json>, defined: &mut HashSet<String>) -> Json {
    match schema {
        Json::String(name) => match defs.get(&name) {
            Some(def) if !defined.contains(&name) => {
                defined.insert(name);
                inline(def.clone(), defs, defined)
            }
            _ => Json::String(name),
        },
        Json::Array(branches) => Json::Array(
            branches
                .into_iter()
                .map(|b| inline(b, defs, defined))
                .collect(),
        ),
        Json::Object(mut map) => {
            let named = matches!(
                map.get("type").and_then(Json::as_str),
                Some("record" | "enum" | "fixed")
            );
            if let Some(name) = named.then(|| full_name_of(&map)).flatten() {
                defined.insert(name);
            }
            for key in ["type", "items", "values"] {
                if let Some(slot) = map.get_mut(key) {
                    *slot = inline(slot.take(), defs, defined);
                }
            }
            if let Some(Json::Array(fields)) = map.get_mut("fields") {
                for slot in fields.iter_mut().filter_map(|f| f.get_mut("type")) {
                    *slot = inline(slot.take(), defs, defined);
                }
            }
            Json::Object(map)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Body, ChatKind, MessageKind, PresenceStatus, RemovalReason, Role};

    /// Every named type definition in the composed schema, in document order.
    fn definitions<'a>(json: &'a Json, out: &mut Vec<&'a Json>) {
        match json {
            Json::Array(items) => items.iter().for_each(|i| definitions(i, out)),
            Json::Object(map) => {
                if matches!(
                    map.get("type").and_then(Json::as_str),
                    Some("record" | "enum" | "fixed")
                ) {
                    out.push(json);
                }
                map.values().for_each(|v| definitions(v, out));
            }
            _ => {}
        }
    }

    fn composed() -> Json {
        serde_json::from_str(envelope_schema_json()).unwrap()
    }

    fn doc(json: &Json) -> &str {
        json.get("doc").and_then(Json::as_str).unwrap_or_default()
    }

    #[test]
    fn every_avsc_file_is_embedded() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/avro");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().into_string().ok())
            .filter_map(|f| f.strip_suffix(".avsc").map(str::to_owned))
            .collect();
        let mut embedded: Vec<String> = AVSC_FILES.iter().map(|(f, _)| (*f).to_owned()).collect();
        on_disk.sort();
        embedded.sort();
        assert_eq!(on_disk, embedded);
        for (file, text) in AVSC_FILES {
            let def: Json = serde_json::from_str(text).unwrap();
            assert_eq!(def["namespace"], "chat.v1", "{file}");
            assert_eq!(
                def["name"], *file,
                "{file}: one named type per file, named like the file"
            );
        }
    }

    #[test]
    fn composed_schema_parses_and_defines_every_type_once() {
        assert_eq!(envelope_schema().name().unwrap().fullname(None), ENVELOPE);
        let json = composed();
        let mut defs = Vec::new();
        definitions(&json, &mut defs);
        let mut names: Vec<String> = defs.iter().filter_map(|d| full_name(d)).collect();
        let count = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), count, "a named type is defined twice");
        let mut files: Vec<String> = AVSC_FILES
            .iter()
            .map(|(f, _)| format!("chat.v1.{f}"))
            .collect();
        files.sort();
        assert_eq!(names, files);
    }

    #[test]
    fn every_type_and_field_has_a_doc_and_optionals_default_to_null() {
        let json = composed();
        let mut defs = Vec::new();
        definitions(&json, &mut defs);
        for def in defs {
            let name = full_name(def).unwrap();
            assert!(!doc(def).is_empty(), "{name} has no doc");
            for field in def
                .get("fields")
                .and_then(Json::as_array)
                .into_iter()
                .flatten()
            {
                let at = format!("{name}.{}", field["name"]);
                assert!(!doc(field).is_empty(), "{at} has no doc");
                if field["type"].get(0) == Some(&Json::from("null")) {
                    assert_eq!(
                        field.get("default"),
                        Some(&Json::Null),
                        "{at}: default null"
                    );
                }
            }
        }
    }

    #[test]
    fn rust_types_follow_the_schema_order() {
        let json = composed();
        let body = json["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "body")
            .unwrap();
        let branches: Vec<String> = body["type"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| full_name(b).unwrap_or_else(|| b.as_str().unwrap().to_owned()))
            .collect();
        let kinds: Vec<String> = Body::KINDS.iter().map(|k| format!("chat.v1.{k}")).collect();
        assert_eq!(branches, kinds);

        let mut defs = Vec::new();
        definitions(&json, &mut defs);
        let enums: [(&str, &[&str]); 5] = [
            ("chat.v1.Role", Role::SYMBOLS),
            ("chat.v1.ChatKind", ChatKind::SYMBOLS),
            ("chat.v1.MessageKind", MessageKind::SYMBOLS),
            ("chat.v1.RemovalReason", RemovalReason::SYMBOLS),
            ("chat.v1.PresenceStatus", PresenceStatus::SYMBOLS),
        ];
        for (name, symbols) in enums {
            let def = defs
                .iter()
                .find(|d| full_name(d).as_deref() == Some(name))
                .unwrap();
            assert_eq!(def["symbols"], Json::from(symbols.to_vec()), "{name}");
        }
    }
}
