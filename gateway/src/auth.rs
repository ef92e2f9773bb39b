//! Who is connecting: JWT verification at the WebSocket upgrade, the device
//! id rules, the Origin allow-list and the development token minting.
//!
//! Accepted tokens: HS256 with the configured shared secret (development,
//! `/dev/login`), and RS256 / ES256 whose key is in the configured JWKS file
//! (chosen by the header's `kid`; without a `kid`, the only key of that
//! algorithm). Anything else (`alg: none`, another algorithm, a bad
//! signature, an expired token, a missing `sub` or `exp`) is refused before
//! the upgrade. The user is `sub`; the device is the `device` claim or the
//! `?device=` parameter.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AuthConfig;

/// A verified identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The user (`sub`).
    pub user: String,
    /// The `device` claim, when the token names one.
    pub device: Option<String>,
    /// `exp`, seconds since the epoch.
    pub expires_at: u64,
    /// `iat`, seconds since the epoch, when the token has one (a revoked
    /// device's tokens issued before the revocation are refused).
    pub issued_at: Option<u64>,
}

/// Why a token was refused. `code()` is what the 401 body says.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token: pass ?token= or Authorization: Bearer")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::Expired => "token_expired",
            AuthError::Invalid(_) => "invalid_token",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
}

/// Verifies tokens; built once at start-up.
pub struct Authenticator {
    hs256: Option<(DecodingKey, EncodingKey)>,
    /// JWKS keys: (kid, algorithm, key).
    jwks: Vec<(Option<String>, Algorithm, DecodingKey)>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_s: u64,
    dev_token_ttl_s: u64,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("hs256", &self.hs256.is_some())
            .field("jwks_keys", &self.jwks.len())
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Loads the keys. With `dev_login` and no configured secret, a random
    /// HS256 secret is generated (tokens then do not survive a restart).
    pub fn new(cfg: &AuthConfig, dev_login: bool) -> anyhow::Result<Self> {
        let secret: Option<Vec<u8>> = match &cfg.hs256_secret {
            Some(s) => Some(s.expose().as_bytes().to_vec()),
            None if dev_login => {
                tracing::warn!(
                    "dev_login without auth.hs256_secret: using a random per-process secret"
                );
                let mut bytes = Vec::with_capacity(32);
                bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
                bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
                Some(bytes)
            }
            None => None,
        };
        let hs256 = secret.map(|s| (DecodingKey::from_secret(&s), EncodingKey::from_secret(&s)));
        let jwks = match &cfg.jwks_path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!("cannot read auth.jwks_path {}: {e}", path.display())
                })?;
                load_jwks(&text)
                    .map_err(|e| anyhow::anyhow!("auth.jwks_path {}: {e}", path.display()))?
            }
            None => Vec::new(),
        };
        if hs256.is_none() && jwks.is_empty() {
            anyhow::bail!("auth: no key configured (auth.hs256_secret or auth.jwks_path)");
        }
        Ok(Self {
            hs256,
            jwks,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            leeway_s: cfg.leeway_s,
            dev_token_ttl_s: cfg.dev_token_ttl_s,
        })
    }

    /// Checks signature, algorithm, `exp`, `nbf`, `iss`, `aud` and the shape of `sub`.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Invalid(format!("header: {e}")))?;
        let key = match header.alg {
            Algorithm::HS256 => self
                .hs256
                .as_ref()
                .map(|(d, _)| d)
                .ok_or_else(|| AuthError::Invalid("HS256 is not accepted here".into()))?,
            Algorithm::RS256 | Algorithm::ES256 => {
                self.jwks_key(header.alg, header.kid.as_deref())?
            }
            other => {
                return Err(AuthError::Invalid(format!(
                    "algorithm {other:?} is not accepted"
                )))
            }
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway_s;
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
        }
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| match e
            .kind()
        {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
            _ => AuthError::Invalid(e.to_string()),
        })?;
        let claims = data.claims;
        validate_user_id(&claims.sub).map_err(AuthError::Invalid)?;
        // A malformed `device` claim is the device's fault, not the
        // token's: `resolve_device` refuses it with 400 `invalid_device`.
        Ok(Identity {
            user: claims.sub,
            device: claims.device,
            expires_at: claims.exp,
            issued_at: claims.iat,
        })
    }

    fn jwks_key(&self, alg: Algorithm, kid: Option<&str>) -> Result<&DecodingKey, AuthError> {
        let mut candidates = self.jwks.iter().filter(|(_, a, _)| *a == alg);
        let found = match kid {
            Some(kid) => candidates.find(|(k, _, _)| k.as_deref() == Some(kid)),
            None => {
                let first = candidates.next();
                if candidates.next().is_some() {
                    return Err(AuthError::Invalid(
                        "token has no kid and several keys match".into(),
                    ));
                }
                first
            }
        };
        found
            .map(|(_, _, key)| key)
            .ok_or_else(|| AuthError::Invalid(format!("no {alg:?} key for kid {kid:?}")))
    }

    /// True when `/dev/login` can mint tokens (an HS256 secret is loaded).
    pub fn can_mint(&self) -> bool {
        self.hs256.is_some()
    }

    /// Mints an HS256 token for `/dev/login`. Returns the token and its `exp`
    /// (seconds since the epoch).
    pub fn mint(&self, user: &str, device: Option<&str>) -> anyhow::Result<(String, u64)> {
        let Some((_, key)) = &self.hs256 else {
            anyhow::bail!("no HS256 secret");
        };
        let now = jsonwebtoken::get_current_timestamp();
        let exp = now + self.dev_token_ttl_s;
        let claims = Claims {
            sub: user.to_string(),
            exp,
            device: device.map(str::to_string),
            iat: Some(now),
        };
        Ok((
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key)?,
            exp,
        ))
    }
}

