//! The JSON protocol v1 (PROTOCOL.md): parsing client frames, building
//! server frames, error and close codes, and the one JSON shape of a chat
//! event whether it comes live from the log or from history.
//!
//! Parsing never panics and never fails the connection: a frame that is not
//! JSON, has no `type`, names an unknown type or has invalid fields becomes
//! an error code and a message for an `error` frame.

use chat_projectors::store::MessageRow;
use chat_schemas::{ChatKind, Envelope, Role};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use uuid::Uuid;

pub use chat_runtime::now_ms;

/// Protocol version announced in `hello`.
pub const PROTOCOL_VERSION: u32 = 1;

/// WebSocket close codes the gateway uses.
pub mod close {
    /// Normal closure (answer to the client's close).
    pub const NORMAL: u16 = 1000;
    /// The gateway is draining (shutdown, deploy): reconnect elsewhere.
    pub const GOING_AWAY: u16 = 1001;
    /// A WebSocket protocol violation.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text message that is not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A message larger than `limits.max_frame_bytes`.
    pub const TOO_BIG: u16 = 1009;
    /// An internal error of the gateway.
    pub const INTERNAL: u16 = 1011;
    /// A dependency is unavailable: try again later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The token expired while connected: reconnect with a fresh token.
    pub const AUTH_EXPIRED: u16 = 4001;
    /// Nothing received for `timeouts.idle_ms`.
    pub const IDLE: u16 = 4002;
    /// The device was revoked by its user.
    pub const DEVICE_REVOKED: u16 = 4003;
    /// The client did not read fast enough; its queue filled up.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// Too many malformed or invalid frames in a row.
    pub const TOO_MANY_BAD_FRAMES: u16 = 4009;
}

/// Error codes of `error` frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadFrame,
    UnknownType,
    TooLarge,
    Invalid,
    UnknownChat,
    NotMember,
    Forbidden,
    GroupFull,
    RateLimited,
    StaleReceipt,
    SeqOutOfRange,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::BadFrame,
        ErrorCode::UnknownType,
        ErrorCode::TooLarge,
        ErrorCode::Invalid,
        ErrorCode::UnknownChat,
        ErrorCode::NotMember,
        ErrorCode::Forbidden,
        ErrorCode::GroupFull,
        ErrorCode::RateLimited,
        ErrorCode::StaleReceipt,
        ErrorCode::SeqOutOfRange,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Invalid => "invalid",
            ErrorCode::UnknownChat => "unknown_chat",
            ErrorCode::NotMember => "not_member",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::GroupFull => "group_full",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::StaleReceipt => "stale_receipt",
            ErrorCode::SeqOutOfRange => "seq_out_of_range",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// The code for a sequencer's rejection code; unknown codes map to `invalid`.
    pub fn from_sequencer(code: Option<&str>) -> ErrorCode {
        code.and_then(|c| ErrorCode::ALL.iter().copied().find(|e| e.as_str() == c))
            .unwrap_or(ErrorCode::Invalid)
    }

    /// Whether this code counts towards `limits.max_bad_frames`.
    pub fn is_client_fault(self) -> bool {
        matches!(
            self,
            ErrorCode::BadFrame | ErrorCode::UnknownType | ErrorCode::Invalid | ErrorCode::TooLarge
        )
    }
}

/// A frame's `id`: a string (at most 64 bytes) or an integer, echoed as given.
pub type FrameId = Option<Value>;

/// A parse or validation failure.
#[derive(Clone, Debug, PartialEq)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
    /// What the refused frame was about, echoed in the `error` frame.
    pub about: About,
}

impl FrameError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            about: About::default(),
        }
    }
}

/// The chat and `client_msg_id` a frame names, as far as they are valid:
/// an `error` answering the frame repeats them so a client can match it to
/// its outbox entry (PROTOCOL.md, `error`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct About {
    pub chat: Option<Uuid>,
    pub client_msg_id: Option<String>,
}

impl About {
    /// About `chat` only (queries that name a chat).
    pub fn chat(chat: Uuid) -> Self {
        Self {
            chat: Some(chat),
            client_msg_id: None,
        }
    }

    /// Reads `chat` and `client_msg_id` from a frame that failed to parse;
    /// a field that is itself malformed is left out.
    fn of_raw(map: &serde_json::Map<String, Value>) -> Self {
        let chat = map
            .get("chat")
            .and_then(Value::as_str)
            .and_then(|c| Uuid::parse_str(c).ok());
        let client_msg_id = map
            .get("client_msg_id")
            .and_then(Value::as_str)
            .filter(|m| check_client_msg_id(m).is_ok())
            .map(str::to_string);
        Self {
            chat,
            client_msg_id,
        }
    }
}

/// A client frame, validated.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientFrame {
    Send {
        chat: Uuid,
        client_msg_id: String,
        text: String,
        reply_to: Option<u64>,
    },
    CreateChat {
        kind: ChatKind,
        members: Vec<String>,
        title: Option<String>,
        client_msg_id: Option<String>,
    },
    AddMember {
        chat: Uuid,
        user: String,
        role: Role,
        client_msg_id: Option<String>,
    },
    RemoveMember {
        chat: Uuid,
        user: String,
        client_msg_id: Option<String>,
    },
    ChangeRole {
        chat: Uuid,
        user: String,
        role: Role,
        client_msg_id: Option<String>,
    },
    Leave {
        chat: Uuid,
        client_msg_id: Option<String>,
    },
    History {
        chat: Uuid,
        before: Option<u64>,
        after: Option<u64>,
        limit: u32,
    },
    Sync {
        since: Option<i64>,
        chats: HashMap<Uuid, u64>,
        /// More `chats` of this sync follow in the next `sync` frame.
        more: bool,
    },
    Chats,
    Ping,
    /// The chats this connection has open (replaces the earlier set).
    Watch {
        chats: Vec<Uuid>,
    },
    Typing {
        chat: Uuid,
        active: bool,
    },
    /// A read (`delivered == false`) or delivery receipt.
    Receipt {
        chat: Uuid,
        up_to_seq: u64,
        delivered: bool,
        client_msg_id: Option<String>,
    },
    Receipts {
        chat: Uuid,
    },
    Devices,
    RevokeDevice {
        device: String,
    },
    PresenceSettings {
        hidden: bool,
    },
    Mute {
        chat: Uuid,
        muted: bool,
        client_msg_id: Option<String>,
    },
    /// Registers (or refreshes: the same frame again) this device's push
    /// token; one registration per device, the latest wins.
    PushRegister {
        provider: String,
        token: String,
        locale: Option<String>,
    },
    /// Removes this device's push registration.
    PushUnregister,
    /// The user's do-not-disturb schedule (replaces the earlier one).
    PushSettings {
        time_zone: String,
        /// (start, end) minutes after local midnight; None: no do-not-disturb.
        dnd: Option<(u32, u32)>,
        allowed_chats: Vec<Uuid>,
    },
}

