//! Web Push: RFC 8030 delivery (`POST` to the subscription's endpoint with
//! `TTL`, `Urgency`, `Topic`), the payload encrypted per RFC 8291
//! (`Content-Encoding: aes128gcm`: ECDH P-256 with the subscription's
//! `p256dh`, HKDF-SHA256 keyed by its `auth` secret, AES-128-GCM, one
//! record), authenticated with VAPID (RFC 8292: `Authorization: vapid
//! t=<ES256 JWT with aud = the endpoint's origin>, k=<public key>`).
//!
//! Answers: 200/201/202 sent; 404 and 410 remove the subscription; 429 and
//! 5xx retry (honouring `Retry-After`); other 4xx (400, 403 VAPID refused,
//! 413 too large) are dead-lettered.

use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes128Gcm, Nonce};
use hkdf::Hkdf;
use p256::ecdsa::SigningKey;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::PublicKey;
use rand_core::{OsRng, RngCore};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::config::WebPushConfig;
use crate::jwt::{b64url, b64url_decode, es256, key_text, now_secs, p256_key, public_point};
use crate::{answer, retry_after, transport, Notification, Outcome, PushError};

/// Record size written in the header; one record holds the whole payload.
const RECORD_SIZE: u32 = 4096;
/// Largest plaintext that fits one record (RFC 8291 §4: 4096 - 16 tag - 1 delimiter - 86 header).
pub const MAX_PLAINTEXT: usize = 3993;

/// A subscription as the browser's `PushSubscription.toJSON()` gives it.
#[derive(Clone, Debug, Deserialize)]
pub struct Subscription {
    pub endpoint: String,
    pub keys: SubscriptionKeys,
}

#[derive(Clone, Debug, Deserialize)]
pub struct SubscriptionKeys {
    pub p256dh: String,
    pub auth: String,
}

/// A Web Push sender with its VAPID key.
pub struct WebPush {
    http: crate::http::Http,
    vapid: SigningKey,
    vapid_public: String,
    subject: String,
    ttl: u64,
}

impl std::fmt::Debug for WebPush {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebPush")
            .field("vapid_public", &self.vapid_public)
            .finish_non_exhaustive()
    }
}

/// RFC 8291 encryption of `plaintext` for the user agent key `ua_public`
/// (65-byte uncompressed point) and `auth` secret, with the given ephemeral
/// key and salt (random in [`encrypt`]; fixed in tests).
pub fn encrypt_with(
    plaintext: &[u8],
    ua_public: &[u8],
    auth: &[u8],
    as_secret: &p256::SecretKey,
    salt: [u8; 16],
) -> Result<Vec<u8>, PushError> {
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(PushError::BadTask(format!(
            "Web Push payload of {} bytes is over {MAX_PLAINTEXT}",
            plaintext.len()
        )));
    }
    let ua = PublicKey::from_sec1_bytes(ua_public)
        .map_err(|_| PushError::BadTask("subscription p256dh is not a P-256 point".into()))?;
    let as_public = as_secret.public_key().to_encoded_point(false);
    let shared = p256::ecdh::diffie_hellman(as_secret.to_nonzero_scalar(), ua.as_affine());
    // IKM = HKDF(salt = auth, ikm = ecdh, info = "WebPush: info" 0 ua_public as_public, 32)
    let mut key_info = b"WebPush: info\0".to_vec();
    key_info.extend_from_slice(ua_public);
    key_info.extend_from_slice(as_public.as_bytes());
    let mut ikm = [0u8; 32];
    Hkdf::<Sha256>::new(Some(auth), shared.raw_secret_bytes())
        .expand(&key_info, &mut ikm)
        .map_err(|_| PushError::BadTask("hkdf".into()))?;
    let prk = Hkdf::<Sha256>::new(Some(&salt), &ikm);
    let mut cek = [0u8; 16];
    let mut nonce = [0u8; 12];
    prk.expand(b"Content-Encoding: aes128gcm\0", &mut cek)
        .and_then(|_| prk.expand(b"Content-Encoding: nonce\0", &mut nonce))
        .map_err(|_| PushError::BadTask("hkdf".into()))?;
    // One record, the last: plaintext then the 0x02 delimiter, no padding.
    let mut record = plaintext.to_vec();
    record.push(2);
    let cipher =
        Aes128Gcm::new_from_slice(&cek).map_err(|_| PushError::BadTask("aes key".into()))?;
    let sealed = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &record,
                aad: b"",
            },
        )
        .map_err(|_| PushError::BadTask("aes-gcm".into()))?;
    let mut out = Vec::with_capacity(86 + sealed.len());
    out.extend_from_slice(&salt);
    out.extend_from_slice(&RECORD_SIZE.to_be_bytes());
    out.push(as_public.len() as u8);
    out.extend_from_slice(as_public.as_bytes());
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// RFC 8291 encryption with a fresh ephemeral key and salt.
pub fn encrypt(plaintext: &[u8], ua_public: &[u8], auth: &[u8]) -> Result<Vec<u8>, PushError> {
    let secret = p256::SecretKey::random(&mut OsRng);
    let mut salt = [0u8; 16];
    OsRng.fill_bytes(&mut salt);
    encrypt_with(plaintext, ua_public, auth, &secret, salt)
}

