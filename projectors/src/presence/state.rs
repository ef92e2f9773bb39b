//! The presence fold of one `chat.sessions` partition, and what each record
//! implies. Pure: no I/O, so the rules are unit-tested here.
//!
//! A user is online while at least one of their sessions is open and they do
//! not hide their presence. Sessions end by `SessionClosed` (the gateway saw
//! the connection end, or the heartbeat TTL passed), or are expired here:
//! when a gateway's heartbeats stop for the TTL, or when it restarts under
//! the same id (a new `instance_id`), its sessions are closed by appending
//! `SessionClosed` records, which then fold like any other close.
//!
//! **Log time.** Whether a gateway's heartbeats stopped is decided by the
//! partition's own records, never by the clock of the process folding them:
//! the fold keeps a log clock that only `GatewayHeartbeat` records move. A
//! heartbeat moves it by the time its gateway's own clock says passed since
//! that gateway's previous heartbeat (`seen + (ts - own_ts)`, the larger of
//! that and the clock), so the clock runs as fast as the fastest live
//! gateway's and constant offsets between the gateways' clocks do not
//! matter. A gateway is expired when the clock passed its last heartbeat by
//! more than the TTL: a fold that stalls (stopped, slow rebuild, blocked
//! writes) reads the backlog in order and sees every live gateway's
//! heartbeats in time. When no gateway beats, the clock stands still; the
//! service then may pass `idle_ms` to [`PresenceState::expire`] (see the
//! service's docs: only once caught up with the partition's end).

use chat_schemas::{Body, Envelope, PresenceStatus};
use std::collections::HashMap;
use uuid::Uuid;

/// One user's sessions and settings.
#[derive(Clone, Debug, Default)]
struct User {
    /// session -> (gateway, device)
    sessions: HashMap<Uuid, (String, String)>,
    hidden: bool,
    /// When the last session closed (ms), for `last_seen`.
    last_seen: Option<i64>,
}

impl User {
    fn visible_status(&self) -> PresenceStatus {
        if !self.hidden && !self.sessions.is_empty() {
            PresenceStatus::Online
        } else {
            PresenceStatus::Offline
        }
    }
}

#[derive(Clone, Debug)]
struct Gateway {
    /// Nil when only a session of it was seen, not a heartbeat yet.
    instance: Uuid,
    /// The log clock after its last heartbeat (ms).
    seen: i64,
    /// Its own clock (`server_ts`) at that heartbeat (ms).
    own_ts: i64,
}

/// What a record (or the passing of time) implies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Append `PresenceChanged` for `user` to `chat.presence`.
    Presence {
        user: String,
        status: PresenceStatus,
        last_seen: Option<i64>,
    },
    /// Append `SessionClosed` for this session to `chat.sessions`.
    Close {
        user: String,
        session: Uuid,
        gateway: String,
        device: String,
        reason: &'static str,
    },
    /// The device was connected at `at` (for `user_devices`).
    DeviceSeen {
        user: String,
        device: String,
        at: i64,
    },
    /// The device was revoked at `at` (for `user_devices`).
    DeviceRevoked {
        user: String,
        device: String,
        at: i64,
    },
}

/// The fold of one `chat.sessions` partition.
#[derive(Clone, Debug, Default)]
pub struct PresenceState {
    users: HashMap<String, User>,
    gateways: HashMap<String, Gateway>,
    /// The log clock (ms): see the module docs.
    clock: i64,
    /// False until the first heartbeat set the clock.
    clock_set: bool,
}

impl PresenceState {
    /// Users with at least one open session.
    pub fn online_users(&self) -> usize {
        self.users
            .values()
            .filter(|u| !u.sessions.is_empty())
            .count()
    }

    /// The log clock (ms): how far the partition's heartbeats say time went.
    pub fn clock(&self) -> i64 {
        self.clock
    }