impl ClientFrame {
    /// The chat and `client_msg_id` the frame names (for `error` frames).
    pub fn about(&self) -> About {
        let (chat, client_msg_id) = match self {
            ClientFrame::Send {
                chat,
                client_msg_id,
                ..
            } => (Some(*chat), Some(client_msg_id)),
            ClientFrame::CreateChat { client_msg_id, .. } => (None, client_msg_id.as_ref()),
            ClientFrame::AddMember {
                chat,
                client_msg_id,
                ..
            }
            | ClientFrame::RemoveMember {
                chat,
                client_msg_id,
                ..
            }
            | ClientFrame::ChangeRole {
                chat,
                client_msg_id,
                ..
            }
            | ClientFrame::Leave {
                chat,
                client_msg_id,
            }
            | ClientFrame::Receipt {
                chat,
                client_msg_id,
                ..
            }
            | ClientFrame::Mute {
                chat,
                client_msg_id,
                ..
            } => (Some(*chat), client_msg_id.as_ref()),
            ClientFrame::History { chat, .. }
            | ClientFrame::Typing { chat, .. }
            | ClientFrame::Receipts { chat } => (Some(*chat), None),
            _ => (None, None),
        };
        About {
            chat,
            client_msg_id: client_msg_id.cloned(),
        }
    }

    /// The frame's `type`, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Send { .. } => "send",
            ClientFrame::CreateChat { .. } => "create_chat",
            ClientFrame::AddMember { .. } => "add_member",
            ClientFrame::RemoveMember { .. } => "remove_member",
            ClientFrame::ChangeRole { .. } => "change_role",
            ClientFrame::Leave { .. } => "leave",
            ClientFrame::History { .. } => "history",
            ClientFrame::Sync { .. } => "sync",
            ClientFrame::Chats => "chats",
            ClientFrame::Ping => "ping",
            ClientFrame::Watch { .. } => "watch",
            ClientFrame::Typing { .. } => "typing",
            ClientFrame::Receipt {
                delivered: false, ..
            } => "read",
            ClientFrame::Receipt { .. } => "delivered",
            ClientFrame::Receipts { .. } => "receipts",
            ClientFrame::Devices => "devices",
            ClientFrame::RevokeDevice { .. } => "revoke_device",
            ClientFrame::PresenceSettings { .. } => "presence_settings",
            ClientFrame::Mute { .. } => "mute",
            ClientFrame::PushRegister { .. } => "push_register",
            ClientFrame::PushUnregister => "push_unregister",
            ClientFrame::PushSettings { .. } => "push_settings",
        }
    }
}

/// Limits that parsing enforces.
#[derive(Clone, Copy, Debug)]
pub struct ParseLimits {
    pub max_watched_chats: usize,
    pub max_text_bytes: usize,
    pub max_history_limit: u32,
    pub max_group_members: u32,
    /// Most `sync.chats` entries in one frame ([`sync_chats_per_frame`]).
    pub sync_chats_per_frame: usize,
}

/// Most `sync.chats` entries in all the parts of one sync together.
pub const MAX_SYNC_CHATS: usize = 20_000;

/// Bytes a `sync.chats` entry may take: `"<36-char uuid>":<seq up to 20
/// digits>,` is at most 61 bytes of compact JSON; 64 leaves room.
const SYNC_ENTRY_BYTES: usize = 64;
/// Bytes of a `sync` frame besides its entries (`type`, `id`, `since`, `more`).
const SYNC_FRAME_OVERHEAD: usize = 1_024;

/// How many `sync.chats` entries one frame may carry: as many as surely fit
/// in `max_frame_bytes`, so the two limits cannot contradict each other
/// (1,008 for the default 65,536). More chats go in several `sync` frames
/// (`more: true`).
pub fn sync_chats_per_frame(max_frame_bytes: usize) -> usize {
    (max_frame_bytes.saturating_sub(SYNC_FRAME_OVERHEAD) / SYNC_ENTRY_BYTES).max(1)
}
/// Default `history.limit`.
pub const DEFAULT_HISTORY_LIMIT: u32 = 50;
/// Longest group title, bytes.
pub const MAX_TITLE_BYTES: usize = 256;
/// Longest `client_msg_id`, bytes.
pub const MAX_CLIENT_MSG_ID_BYTES: usize = 64;

#[derive(Deserialize)]
struct SendBody {
    chat: Uuid,
    client_msg_id: String,
    text: String,
    #[serde(default)]
    reply_to: Option<u64>,
}

#[derive(Deserialize)]
struct CreateChatBody {
    kind: ChatKind,
    members: Vec<String>,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    client_msg_id: Option<String>,
}

#[derive(Deserialize)]
struct MemberBody {
    chat: Uuid,
    user: String,
    #[serde(default)]
    role: Option<Role>,
    #[serde(default)]
    client_msg_id: Option<String>,
}

#[derive(Deserialize)]
struct LeaveBody {
    chat: Uuid,
    #[serde(default)]
    client_msg_id: Option<String>,
}

#[derive(Deserialize)]
struct HistoryBody {
    chat: Uuid,
    #[serde(default)]
    before: Option<u64>,
    #[serde(default)]
    after: Option<u64>,
    #[serde(default)]
    limit: Option<u32>,
}

#[derive(Deserialize)]
struct WatchBody {
    chats: Vec<Uuid>,
}

