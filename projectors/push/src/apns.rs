//! APNs: `POST /3/device/<token>` over HTTP/2 (multiplexed on one
//! connection; TLS with ALPN `h2` for `https://`, h2c with prior knowledge
//! for a local `http://` fake) with token-based authentication: an ES256
//! JWT (`kid` = key id, `iss` = team id, `iat`) re-signed before
//! `token_refresh_secs` (Apple refuses tokens older than an hour and
//! re-signing more often than every 20 minutes).
//!
//! Headers: `apns-push-type: alert`, `apns-topic` (bundle id),
//! `apns-priority: 10`, `apns-collapse-id` (the task's collapse key, so a
//! coalesced notification replaces the previous one), `apns-id` (a UUID
//! derived from the dedupe key: the same on every resend). Answers:
//! 200 sent; 410 `Unregistered` and 400 `BadDeviceToken` /
//! `DeviceTokenNotForTopic` remove the token; 403 `ExpiredProviderToken`
//! re-signs and retries; 429 `TooManyRequests` and 5xx retry (honouring
//! `Retry-After`); any other 4xx is dead-lettered with the reason.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use p256::ecdsa::SigningKey;
use serde_json::json;

use crate::config::ApnsConfig;
use crate::jwt::{es256, key_text, now_secs, p256_key};
use crate::{answer, retry_after, transport, Notification, Outcome, PushError};

/// An APNs client (one HTTP/2 connection per origin, shared by every request).
pub struct Apns {
    http: crate::http::Http,
    base: String,
    topic: String,
    team_id: String,
    key_id: String,
    key: SigningKey,
    refresh: Duration,
    token: Mutex<Option<(String, Instant)>>,
}

impl std::fmt::Debug for Apns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Apns")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Apns {
    pub fn new(cfg: &ApnsConfig, timeout: Duration) -> Result<Self, PushError> {
        let key_value = cfg
            .key
            .as_ref()
            .ok_or_else(|| PushError::Config("push.apns.key is not set".into()))?;
        let key = p256_key(&key_text(key_value.expose())?)?;
        Ok(Self {
            // APNs speaks only HTTP/2: prior knowledge for h2c, ALPN h2 over TLS.
            http: crate::http::Http::new(true, timeout)?,
            base: cfg.base_url.trim_end_matches('/').to_string(),
            topic: cfg.topic.clone(),
            team_id: cfg.team_id.clone(),
            key_id: cfg.key_id.clone(),
            key,
            refresh: Duration::from_secs(cfg.token_refresh_secs.clamp(20 * 60, 59 * 60)),
            token: Mutex::new(None),
        })
    }

    /// The current provider token, re-signed when older than the refresh period.
    fn provider_token(&self, force: bool) -> String {
        let mut slot = self.token.lock().unwrap();
        if let Some((t, at)) = slot.as_ref() {
            if !force && at.elapsed() < self.refresh {
                return t.clone();
            }
        }
        let t = es256(
            &json!({"alg": "ES256", "kid": self.key_id}),
            &json!({"iss": self.team_id, "iat": now_secs()}),
            &self.key,
        );
        *slot = Some((t.clone(), Instant::now()));
        t
    }

    /// The JSON payload: `aps` (alert, badge, sound, thread-id) plus the app's data.
    pub fn payload(n: &Notification) -> serde_json::Value {
        let mut aps = json!({
            "alert": {"title": n.title, "body": n.body.clone().unwrap_or_default()},
            "sound": "default",
            "thread-id": n.chat_id.to_string(),
        });
        if let Some(b) = n.badge {
            aps["badge"] = json!(b);
        }
        json!({"aps": aps, "chat": n.data()})
    }

    pub async fn send(&self, n: &Notification) -> Outcome {
        let mut outcome = self.send_once(n, false).await;
        if matches!(&outcome, Outcome::Retry { detail, .. } if detail.contains("ExpiredProviderToken"))
        {
            outcome = self.send_once(n, true).await;
        }
        outcome
    }

    async fn send_once(&self, n: &Notification, fresh_token: bool) -> Outcome {
        let token = n.token.trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Outcome::Unregistered {
                reason: "invalid_token",
                detail: "not a hex APNs device token".into(),
            };
        }
        let url = format!("{}/3/device/{token}", self.base);
        let mut collapse = n.collapse_key.clone();
        collapse.truncate(64);
        let headers = [
            (
                "authorization",
                format!("bearer {}", self.provider_token(fresh_token)),
            ),
            ("apns-push-type", "alert".to_string()),
            ("apns-topic", self.topic.clone()),
            ("apns-priority", "10".to_string()),
            ("apns-collapse-id", collapse),
            ("apns-id", n.stable_id().to_string()),
            ("content-type", "application/json".to_string()),
        ];
        let resp = match self
            .http
            .post(&url, &headers, Self::payload(n).to_string().into_bytes())
            .await
        {
            Ok(r) => r,
            Err(e) => return transport(e),
        };
        let status = resp.status;
        let after = retry_after(&resp.headers);
        let id = resp
            .headers
            .get("apns-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp.body;
        let reason = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("reason").and_then(|r| r.as_str()).map(str::to_string))
            .unwrap_or_default();
        classify(status, &reason, after, id, &body)
    }
}

/// APNs status and `reason` to an [`Outcome`].
pub fn classify(
    status: u16,
    reason: &str,
    after: Option<Duration>,
    id: Option<String>,
    body: &str,
) -> Outcome {
    match (status, reason) {
        (200, _) => Outcome::Sent { status, id },
        (410, _) | (400, "Unregistered") => Outcome::Unregistered {
            reason: "unregistered",
            detail: answer(status, body),
        },
        (400, "BadDeviceToken" | "DeviceTokenNotForTopic") => Outcome::Unregistered {
            reason: "invalid_token",
            detail: answer(status, body),
        },
        (403, "ExpiredProviderToken") | (429, _) | (500..=599, _) => Outcome::Retry {
            after,
            detail: answer(status, body),
        },
        _ => Outcome::Rejected {
            detail: answer(status, body),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_map_to_outcomes() {
        assert!(matches!(
            classify(200, "", None, None, ""),
            Outcome::Sent { .. }
        ));
        assert!(matches!(
            classify(410, "Unregistered", None, None, ""),
            Outcome::Unregistered {
                reason: "unregistered",
                ..
            }
        ));
        assert!(matches!(
            classify(400, "BadDeviceToken", None, None, ""),
            Outcome::Unregistered {
                reason: "invalid_token",
                ..
            }
        ));
        assert!(matches!(
            classify(
                429,
                "TooManyRequests",
                Some(Duration::from_secs(2)),
                None,
                ""
            ),
            Outcome::Retry { after: Some(_), .. }
        ));
        assert!(matches!(
            classify(503, "ServiceUnavailable", None, None, ""),
            Outcome::Retry { .. }
        ));
        assert!(matches!(
            classify(400, "PayloadTooLarge", None, None, ""),
            Outcome::Rejected { .. }
        ));
    }
}