    /// Folds one record and returns its effects. No wall clock: time is
    /// what the records say (module docs).
    pub fn apply(&mut self, ev: &Envelope) -> Vec<Effect> {
        let user_id = &ev.sender_user;
        let mut out = Vec::new();
        match &ev.body {
            Body::GatewayHeartbeat(h) => {
                let ts = ev.server_ts;
                let prev = self.gateways.get(&h.gateway_id).cloned();
                let restarted = prev
                    .as_ref()
                    .is_some_and(|g| !g.instance.is_nil() && g.instance != h.instance_id);
                if restarted {
                    // Every session of the earlier instance is gone. The new
                    // instance writes this heartbeat before any session.
                    self.close_gateway(&h.gateway_id, "gateway_restarted", &mut out);
                }
                match prev.filter(|_| !restarted) {
                    // Its own clock says how long since its previous beat.
                    Some(g) => {
                        let mapped = g.seen.saturating_add(ts.saturating_sub(g.own_ts));
                        self.clock = self.clock.max(mapped);
                    }
                    // A first heartbeat only anchors its clock to ours.
                    None if !self.clock_set => {
                        self.clock = ts;
                        self.clock_set = true;
                    }
                    None => {}
                }
                self.gateways.insert(
                    h.gateway_id.clone(),
                    Gateway {
                        instance: h.instance_id,
                        seen: self.clock,
                        own_ts: ts,
                    },
                );
            }
            Body::SessionOpened(o) => {
                let user = self.users.entry(user_id.clone()).or_default();
                let before = user.visible_status();
                user.sessions
                    .insert(o.session_id, (o.gateway_id.clone(), o.device_id.clone()));
                if before != user.visible_status() {
                    out.push(presence(user_id, user));
                }
                out.push(Effect::DeviceSeen {
                    user: user_id.clone(),
                    device: o.device_id.clone(),
                    at: o.opened_at,
                });
                // A session of a gateway never heard of counts as alive now
                // (a gateway re-announcing sessions after it was expired).
                let clock = self.clock;
                self.gateways
                    .entry(o.gateway_id.clone())
                    .or_insert(Gateway {
                        instance: Uuid::nil(),
                        seen: clock,
                        own_ts: ev.server_ts,
                    });
            }
            Body::SessionClosed(c) => {
                if let Some(user) = self.users.get_mut(user_id) {
                    let before = user.visible_status();
                    if let Some((_, device)) = user.sessions.remove(&c.session_id) {
                        out.push(Effect::DeviceSeen {
                            user: user_id.clone(),
                            device,
                            at: ev.server_ts,
                        });
                        if user.sessions.is_empty() {
                            user.last_seen = Some(ev.server_ts);
                        }
                    }
                    if before != user.visible_status() {
                        out.push(presence(user_id, user));
                    }
                }
            }
            Body::PresenceSettingChanged(s) => {
                let user = self.users.entry(user_id.clone()).or_default();
                user.hidden = s.hidden;
                // Always published: hiding also hides last_seen, showing
                // reveals it again.
                out.push(presence(user_id, user));
            }
            Body::DeviceRevoked(r) => {
                out.push(Effect::DeviceRevoked {
                    user: user_id.clone(),
                    device: r.device_id.clone(),
                    at: r.revoked_at,
                });
            }
            _ => {}
        }
        out
    }

    /// Closes the sessions of gateways whose last heartbeat the log clock
    /// passed by more than `ttl_ms` (they died without saying goodbye) and
    /// forgets those gateways. `idle_ms` is added to the log clock: 0, unless
    /// the caller knows that much time passed with no heartbeat at all while
    /// it was caught up with the partition (the last gateway died).
    pub fn expire(&mut self, ttl_ms: i64, idle_ms: i64) -> Vec<Effect> {
        let now = self.clock.saturating_add(idle_ms.max(0));
        let dead: Vec<String> = self
            .gateways
            .iter()
            .filter(|(_, g)| now - g.seen > ttl_ms)
            .map(|(id, _)| id.clone())
            .collect();
        let mut out = Vec::new();
        for gw in dead {
            self.gateways.remove(&gw);
            self.close_gateway(&gw, "gateway_expired", &mut out);
        }
        out
    }

    fn close_gateway(&self, gateway: &str, reason: &'static str, out: &mut Vec<Effect>) {
        for (user_id, user) in &self.users {
            for (session, (gw, device)) in &user.sessions {
                if gw == gateway {
                    out.push(Effect::Close {
                        user: user_id.clone(),
                        session: *session,
                        gateway: gw.clone(),
                        device: device.clone(),
                        reason,
                    });
                }
            }
        }
    }
}