/// The RS256 / ES256 keys of a JWKS document. Keys of other types are
/// skipped (with a warning); a document without any usable key is an error.
fn load_jwks(text: &str) -> Result<Vec<(Option<String>, Algorithm, DecodingKey)>, String> {
    let set: JwkSet =
        serde_json::from_str(text).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut out = Vec::new();
    for jwk in &set.keys {
        let alg = match (&jwk.common.key_algorithm, &jwk.algorithm) {
            (Some(KeyAlgorithm::RS256), AlgorithmParameters::RSA(_))
            | (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
            (Some(KeyAlgorithm::ES256), AlgorithmParameters::EllipticCurve(p))
            | (None, AlgorithmParameters::EllipticCurve(p))
                if p.curve == EllipticCurve::P256 =>
            {
                Algorithm::ES256
            }
            _ => {
                tracing::warn!(kid = ?jwk.common.key_id, "JWKS key skipped: only RS256 and ES256 (P-256) keys are used");
                continue;
            }
        };
        let key =
            DecodingKey::from_jwk(jwk).map_err(|e| format!("key {:?}: {e}", jwk.common.key_id))?;
        out.push((jwk.common.key_id.clone(), alg, key));
    }
    if out.is_empty() {
        return Err("no RS256 or ES256 key in the JWKS".into());
    }
    Ok(out)
}

/// A user id: 1 to 128 bytes, no comma (the router's recipient lists are
/// comma-separated), no whitespace or control characters.
pub fn validate_user_id(user: &str) -> Result<(), String> {
    if user.is_empty() || user.len() > 128 {
        return Err("user id (sub) must be 1 to 128 bytes".into());
    }
    if user
        .chars()
        .any(|c| c == ',' || c.is_whitespace() || c.is_control())
    {
        return Err(
            "user id (sub) must not contain commas, whitespace or control characters".into(),
        );
    }
    Ok(())
}

/// A device id: 1 to 64 characters of `[A-Za-z0-9._-]`.
pub fn validate_device(device: &str) -> Result<(), String> {
    let ok = !device.is_empty()
        && device.len() <= 64
        && device
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err("device must be 1 to 64 characters of A-Z a-z 0-9 . _ -".into())
    }
}

/// The device of a connection: the token's `device` claim or the
/// `?device=` parameter; both given and different is an error.
pub fn resolve_device(claim: Option<&str>, param: Option<&str>) -> Result<String, String> {
    match (claim, param) {
        (Some(c), Some(p)) if c != p => {
            Err("the device parameter differs from the token's device claim".into())
        }
        (Some(d), _) | (None, Some(d)) => {
            validate_device(d)?;
            Ok(d.to_string())
        }
        (None, None) => Err("device is required: ?device= or a device claim".into()),
    }
}

