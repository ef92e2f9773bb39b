//! FCM HTTP v1: `POST /v1/projects/<project>/messages:send` with an OAuth2
//! access token from the service account (an RS256 JWT assertion, grant
//! type `urn:ietf:params:oauth:grant-type:jwt-bearer`, scope
//! `firebase.messaging`, against the token endpoint; cached until a minute
//! before it expires, fetched again after a 401).
//!
//! Answers: 200 sent (the message `name` is FCM's id); 404 / `UNREGISTERED`
//! and `SENDER_ID_MISMATCH` remove the token; 429 / `QUOTA_EXCEEDED` and
//! 5xx retry (honouring `Retry-After`); `INVALID_ARGUMENT` (400) and other
//! 4xx are dead-lettered with FCM's answer.

use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;
use tokio::sync::Mutex;

use crate::config::FcmConfig;
use crate::jwt::{key_text, now_secs, rsa_key};
use crate::{answer, retry_after, transport, Notification, Outcome, PushError};

const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
const GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

#[derive(Deserialize)]
struct ServiceAccount {
    client_email: String,
    private_key: String,
    #[serde(default)]
    token_uri: String,
    #[serde(default)]
    project_id: String,
}

/// An FCM HTTP v1 client.
pub struct Fcm {
    http: crate::http::Http,
    send_url: String,
    token_url: String,
    client_email: String,
    key: jsonwebtoken::EncodingKey,
    token: Mutex<Option<(String, Instant)>>,
}

impl std::fmt::Debug for Fcm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fcm")
            .field("send_url", &self.send_url)
            .finish_non_exhaustive()
    }
}

impl Fcm {
    pub fn new(cfg: &FcmConfig, timeout: Duration) -> Result<Self, PushError> {
        let sa = cfg
            .service_account
            .as_ref()
            .ok_or_else(|| PushError::Config("push.fcm.service_account is not set".into()))?;
        let sa: ServiceAccount = serde_json::from_str(&key_text(sa.expose())?).map_err(|e| {
            PushError::Config(format!(
                "push.fcm.service_account is not a service-account JSON: {e}"
            ))
        })?;
        let project = if cfg.project_id.is_empty() {
            sa.project_id.clone()
        } else {
            cfg.project_id.clone()
        };
        if project.is_empty() {
            return Err(PushError::Config("push.fcm.project_id is not set".into()));
        }
        let token_url = if !cfg.token_url.is_empty() {
            cfg.token_url.clone()
        } else if !sa.token_uri.is_empty() {
            sa.token_uri.clone()
        } else {
            "https://oauth2.googleapis.com/token".into()
        };
        Ok(Self {
            http: crate::http::Http::new(false, timeout)?,
            send_url: format!(
                "{}/v1/projects/{project}/messages:send",
                cfg.base_url.trim_end_matches('/')
            ),
            token_url,
            client_email: sa.client_email,
            key: rsa_key(&sa.private_key)?,
            token: Mutex::new(None),
        })
    }

    /// A valid access token (cached until a minute before its expiry).
    async fn access_token(&self, force: bool) -> Result<String, Outcome> {
        let mut slot = self.token.lock().await;
        if let Some((t, until)) = slot.as_ref() {
            if !force && Instant::now() < *until {
                return Ok(t.clone());
            }
        }
        let iat = now_secs();
        let claims = json!({
            "iss": self.client_email, "scope": SCOPE, "aud": self.token_url,
            "iat": iat, "exp": iat + 3600,
        });
        let assertion = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &claims,
            &self.key,
        )
        .map_err(|e| Outcome::Rejected {
            detail: format!("cannot sign the OAuth2 assertion: {e}"),
        })?;
        // Both values are URL-safe except the grant's colons.
        let form = format!(
            "grant_type={}&assertion={assertion}",
            GRANT.replace(':', "%3A")
        );
        let headers = [(
            "content-type",
            "application/x-www-form-urlencoded".to_string(),
        )];
        let resp = self
            .http
            .post(&self.token_url, &headers, form.into_bytes())
            .await
            .map_err(transport)?;
        let status = resp.status;
        let after = retry_after(&resp.headers);
        let body = resp.body;
        if status != 200 {
            let detail = format!("OAuth2 token endpoint: {}", answer(status, &body));
            return Err(if status == 429 || status >= 500 {
                Outcome::Retry { after, detail }
            } else {
                // A refused service account refuses every task: retried (and
                // alerted on in the logs), not dead-lettered task by task.
                Outcome::Retry {
                    after: Some(Duration::from_secs(30)),
                    detail,
                }
            });
        }
        #[derive(Deserialize)]
        struct TokenAnswer {
            access_token: String,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let t: TokenAnswer = serde_json::from_str(&body).map_err(|e| Outcome::Retry {
            after: None,
            detail: format!("OAuth2 token endpoint answered no token: {e}"),
        })?;
        let life = Duration::from_secs(t.expires_in.unwrap_or(3600).saturating_sub(60).max(1));
        *slot = Some((t.access_token.clone(), Instant::now() + life));
        Ok(t.access_token)
    }

