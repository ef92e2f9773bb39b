//! Where the CLI keeps what it learned: the credentials of the last
//! `chat login` and, per user and device, the sync state of `chat tail`.
//!
//! Owns: the config directory (`$XDG_CONFIG_HOME/chat-cli`, else
//! `~/.config/chat-cli`), `credentials.json` (gateway, user, device, token,
//! expiry; written with mode 0600) and `state-<user>-<device>.json`
//! (the `synced` checkpoint and the last seq per chat, so the next `tail`
//! resumes where the last one stopped). Also reads a token's claims
//! (without verifying them: only to find its user, device and expiry).

use crate::error::{CliError, Result};
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What `chat login` stores.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Credentials {
    pub gateway: String,
    pub user: String,
    pub device: String,
    pub token: String,
    #[serde(default)]
    pub expires_at: Option<u64>,
}

/// What `chat tail` remembers between runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SyncState {
    pub checkpoint: Option<i64>,
    /// Last seq seen per chat id.
    pub chats: BTreeMap<String, u64>,
}

/// The claims of a token that matter here.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Claims {
    #[serde(default)]
    pub sub: Option<String>,
    #[serde(default)]
    pub device: Option<String>,
    #[serde(default)]
    pub exp: Option<u64>,
}

/// Decodes a JWT's payload (no signature check).
pub fn claims(token: &str) -> Claims {
    token
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p.trim_end_matches('='))
                .ok()
        })
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The config directory: `$XDG_CONFIG_HOME/chat-cli` or `~/.config/chat-cli`.
pub fn dir() -> Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("chat-cli"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| {
            CliError::Usage("neither XDG_CONFIG_HOME nor HOME is set: pass --token".into())
        })?;
    Ok(PathBuf::from(home).join(".config").join("chat-cli"))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            CliError::Usage(format!(
                "{} is damaged ({e}); delete it or log in again",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CliError::Usage(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let fail = |e: std::io::Error| CliError::Usage(format!("cannot write {}: {e}", path.display()));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(fail)?;
    }
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| CliError::Protocol(e.to_string()))?;
    {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp).map_err(fail)?;
        f.write_all(&bytes).map_err(fail)?;
    }
    std::fs::rename(&tmp, path).map_err(fail)
}

pub fn load_credentials() -> Result<Option<Credentials>> {
    read_json(&dir()?.join("credentials.json"))
}

pub fn save_credentials(c: &Credentials) -> Result<PathBuf> {
    let path = dir()?.join("credentials.json");
    write_json(&path, c)?;
    Ok(path)
}

/// Forgets the stored credentials; true when there were some.
pub fn remove_credentials() -> Result<bool> {
    let path = dir()?.join("credentials.json");
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(CliError::Usage(format!(
            "cannot remove {}: {e}",
            path.display()
        ))),
    }
}

fn safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn state_path(user: &str, device: &str) -> Result<PathBuf> {
    Ok(dir()?.join(format!("state-{}-{}.json", safe(user), safe(device))))
}

pub fn load_state(user: &str, device: &str) -> Result<SyncState> {
    Ok(read_json(&state_path(user, device)?)?.unwrap_or_default())
}

pub fn save_state(user: &str, device: &str, s: &SyncState) -> Result<()> {
    write_json(&state_path(user, device)?, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_claims_of_a_jwt() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"sub":"ann","device":"d1","exp":1767225600}"#);
        let c = claims(&format!("eyJhbGciOiJIUzI1NiJ9.{payload}.sig"));
        assert_eq!(c.sub.as_deref(), Some("ann"));
        assert_eq!(c.device.as_deref(), Some("d1"));
        assert_eq!(c.exp, Some(1_767_225_600));
        assert_eq!(claims("not a token"), Claims::default());
    }

    #[test]
    fn file_names_stay_in_the_directory() {
        assert_eq!(safe("../x y"), ".._x_y");
    }
}
