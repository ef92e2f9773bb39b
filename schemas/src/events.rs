//! Rust mirror of the `chat.v1` schema: one type per `.avsc` file.
//!
//! Field names and order are those of the schema. Mapping of Avro types:
//! `string` → `String`, `long` → `u64` (non-negative), `int` → `u32`,
//! `timestamp-millis` → `i64` milliseconds since the Unix epoch, `uuid` →
//! [`Uuid`], `["null", T]` → `Option<T>`.

use apache_avro::types::Value;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::value::{index_of, shape, At, AvroValue, Fields};
use crate::SchemaError;

avro_enum! {
    /// `chat.v1.Role`: role of a member inside a chat.
    Role { Admin = "admin", Member = "member" }
}

avro_enum! {
    /// `chat.v1.ChatKind`: direct (one-to-one) or group chat.
    ChatKind { Direct = "direct", Group = "group" }
}

avro_enum! {
    /// `chat.v1.MessageKind`: text or media message.
    MessageKind { Text = "text", Media = "media" }
}

avro_enum! {
    /// `chat.v1.RemovalReason`: why a member is no longer in a chat.
    RemovalReason { Left = "left", Removed = "removed" }
}

avro_enum! {
    /// `chat.v1.PresenceStatus`: coarse presence of a user.
    PresenceStatus { Online = "online", Offline = "offline" }
}

avro_record! {
    /// `chat.v1.MediaRef`: an uploaded media object in the object store.
    MediaRef {
        /// Key of the object in the media object store.
        object_key: String,
        /// MIME type, e.g. `image/jpeg`.
        mime_type: String,
        /// Size in bytes.
        size_bytes: u64,
        /// Width in pixels for images and videos.
        width: Option<u32>,
        /// Height in pixels for images and videos.
        height: Option<u32>,
        /// SHA-256 of the bytes, lowercase hex.
        sha256: String,
    }
}

avro_record! {
    /// `chat.v1.ChatMember`: a member of a chat and their role.
    ChatMember {
        /// The member.
        user_id: String,
        /// Their role.
        role: Role,
    }
}

avro_record! {
    /// `chat.v1.MessageSent`: a new message; its number is the envelope `seq`.
    MessageSent {
        /// Text or media.
        kind: MessageKind,
        /// Text body (caption for media).
        text: Option<String>,
        /// Media object of a media message.
        media: Option<MediaRef>,
        /// The message replied to.
        reply_to_seq: Option<u64>,
    }
}

avro_record! {
    /// `chat.v1.MessageEdited`: new text for an earlier message.
    MessageEdited {
        /// The edited message.
        target_seq: u64,
        /// The new text.
        text: String,
    }
}

avro_record! {
    /// `chat.v1.MessageDeleted`: a message was deleted.
    MessageDeleted {
        /// The deleted message.
        target_seq: u64,
        /// For every member (true) or for the sender only (false).
        for_everyone: bool,
    }
}

avro_record! {
    /// `chat.v1.ReactionChanged`: a reaction was added or removed.
    ReactionChanged {
        /// The message reacted to.
        target_seq: u64,
        /// The emoji.
        emoji: String,
        /// Added (true) or removed (false).
        added: bool,
    }
}

avro_record! {
    /// `chat.v1.DeliveryReceipt`: delivered to a device up to `up_to_seq`.
    DeliveryReceipt {
        /// Cumulative delivery watermark.
        up_to_seq: u64,
        /// The receiving device.
        device: String,
    }
}

avro_record! {
    /// `chat.v1.ReadReceipt`: read up to `up_to_seq`.
    ReadReceipt {
        /// Cumulative read watermark.
        up_to_seq: u64,
    }
}

avro_record! {
    /// `chat.v1.ChatCreated`: first event of every chat.
    ChatCreated {
        /// Direct or group.
        kind: ChatKind,
        /// Title of a group chat.
        title: Option<String>,
        /// Initial members, the creator included.
        members: Vec<ChatMember>,
        /// Upper bound on the number of members.
        max_members: u32,
    }
}

avro_record! {
    /// `chat.v1.MemberAdded`: a user joined the chat.
    MemberAdded {
        /// The added user.
        user_id: String,
        /// Their role.
        role: Role,
    }
}

avro_record! {
    /// `chat.v1.MemberRemoved`: a user left or was removed.
    MemberRemoved {
        /// The user no longer in the chat.
        user_id: String,
        /// Left or removed.
        reason: RemovalReason,
    }
}

