//! [`Notification`]: one push task as the providers see it, provider-independent.
//! Built from a `chat.v1.PushTask` on `chat.push` (see [`crate::worker`]).

use serde::Serialize;
use uuid::Uuid;

/// One notification to one device: the fields of a `PushTask` a provider needs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Notification {
    pub user_id: String,
    pub device_id: String,
    /// `apns` | `fcm` | `webpush` | `webhook`.
    pub provider: String,
    /// Device token, FCM registration token, webhook URL, or the Web Push
    /// subscription JSON.
    pub token: String,
    pub chat_id: Uuid,
    pub seq: u64,
    pub title: String,
    pub body: Option<String>,
    pub locale: Option<String>,
    /// Messages coalesced into this notification (>= 1).
    pub count: u32,
    pub badge: Option<u32>,
    /// Same for every notification of one (chat, device) burst stream.
    pub collapse_key: String,
    /// `<chat_id>:<seq>:<device_id>`: the idempotency key.
    pub dedupe_key: String,
    pub sender_id: Option<String>,
    /// `message` | `mention` | `direct`.
    pub kind: Option<String>,
    /// When the projector made the task (ms since epoch).
    pub created_ts: Option<i64>,
    /// Delivery attempt, from 1.
    pub attempt: u32,
}

impl Notification {
    /// The dedupe key the platform uses: `<chat_id>:<seq>:<device_id>`.
    pub fn dedupe_key_of(chat_id: Uuid, seq: u64, device_id: &str) -> String {
        format!("{chat_id}:{seq}:{device_id}")
    }

    /// A stable UUID for this notification (v5 of the dedupe key): the
    /// APNs `apns-id`, the same on every resend so a resend is recognisable.
    pub fn stable_id(&self) -> Uuid {
        Uuid::new_v5(
            &Uuid::NAMESPACE_URL,
            format!("chat-push:{}", self.dedupe_key).as_bytes(),
        )
    }

    /// The JSON the webhook posts and the app-data part of the other payloads.
    pub fn data(&self) -> serde_json::Value {
        serde_json::json!({
            "chat_id": self.chat_id.to_string(),
            "seq": self.seq,
            "count": self.count,
            "badge": self.badge,
            "kind": self.kind,
            "sender_id": self.sender_id,
            "dedupe_key": self.dedupe_key,
            "created_ts": self.created_ts,
        })
    }
}
