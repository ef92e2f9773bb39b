//! Compact JWTs signed here: ES256 (APNs provider tokens, VAPID) with
//! `p256`, RS256 (the FCM service-account grant) with `jsonwebtoken`; and
//! loading keys from PEM or base64url.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::{signature::Signer, Signature, SigningKey};
use p256::pkcs8::DecodePrivateKey;

use crate::PushError;

pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes base64url with or without padding (and tolerates standard base64).
pub fn b64url_decode(text: &str) -> Result<Vec<u8>, PushError> {
    let t = text
        .trim()
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_");
    URL_SAFE_NO_PAD
        .decode(t)
        .map_err(|e| PushError::Key(format!("not base64url: {e}")))
}

/// A P-256 signing key from a PKCS#8 PEM (an APNs `.p8` file) or the
/// base64url of the raw 32-byte scalar (the usual VAPID private key form).
pub fn p256_key(text: &str) -> Result<SigningKey, PushError> {
    let t = text.trim();
    if t.starts_with("-----BEGIN") {
        if t.contains("BEGIN EC PRIVATE KEY") {
            let der = pem_body(t)?;
            let sk = p256::SecretKey::from_sec1_der(&der)
                .map_err(|e| PushError::Key(format!("SEC1 P-256 key: {e}")))?;
            return Ok(SigningKey::from(sk));
        }
        return SigningKey::from_pkcs8_pem(t)
            .map_err(|e| PushError::Key(format!("PKCS#8 P-256 key: {e}")));
    }
    let raw = b64url_decode(t)?;
    SigningKey::from_slice(&raw).map_err(|e| PushError::Key(format!("raw P-256 key: {e}")))
}

fn pem_body(pem: &str) -> Result<Vec<u8>, PushError> {
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    use base64::engine::general_purpose::STANDARD;
    STANDARD
        .decode(body.trim())
        .map_err(|e| PushError::Key(format!("PEM body: {e}")))
}

/// `header.claims.signature` signed with ES256 (the signature is r || s).
pub fn es256(header: &serde_json::Value, claims: &serde_json::Value, key: &SigningKey) -> String {
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let sig: Signature = key.sign(signing_input.as_bytes());
    format!("{signing_input}.{}", b64url(&sig.to_bytes()))
}

/// The uncompressed SEC1 public point (65 bytes) of `key`.
pub fn public_point(key: &SigningKey) -> Vec<u8> {
    key.verifying_key()
        .to_encoded_point(false)
        .as_bytes()
        .to_vec()
}

/// An RSA key for `jsonwebtoken` from a PKCS#8 (`BEGIN PRIVATE KEY`, as in a
/// Google service-account file) or PKCS#1 (`BEGIN RSA PRIVATE KEY`) PEM.
pub fn rsa_key(pem: &str) -> Result<jsonwebtoken::EncodingKey, PushError> {
    use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
    let key = if pem.contains("BEGIN RSA PRIVATE KEY") {
        rsa::RsaPrivateKey::from_pkcs1_pem(pem)
            .map_err(|e| PushError::Key(format!("PKCS#1 RSA key: {e}")))?
    } else {
        rsa::RsaPrivateKey::from_pkcs8_pem(pem)
            .map_err(|e| PushError::Key(format!("PKCS#8 RSA key: {e}")))?
    };
    let der = key
        .to_pkcs1_der()
        .map_err(|e| PushError::Key(format!("RSA key: {e}")))?;
    Ok(jsonwebtoken::EncodingKey::from_rsa_der(der.as_bytes()))
}

/// Reads a key given inline (PEM / base64url) or as `@path` / a path to a file.
pub fn key_text(value: &str) -> Result<String, PushError> {
    let v = value.trim();
    let path = v.strip_prefix('@').unwrap_or(v);
    if v.starts_with('@') || (!v.starts_with("-----") && std::path::Path::new(path).is_file()) {
        return std::fs::read_to_string(path)
            .map_err(|e| PushError::Key(format!("cannot read {path}: {e}")));
    }
    Ok(v.to_string())
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::{signature::Verifier, VerifyingKey};

    #[test]
    fn es256_verifies_with_the_public_key() {
        let key = SigningKey::from_slice(&[7u8; 32]).unwrap();
        let jwt = es256(
            &serde_json::json!({"alg":"ES256"}),
            &serde_json::json!({"iss":"x"}),
            &key,
        );
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let sig = Signature::from_slice(&b64url_decode(parts[2]).unwrap()).unwrap();
        let vk = VerifyingKey::from(&key);
        vk.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
            .unwrap();
        assert_eq!(public_point(&key).len(), 65);
    }
}
