//! Envelopes as the tests and benchmarks that talk to the log directly (no
//! gateway) write them: commands for the sequencer, sequenced events for
//! the router, session records.

use chat_schemas::{
    Body, ChatCreated, ChatKind, ChatMember, Envelope, MessageKind, MessageSent, Role,
    SessionOpened,
};
use uuid::Uuid;

/// An envelope of `chat` from `user` (device `<user>-phone`) with
/// `client_msg_id`; `seq` set makes it a sequenced event.
pub fn envelope(
    chat: Uuid,
    user: &str,
    client_msg_id: &str,
    seq: Option<u64>,
    body: Body,
) -> Envelope {
    Envelope {
        event_id: Uuid::new_v4(),
        chat_id: Some(chat),
        seq,
        sender_user: user.into(),
        sender_device: format!("{user}-phone"),
        client_msg_id: Some(client_msg_id.into()),
        client_ts: None,
        server_ts: chat_runtime::now_ms(),
        sequenced_ts: seq.map(|_| chat_runtime::now_ms()),
        trace_id: Uuid::new_v4().simple().to_string(),
        body,
    }
}

/// A command for the sequencer (seq not assigned yet).
pub fn command(chat: Uuid, user: &str, client_msg_id: &str, body: Body) -> Envelope {
    envelope(chat, user, client_msg_id, None, body)
}

/// A sequenced event with `seq` (client message id `c<seq>`).
pub fn event(chat: Uuid, seq: u64, user: &str, body: Body) -> Envelope {
    envelope(chat, user, &format!("c{seq}"), Some(seq), body)
}

/// A text message body.
pub fn text(t: &str) -> Body {
    Body::MessageSent(MessageSent {
        kind: MessageKind::Text,
        text: Some(t.into()),
        media: None,
        reply_to_seq: None,
    })
}

/// A group's creation with `members` (the sender is added by the sequencer).
pub fn group(members: &[&str]) -> Body {
    Body::ChatCreated(ChatCreated {
        kind: ChatKind::Group,
        title: Some("test".into()),
        members: members
            .iter()
            .map(|u| ChatMember {
                user_id: (*u).into(),
                role: Role::Member,
            })
            .collect(),
        max_members: 0,
    })
}

/// `user`'s device `<user>-d` opened a session on `gateway`.
pub fn session_opened(user: &str, gateway: &str) -> Envelope {
    Envelope {
        event_id: Uuid::new_v4(),
        chat_id: None,
        seq: None,
        sender_user: user.into(),
        sender_device: format!("{user}-d"),
        client_msg_id: None,
        client_ts: None,
        server_ts: chat_runtime::now_ms(),
        sequenced_ts: None,
        trace_id: Uuid::new_v4().simple().to_string(),
        body: Body::SessionOpened(SessionOpened {
            gateway_id: gateway.into(),
            device_id: format!("{user}-d"),
            session_id: Uuid::new_v4(),
            opened_at: chat_runtime::now_ms(),
        }),
    }
}
