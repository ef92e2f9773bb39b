//! The worker's configuration (`[push]` in its TOML file, `CHAT_PUSH__*`
//! in the environment). Every provider is off until configured; the local
//! default sends only signed webhooks, which need no provider credentials.

use chat_log::LogConfig;
use chat_projectors::store::StoreConfig;
use chat_runtime::telemetry::LogFormat;
use chat_runtime::Secret;
use serde::{Deserialize, Serialize};

/// The whole `chat-push-worker` config.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    pub log_format: LogFormat,
    pub log: LogConfig,
    /// Cassandra: the sent-markers (table `push_sent`, created at start).
    pub store: StoreConfig,
    pub push: PushConfig,
    /// `host:port` of /health and /metrics; unset: not served.
    pub listen: Option<std::net::SocketAddr>,
}

impl chat_runtime::ServiceConfig for WorkerConfig {
    fn log_format(&self) -> LogFormat {
        self.log_format
    }
    fn validate(&self) -> Result<(), String> {
        self.store.check()?;
        self.push.validate()
    }
}

/// Providers, retries and the worker's consumer.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// Consumer group on `chat.push` and the retry topic.
    pub group_id: String,
    /// Records handed to one batch (sent concurrently).
    pub max_batch: usize,
    /// Requests in flight at once (all providers together).
    pub concurrency: usize,
    /// First retry delay; doubles per attempt, full jitter.
    pub retry_base_ms: u64,
    /// Cap of one retry delay (and of a honoured `Retry-After`).
    pub retry_max_ms: u64,
    /// Attempts before a task that keeps failing is dead-lettered.
    pub max_attempts: u32,
    /// Timeout of one provider request.
    pub request_timeout_ms: u64,
    pub apns: ApnsConfig,
    pub fcm: FcmConfig,
    pub webpush: WebPushConfig,
    pub webhook: WebhookConfig,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            group_id: "chat-push-worker".into(),
            max_batch: 256,
            concurrency: 64,
            retry_base_ms: 1_000,
            retry_max_ms: 300_000,
            max_attempts: 12,
            request_timeout_ms: 10_000,
            apns: ApnsConfig::default(),
            fcm: FcmConfig::default(),
            webpush: WebPushConfig::default(),
            webhook: WebhookConfig::default(),
        }
    }
}

impl PushConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_batch == 0 || self.concurrency == 0 || self.max_attempts == 0 {
            return Err(
                "push.max_batch, push.concurrency and push.max_attempts must be > 0".into(),
            );
        }
        if self.apns.enabled
            && (self.apns.key.is_none()
                || self.apns.key_id.is_empty()
                || self.apns.team_id.is_empty()
                || self.apns.topic.is_empty())
        {
            return Err("push.apns.enabled needs push.apns.key, key_id, team_id and topic".into());
        }
        if self.fcm.enabled && self.fcm.service_account.is_none() {
            return Err("push.fcm.enabled needs push.fcm.service_account".into());
        }
        if self.webpush.enabled
            && (self.webpush.vapid_private_key.is_none() || self.webpush.vapid_subject.is_empty())
        {
            return Err(
                "push.webpush.enabled needs push.webpush.vapid_private_key and vapid_subject"
                    .into(),
            );
        }
        if self.webhook.enabled && self.webhook.secret.is_none() {
            return Err("push.webhook.enabled needs push.webhook.secret".into());
        }
        Ok(())
    }
}

/// Apple Push Notification service, token-based authentication.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApnsConfig {
    pub enabled: bool,
    /// `https://api.push.apple.com` (production), `https://api.sandbox.push.apple.com`,
    /// or a local `http://` fake (HTTP/2 without TLS, prior knowledge).
    pub base_url: String,
    /// Team id (the JWT's `iss`).
    pub team_id: String,
    /// Key id (the JWT's `kid`).
    pub key_id: String,
    /// The `.p8` signing key: PEM inline, or `@/path/to/AuthKey.p8`.
    #[serde(skip_serializing)]
    pub key: Option<Secret>,
    /// The app's bundle id (`apns-topic`).
    pub topic: String,
    /// Provider token lifetime before it is re-signed (Apple: at most 60
    /// minutes, no more often than every 20).
    pub token_refresh_secs: u64,
}

impl Default for ApnsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            base_url: "https://api.push.apple.com".into(),
            team_id: String::new(),
            key_id: String::new(),
            key: None,
            topic: String::new(),
            token_refresh_secs: 50 * 60,
        }
    }
}

/// Firebase Cloud Messaging, HTTP v1 API.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FcmConfig {
    pub enabled: bool,
    /// `https://fcm.googleapis.com`, or a local fake.
    pub base_url: String,
    /// OAuth2 token endpoint; empty: the service account's `token_uri`.
    pub token_url: String,
    /// Project id; empty: the service account's `project_id`.
    pub project_id: String,
    /// The service-account JSON key: inline, or `@/path/to/key.json`.
    #[serde(skip_serializing)]
    pub service_account: Option<Secret>,
}

impl Default for FcmConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            base_url: "https://fcm.googleapis.com".into(),
            token_url: String::new(),
            project_id: String::new(),
            service_account: None,
        }
    }
}

/// Web Push (the endpoint comes from each subscription).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebPushConfig {
    pub enabled: bool,
    /// The VAPID private key: base64url of the 32-byte scalar, a PEM, or `@path`.
    #[serde(skip_serializing)]
    pub vapid_private_key: Option<Secret>,
    /// `mailto:` or `https:` contact (the VAPID JWT's `sub`).
    pub vapid_subject: String,
    /// `TTL` header: seconds the push service keeps an undelivered message.
    pub ttl_secs: u64,
}

impl Default for WebPushConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            vapid_private_key: None,
            vapid_subject: String::new(),
            ttl_secs: 86_400,
        }
    }
}

/// Signed webhooks (the URL is the registration's token).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    pub enabled: bool,
    /// The HMAC-SHA256 key receivers verify with.
    #[serde(skip_serializing)]
    pub secret: Option<Secret>,
}