#[derive(Deserialize)]
struct TypingBody {
    chat: Uuid,
    #[serde(default = "yes")]
    active: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct ReceiptBody {
    chat: Uuid,
    up_to_seq: u64,
    #[serde(default)]
    client_msg_id: Option<String>,
}

#[derive(Deserialize)]
struct ChatBody {
    chat: Uuid,
}

#[derive(Deserialize)]
struct DeviceBody {
    device: String,
}

#[derive(Deserialize)]
struct MuteBody {
    chat: Uuid,
    muted: bool,
    #[serde(default)]
    client_msg_id: Option<String>,
}

#[derive(Deserialize)]
struct PushRegisterBody {
    provider: String,
    token: String,
    #[serde(default)]
    locale: Option<String>,
}

/// Push providers a device can register with.
pub const PUSH_PROVIDERS: &[&str] = &["apns", "fcm", "webpush", "webhook"];
/// Longest push token (or Web Push subscription JSON), bytes.
pub const MAX_PUSH_TOKEN_BYTES: usize = 4096;
/// Longest locale tag, bytes.
pub const MAX_LOCALE_BYTES: usize = 35;

/// Checks a push registration: a known provider, a token of at most
/// [`MAX_PUSH_TOKEN_BYTES`] in the provider's shape (APNs: hex; FCM: printable
/// ASCII; webhook: an http(s) URL; Web Push: the subscription JSON
/// `{"endpoint":"https://...","keys":{"p256dh":..,"auth":..}}` with a 65-byte
/// uncompressed P-256 key and a 16-byte auth secret, base64url).
pub fn check_push_registration(
    provider: &str,
    token: &str,
    locale: Option<&str>,
) -> Result<(), FrameError> {
    let invalid = |m: String| FrameError::new(ErrorCode::Invalid, m);
    if !PUSH_PROVIDERS.contains(&provider) {
        let shown: String = provider.chars().take(32).collect();
        return Err(invalid(format!(
            "unknown provider {shown:?}; one of apns, fcm, webpush, webhook"
        )));
    }
    if token.len() > MAX_PUSH_TOKEN_BYTES {
        return Err(FrameError::new(
            ErrorCode::TooLarge,
            format!(
                "token is {} bytes; at most {MAX_PUSH_TOKEN_BYTES}",
                token.len()
            ),
        ));
    }
    if token.is_empty() {
        return Err(invalid("token must not be empty".into()));
    }
    if let Some(l) = locale {
        if l.is_empty()
            || l.len() > MAX_LOCALE_BYTES
            || !l
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "locale must be a BCP 47 tag such as en-GB (1-35 bytes)".into(),
            ));
        }
    }
    match provider {
        "apns" => {
            if !token.len().is_multiple_of(2) || !token.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(invalid("an APNs device token is hex".into()));
            }
        }
        "fcm" => {
            if !token.chars().all(|c| c.is_ascii_graphic()) {
                return Err(invalid(
                    "an FCM registration token is printable ASCII".into(),
                ));
            }
        }
        "webhook" => {
            let lower = token.to_ascii_lowercase();
            let rest = lower
                .strip_prefix("https://")
                .or_else(|| lower.strip_prefix("http://"));
            if rest.is_none_or(|r| r.is_empty() || r.chars().any(|c| c.is_whitespace())) {
                return Err(invalid("a webhook token is an http(s) URL".into()));
            }
        }
        _ => check_webpush_subscription(token).map_err(|m| {
            invalid(format!(
                "malformed Web Push subscription: {m}; expected {{\"endpoint\":\"https://...\",\"keys\":{{\"p256dh\":...,\"auth\":...}}}}"
            ))
        })?,
    }
    Ok(())
}

fn check_webpush_subscription(token: &str) -> Result<(), String> {
    use base64::Engine;
    let v: Value = serde_json::from_str(token).map_err(|e| format!("not JSON ({e})"))?;
    let endpoint = v
        .get("endpoint")
        .and_then(Value::as_str)
        .ok_or("no endpoint")?;
    if !endpoint.starts_with("https://") && !endpoint.starts_with("http://") {
        return Err("endpoint is not an http(s) URL".into());
    }
    let key = |name: &str| -> Result<Vec<u8>, String> {
        let s = v
            .get("keys")
            .and_then(|k| k.get(name))
            .and_then(Value::as_str)
            .ok_or(format!("no keys.{name}"))?;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s.trim_end_matches('='))
            .map_err(|_| format!("keys.{name} is not base64url"))
    };
    let p256dh = key("p256dh")?;
    if p256dh.len() != 65 || p256dh[0] != 4 {
        return Err("keys.p256dh is not an uncompressed P-256 point (65 bytes)".into());
    }
    if key("auth")?.len() != 16 {
        return Err("keys.auth is not 16 bytes".into());
    }
    Ok(())
}

#[derive(Deserialize)]
struct PushSettingsBody {
    time_zone: String,
    #[serde(default)]
    dnd: Option<DndBody>,
    #[serde(default)]
    allowed_chats: Vec<Uuid>,
}

#[derive(Deserialize)]
struct DndBody {
    start: String,
    end: String,
}

/// Most chats allowed through do-not-disturb.
pub const MAX_DND_ALLOWED_CHATS: usize = 256;