fn presence(user_id: &str, user: &User) -> Effect {
    let status = user.visible_status();
    Effect::Presence {
        user: user_id.to_string(),
        status,
        last_seen: match status {
            PresenceStatus::Online => None,
            PresenceStatus::Offline if user.hidden => None,
            PresenceStatus::Offline => user.last_seen,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_schemas::{GatewayHeartbeat, PresenceSettingChanged, SessionClosed, SessionOpened};

    fn env(user: &str, ts: i64, body: Body) -> Envelope {
        Envelope {
            event_id: Uuid::new_v4(),
            chat_id: None,
            seq: None,
            sender_user: user.into(),
            sender_device: "d".into(),
            client_msg_id: None,
            client_ts: None,
            server_ts: ts,
            sequenced_ts: None,
            trace_id: "t".into(),
            body,
        }
    }
    fn open(user: &str, gw: &str, s: Uuid, ts: i64) -> Envelope {
        env(
            user,
            ts,
            Body::SessionOpened(SessionOpened {
                gateway_id: gw.into(),
                device_id: format!("{user}-d"),
                session_id: s,
                opened_at: ts,
            }),
        )
    }
    fn close(user: &str, gw: &str, s: Uuid, ts: i64) -> Envelope {
        env(
            user,
            ts,
            Body::SessionClosed(SessionClosed {
                gateway_id: gw.into(),
                device_id: format!("{user}-d"),
                session_id: s,
                reason: "closed".into(),
            }),
        )
    }
    fn beat(gw: &str, instance: Uuid, ts: i64) -> Envelope {
        env(
            "",
            ts,
            Body::GatewayHeartbeat(GatewayHeartbeat {
                gateway_id: gw.into(),
                instance_id: instance,
                interval_ms: 1000,
            }),
        )
    }
    fn statuses(effects: &[Effect]) -> Vec<(String, PresenceStatus, Option<i64>)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Presence {
                    user,
                    status,
                    last_seen,
                } => Some((user.clone(), *status, *last_seen)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn online_with_the_first_session_offline_after_the_last() {
        let mut s = PresenceState::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let on = s.apply(&open("u", "g", a, 10));
        assert_eq!(
            statuses(&on),
            vec![("u".into(), PresenceStatus::Online, None)]
        );
        assert!(statuses(&s.apply(&open("u", "g", b, 11))).is_empty());
        assert!(statuses(&s.apply(&close("u", "g", a, 12))).is_empty());
        let off = s.apply(&close("u", "g", b, 13));
        assert_eq!(
            statuses(&off),
            vec![("u".into(), PresenceStatus::Offline, Some(13))]
        );
        // A close of an unknown session changes nothing.
        assert!(s.apply(&close("u", "g", a, 14)).is_empty());
    }

    #[test]
    fn a_silent_gateway_expires_and_a_restarted_one_drops_its_old_sessions() {
        let mut s = PresenceState::default();
        let (i1, i2) = (Uuid::new_v4(), Uuid::new_v4());
        s.apply(&beat("g1", i1, 0));
        s.apply(&beat("g2", i1, 0));
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        s.apply(&open("u", "g1", a, 1));
        s.apply(&open("v", "g2", b, 1));
        s.apply(&beat("g2", i1, 9_000));
        assert!(s.expire(10_000, 0).is_empty(), "9 s of log time < TTL");
        s.apply(&beat("g2", i1, 10_001));
        // g1 silent for more than the TTL of log time: its session is
        // closed, g2's is not.
        let closes = s.expire(10_000, 0);
        assert!(
            matches!(&closes[..], [Effect::Close { user, session, reason: "gateway_expired", .. }] if user == "u" && *session == a)
        );
        assert!(s.expire(10_000, 0).is_empty(), "expired once");
        // g2 restarts with a new instance: its earlier sessions are closed.
        let closes = s.apply(&beat("g2", i2, 10_500));
        assert!(
            matches!(&closes[..], [Effect::Close { user, reason: "gateway_restarted", .. }] if user == "v")
        );
    }

    /// The finding: a fold that stalls (stopped, slow rebuild, blocked
    /// writes) must not expire live gateways. No wall clock enters the fold:
    /// however late the records are read, a gateway beating every second is
    /// never silent for the TTL.
    #[test]
    fn a_stalled_fold_reads_the_backlog_and_expires_nobody_alive() {
        let mut s = PresenceState::default();
        let i = Uuid::new_v4();
        s.apply(&beat("g", i, 1_000));
        s.apply(&open("u", "g", Uuid::new_v4(), 1_001));
        // The fold stopped for a minute; the backlog is read at once, with
        // an expiry check after every record, as the service may do.
        for t in 1..=60 {
            s.apply(&beat("g", i, 1_000 + t * 1_000));
            assert!(s.expire(4_000, 0).is_empty(), "at {t} s");
        }
        assert_eq!(s.clock(), 61_000);
        assert_eq!(s.online_users(), 1);
    }

    #[test]
    fn skewed_gateway_clocks_do_not_expire_each_other_but_log_time_still_runs() {
        let mut s = PresenceState::default();
        let (i1, i2) = (Uuid::new_v4(), Uuid::new_v4());
        let ahead = 3_600_000; // g1's clock is an hour ahead of g2's
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        for t in 0..20 {
            s.apply(&beat("g2", i2, t * 1_000));
            s.apply(&beat("g1", i1, ahead + t * 1_000));
            if t == 0 {
                s.apply(&open("u", "g1", a, ahead));
                s.apply(&open("v", "g2", b, 0));
            }
            assert!(s.expire(4_000, 0).is_empty(), "at {t} s");
        }
        // g2 dies; g1's heartbeats alone move the clock past the TTL.
        for t in 20..24 {
            s.apply(&beat("g1", i1, ahead + t * 1_000));
            assert!(s.expire(4_000, 0).is_empty(), "at {t} s");
        }
        s.apply(&beat("g1", i1, ahead + 24_000));
        let closes = s.expire(4_000, 0);
        assert!(
            matches!(&closes[..], [Effect::Close { user, reason: "gateway_expired", .. }] if user == "v"),
            "{closes:?}"
        );
    }

    #[test]
    fn with_no_heartbeat_at_all_only_idle_time_expires() {
        let mut s = PresenceState::default();
        let i = Uuid::new_v4();
        s.apply(&beat("g", i, 5_000));
        s.apply(&open("u", "g", Uuid::new_v4(), 5_001));
        // The only gateway died: nothing moves the log clock.
        assert!(s.expire(4_000, 0).is_empty());
        assert!(s.expire(4_000, 4_000).is_empty());
        let closes = s.expire(4_000, 4_001);
        assert!(matches!(&closes[..], [Effect::Close { user, .. }] if user == "u"));
    }

    #[test]
    fn an_expired_gateway_that_reannounces_sessions_is_not_taken_for_a_restart() {
        let mut s = PresenceState::default();
        let (i, other) = (Uuid::new_v4(), Uuid::new_v4());
        let a = Uuid::new_v4();
        s.apply(&beat("g", i, 0));
        s.apply(&beat("h", other, 0));
        s.apply(&open("u", "g", a, 1));
        s.apply(&beat("h", other, 5_000));
        let closes = s.expire(4_000, 0);
        assert_eq!(closes.len(), 1);
        // presence appends the close; the fold reads it back
        s.apply(&close("u", "g", a, 5_001));
        // g was alive after all: it re-announces the session (same id), and
        // then beats with the same instance: the session stays open.
        let on = s.apply(&open("u", "g", a, 5_100));
        assert_eq!(
            statuses(&on),
            vec![("u".into(), PresenceStatus::Online, None)]
        );
        assert!(s.apply(&beat("g", i, 5_200)).is_empty());
        assert!(s.expire(4_000, 0).is_empty());
        assert_eq!(s.online_users(), 1);
    }

    #[test]
    fn hidden_users_look_offline_without_last_seen() {
        let mut s = PresenceState::default();
        let a = Uuid::new_v4();
        s.apply(&open("u", "g", a, 1));
        let hide = Body::PresenceSettingChanged(PresenceSettingChanged { hidden: true });
        let hidden = s.apply(&env("u", 2, hide));
        assert_eq!(
            statuses(&hidden),
            vec![("u".into(), PresenceStatus::Offline, None)]
        );
        assert!(statuses(&s.apply(&close("u", "g", a, 3))).is_empty());
        let show = Body::PresenceSettingChanged(PresenceSettingChanged { hidden: false });
        let shown = s.apply(&env("u", 4, show));
        assert_eq!(
            statuses(&shown),
            vec![("u".into(), PresenceStatus::Offline, Some(3))]
        );
        let on = s.apply(&open("u", "g", Uuid::new_v4(), 5));
        assert_eq!(
            statuses(&on),
            vec![("u".into(), PresenceStatus::Online, None)]
        );
    }
}
