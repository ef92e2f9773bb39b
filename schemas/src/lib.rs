//! The Avro contract of the chat log.
//!
//! Kafka is the source of truth of the platform and every record on every chat
//! topic is one [`Envelope`] in Avro (Confluent wire format, registered under
//! the topic's `-value` subject). This crate owns:
//!
//! - the `.avsc` files in `schemas/avro/` (namespace `chat.v1`), one per event
//!   type and per shared named type, plus `Envelope.avsc` whose `body` is a
//!   union of every event type;
//! - composing them into the single self-contained schema that is registered
//!   ([`envelope_schema_json`], [`envelope_schema`]);
//! - the Rust types mirroring the schema ([`Envelope`], [`Body`] and one struct
//!   per event) and their hand-written conversion to and from
//!   [`apache_avro::types::Value`] ([`Envelope::to_avro`], [`Envelope::from_avro`]);
//! - raw Avro datum encoding for tests and fuzzing ([`encode_datum`],
//!   [`decode_datum`]).
//!
//! It does not talk to Kafka or to the schema registry, and it does not know
//! the Confluent wire header (magic byte and schema id): that is the job of
//! the crates that do I/O.

#[macro_use]
mod value;
mod compose;
mod error;
mod events;

use std::sync::OnceLock;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;

pub mod released;

pub use compose::{envelope_schema, envelope_schema_json};
pub use error::SchemaError;
pub use events::*;

/// Encodes `envelope` as a raw Avro datum (no Confluent header) with
/// [`envelope_schema`]; the value is validated against the schema first.
pub fn encode_datum(envelope: &Envelope) -> Result<Vec<u8>, SchemaError> {
    static WRITER: OnceLock<GenericDatumWriter<'static>> = OnceLock::new();
    let writer = WRITER.get_or_init(|| {
        GenericDatumWriter::builder(envelope_schema())
            .build()
            .expect("composed schema resolves")
    });
    Ok(writer.write_value_to_vec(envelope.to_avro())?)
}

/// Decodes a raw Avro datum (no Confluent header) written with
/// [`envelope_schema`]. Never panics: malformed input is an `Err`, and so
/// are bytes left over after the datum.
pub fn decode_datum(bytes: &[u8]) -> Result<Envelope, SchemaError> {
    static READER: OnceLock<GenericDatumReader<'static>> = OnceLock::new();
    let reader = READER.get_or_init(|| {
        GenericDatumReader::builder(envelope_schema())
            .build()
            .expect("composed schema resolves")
    });
    let mut rest = bytes;
    let value = reader.read_value(&mut rest)?;
    if !rest.is_empty() {
        return Err(SchemaError::TrailingBytes(rest.len()));
    }
    Envelope::from_avro(value)
}

/// Namespace of the deterministic ids of 1:1 chats.
const DIRECT_CHAT_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6368_6174_2d76_312d_6469_7265_6374_0001);

/// The id of the one 1:1 chat between two users: a UUIDv5 of the ordered
/// pair, so creating it twice (from either side, on any gateway) names the
/// same chat and the sequencer answers the second create as a duplicate.
pub fn direct_chat_id(a: &str, b: &str) -> uuid::Uuid {
    let (low, high) = if a <= b { (a, b) } else { (b, a) };
    let name = format!("{}\u{0}{}", low, high);
    uuid::Uuid::new_v5(&DIRECT_CHAT_NAMESPACE, name.as_bytes())
}

/// Namespace of the ids of groups created with a `client_msg_id`.
const GROUP_CHAT_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6368_6174_2d76_312d_6772_6f75_7000_0001);

/// The id of the group that `user` creates from `device` with
/// `client_msg_id`: a UUIDv5 of the three (the sequencer's dedupe key), so a
/// retried `create_chat` names the same chat and is answered as a duplicate
/// instead of creating a second group.
pub fn group_chat_id(user: &str, device: &str, client_msg_id: &str) -> uuid::Uuid {
    let name = format!("{user}\u{0}{device}\u{0}{client_msg_id}");
    uuid::Uuid::new_v5(&GROUP_CHAT_NAMESPACE, name.as_bytes())
}

/// `SessionRouted.router_offsets` value for a partition the answering router
/// does not route (not assigned to it, or nothing routed yet): the largest
/// Avro `long`, so it survives the wire unchanged.
pub const UNROUTED_PARTITION: u64 = i64::MAX as u64;

#[cfg(test)]
mod direct_tests {
    #[test]
    fn direct_chat_id_is_symmetric_and_distinct() {
        assert_eq!(
            super::direct_chat_id("a", "b"),
            super::direct_chat_id("b", "a")
        );
        assert_ne!(
            super::direct_chat_id("a", "b"),
            super::direct_chat_id("a", "c")
        );
        // The separator keeps ("ab","c") apart from ("a","bc").
        assert_ne!(
            super::direct_chat_id("ab", "c"),
            super::direct_chat_id("a", "bc")
        );
    }

    #[test]
    fn group_chat_id_is_per_user_device_and_client_msg_id() {
        let id = super::group_chat_id("ann", "phone", "g-1");
        assert_eq!(id, super::group_chat_id("ann", "phone", "g-1"));
        assert_ne!(id, super::group_chat_id("ann", "phone", "g-2"));
        assert_ne!(id, super::group_chat_id("ann", "laptop", "g-1"));
        assert_ne!(id, super::group_chat_id("bob", "phone", "g-1"));
        assert_ne!(
            super::group_chat_id("a", "bc", "d"),
            super::group_chat_id("ab", "c", "d")
        );
        assert_ne!(id, super::direct_chat_id("ann", "phone"));
    }
}