/// `HH:MM` (24-hour) -> minutes after midnight.
fn minute_of_day(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

fn push_settings(b: PushSettingsBody) -> Result<ClientFrame, FrameError> {
    let invalid = |m: &str| FrameError::new(ErrorCode::Invalid, m);
    if b.time_zone.parse::<chrono_tz::Tz>().is_err() {
        return Err(invalid(
            "time_zone must be an IANA time zone such as Europe/Paris",
        ));
    }
    let dnd = match b.dnd {
        None => None,
        Some(d) => {
            let (Some(start), Some(end)) = (minute_of_day(&d.start), minute_of_day(&d.end)) else {
                return Err(invalid("dnd.start and dnd.end are HH:MM (24-hour)"));
            };
            if start == end {
                return Err(invalid("dnd.start and dnd.end must differ"));
            }
            Some((start, end))
        }
    };
    if b.allowed_chats.len() > MAX_DND_ALLOWED_CHATS {
        return Err(FrameError::new(
            ErrorCode::TooLarge,
            format!("at most {MAX_DND_ALLOWED_CHATS} allowed_chats"),
        ));
    }
    let mut allowed_chats = b.allowed_chats;
    allowed_chats.sort();
    allowed_chats.dedup();
    Ok(ClientFrame::PushSettings {
        time_zone: b.time_zone,
        dnd,
        allowed_chats,
    })
}

#[derive(Deserialize)]
struct PresenceSettingsBody {
    hidden: bool,
}

#[derive(Deserialize)]
struct SyncBody {
    #[serde(default)]
    since: Option<i64>,
    #[serde(default)]
    chats: Option<HashMap<Uuid, u64>>,
    #[serde(default)]
    more: bool,
}

fn fields<T: for<'de> Deserialize<'de>>(kind: &str, v: Value) -> Result<T, FrameError> {
    serde_json::from_value(v)
        .map_err(|e| FrameError::new(ErrorCode::Invalid, format!("{kind}: {e}")))
}

fn check_client_msg_id(id: &str) -> Result<(), FrameError> {
    if id.is_empty() || id.len() > MAX_CLIENT_MSG_ID_BYTES || id.chars().any(char::is_control) {
        return Err(FrameError::new(
            ErrorCode::Invalid,
            "client_msg_id must be 1 to 64 bytes without control characters",
        ));
    }
    Ok(())
}

fn check_opt_client_msg_id(id: &Option<String>) -> Result<(), FrameError> {
    id.as_deref().map_or(Ok(()), check_client_msg_id)
}

fn check_user(user: &str) -> Result<(), FrameError> {
    crate::auth::validate_user_id(user).map_err(|e| FrameError::new(ErrorCode::Invalid, e))
}

/// Parses one text message. Returns the frame's `id` (when it has a valid
/// one, even if the rest is invalid, so the error can echo it) and the frame.
pub fn parse(text: &str, limits: &ParseLimits) -> (FrameId, Result<ClientFrame, FrameError>) {
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return (
                None,
                Err(FrameError::new(
                    ErrorCode::BadFrame,
                    format!("not JSON: {e}"),
                )),
            )
        }
    };
    let Value::Object(mut map) = value else {
        return (
            None,
            Err(FrameError::new(
                ErrorCode::BadFrame,
                "a frame is a JSON object",
            )),
        );
    };
    let id = match map.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() <= 64 => Some(Value::String(s)),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Some(Value::Number(n)),
        Some(_) => {
            return (
                None,
                Err(FrameError::new(
                    ErrorCode::BadFrame,
                    "id must be a string of at most 64 bytes or an integer",
                )),
            )
        }
    };
    let kind = match map.remove("type") {
        Some(Value::String(s)) => s,
        _ => {
            return (
                id,
                Err(FrameError::new(
                    ErrorCode::BadFrame,
                    "missing string field \"type\"",
                )),
            )
        }
    };
    let about = About::of_raw(&map);
    let body = Value::Object(map);
    let parsed = parse_body(&kind, body, limits).map_err(|mut e| {
        e.about = about;
        e
    });
    (id, parsed)
}