    /// The `message` of the v1 API.
    pub fn message(n: &Notification) -> serde_json::Value {
        let data: serde_json::Map<String, serde_json::Value> = n
            .data()
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, v)| !v.is_null())
            // FCM data values must be strings.
            .map(|(k, v)| {
                (
                    k.clone(),
                    json!(v
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string())),
                )
            })
            .collect();
        let mut android_notification =
            json!({"tag": n.collapse_key, "notification_count": n.count});
        if let Some(b) = n.badge {
            android_notification["notification_count"] = json!(b);
        }
        json!({"message": {
            "token": n.token,
            "notification": {"title": n.title, "body": n.body.clone().unwrap_or_default()},
            "data": data,
            "android": {"collapse_key": n.collapse_key, "priority": "high", "notification": android_notification},
        }})
    }

    pub async fn send(&self, n: &Notification) -> Outcome {
        let mut outcome = self.send_once(n, false).await;
        if matches!(&outcome, Outcome::Retry { detail, .. } if detail.starts_with("401")) {
            outcome = self.send_once(n, true).await;
        }
        outcome
    }

    async fn send_once(&self, n: &Notification, fresh_token: bool) -> Outcome {
        let token = match self.access_token(fresh_token).await {
            Ok(t) => t,
            Err(o) => return o,
        };
        let headers = [
            ("authorization", format!("Bearer {token}")),
            ("content-type", "application/json".to_string()),
        ];
        let resp = match self
            .http
            .post(
                &self.send_url,
                &headers,
                Self::message(n).to_string().into_bytes(),
            )
            .await
        {
            Ok(r) => r,
            Err(e) => return transport(e),
        };
        let status = resp.status;
        let after = retry_after(&resp.headers);
        let body = resp.body;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if status == 200 {
            let id = v.get("name").and_then(|x| x.as_str()).map(str::to_string);
            return Outcome::Sent { status, id };
        }
        let error_code = v["error"]["details"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|d| d.get("errorCode").and_then(|c| c.as_str()))
            .or_else(|| v["error"]["status"].as_str())
            .unwrap_or_default()
            .to_string();
        classify(status, &error_code, after, &body)
    }
}

/// FCM status and error code to an [`Outcome`].
pub fn classify(status: u16, code: &str, after: Option<Duration>, body: &str) -> Outcome {
    let detail = answer(status, body);
    match (status, code) {
        (404, _) | (_, "UNREGISTERED") => Outcome::Unregistered {
            reason: "unregistered",
            detail,
        },
        (_, "SENDER_ID_MISMATCH") => Outcome::Unregistered {
            reason: "invalid_token",
            detail,
        },
        (401, _)
        | (429, _)
        | (500..=599, _)
        | (_, "QUOTA_EXCEEDED" | "UNAVAILABLE" | "INTERNAL") => Outcome::Retry { after, detail },
        _ => Outcome::Rejected { detail },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_map_to_outcomes() {
        assert!(matches!(
            classify(404, "UNREGISTERED", None, ""),
            Outcome::Unregistered { .. }
        ));
        assert!(matches!(
            classify(429, "QUOTA_EXCEEDED", None, ""),
            Outcome::Retry { .. }
        ));
        assert!(matches!(classify(503, "", None, ""), Outcome::Retry { .. }));
        assert!(matches!(
            classify(400, "INVALID_ARGUMENT", None, ""),
            Outcome::Rejected { .. }
        ));
    }
}