avro_record! {
    /// `chat.v1.MemberRoleChanged`: a member's role changed.
    MemberRoleChanged {
        /// The member.
        user_id: String,
        /// The new role.
        role: Role,
    }
}

avro_record! {
    /// `chat.v1.PresenceChanged`: user-scoped presence change.
    PresenceChanged {
        /// The user.
        user_id: String,
        /// Online or offline.
        status: PresenceStatus,
        /// Last seen online (ms since epoch).
        last_seen: Option<i64>,
    }
}

avro_record! {
    /// `chat.v1.Typing`: typing indicator (ephemeral).
    Typing {
        /// Typing (true) or stopped (false).
        active: bool,
        /// Hide the indicator after this instant (ms since epoch).
        expires_at: i64,
    }
}

avro_record! {
    /// `chat.v1.SessionOpened`: a device connected to a gateway.
    SessionOpened {
        /// The gateway instance.
        gateway_id: String,
        /// The device.
        device_id: String,
        /// The connection.
        session_id: Uuid,
        /// When it was accepted (ms since epoch).
        opened_at: i64,
    }
}

avro_record! {
    /// `chat.v1.SessionClosed`: a device connection ended.
    SessionClosed {
        /// The gateway instance.
        gateway_id: String,
        /// The device.
        device_id: String,
        /// The connection, as in [`SessionOpened`].
        session_id: Uuid,
        /// Why it ended.
        reason: String,
    }
}

avro_record! {
    /// `chat.v1.PushTask`: a push notification to deliver.
    PushTask {
        /// The recipient.
        user_id: String,
        /// The chat of the notified message.
        chat_id: Uuid,
        /// The notified message.
        seq: u64,
        /// Notification title.
        title: String,
        /// Message preview, if previews are enabled.
        body_preview: Option<String>,
        /// Attempt number, from 1.
        attempt: u32,
        /// Not to be delivered before this instant (ms since epoch).
        not_before: i64,
        /// The device to notify (one task per (chat, seq, device)).
        device_id: Option<String>,
        /// `apns`, `fcm`, `webpush` or `webhook`.
        provider: Option<String>,
        /// The provider token, or the Web Push subscription JSON.
        token: Option<String>,
        /// The app's locale.
        locale: Option<String>,
        /// Messages coalesced into this notification (>= 1).
        count: Option<u32>,
        /// The user's unread total when the task was made.
        badge: Option<u32>,
        /// Same for every notification of one (chat, device) stream.
        collapse_key: Option<String>,
        /// `<chat_id>:<seq>:<device_id>`, the idempotency key.
        dedupe_key: Option<String>,
        /// Sender of the latest coalesced message.
        sender_id: Option<String>,
        /// `message`, `mention` or `direct`.
        kind: Option<String>,
        /// When the projector made the task (ms since epoch).
        created_ts: Option<i64>,
    }
}

avro_enum! {
    /// `chat.v1.CommandOutcome`: what the sequencer did with a command.
    CommandOutcome { Accepted = "accepted", Duplicate = "duplicate", Rejected = "rejected" }
}

avro_record! {
    /// `chat.v1.CommandResult`: the sequencer's answer to one client command.
    CommandResult {
        /// event_id of the command this answers.
        command_event_id: Uuid,
        /// accepted, duplicate (seq is the original) or rejected.
        outcome: CommandOutcome,
        /// The event's per-chat seq; None when rejected.
        seq: Option<u64>,
        /// Stable error code when rejected.
        code: Option<String>,
        /// Human-readable explanation when rejected.
        reason: Option<String>,
        /// The `chat.events` partition of the command's event (not rejected).
        event_partition: Option<u32>,
        /// An offset of that partition at or after the command's event
        /// (accepted: the event's own; duplicate: the newest event when
        /// answered), so the gateway can wait for projections to pass it.
        event_offset: Option<u64>,
    }
}

avro_record! {
    /// `chat.v1.SessionRouted`: the router routes live events to a new session from these offsets on.
    SessionRouted {
        /// The session (from SessionOpened).
        session_id: Uuid,
        /// Per chat.events partition (index), the next offset the router will route.
        router_offsets: Vec<u64>,
    }
}

