//! `chat-push-send`: the sending half of push notifications (issue 12).
//!
//! What this crate owns:
//! - the providers, one module each, speaking the real wire protocols:
//!   [`apns`] (HTTP/2, ES256 provider token), [`fcm`] (HTTP v1, OAuth2
//!   service-account grant), [`webpush`] (RFC 8030 + RFC 8291 `aes128gcm` +
//!   RFC 8292 VAPID) and [`webhook`] (HMAC-SHA256 signed JSON). Each turns a
//!   [`Notification`] into one request and the provider's answer into an
//!   [`Outcome`]; base URLs are configuration, so the tests run this code
//!   unchanged against local fakes;
//! - [`retry`]: the backoff schedule (exponential, full jitter, `Retry-After`
//!   honoured);
//! - [`marker`]: the sent-markers in Cassandra (one row per dedupe key);
//! - [`worker`]: the consumer group on `chat.push` and its retry topic that
//!   sends, re-appends retries as records, removes dead tokens through a
//!   `PushRegistrationChanged` event and dead-letters what fails for good.
//!
//! Not owned here: deciding who gets a push (the push projector, push-core)
//! and the registrations table (projected from `chat.sessions`).
#![forbid(unsafe_code)]

pub mod apns;
pub mod config;
pub mod fcm;
pub mod http;
pub mod jwt;
pub mod marker;
pub mod retry;
pub mod task;
pub mod webhook;
pub mod webpush;
pub mod worker;

pub use config::PushConfig;
pub use task::Notification;

use std::time::Duration;

/// What a provider said about one notification.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Accepted (2xx). `id`: the provider's message id when it gives one
    /// (APNs `apns-id`, FCM message name).
    Sent { status: u16, id: Option<String> },
    /// Try again later (429, 5xx, transport failure); `after`: the
    /// provider's `Retry-After`, when it sent one.
    Retry {
        after: Option<Duration>,
        detail: String,
    },
    /// The token is dead: remove the registration (`reason` is
    /// `unregistered` or `invalid_token`) and never try it again.
    Unregistered {
        reason: &'static str,
        detail: String,
    },
    /// Refused for good (other 4xx): dead-letter with the provider's answer.
    Rejected { detail: String },
}

/// Failures before a request could be made (bad configuration, a task
/// the provider cannot express). Transport failures are [`Outcome::Retry`].
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("push configuration: {0}")]
    Config(String),
    #[error("provider {0} is not enabled on this worker")]
    Disabled(String),
    #[error("bad task: {0}")]
    BadTask(String),
    #[error("key: {0}")]
    Key(String),
}

/// `Retry-After` as seconds (RFC 9110 also allows an HTTP date: treated as absent).
pub(crate) fn retry_after(headers: &hyper::header::HeaderMap) -> Option<Duration> {
    headers
        .get(hyper::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// The outcome of a transport failure (connect, reset, timeout): retried.
pub(crate) fn transport(e: http::TransportError) -> Outcome {
    Outcome::Retry {
        after: None,
        detail: format!("transport: {e}"),
    }
}

/// `status body`, the body cut to 500 bytes, for `dlq.error` and logs.
pub(crate) fn answer(status: u16, body: &str) -> String {
    let mut b = body.trim().to_string();
    if b.len() > 500 {
        let mut cut = 500;
        while !b.is_char_boundary(cut) {
            cut -= 1;
        }
        b.truncate(cut);
    }
    format!("{status} {b}")
}