fn parse_body(kind: &str, body: Value, limits: &ParseLimits) -> Result<ClientFrame, FrameError> {
    match kind {
        "send" => {
            let b: SendBody = fields(kind, body)?;
            check_client_msg_id(&b.client_msg_id)?;
            if b.text.is_empty() {
                return Err(FrameError::new(
                    ErrorCode::Invalid,
                    "text must not be empty",
                ));
            }
            if b.text.len() > limits.max_text_bytes {
                return Err(FrameError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "text is {} bytes; at most {}",
                        b.text.len(),
                        limits.max_text_bytes
                    ),
                ));
            }
            if b.reply_to == Some(0) {
                return Err(FrameError::new(
                    ErrorCode::Invalid,
                    "reply_to is a seq (>= 1)",
                ));
            }
            Ok(ClientFrame::Send {
                chat: b.chat,
                client_msg_id: b.client_msg_id,
                text: b.text,
                reply_to: b.reply_to,
            })
        }
        "create_chat" => {
            let b: CreateChatBody = fields(kind, body)?;
            check_opt_client_msg_id(&b.client_msg_id)?;
            for m in &b.members {
                check_user(m)?;
            }
            let mut members = b.members;
            members.sort();
            members.dedup();
            match b.kind {
                ChatKind::Direct => {
                    if members.len() != 1 {
                        return Err(FrameError::new(
                            ErrorCode::Invalid,
                            "a direct chat has exactly one other member",
                        ));
                    }
                    if b.title.is_some() {
                        return Err(FrameError::new(
                            ErrorCode::Invalid,
                            "a direct chat has no title",
                        ));
                    }
                }
                ChatKind::Group => {
                    if members.len() + 1 > limits.max_group_members as usize {
                        return Err(FrameError::new(
                            ErrorCode::GroupFull,
                            format!("a group has at most {} members", limits.max_group_members),
                        ));
                    }
                    if let Some(t) = &b.title {
                        if t.trim().is_empty() || t.len() > MAX_TITLE_BYTES {
                            return Err(FrameError::new(
                                ErrorCode::Invalid,
                                "title must be 1 to 256 bytes",
                            ));
                        }
                    }
                }
            }
            Ok(ClientFrame::CreateChat {
                kind: b.kind,
                members,
                title: b.title,
                client_msg_id: b.client_msg_id,
            })
        }
        "add_member" | "change_role" | "remove_member" => {
            let b: MemberBody = fields(kind, body)?;
            check_opt_client_msg_id(&b.client_msg_id)?;
            check_user(&b.user)?;
            Ok(match kind {
                "add_member" => ClientFrame::AddMember {
                    chat: b.chat,
                    user: b.user,
                    role: b.role.unwrap_or(Role::Member),
                    client_msg_id: b.client_msg_id,
                },
                "change_role" => ClientFrame::ChangeRole {
                    chat: b.chat,
                    user: b.user,
                    role: b.role.ok_or_else(|| {
                        FrameError::new(ErrorCode::Invalid, "change_role: missing field `role`")
                    })?,
                    client_msg_id: b.client_msg_id,
                },
                _ => ClientFrame::RemoveMember {
                    chat: b.chat,
                    user: b.user,
                    client_msg_id: b.client_msg_id,
                },
            })
        }
        "leave" => {
            let b: LeaveBody = fields(kind, body)?;
            check_opt_client_msg_id(&b.client_msg_id)?;
            Ok(ClientFrame::Leave {
                chat: b.chat,
                client_msg_id: b.client_msg_id,
            })
        }
        "history" => {
            let b: HistoryBody = fields(kind, body)?;
            let limit = b
                .limit
                .unwrap_or(DEFAULT_HISTORY_LIMIT.min(limits.max_history_limit));
            if limit == 0 || limit > limits.max_history_limit {
                return Err(FrameError::new(
                    ErrorCode::Invalid,
                    format!("limit must be 1 to {}", limits.max_history_limit),
                ));
            }
            if let (Some(a), Some(bf)) = (b.after, b.before) {
                if a >= bf {
                    return Err(FrameError::new(
                        ErrorCode::Invalid,
                        "after must be below before",
                    ));
                }
            }
            Ok(ClientFrame::History {
                chat: b.chat,
                before: b.before,
                after: b.after,
                limit,
            })
        }
        "sync" => {
            let b: SyncBody = fields(kind, body)?;
            let chats = b.chats.unwrap_or_default();
            if chats.len() > limits.sync_chats_per_frame {
                return Err(FrameError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "sync.chats has at most {} entries per frame; send the rest in further sync frames (more: true)",
                        limits.sync_chats_per_frame
                    ),
                ));
            }
            if b.since.is_some_and(|s| s < 0) {
                return Err(FrameError::new(
                    ErrorCode::Invalid,
                    "since is a checkpoint from synced (>= 0)",
                ));
            }
            Ok(ClientFrame::Sync {
                since: b.since,
                chats,
                more: b.more,
            })
        }
        "chats" => Ok(ClientFrame::Chats),
        "heartbeat" | "ping" => Ok(ClientFrame::Ping),
        "watch" => {
            let b: WatchBody = fields(kind, body)?;
            let mut chats = b.chats;
            chats.sort();
            chats.dedup();
            if chats.len() > limits.max_watched_chats {
                return Err(FrameError::new(
                    ErrorCode::TooLarge,
                    format!("watch at most {} chats", limits.max_watched_chats),
                ));
            }
            Ok(ClientFrame::Watch { chats })
        }
        "typing" => {
            let b: TypingBody = fields(kind, body)?;
            Ok(ClientFrame::Typing {
                chat: b.chat,
                active: b.active,
            })
        }
        "read" | "delivered" => {
            let b: ReceiptBody = fields(kind, body)?;
            check_opt_client_msg_id(&b.client_msg_id)?;
            if b.up_to_seq == 0 {
                return Err(FrameError::new(
                    ErrorCode::SeqOutOfRange,
                    "up_to_seq is a seq (>= 1)",
                ));
            }
            Ok(ClientFrame::Receipt {
                chat: b.chat,
                up_to_seq: b.up_to_seq,
                delivered: kind == "delivered",
                client_msg_id: b.client_msg_id,
            })
        }
        "receipts" => {
            let b: ChatBody = fields(kind, body)?;
            Ok(ClientFrame::Receipts { chat: b.chat })
        }
        "devices" => Ok(ClientFrame::Devices),
        "revoke_device" => {
            let b: DeviceBody = fields(kind, body)?;
            crate::auth::validate_device(&b.device)
                .map_err(|e| FrameError::new(ErrorCode::Invalid, e))?;
            Ok(ClientFrame::RevokeDevice { device: b.device })
        }
        "mute" => {
            let b: MuteBody = fields(kind, body)?;
            check_opt_client_msg_id(&b.client_msg_id)?;
            Ok(ClientFrame::Mute {
                chat: b.chat,
                muted: b.muted,
                client_msg_id: b.client_msg_id,
            })
        }
        "presence_settings" => {
            let b: PresenceSettingsBody = fields(kind, body)?;
            Ok(ClientFrame::PresenceSettings { hidden: b.hidden })
        }
        "push_register" => {
            let b: PushRegisterBody = fields(kind, body)?;
            check_push_registration(&b.provider, &b.token, b.locale.as_deref())?;
            Ok(ClientFrame::PushRegister {
                provider: b.provider,
                token: b.token,
                locale: b.locale,
            })
        }
        "push_unregister" => Ok(ClientFrame::PushUnregister),
        "push_settings" => push_settings(fields(kind, body)?),
        other => {
            let shown: String = other.chars().take(32).collect();
            Err(FrameError::new(
                ErrorCode::UnknownType,
                format!("unknown frame type {shown:?}"),
            ))
        }
    }
}

/// A chat event as clients see it (in `event` frames and in `history.events`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EventJson {
    pub chat: Uuid,
    pub seq: Option<u64>,
    pub kind: String,
    pub sender: String,
    pub device: String,
    pub client_msg_id: Option<String>,
    /// When the sequencer assigned the seq (ms since the epoch); the gateway's
    /// accept time for events that are not sequenced.
    pub ts: i64,
    pub body: Value,
}

impl EventJson {
    /// From a live envelope (`None` for an envelope without a chat).
    pub fn from_envelope(e: &Envelope) -> Option<Self> {
        let chat = e.chat_id?;
        let body = e.body.record_value();
        Some(Self {
            chat,
            seq: e.seq,
            kind: e.body.kind().to_string(),
            sender: e.sender_user.clone(),
            device: e.sender_device.clone(),
            client_msg_id: e.client_msg_id.clone(),
            ts: e.sequenced_ts.unwrap_or(e.server_ts),
            body,
        })
    }

    /// From a history row. The row's `body` JSON may be the bare record or
    /// the record tagged with its kind; both give the same `body` here.
    pub fn from_row(r: &MessageRow) -> Self {
        let body = match serde_json::from_str::<Value>(&r.body) {
            Ok(v) => unwrap_tagged(v, &r.kind),
            Err(_) => Value::String(r.body.clone()),
        };
        Self {
            chat: r.chat_id,
            seq: Some(r.seq),
            kind: r.kind.clone(),
            sender: r.sender_user.clone(),
            device: r.sender_device.clone(),
            client_msg_id: r.client_msg_id.clone(),
            ts: if r.sequenced_ts_ms > 0 {
                r.sequenced_ts_ms
            } else {
                r.server_ts_ms
            },
            body,
        }
    }