avro_record! {
    /// `chat.v1.GatewayHeartbeat`: a gateway is alive (on every `chat.sessions` partition).
    GatewayHeartbeat {
        /// The gateway.
        gateway_id: String,
        /// Random per gateway process.
        instance_id: Uuid,
        /// How often this gateway sends heartbeats.
        interval_ms: u64,
    }
}

avro_record! {
    /// `chat.v1.PresenceSettingChanged`: a user hid or showed their presence.
    PresenceSettingChanged {
        /// True: the user appears offline with no last-seen time.
        hidden: bool,
    }
}

avro_record! {
    /// `chat.v1.DeviceRevoked`: a user revoked one of their devices.
    DeviceRevoked {
        /// The revoked device.
        device_id: String,
        /// When (ms since epoch); tokens issued before are refused.
        revoked_at: i64,
    }
}

avro_record! {
    /// `chat.v1.MuteChanged`: a member muted or unmuted a chat for themselves.
    MuteChanged {
        /// True: no notifications for this chat.
        muted: bool,
    }
}

avro_record! {
    /// `chat.v1.PushRegistrationChanged`: a device's push registration changed.
    PushRegistrationChanged {
        /// The device.
        device_id: String,
        /// `apns`, `fcm`, `webpush` or `webhook`.
        provider: String,
        /// The token or Web Push subscription JSON; `None`: removed.
        token: Option<String>,
        /// The app's locale.
        locale: Option<String>,
        /// `client`, `unregistered`, `invalid_token` or `revoked`.
        reason: Option<String>,
        /// The provider's answer when a worker removed it.
        provider_detail: Option<String>,
    }
}

avro_union! {
    /// The `body` union of [`Envelope`]: exactly one event. Variant order is
    /// the union order of the schema; new variants are only ever appended.
    Body {
        MessageSent,
        MessageEdited,
        MessageDeleted,
        ReactionChanged,
        DeliveryReceipt,
        ReadReceipt,
        ChatCreated,
        MemberAdded,
        MemberRemoved,
        MemberRoleChanged,
        PresenceChanged,
        Typing,
        SessionOpened,
        SessionClosed,
        PushTask,
        CommandResult,
        SessionRouted,
        GatewayHeartbeat,
        PresenceSettingChanged,
        DeviceRevoked,
        MuteChanged,
        PushRegistrationChanged,
    }
}

avro_record! {
    /// `chat.v1.Envelope`: every record on every chat topic.
    Envelope {
        /// Unique event id (idempotence, deduplication).
        event_id: Uuid,
        /// The chat; `None` for user-scoped events (presence, sessions, push).
        chat_id: Option<Uuid>,
        /// Gap-free per-chat sequence number; `None` until sequenced.
        seq: Option<u64>,
        /// User who caused the event.
        sender_user: String,
        /// Device of `sender_user`.
        sender_device: String,
        /// Client-chosen id for retries and optimistic UI.
        client_msg_id: Option<String>,
        /// Client clock (ms since epoch), informative only.
        client_ts: Option<i64>,
        /// When the gateway accepted the event (ms since epoch).
        server_ts: i64,
        /// When the sequencer assigned `seq` (ms since epoch).
        sequenced_ts: Option<i64>,
        /// Distributed tracing id.
        trace_id: String,
        /// The event.
        body: Body,
    }
}

impl Body {
    /// The pointer a receipt moves, if this is one: `(device, up_to_seq)`,
    /// with `device` `None` for a read receipt (read pointers are per user,
    /// delivery pointers per device). Receipts are ordered in a chat's
    /// partition but take no seq.
    pub fn receipt(&self) -> Option<(Option<&str>, u64)> {
        match self {
            Body::ReadReceipt(r) => Some((None, r.up_to_seq)),
            Body::DeliveryReceipt(r) => Some((Some(r.device.as_str()), r.up_to_seq)),
            _ => None,
        }
    }
}

impl Envelope {
    /// The Avro value of this envelope, shaped for [`crate::envelope_schema`].
    ///
    /// `u64` values above `i64::MAX` and `u32` values above `i32::MAX` are not
    /// representable in Avro `long` / `int` and saturate.
    pub fn to_avro(&self) -> Value {
        self.to_value()
    }

    /// Decodes a value read with [`crate::envelope_schema`]. Total: any other
    /// shape is a [`SchemaError::Shape`], never a panic.
    pub fn from_avro(value: Value) -> Result<Envelope, SchemaError> {
        Self::from_value(value, At::ROOT)
    }
}
