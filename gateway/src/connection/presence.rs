//! Presence-family frames on the session side: `watch` (a new generation
//! of the watched set, answered by a read task) and `typing` (the per-chat
//! rate limit and the membership cache here; the check and the append to
//! `chat.ephemeral` in a read task). Presence, typing and receipt frames
//! *to* the client come from the hub (`fanout.rs`) as live events.

use std::time::{Duration, Instant};
use uuid::Uuid;

use super::reads::Read;
use super::session::{Session, Stop};
use crate::config::ms;
use crate::protocol::{About, ErrorCode, FrameId};

/// How long a membership check answers `typing` without a new read.
const MEMBER_CACHE: Duration = Duration::from_secs(30);

/// Marks a chat's typing as in flight (no second one until it is done).
const IN_FLIGHT: Duration = Duration::from_secs(24 * 3600);

impl Session {
    pub(super) fn on_watch(&mut self, id: FrameId, chats: Vec<Uuid>) -> Result<(), Stop> {
        self.watch_generation += 1;
        let generation = self.watch_generation;
        self.spawn_read(id, About::default(), Read::Watch { chats, generation });
        Ok(())
    }

    pub(super) fn on_typing(&mut self, id: FrameId, chat: Uuid, active: bool) -> Result<(), Stop> {
        let limits = &self.shared.config.limits;
        let interval = ms(limits.typing_interval_ms);
        let now = Instant::now();
        if self
            .typing_at
            .get(&chat)
            .is_some_and(|t| now.saturating_duration_since(*t) < interval || *t > now)
        {
            let message = format!(
                "at most one typing frame per chat every {} ms",
                limits.typing_interval_ms
            );
            self.error_about(id, ErrorCode::RateLimited, message, About::chat(chat));
            return Ok(());
        }
        let known = self
            .members
            .get(&chat)
            .is_some_and(|t| t.elapsed() < MEMBER_CACHE);
        if self.typing_at.len() > 1024 {
            self.typing_at
                .retain(|_, t| *t > now || now.saturating_duration_since(*t) < interval);
        }
        if self.members.len() > 1024 {
            self.members.retain(|_, t| t.elapsed() < MEMBER_CACHE);
        }
        self.typing_at.insert(chat, now + IN_FLIGHT);
        self.spawn_read(
            id,
            About::chat(chat),
            Read::Typing {
                chat,
                active,
                known,
            },
        );
        Ok(())
    }
}