    /// The `event` frame of this event, serialized.
    pub fn frame(&self) -> String {
        #[derive(Serialize)]
        struct Frame<'a> {
            r#type: &'static str,
            #[serde(flatten)]
            event: &'a EventJson,
        }
        serde_json::to_string(&Frame {
            r#type: "event",
            event: self,
        })
        .unwrap_or_default()
    }
}

/// `{"Kind": {...}}` → `{...}`; anything else unchanged.
fn unwrap_tagged(v: Value, kind: &str) -> Value {
    match v {
        Value::Object(mut m) if m.len() == 1 && m.contains_key(kind) => {
            m.remove(kind).unwrap_or(Value::Null)
        }
        other => other,
    }
}

/// The limits announced in `hello`.
#[derive(Clone, Debug, Serialize)]
pub struct HelloLimits {
    pub max_frame_bytes: usize,
    pub max_text_bytes: usize,
    pub max_history_limit: u32,
    pub max_group_members: u32,
    pub max_pending_commands: usize,
    pub send_rate_per_s: f64,
    pub send_burst: f64,
    pub idle_timeout_ms: u64,
    pub ack_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub max_watched_chats: usize,
    pub typing_interval_ms: u64,
    pub typing_ttl_ms: u64,
    /// Most `sync.chats` entries in one `sync` frame.
    pub sync_chats_per_frame: usize,
    /// Most `sync.chats` entries in all the frames of one sync.
    pub max_sync_chats: usize,
    /// Reads one connection may have waiting for their answer at once.
    pub max_concurrent_reads: usize,
}

/// One chat of the `chats` answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatSummary {
    pub chat: Uuid,
    pub kind: Option<String>,
    pub title: Option<String>,
    pub role: Option<String>,
    pub joined_seq: Option<u64>,
    pub left_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub last_read_seq: Option<u64>,
    /// Events after the read pointer (within the user's membership).
    pub unread: u64,
    pub muted: bool,
}

/// One user's presence, as `presence` frames list it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PresenceJson {
    pub user: String,
    /// `online` or `offline`.
    pub status: String,
    /// Last time online (ms), when known and not hidden.
    pub last_seen: Option<i64>,
}

/// One device of the user, as `devices` lists it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeviceJson {
    pub device: String,
    pub first_seen: Option<i64>,
    pub last_seen: Option<i64>,
    pub revoked_at: Option<i64>,
    /// Connected to this gateway now.
    pub online: bool,
    /// The device asking.
    pub current: bool,
}

/// Server frames other than `event` (which is pre-serialized, see [`EventJson::frame`]).
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Hello {
        v: u32,
        user: String,
        device: String,
        gateway: String,
        session: Uuid,
        limits: HelloLimits,
    },
    Ack {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: FrameId,
        chat: Uuid,
        /// The command's seq; for `read`/`delivered` the pointer; null for `mute`.
        seq: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<String>,
        server_ts: i64,
        duplicate: bool,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: FrameId,
        code: &'static str,
        message: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        chat: Option<Uuid>,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<String>,
    },
    History {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: FrameId,
        chat: Uuid,
        events: Vec<EventJson>,
        has_more: bool,
    },
    Synced {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: FrameId,
        checkpoint: i64,
        truncated: Vec<Uuid>,
        /// Present (true) only when `since` was older than the sync
        /// markers' retention: the answer is a full resync.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        full_resync: bool,
    },
    Chats {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: FrameId,
        chats: Vec<ChatSummary>,
        unread_total: u64,
    },
    Presence {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: FrameId,
        users: Vec<PresenceJson>,
    },
    Typing {
        chat: Uuid,
        user: String,
        device: String,
        active: bool,
        expires_at: i64,
    },
    Receipt {
        chat: Uuid,
        user: String,
        device: String,
        /// `read` or `delivered`.
        kind: &'static str,
        up_to_seq: u64,
        ts: i64,
    },
    Receipts {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: FrameId,
        chat: Uuid,
        members: Vec<chat_projectors::store::ReceiptRow>,
    },
    Devices {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: FrameId,
        devices: Vec<DeviceJson>,
    },
    /// A chat was muted or unmuted on one of the user's devices.
    Muted {
        chat: Uuid,
        muted: bool,
    },
    Ok {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: FrameId,
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: FrameId,
        ts: i64,
    },
    Reconnect {
        reason: &'static str,
    },
}

impl ServerFrame {
    /// Sets the echoed `id` of a frame that answers a request.
    pub fn set_id(&mut self, new: FrameId) {
        match self {
            ServerFrame::Ack { id, .. }
            | ServerFrame::Error { id, .. }
            | ServerFrame::History { id, .. }
            | ServerFrame::Synced { id, .. }
            | ServerFrame::Chats { id, .. }
            | ServerFrame::Pong { id, .. }
            | ServerFrame::Presence { id, .. }
            | ServerFrame::Receipts { id, .. }
            | ServerFrame::Devices { id, .. }
            | ServerFrame::Ok { id } => *id = new,
            ServerFrame::Hello { .. }
            | ServerFrame::Reconnect { .. }
            | ServerFrame::Typing { .. }
            | ServerFrame::Receipt { .. }
            | ServerFrame::Muted { .. } => {}
        }
    }

    pub fn error(id: FrameId, code: ErrorCode, message: impl Into<String>) -> Self {
        Self::error_about(id, code, message, About::default())
    }

