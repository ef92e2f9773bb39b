//! The boundary to the schema registry (Confluent-compatible API; Apicurio's
//! `/apis/ccompat/v7` here).
//!
//! Subjects follow TopicNameStrategy: every topic's value subject is
//! `<topic>-value` and holds the one composed `chat.v1.Envelope` schema, so
//! stock consumers need no configuration. Each subject is set to
//! `BACKWARD_TRANSITIVE`: a new schema must read every earlier version's data.
//!
//! Records are framed in Confluent wire format: magic byte 0, the schema id as
//! a big-endian u32, then the Avro binary datum.

use apache_avro::types::Value;
use chat_schemas::Envelope;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::{post_schema, SrSettings};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};
use std::time::Duration;

use crate::{LogConfig, LogError};

/// The compatibility level the platform sets on every subject.
pub const COMPATIBILITY: &str = "BACKWARD_TRANSITIVE";

/// Registry client: registration, compatibility settings, encode and decode.
pub struct SchemaRegistry {
    url: String,
    settings: SrSettings,
    encoder: AvroEncoder,
    decoder: AvroDecoder,
    http: reqwest::Client,
    /// Schema id of the envelope schema per topic, learnt from the first encode.
    ids: std::sync::RwLock<std::collections::HashMap<String, u32>>,
}

impl std::fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaRegistry")
            .field("url", &self.url)
            .finish()
    }
}

fn envelope_supplied() -> SuppliedSchema {
    SuppliedSchema::new(
        Some("chat.v1.Envelope".into()),
        SchemaType::Avro,
        chat_schemas::envelope_schema_json().to_string(),
    )
}

fn subject_of(topic: &str) -> String {
    format!("{topic}-value")
}

impl SchemaRegistry {
    pub fn new(config: &LogConfig) -> Result<Self, LogError> {
        let url = config.registry_url.trim_end_matches('/').to_string();
        let timeout = Duration::from_millis(config.connect_timeout_ms);
        let settings = SrSettings::new_builder(url.clone())
            .set_timeout(timeout)
            .build()
            .map_err(|e| LogError::Config(format!("registry settings: {e}")))?;
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| LogError::Config(format!("registry http client: {e}")))?;
        Ok(Self {
            encoder: AvroEncoder::new(settings.clone()),
            decoder: AvroDecoder::new(settings.clone()),
            settings,
            url,
            http,
            ids: Default::default(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn unreachable(&self, detail: impl ToString) -> LogError {
        LogError::RegistryUnreachable {
            url: self.url.clone(),
            detail: detail.to_string(),
        }
    }

    /// Fails with [`LogError::RegistryUnreachable`] unless the registry answers.
    pub async fn check_reachable(&self) -> Result<(), LogError> {
        let resp = self
            .http
            .get(format!("{}/subjects", self.url))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(self.unreachable(format!("GET /subjects answered {}", resp.status())))
        }
    }

    /// Registers the envelope schema under `<topic>-value` (idempotent: the
    /// registry answers an existing identical schema with its id) and sets the
    /// subject's compatibility. Returns the schema id.
    pub async fn register_envelope(&self, topic: &str) -> Result<u32, LogError> {
        self.register_schema(topic, envelope_supplied()).await
    }

    /// Registers any schema under `<topic>-value` (used by tests to try an
    /// incompatible change), then enforces [`COMPATIBILITY`] on the subject.
    pub async fn register_schema(
        &self,
        topic: &str,
        schema: SuppliedSchema,
    ) -> Result<u32, LogError> {
        let subject = subject_of(topic);
        let registered = post_schema(&self.settings, subject.clone(), schema)
            .await
            .map_err(|e| self.classify(&subject, e))?;
        self.set_compatibility(&subject, COMPATIBILITY).await?;
        Ok(registered.id)
    }

    /// `PUT /config/{subject}`.
    pub async fn set_compatibility(&self, subject: &str, level: &str) -> Result<(), LogError> {
        let resp = self
            .http
            .put(format!("{}/config/{subject}", self.url))
            .header("content-type", "application/vnd.schemaregistry.v1+json")
            .body(format!("{{\"compatibility\":\"{level}\"}}"))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            Err(LogError::Registry {
                detail: format!("PUT /config/{subject} answered {status}: {body}"),
                retryable: status.is_server_error(),
            })
        }
    }

    /// `GET /config/{subject}`: the subject's compatibility level.
    pub async fn compatibility(&self, subject: &str) -> Result<String, LogError> {
        let resp = self
            .http
            .get(format!("{}/config/{subject}", self.url))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let body: serde_json::Value = resp.json().await.map_err(|e| self.unreachable(e))?;
        body.get("compatibilityLevel")
            .or_else(|| body.get("compatibility"))
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| LogError::Registry {
                detail: format!("unexpected config answer: {body}"),
                retryable: false,
            })
    }

    fn classify(&self, subject: &str, e: SRCError) -> LogError {
        let text = e.to_string();
        if text.contains("409") || text.to_lowercase().contains("incompatible") {
            LogError::SchemaRejected {
                subject: subject.to_string(),
                detail: text,
            }
        } else if e.retriable
            && (text.contains("connect") || text.contains("error sending request"))
        {
            self.unreachable(text)
        } else {
            LogError::Registry {
                detail: text,
                retryable: e.retriable,
            }
        }
    }

