//! The presence fold of one `chat.sessions` partition, and what each record
//! implies. Pure: no I/O, so the rules are unit-tested here.
//!
//! A user is online while at least one of their sessions is open and they do
//! not hide their presence. Sessions end by `SessionClosed` (the gateway saw
//! the connection end, or the heartbeat TTL passed), or are expired here:
//! when a gateway's heartbeats stop for the TTL, or when it restarts under
//! the same id (a new `instance_id`), its sessions are closed by appending
//! `SessionClosed` records, which then fold like any other close.

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
    instance: Uuid,
    /// When its last heartbeat was seen (ms, this process's clock).
    seen_ms: i64,
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
}

impl PresenceState {
    /// Users with at least one open session.
    pub fn online_users(&self) -> usize {
        self.users
            .values()
            .filter(|u| !u.sessions.is_empty())
            .count()
    }

    /// Folds one record read at `now_ms` (this process's clock; for a
    /// rebuild, pass the record's own time) and returns its effects.
    pub fn apply(&mut self, ev: &Envelope, now_ms: i64) -> Vec<Effect> {
        let user_id = &ev.sender_user;
        let mut out = Vec::new();
        match &ev.body {
            Body::GatewayHeartbeat(h) => {
                let restarted = self
                    .gateways
                    .get(&h.gateway_id)
                    .is_some_and(|g| g.instance != h.instance_id);
                if restarted {
                    // Every session of the earlier instance is gone. The new
                    // instance writes this heartbeat before any session.
                    self.close_gateway(&h.gateway_id, "gateway_restarted", &mut out);
                }
                self.gateways.insert(
                    h.gateway_id.clone(),
                    Gateway {
                        instance: h.instance_id,
                        seen_ms: now_ms,
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
                // A session of a gateway never heard of counts as alive now.
                self.gateways
                    .entry(o.gateway_id.clone())
                    .or_insert(Gateway {
                        instance: Uuid::nil(),
                        seen_ms: now_ms,
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

    /// Closes the sessions of gateways not heard of for `ttl_ms` (they died
    /// without saying goodbye) and forgets those gateways.
    pub fn expire(&mut self, now_ms: i64, ttl_ms: i64) -> Vec<Effect> {
        let dead: Vec<String> = self
            .gateways
            .iter()
            .filter(|(_, g)| now_ms - g.seen_ms > ttl_ms)
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
        let on = s.apply(&open("u", "g", a, 10), 10);
        assert_eq!(
            statuses(&on),
            vec![("u".into(), PresenceStatus::Online, None)]
        );
        assert!(statuses(&s.apply(&open("u", "g", b, 11), 11)).is_empty());
        assert!(statuses(&s.apply(&close("u", "g", a, 12), 12)).is_empty());
        let off = s.apply(&close("u", "g", b, 13), 13);
        assert_eq!(
            statuses(&off),
            vec![("u".into(), PresenceStatus::Offline, Some(13))]
        );
        // A close of an unknown session changes nothing.
        assert!(s.apply(&close("u", "g", a, 14), 14).is_empty());
    }

    #[test]
    fn a_silent_gateway_expires_and_a_restarted_one_drops_its_old_sessions() {
        let mut s = PresenceState::default();
        let (i1, i2) = (Uuid::new_v4(), Uuid::new_v4());
        s.apply(&beat("g1", i1, 0), 0);
        s.apply(&beat("g2", i1, 0), 0);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        s.apply(&open("u", "g1", a, 1), 1);
        s.apply(&open("v", "g2", b, 1), 1);
        s.apply(&beat("g2", i1, 9_000), 9_000);
        // g1 silent for more than the TTL: its session is closed, g2's is not.
        let closes = s.expire(10_001, 10_000);
        assert!(
            matches!(&closes[..], [Effect::Close { user, session, reason: "gateway_expired", .. }] if user == "u" && *session == a)
        );
        assert!(s.expire(10_002, 10_000).is_empty(), "expired once");
        // g2 restarts with a new instance: its earlier sessions are closed.
        let closes = s.apply(&beat("g2", i2, 9_500), 9_500);
        assert!(
            matches!(&closes[..], [Effect::Close { user, reason: "gateway_restarted", .. }] if user == "v")
        );
    }

    #[test]
    fn hidden_users_look_offline_without_last_seen() {
        let mut s = PresenceState::default();
        let a = Uuid::new_v4();
        s.apply(&open("u", "g", a, 1), 1);
        let hide = Body::PresenceSettingChanged(PresenceSettingChanged { hidden: true });
        let hidden = s.apply(&env("u", 2, hide), 2);
        assert_eq!(
            statuses(&hidden),
            vec![("u".into(), PresenceStatus::Offline, None)]
        );
        assert!(statuses(&s.apply(&close("u", "g", a, 3), 3)).is_empty());
        let show = Body::PresenceSettingChanged(PresenceSettingChanged { hidden: false });
        let shown = s.apply(&env("u", 4, show), 4);
        assert_eq!(
            statuses(&shown),
            vec![("u".into(), PresenceStatus::Offline, Some(3))]
        );
        let on = s.apply(&open("u", "g", Uuid::new_v4(), 5), 5);
        assert_eq!(
            statuses(&on),
            vec![("u".into(), PresenceStatus::Online, None)]
        );
    }
}
