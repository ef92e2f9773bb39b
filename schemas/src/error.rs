//! Errors of this crate.

/// Why an [`Envelope`](crate::Envelope) could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// An Avro value did not have the shape the schema prescribes.
    #[error("field `{field}`: expected {expected}")]
    Shape {
        /// Where: `Record.field` (or `chat.v1.Envelope` for the root).
        field: String,
        /// What was expected there.
        expected: &'static str,
    },
    /// Avro encoding, decoding or validation failed.
    #[error("avro: {0}")]
    Avro(#[from] apache_avro::Error),
    /// The datum was followed by this many unread bytes.
    #[error("{0} trailing bytes after the Avro datum")]
    TrailingBytes(usize),
}
