//! One decoded `chat.events` record as one row of the export.
//!
//! Columns (the contract is in `schemas/README.md`, "Analytics contract"):
//! the Kafka position (`kafka_partition`, `kafka_offset`), the envelope's
//! fields (`event_id`, `chat_id`, `seq`, `sender_user`, `sender_device`,
//! `client_msg_id`, `client_ts`, `server_ts`, `sequenced_ts`, `trace_id`),
//! `event_type` (the body's record name), `schema_id` (the writer schema's
//! registry id), a few body fields that analysts filter on (`text`,
//! `target_seq`, `up_to_seq`, `member_user`) and `body_json`, the whole
//! event record as JSON (what history stores too).

use chat_log::ConsumedEvent;
use chat_schemas::Body;

/// One exported event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportRow {
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    pub event_id: String,
    pub chat_id: Option<String>,
    pub seq: Option<i64>,
    pub event_type: String,
    pub sender_user: String,
    pub sender_device: String,
    pub client_msg_id: Option<String>,
    /// Milliseconds since the epoch (Parquet `TIMESTAMP(MILLIS, UTC)`).
    pub client_ts: Option<i64>,
    pub server_ts: i64,
    pub sequenced_ts: Option<i64>,
    pub trace_id: String,
    pub schema_id: i32,
    /// `MessageSent.text`, `MessageEdited.text`.
    pub text: Option<String>,
    /// `MessageEdited`, `MessageDeleted`, `ReactionChanged`: the message
    /// concerned; `MessageSent`: the message replied to.
    pub target_seq: Option<i64>,
    /// `ReadReceipt`, `DeliveryReceipt`: the pointer's new value.
    pub up_to_seq: Option<i64>,
    /// `MemberAdded`, `MemberRemoved`, `MemberRoleChanged`: the member.
    pub member_user: Option<String>,
    /// The event record as JSON (field names as in its `.avsc`).
    pub body_json: String,
}

fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl ExportRow {
    /// The row of one decoded record.
    pub fn of(event: &ConsumedEvent) -> Self {
        let e = &event.envelope;
        let (mut text, mut target_seq, mut up_to_seq, mut member_user) = (None, None, None, None);
        match &e.body {
            Body::MessageSent(m) => {
                text = m.text.clone();
                target_seq = m.reply_to_seq.map(signed);
            }
            Body::MessageEdited(m) => {
                text = Some(m.text.clone());
                target_seq = Some(signed(m.target_seq));
            }
            Body::MessageDeleted(m) => target_seq = Some(signed(m.target_seq)),
            Body::ReactionChanged(m) => target_seq = Some(signed(m.target_seq)),
            Body::ReadReceipt(r) => up_to_seq = Some(signed(r.up_to_seq)),
            Body::DeliveryReceipt(r) => up_to_seq = Some(signed(r.up_to_seq)),
            Body::MemberAdded(m) => member_user = Some(m.user_id.clone()),
            Body::MemberRemoved(m) => member_user = Some(m.user_id.clone()),
            Body::MemberRoleChanged(m) => member_user = Some(m.user_id.clone()),
            _ => {}
        }
        Self {
            kafka_partition: event.partition,
            kafka_offset: event.offset,
            event_id: e.event_id.to_string(),
            chat_id: e.chat_id.map(|c| c.to_string()),
            seq: e.seq.map(signed),
            event_type: e.body.kind().to_string(),
            sender_user: e.sender_user.clone(),
            sender_device: e.sender_device.clone(),
            client_msg_id: e.client_msg_id.clone(),
            client_ts: e.client_ts,
            server_ts: e.server_ts,
            sequenced_ts: e.sequenced_ts,
            trace_id: e.trace_id.clone(),
            schema_id: i32::try_from(event.schema_id).unwrap_or(i32::MAX),
            text,
            target_seq,
            up_to_seq,
            member_user,
            body_json: e.body.record_json(),
        }
    }

    /// The time that places the row in a date and hour: when it was
    /// sequenced, or (never on `chat.events`) accepted by the gateway.
    pub fn event_time_ms(&self) -> i64 {
        self.sequenced_ts.unwrap_or(self.server_ts)
    }
}