    /// An `error` answering a frame that named a chat or a `client_msg_id`.
    pub fn error_about(
        id: FrameId,
        code: ErrorCode,
        message: impl Into<String>,
        about: About,
    ) -> Self {
        ServerFrame::Error {
            id,
            code: code.as_str(),
            message: message.into(),
            chat: about.chat,
            client_msg_id: about.client_msg_id,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The `type` of the frame, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerFrame::Hello { .. } => "hello",
            ServerFrame::Ack { .. } => "ack",
            ServerFrame::Error { .. } => "error",
            ServerFrame::History { .. } => "history",
            ServerFrame::Synced { .. } => "synced",
            ServerFrame::Chats { .. } => "chats",
            ServerFrame::Presence { .. } => "presence",
            ServerFrame::Typing { .. } => "typing",
            ServerFrame::Receipt { .. } => "receipt",
            ServerFrame::Receipts { .. } => "receipts",
            ServerFrame::Devices { .. } => "devices",
            ServerFrame::Muted { .. } => "muted",
            ServerFrame::Ok { .. } => "ok",
            ServerFrame::Pong { .. } => "pong",
            ServerFrame::Reconnect { .. } => "reconnect",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_schemas::{Body, MessageKind, MessageSent};

    const L: ParseLimits = ParseLimits {
        max_watched_chats: 4,
        max_text_bytes: 10,
        max_history_limit: 100,
        max_group_members: 3,
        sync_chats_per_frame: 2,
    };
    const CHAT: &str = "5f0c7d8e-1b2a-4c3d-9e8f-0a1b2c3d4e5f";

    fn code(text: &str) -> ErrorCode {
        parse(text, &L).1.unwrap_err().code
    }

    #[test]
    fn push_registrations_are_validated() {
        let frame = |provider: &str, token: &str| {
            serde_json::json!({"type": "push_register", "provider": provider, "token": token})
                .to_string()
        };
        let sub = r#"{"endpoint":"https://push.example/x","keys":{"p256dh":"BAcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc","auth":"CQkJCQkJCQkJCQkJCQkJCQ"}}"#;
        for (provider, token) in [
            ("apns", "00fc13adff785122"),
            ("fcm", "abc:APA91b"),
            ("webhook", "https://hooks.example/x"),
            ("webpush", sub),
        ] {
            match parse(&frame(provider, token), &L).1 {
                Ok(ClientFrame::PushRegister { provider: p, .. }) => assert_eq!(p, provider),
                other => panic!("{provider}: {other:?}"),
            }
        }
        assert_eq!(code(&frame("pigeon", "x")), ErrorCode::Invalid);
        assert_eq!(code(&frame("apns", "xyz")), ErrorCode::Invalid);
        assert_eq!(code(&frame("webhook", "ftp://x")), ErrorCode::Invalid);
        assert_eq!(code(&frame("webpush", "{}")), ErrorCode::Invalid);
        let short = sub.replace("CQkJCQkJCQkJCQkJCQkJCQ", "CQkJ");
        assert_eq!(code(&frame("webpush", &short)), ErrorCode::Invalid);
        assert_eq!(code(&frame("fcm", &"t".repeat(5000))), ErrorCode::TooLarge);
        assert_eq!(
            parse(r#"{"type":"push_unregister"}"#, &L).1.unwrap(),
            ClientFrame::PushUnregister
        );
        let ok = format!(
            r#"{{"type":"push_settings","time_zone":"Asia/Kolkata","dnd":{{"start":"22:30","end":"07:00"}},"allowed_chats":["{CHAT}"]}}"#
        );
        match parse(&ok, &L).1.unwrap() {
            ClientFrame::PushSettings { dnd, .. } => assert_eq!(dnd, Some((1350, 420))),
            other => panic!("{other:?}"),
        }
        let tz = r#"{"type":"push_settings","time_zone":"Mars/Olympus"}"#;
        assert_eq!(code(tz), ErrorCode::Invalid);
        let t =
            r#"{"type":"push_settings","time_zone":"UTC","dnd":{"start":"25:00","end":"07:00"}}"#;
        assert_eq!(code(t), ErrorCode::Invalid);
    }

    #[test]
    fn malformed_frames_are_bad_frame() {
        assert_eq!(code("not json"), ErrorCode::BadFrame);
        assert_eq!(code("[1,2]"), ErrorCode::BadFrame);
        assert_eq!(code("{}"), ErrorCode::BadFrame);
        assert_eq!(code(r#"{"type":5}"#), ErrorCode::BadFrame);
        assert_eq!(code(r#"{"type":"ping","id":{"a":1}}"#), ErrorCode::BadFrame);
        assert_eq!(code(r#"{"type":"teleport"}"#), ErrorCode::UnknownType);
    }

    #[test]
    fn ids_are_echoed_even_on_invalid_frames() {
        let (id, r) = parse(r#"{"type":"send","id":"x1"}"#, &L);
        assert_eq!(id, Some(Value::String("x1".into())));
        assert_eq!(r.unwrap_err().code, ErrorCode::Invalid);
        let (id, r) = parse(r#"{"type":"ping","id":7}"#, &L);
        assert_eq!(id, Some(serde_json::json!(7)));
        assert_eq!(r.unwrap(), ClientFrame::Ping);
        assert_eq!(
            parse(r#"{"type":"heartbeat"}"#, &L).1.unwrap(),
            ClientFrame::Ping
        );
    }

    #[test]
    fn send_is_validated() {
        let ok = format!(
            r#"{{"type":"send","chat":"{CHAT}","client_msg_id":"c1","text":"hi","reply_to":3}}"#
        );
        match parse(&ok, &L).1.unwrap() {
            ClientFrame::Send { text, reply_to, .. } => {
                assert_eq!(text, "hi");
                assert_eq!(reply_to, Some(3));
            }
            other => panic!("{other:?}"),
        }
        let long = format!(
            r#"{{"type":"send","chat":"{CHAT}","client_msg_id":"c1","text":"0123456789x"}}"#
        );
        assert_eq!(code(&long), ErrorCode::TooLarge);
        let empty = format!(r#"{{"type":"send","chat":"{CHAT}","client_msg_id":"c1","text":""}}"#);
        assert_eq!(code(&empty), ErrorCode::Invalid);
        let bad_chat = r#"{"type":"send","chat":"nope","client_msg_id":"c1","text":"hi"}"#;
        assert_eq!(code(bad_chat), ErrorCode::Invalid);
        let no_cmid =
            format!(r#"{{"type":"send","chat":"{CHAT}","client_msg_id":"","text":"hi"}}"#);
        assert_eq!(code(&no_cmid), ErrorCode::Invalid);
    }

    #[test]
    fn chat_management_frames() {
        let direct = r#"{"type":"create_chat","kind":"direct","members":["bob"]}"#;
        assert!(matches!(
            parse(direct, &L).1.unwrap(),
            ClientFrame::CreateChat {
                kind: ChatKind::Direct,
                ..
            }
        ));
        let two = r#"{"type":"create_chat","kind":"direct","members":["bob","carol"]}"#;
        assert_eq!(code(two), ErrorCode::Invalid);
        let big = r#"{"type":"create_chat","kind":"group","members":["a","b","c"],"title":"t"}"#;
        assert_eq!(code(big), ErrorCode::GroupFull);
        let kind = r#"{"type":"create_chat","kind":"channel","members":["a"]}"#;
        assert_eq!(code(kind), ErrorCode::Invalid);
        let add = format!(r#"{{"type":"add_member","chat":"{CHAT}","user":"bob"}}"#);
        assert!(matches!(
            parse(&add, &L).1.unwrap(),
            ClientFrame::AddMember {
                role: Role::Member,
                ..
            }
        ));
        let role = format!(r#"{{"type":"change_role","chat":"{CHAT}","user":"bob"}}"#);
        assert_eq!(code(&role), ErrorCode::Invalid);
        let role =
            format!(r#"{{"type":"change_role","chat":"{CHAT}","user":"bob","role":"admin"}}"#);
        assert!(matches!(
            parse(&role, &L).1.unwrap(),
            ClientFrame::ChangeRole {
                role: Role::Admin,
                ..
            }
        ));
        let leave = format!(r#"{{"type":"leave","chat":"{CHAT}"}}"#);
        assert!(matches!(
            parse(&leave, &L).1.unwrap(),
            ClientFrame::Leave { .. }
        ));
    }

    #[test]
    fn history_and_sync() {
        let h = format!(r#"{{"type":"history","chat":"{CHAT}","before":10}}"#);
        assert!(matches!(
            parse(&h, &L).1.unwrap(),
            ClientFrame::History {
                limit: 50,
                before: Some(10),
                ..
            }
        ));
        let h = format!(r#"{{"type":"history","chat":"{CHAT}","limit":101}}"#);
        assert_eq!(code(&h), ErrorCode::Invalid);
        let s = format!(r#"{{"type":"sync","since":null,"chats":{{"{CHAT}":4}}}}"#);
        match parse(&s, &L).1.unwrap() {
            ClientFrame::Sync { since, chats, more } => {
                assert_eq!(since, None);
                assert_eq!(chats.values().copied().collect::<Vec<_>>(), [4]);
                assert!(!more);
            }
            other => panic!("{other:?}"),
        }
        // Per frame at most `sync_chats_per_frame` (2 here); `more` continues.
        let three = format!(
            r#"{{"type":"sync","chats":{{"{}":1,"{}":1,"{}":1}}}}"#,
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4()
        );
        assert_eq!(code(&three), ErrorCode::TooLarge);
        let part = format!(r#"{{"type":"sync","more":true,"chats":{{"{CHAT}":4}}}}"#);
        assert!(matches!(
            parse(&part, &L).1.unwrap(),
            ClientFrame::Sync { more: true, .. }
        ));
        // The default limits agree with each other: a frame of the most
        // entries, each as long as JSON allows, fits in max_frame_bytes.
        let per = sync_chats_per_frame(65_536);
        let widest: serde_json::Map<String, Value> = (0..per)
            .map(|_| (Uuid::new_v4().to_string(), Value::from(u64::MAX)))
            .collect();
        let frame = serde_json::json!({"type": "sync", "id": "s-0123456789", "since": i64::MAX,
            "more": true, "chats": widest})
        .to_string();
        assert!(frame.len() <= 65_536, "{} bytes", frame.len());
        assert!(per >= 1_000, "{per}");
        assert!(matches!(
            parse(r#"{"type":"sync"}"#, &L).1.unwrap(),
            ClientFrame::Sync { .. }
        ));
    }

    #[test]
    fn event_json_is_the_same_live_and_from_history() {
        let chat = Uuid::new_v4();
        let env = Envelope {
            event_id: Uuid::new_v4(),
            chat_id: Some(chat),
            seq: Some(7),
            sender_user: "alice".into(),
            sender_device: "d1".into(),
            client_msg_id: Some("c1".into()),
            client_ts: None,
            server_ts: 100,
            sequenced_ts: Some(105),
            trace_id: "t".into(),
            body: Body::MessageSent(MessageSent {
                kind: MessageKind::Text,
                text: Some("hi".into()),
                media: None,
                reply_to_seq: None,
            }),
        };
        let live = EventJson::from_envelope(&env).unwrap();
        assert_eq!(live.body["text"], "hi");
        assert_eq!(live.body["kind"], "text");
        for stored in [
            serde_json::to_string(&env.body).unwrap(),
            serde_json::to_string(&live.body).unwrap(),
        ] {
            let row = MessageRow {
                chat_id: chat,
                seq: 7,
                event_id: env.event_id,
                kind: "MessageSent".into(),
                sender_user: "alice".into(),
                sender_device: "d1".into(),
                client_msg_id: Some("c1".into()),
                body: stored,
                server_ts_ms: 100,
                sequenced_ts_ms: 105,
                trace_id: "t".into(),
            };
            assert_eq!(EventJson::from_row(&row), live);
        }
        let frame: Value = serde_json::from_str(&live.frame()).unwrap();
        assert_eq!(frame["type"], "event");
        assert_eq!(frame["seq"], 7);
        assert_eq!(frame["body"]["text"], "hi");
    }

    #[test]
    fn server_frames_serialize_with_a_type() {
        let f = ServerFrame::error(
            Some(serde_json::json!("a")),
            ErrorCode::RateLimited,
            "slow down",
        );
        let v: Value = serde_json::from_str(&f.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"error","id":"a","code":"rate_limited","message":"slow down"})
        );
        assert_eq!(
            ErrorCode::from_sequencer(Some("not_member")),
            ErrorCode::NotMember
        );
        assert_eq!(
            ErrorCode::from_sequencer(Some("whatever")),
            ErrorCode::Invalid
        );
    }
}