    /// Encodes an envelope for `topic` in Confluent wire format.
    ///
    /// The first record of a topic goes through schema_registry_converter,
    /// which registers (or finds) the schema and gives its id; later records
    /// are written directly with that id, which saves cloning and looking up
    /// the whole schema text for every record on the hot path.
    pub async fn encode(&self, topic: &str, envelope: &Envelope) -> Result<Vec<u8>, LogError> {
        let known = self.ids.read().ok().and_then(|m| m.get(topic).copied());
        if let Some(id) = known {
            let datum = chat_schemas::encode_datum(envelope)
                .map_err(|e| LogError::Encode(e.to_string()))?;
            let mut out = Vec::with_capacity(5 + datum.len());
            out.push(0);
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&datum);
            return Ok(out);
        }
        let strategy = SubjectNameStrategy::TopicNameStrategyWithSchema(
            topic.into(),
            false,
            envelope_supplied(),
        );
        let bytes = self
            .encoder
            .encode_value(envelope.to_avro(), &strategy)
            .await
            .map_err(|e| match self.classify(&subject_of(topic), e) {
                LogError::Registry { detail, .. } => LogError::Encode(detail),
                other => other,
            })?;
        if let (Some(id), Ok(mut ids)) = (schema_id(&bytes), self.ids.write()) {
            ids.insert(topic.to_string(), id);
        }
        Ok(bytes)
    }

    /// Decodes a Confluent-framed record with the writer schema named by its
    /// id. Returns the schema id and the raw Avro value.
    ///
    /// [`DecodeFailure::Permanent`] only when the record is at fault: not
    /// framed, a schema id the registry says it does not have (404), a schema
    /// that does not parse, or a datum that does not match its schema. A
    /// registry that cannot answer properly (no connection, a timeout, a
    /// 5xx, 408 or 429, a body cut short) is [`DecodeFailure::Transient`]:
    /// the caller retries, it must not drop or dead-letter the record.
    pub async fn decode_value(&self, bytes: &[u8]) -> Result<(u32, Value), DecodeFailure> {
        let id = schema_id(bytes).ok_or(DecodeFailure::Permanent(
            "not in Confluent wire format (magic byte 0 + schema id)".into(),
        ))?;
        // Look the writer schema up first, so that a failure of the registry
        // is not taken for a failure of the record.
        if let Err(e) = self.decoder.get_schema(id).await {
            if registry_side(&e) {
                // schema_registry_converter caches errors it deems permanent
                // (any status but 502/503, a body it could not read): forget
                // them, or every later record with this id would fail too.
                if !e.retriable {
                    self.decoder.remove_errors_from_cache();
                }
                return Err(DecodeFailure::Transient(self.unreachable(e)));
            }
            return Err(DecodeFailure::Permanent(e.to_string()));
        }
        match self.decoder.decode(Some(bytes)).await {
            Ok(r) => Ok((id, r.value)),
            Err(e) if e.retriable => Err(DecodeFailure::Transient(self.unreachable(e))),
            Err(e) => Err(DecodeFailure::Permanent(e.to_string())),
        }
    }

    /// Decodes a record into an [`Envelope`].
    pub async fn decode(&self, bytes: &[u8]) -> Result<(u32, Envelope), DecodeFailure> {
        let (id, value) = self.decode_value(bytes).await?;
        Envelope::from_avro(value)
            .map(|e| (id, e))
            .map_err(|e| DecodeFailure::Permanent(e.to_string()))
    }
}

/// Why a record could not be decoded.
#[derive(Debug)]
pub enum DecodeFailure {
    /// The registry could not be asked: retry later, do not dead-letter.
    Transient(LogError),
    /// The bytes are not a valid record for any schema we can read: dead-letter.
    Permanent(String),
}

/// Whether a failed schema lookup is the registry's failure (retry) rather
/// than an answer about the record (no such schema id, a schema that does
/// not parse).
fn registry_side(e: &SRCError) -> bool {
    if e.retriable {
        return true;
    }
    // "HTTP request to schema registry failed with status 500 Internal Server Error"
    if let Some((_, rest)) = e.error.split_once("failed with status ") {
        let code: u16 = rest
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|d| d.parse().ok())
            .unwrap_or(0);
        return code >= 500 || code == 408 || code == 429;
    }
    // A success status whose body could not be read (cut short, timed out).
    e.error.contains("could not parse to RawRegisteredSchema")
}

/// The schema id of a Confluent-framed record.
pub fn schema_id(bytes: &[u8]) -> Option<u32> {
    match bytes {
        [0, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_id_reads_the_confluent_header() {
        assert_eq!(schema_id(&[0, 0, 0, 1, 2, 9, 9]), Some(258));
        assert_eq!(schema_id(&[1, 0, 0, 0, 1]), None);
        assert_eq!(schema_id(&[0, 0, 0]), None);
    }

    #[test]
    fn registry_failures_are_retried_and_answers_about_the_record_are_not() {
        let status = |s: &str| {
            SRCError::new(
                &format!("HTTP request to schema registry failed with status {s}"),
                None,
                false,
            )
        };
        assert!(registry_side(&status("500 Internal Server Error")));
        assert!(registry_side(&status("504 Gateway Timeout")));
        assert!(registry_side(&status("429 Too Many Requests")));
        assert!(!registry_side(&status("404 Not Found")));
        assert!(!registry_side(&status("401 Unauthorized")));
        assert!(registry_side(&SRCError::new(
            "http call failed",
            None,
            true
        )));
        assert!(registry_side(&SRCError::new(
            "could not parse to RawRegisteredSchema",
            None,
            false
        )));
        assert!(!registry_side(&SRCError::new(
            "Could not parse schema",
            None,
            false
        )));
    }
}