/// The Origin policy: no `Origin` header (not a browser) is allowed;
/// otherwise the origin must be listed (case-insensitive, exact
/// `scheme://host[:port]`), or the list must contain `*`.
pub fn origin_allowed(origin: Option<&str>, allowed: &[String]) -> bool {
    match origin {
        None => true,
        Some(o) => allowed.iter().any(|a| {
            a == "*"
                || a.trim_end_matches('/')
                    .eq_ignore_ascii_case(o.trim_end_matches('/'))
        }),
    }
}

/// The bearer token of a request: `Authorization: Bearer <t>` first, then `?token=`.
pub fn token_from(authorization: Option<&str>, query_token: Option<&str>) -> Option<String> {
    if let Some(h) = authorization {
        let mut parts = h.splitn(2, ' ');
        if let (Some(scheme), Some(rest)) = (parts.next(), parts.next()) {
            if scheme.eq_ignore_ascii_case("bearer") {
                return Some(rest.trim().to_string());
            }
        }
    }
    query_token.map(str::to_string)
}

/// Parses a JWKS document (exposed for tests and tooling).
pub fn jwks_key_count(text: &str) -> Result<usize, String> {
    load_jwks(text).map(|k| k.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use chat_runtime::Secret;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn hs() -> Authenticator {
        let cfg = AuthConfig {
            hs256_secret: Some(Secret::new(SECRET)),
            leeway_s: 0,
            ..AuthConfig::default()
        };
        Authenticator::new(&cfg, false).unwrap()
    }

    fn b64(v: &serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn sign_hs(claims: &serde_json::Value, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn a_valid_hs256_token_gives_user_and_device() {
        let a = hs();
        let t = sign_hs(
            &serde_json::json!({"sub":"alice","exp":now()+60,"device":"d1"}),
            SECRET,
        );
        let id = a.verify(&t).unwrap();
        assert_eq!(id.user, "alice");
        assert_eq!(id.device.as_deref(), Some("d1"));
        let (minted, exp) = a.mint("bob", None).unwrap();
        assert!(exp > now());
        assert_eq!(a.verify(&minted).unwrap().user, "bob");
    }

    #[test]
    fn alg_none_is_refused() {
        let a = hs();
        let header = b64(&serde_json::json!({"alg":"none","typ":"JWT"}));
        let claims = b64(&serde_json::json!({"sub":"alice","exp":now()+60}));
        for token in [format!("{header}.{claims}."), format!("{header}.{claims}")] {
            assert!(
                matches!(a.verify(&token), Err(AuthError::Invalid(_))),
                "{token}"
            );
        }
    }

    #[test]
    fn bad_signature_expired_and_missing_claims_are_refused() {
        let a = hs();
        let wrong = sign_hs(
            &serde_json::json!({"sub":"alice","exp":now()+60}),
            "another-secret-of-enough-length!",
        );
        assert!(matches!(a.verify(&wrong), Err(AuthError::Invalid(_))));
        let expired = sign_hs(&serde_json::json!({"sub":"alice","exp":now()-10}), SECRET);
        assert_eq!(a.verify(&expired), Err(AuthError::Expired));
        let no_exp = sign_hs(&serde_json::json!({"sub":"alice"}), SECRET);
        assert!(matches!(a.verify(&no_exp), Err(AuthError::Invalid(_))));
        let no_sub = sign_hs(&serde_json::json!({"exp":now()+60}), SECRET);
        assert!(matches!(a.verify(&no_sub), Err(AuthError::Invalid(_))));
        let comma = sign_hs(&serde_json::json!({"sub":"a,b","exp":now()+60}), SECRET);
        assert!(matches!(a.verify(&comma), Err(AuthError::Invalid(_))));
        assert_eq!(a.verify(""), Err(AuthError::Missing));
        assert!(matches!(a.verify("garbage"), Err(AuthError::Invalid(_))));
        // Tampered payload, original signature.
        let good = sign_hs(&serde_json::json!({"sub":"alice","exp":now()+60}), SECRET);
        let parts: Vec<&str> = good.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64(&serde_json::json!({"sub":"mallory","exp":now()+60})),
            parts[2]
        );
        assert!(matches!(a.verify(&forged), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn hs256_is_refused_when_only_jwks_is_configured() {
        let dir = std::env::temp_dir().join(format!("gw-jwks-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jwks.json");
        std::fs::write(&path, ES256_JWKS).unwrap();
        let cfg = AuthConfig {
            jwks_path: Some(path),
            ..AuthConfig::default()
        };
        let a = Authenticator::new(&cfg, false).unwrap();
        let t = sign_hs(&serde_json::json!({"sub":"alice","exp":now()+60}), SECRET);
        assert!(matches!(a.verify(&t), Err(AuthError::Invalid(_))));
        assert!(!a.can_mint());
    }

    /// A P-256 key pair made for this test only (PKCS#8 DER, base64) and its
    /// public JWK.
    const ES256_PKCS8: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgQPS93MzMvcUJLrboBei2+M9z1+19gxHwB0nCPvLMsQWhRANCAAQjTi10H9PluaCs2vAXUU4YHYgMnB0mHsyr/18gJikVcBebn0Lj2HrLUCcuhzSM6SxXOj9tZK5nSeP1VAmvv/TW";
    const ES256_JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","alg":"ES256","use":"sig","x":"I04tdB_T5bmgrNrwF1FOGB2IDJwdJh7Mq_9fICYpFXA","y":"F5ufQuPYestQJy6HNIzpLFc6P21krmdJ4_VUCa-_9NY"}]}"#;

    #[test]
    fn es256_tokens_verify_against_the_jwks() {
        let dir = std::env::temp_dir().join(format!("gw-jwks-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jwks.json");
        std::fs::write(&path, ES256_JWKS).unwrap();
        let cfg = AuthConfig {
            jwks_path: Some(path),
            issuer: Some("https://id.example".into()),
            ..AuthConfig::default()
        };
        let a = Authenticator::new(&cfg, false).unwrap();
        let der = base64::engine::general_purpose::STANDARD
            .decode(ES256_PKCS8)
            .unwrap();
        let key = EncodingKey::from_ec_der(&der);
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("k1".into());
        let claims = serde_json::json!({"sub":"carol","exp":now()+60,"iss":"https://id.example"});
        let t = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        assert_eq!(a.verify(&t).unwrap().user, "carol");
        // Wrong issuer.
        let claims = serde_json::json!({"sub":"carol","exp":now()+60,"iss":"https://evil"});
        let t = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        assert!(matches!(a.verify(&t), Err(AuthError::Invalid(_))));
        // Unknown kid.
        header.kid = Some("k2".into());
        let claims = serde_json::json!({"sub":"carol","exp":now()+60,"iss":"https://id.example"});
        let t = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        assert!(matches!(a.verify(&t), Err(AuthError::Invalid(_))));
        assert_eq!(jwks_key_count(ES256_JWKS), Ok(1));
    }

    #[test]
    fn device_rules() {
        assert!(validate_device("phone-1.a_b").is_ok());
        assert!(validate_device("").is_err());
        assert!(validate_device(&"x".repeat(65)).is_err());
        assert!(validate_device("a b").is_err());
        assert!(validate_device("a/b").is_err());
        assert_eq!(resolve_device(Some("d1"), None).unwrap(), "d1");
        assert_eq!(resolve_device(None, Some("d2")).unwrap(), "d2");
        assert_eq!(resolve_device(Some("d1"), Some("d1")).unwrap(), "d1");
        assert!(resolve_device(Some("d1"), Some("d2")).is_err());
        assert!(resolve_device(None, None).is_err());
    }

    #[test]
    fn origin_policy() {
        let none: Vec<String> = vec![];
        assert!(origin_allowed(None, &none));
        assert!(!origin_allowed(Some("https://evil.example"), &none));
        let list = vec!["https://app.example".to_string()];
        assert!(origin_allowed(Some("https://APP.example"), &list));
        assert!(!origin_allowed(Some("https://app.example:8443"), &list));
        assert!(!origin_allowed(Some("null"), &list));
        assert!(origin_allowed(Some("http://anything"), &["*".to_string()]));
    }

    #[test]
    fn token_sources() {
        assert_eq!(
            token_from(Some("Bearer abc"), Some("q")).as_deref(),
            Some("abc")
        );
        assert_eq!(
            token_from(Some("bearer  abc "), None).as_deref(),
            Some("abc")
        );
        assert_eq!(
            token_from(Some("Basic xyz"), Some("q")).as_deref(),
            Some("q")
        );
        assert_eq!(token_from(None, None), None);
    }
}
