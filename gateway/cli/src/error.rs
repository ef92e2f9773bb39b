//! The CLI's errors and their exit codes.
//!
//! Owns: the mapping from what went wrong to a process exit code and a
//! message (text or one JSON object). The codes are part of the CLI's
//! interface (README, "CLI"):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | the gateway cannot be reached, or did not answer in time, or the connection dropped |
//! | 2 | usage: bad arguments, not signed in, no gateway address |
//! | 3 | authentication: no token, token expired or refused (sign in again) |
//! | 4 | the server refused the command; the message names the protocol error code |
//! | 5 | the server answered something this client did not expect (a bug) |

use std::process::ExitCode;

/// Everything that ends a command early.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the gateway at {gateway}: {reason}")]
    Unreachable { gateway: String, reason: String },
    #[error("{0}")]
    Usage(String),
    #[error("{message} ({code}); sign in again with `chat login USER`")]
    Auth { code: String, message: String },
    #[error("refused by the server: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
}

impl CliError {
    pub fn unreachable(gateway: &str, reason: impl ToString) -> Self {
        CliError::Unreachable {
            gateway: gateway.to_string(),
            reason: reason.to_string(),
        }
    }

    /// The process exit code (see the module doc).
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Unreachable { .. } => 1,
            CliError::Usage(_) => 2,
            CliError::Auth { .. } => 3,
            CliError::Refused { .. } => 4,
            CliError::Protocol(_) => 5,
        }
    }

    /// A short machine-readable code: the protocol's for refusals.
    pub fn code(&self) -> &str {
        match self {
            CliError::Unreachable { .. } => "unreachable",
            CliError::Usage(_) => "usage",
            CliError::Auth { code, .. } | CliError::Refused { code, .. } => code,
            CliError::Protocol(_) => "protocol",
        }
    }

    /// Prints the error to stderr (one JSON object with `json`) and gives the exit code.
    pub fn report(&self, json: bool) -> ExitCode {
        if json {
            let v = serde_json::json!({
                "error": self.code(),
                "message": self.to_string(),
                "exit": self.exit_code(),
            });
            eprintln!("{v}");
        } else {
            eprintln!("chat: {self}");
        }
        ExitCode::from(self.exit_code())
    }
}

/// What each protocol error code means, for people (PROTOCOL.md, Error codes).
pub fn explain(code: &str) -> &'static str {
    match code {
        "rate_limited" => "sending too fast; retry later",
        "not_member" => "you are not (or no longer) a member of this chat",
        "too_large" => "the text is longer than the gateway's max_text_bytes",
        "unknown_chat" => "no such chat",
        "forbidden" => "you lack the right (only admins may do that)",
        "group_full" => "the group would exceed its member limit",
        "invalid" => "the request is malformed or was refused",
        "unavailable" => "a part of the platform did not answer; retry",
        "internal" => "a bug in the server",
        "bad_frame" | "unknown_type" => {
            "this client sent something the gateway does not understand"
        }
        _ => "",
    }
}

pub type Result<T> = std::result::Result<T, CliError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_the_documented_ones() {
        let cases = [
            (CliError::unreachable("g", "x"), 1),
            (CliError::Usage("u".into()), 2),
            (
                CliError::Auth {
                    code: "token_expired".into(),
                    message: "m".into(),
                },
                3,
            ),
            (
                CliError::Refused {
                    code: "not_member".into(),
                    message: "m".into(),
                },
                4,
            ),
            (CliError::Protocol("p".into()), 5),
        ];
        for (e, code) in cases {
            assert_eq!(e.exit_code(), code, "{e}");
        }
    }

    #[test]
    fn refusals_carry_the_protocol_code() {
        let e = CliError::Refused {
            code: "too_large".into(),
            message: "text is 5000 bytes".into(),
        };
        assert_eq!(e.code(), "too_large");
        assert!(e.to_string().contains("too_large"));
    }
}
