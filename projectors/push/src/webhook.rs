//! Signed webhooks for integrators and bots: `POST <url>` (the url is the
//! registration's token) with a JSON body and
//!
//! - `X-Chat-Timestamp`: Unix seconds when the request was signed;
//! - `X-Chat-Signature`: `v1=` + lowercase hex of
//!   `HMAC-SHA256(secret, "<timestamp>.<body>")`;
//! - `X-Chat-Dedupe-Key` (and `Idempotency-Key`): `<chat_id>:<seq>:<device_id>`,
//!   the same on a resend.
//!
//! A receiver recomputes the HMAC over the exact body bytes, compares in
//! constant time, refuses timestamps more than 5 minutes away from its
//! clock (replays), and drops a dedupe key it has already handled
//! (README.md "Push notifications" has the recipe).
//!
//! Answers: 2xx sent; 410 removes the registration; 408, 429 and 5xx retry
//! (honouring `Retry-After`); other 4xx are dead-lettered.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::WebhookConfig;
use crate::jwt::now_secs;
use crate::{answer, retry_after, transport, Notification, Outcome, PushError};

pub const HEADER_TIMESTAMP: &str = "x-chat-timestamp";
pub const HEADER_SIGNATURE: &str = "x-chat-signature";
pub const HEADER_DEDUPE_KEY: &str = "x-chat-dedupe-key";

/// The webhook sender.
pub struct Webhook {
    http: crate::http::Http,
    secret: Vec<u8>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook").finish_non_exhaustive()
    }
}

/// `v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    format!("v1={hex}")
}

impl Webhook {
    pub fn new(cfg: &WebhookConfig, timeout: Duration) -> Result<Self, PushError> {
        let secret = cfg
            .secret
            .as_ref()
            .ok_or_else(|| PushError::Config("push.webhook.secret is not set".into()))?;
        Ok(Self {
            http: crate::http::Http::new(false, timeout)?,
            secret: secret.expose().as_bytes().to_vec(),
        })
    }

    /// The JSON body.
    pub fn body(n: &Notification) -> serde_json::Value {
        serde_json::json!({
            "type": "push",
            "user_id": n.user_id,
            "device_id": n.device_id,
            "chat_id": n.chat_id.to_string(),
            "seq": n.seq,
            "title": n.title,
            "body": n.body,
            "locale": n.locale,
            "count": n.count,
            "badge": n.badge,
            "kind": n.kind,
            "sender_id": n.sender_id,
            "collapse_key": n.collapse_key,
            "dedupe_key": n.dedupe_key,
            "created_ts": n.created_ts,
            "attempt": n.attempt,
        })
    }

    pub async fn send(&self, n: &Notification) -> Outcome {
        let url = n.token.trim();
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Outcome::Unregistered {
                reason: "invalid_token",
                detail: "webhook token is not an http(s) URL".into(),
            };
        }
        let body = Self::body(n).to_string().into_bytes();
        let ts = now_secs();
        let headers = [
            ("content-type", "application/json".to_string()),
            (HEADER_TIMESTAMP, ts.to_string()),
            (HEADER_SIGNATURE, signature(&self.secret, ts, &body)),
            (HEADER_DEDUPE_KEY, n.dedupe_key.clone()),
            ("idempotency-key", n.dedupe_key.clone()),
        ];
        let resp = match self.http.post(url, &headers, body).await {
            Ok(r) => r,
            Err(e) => return transport(e),
        };
        let status = resp.status;
        let after = retry_after(&resp.headers);
        let text = resp.body;
        match status {
            200..=299 => Outcome::Sent { status, id: None },
            410 => Outcome::Unregistered {
                reason: "unregistered",
                detail: answer(status, &text),
            },
            408 | 429 | 500..=599 => Outcome::Retry {
                after,
                detail: answer(status, &text),
            },
            _ => Outcome::Rejected {
                detail: answer(status, &text),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Python: hmac.new(b"key", b"1700000000.{}", hashlib.sha256).hexdigest()
        let s = super::signature(b"key", 1_700_000_000, b"{}");
        assert!(s.starts_with("v1=") && s.len() == 3 + 64);
        assert_ne!(s, super::signature(b"key", 1_700_000_001, b"{}"));
    }
}