/// `Topic` must be at most 32 characters of the base64url alphabet.
pub fn topic_of(collapse_key: &str) -> String {
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if !collapse_key.is_empty() && collapse_key.len() <= 32 && collapse_key.chars().all(ok) {
        return collapse_key.to_string();
    }
    let simple: String = collapse_key.chars().filter(|&c| c != '-').collect();
    if !simple.is_empty() && simple.len() <= 32 && simple.chars().all(ok) {
        return simple; // a UUID without its hyphens
    }
    b64url(&Sha256::digest(collapse_key.as_bytes()))[..32].to_string()
}

/// `scheme://host[:port]` of an endpoint: the VAPID `aud`.
pub fn origin_of(endpoint: &str) -> Option<String> {
    let (scheme, rest) = endpoint.split_once("://")?;
    let host = rest.split(['/', '?', '#']).next()?;
    (!host.is_empty()).then(|| format!("{scheme}://{host}"))
}

impl WebPush {
    pub fn new(cfg: &WebPushConfig, timeout: Duration) -> Result<Self, PushError> {
        let key = cfg
            .vapid_private_key
            .as_ref()
            .ok_or_else(|| PushError::Config("push.webpush.vapid_private_key is not set".into()))?;
        let vapid = p256_key(&key_text(key.expose())?)?;
        Ok(Self {
            http: crate::http::Http::new(false, timeout)?,
            vapid_public: b64url(&public_point(&vapid)),
            vapid,
            subject: cfg.vapid_subject.clone(),
            ttl: cfg.ttl_secs,
        })
    }

    /// The VAPID public key (base64url), the `applicationServerKey` a browser subscribes with.
    pub fn vapid_public_key(&self) -> &str {
        &self.vapid_public
    }

    /// What the service worker receives (JSON).
    pub fn payload(n: &Notification) -> serde_json::Value {
        json!({"title": n.title, "body": n.body, "data": n.data()})
    }

    pub async fn send(&self, n: &Notification) -> Outcome {
        let sub: Subscription = match serde_json::from_str(&n.token) {
            Ok(s) => s,
            Err(e) => {
                return Outcome::Unregistered {
                    reason: "invalid_token",
                    detail: format!("malformed Web Push subscription: {e}"),
                }
            }
        };
        let keys =
            b64url_decode(&sub.keys.p256dh).and_then(|p| Ok((p, b64url_decode(&sub.keys.auth)?)));
        let body = match keys
            .and_then(|(p, a)| encrypt(Self::payload(n).to_string().as_bytes(), &p, &a))
        {
            Ok(b) => b,
            Err(PushError::BadTask(why)) if why.contains("over") => {
                return Outcome::Rejected { detail: why }
            }
            Err(e) => {
                return Outcome::Unregistered {
                    reason: "invalid_token",
                    detail: e.to_string(),
                }
            }
        };
        let Some(aud) = origin_of(&sub.endpoint) else {
            return Outcome::Unregistered {
                reason: "invalid_token",
                detail: "subscription endpoint is not a URL".into(),
            };
        };
        let jwt = es256(
            &json!({"typ": "JWT", "alg": "ES256"}),
            &json!({"aud": aud, "exp": now_secs() + 12 * 3600, "sub": self.subject}),
            &self.vapid,
        );
        let urgency = if matches!(n.kind.as_deref(), Some("mention" | "direct")) {
            "high"
        } else {
            "normal"
        };
        let headers = [
            (
                "authorization",
                format!("vapid t={jwt}, k={}", self.vapid_public),
            ),
            ("content-encoding", "aes128gcm".to_string()),
            ("content-type", "application/octet-stream".to_string()),
            ("ttl", self.ttl.to_string()),
            ("urgency", urgency.to_string()),
            ("topic", topic_of(&n.collapse_key)),
        ];
        let resp = match self.http.post(&sub.endpoint, &headers, body).await {
            Ok(r) => r,
            Err(e) => return transport(e),
        };
        let status = resp.status;
        let after = retry_after(&resp.headers);
        let id = resp
            .headers
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = resp.body;
        match status {
            200..=202 => Outcome::Sent { status, id },
            404 | 410 => Outcome::Unregistered {
                reason: "unregistered",
                detail: answer(status, &text),
            },
            429 | 500..=599 => Outcome::Retry {
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
    use super::*;
    use base64::Engine;

    fn b64(s: &str) -> Vec<u8> {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .unwrap()
    }

    /// RFC 8291 Appendix A: the exact message from the example keys and salt.
    #[test]
    fn rfc8291_example() {
        let plaintext = b"When I grow up, I want to be a watermelon";
        let as_private = b64("yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw");
        let ua_public = b64("BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4");
        let auth = b64("BTBZMqHH6r4Tts7J_aSIgg");
        let salt: [u8; 16] = b64("DGv6ra1nlYgDCS1FRnbzlw").try_into().unwrap();
        let expected = b64("DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN");
        let secret = p256::SecretKey::from_slice(&as_private).unwrap();
        let out = encrypt_with(plaintext, &ua_public, &auth, &secret, salt).unwrap();
        assert_eq!(b64url(&out), b64url(&expected));
    }

    #[test]
    fn topics_fit_the_alphabet() {
        assert_eq!(
            topic_of("0e1f2a3b-0000-4000-8000-000000000001"),
            "0e1f2a3b000040008000000000000001"
        );
        assert_eq!(topic_of("short_key").len(), 9);
        assert_eq!(
            topic_of("a key with spaces and more than thirty two characters").len(),
            32
        );
        assert_eq!(
            origin_of("https://push.example.net:8443/wpush/v2/abc"),
            Some("https://push.example.net:8443".into())
        );
    }
}
