//! The session registry as the router sees it, and the positions up to which
//! it has routed each `chat.events` partition.

use chat_schemas::UNROUTED_PARTITION;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// How long a new session is remembered for [`Sessions::recent`]: a gateway
/// waits at most `session_routed_ms` (3 s by default) for its answers.
const RECENT_FOR: Duration = Duration::from_secs(60);
/// Most sessions remembered for [`Sessions::recent`] (a reconnect storm).
const RECENT_MAX: usize = 100_000;

/// A session opened lately: (when, session, gateway, user).
pub(crate) type Recent = (Instant, Uuid, String, String);

/// Where a user's sessions are.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    by_user: HashMap<String, HashMap<Uuid, String>>,
    /// Per owned chat.events partition, the next offset to route.
    positions: HashMap<i32, i64>,
    /// Sessions opened in the last [`RECENT_FOR`]: when this instance is
    /// assigned a partition it answers them again, so a gateway waiting for
    /// an owner of every partition gets one after a rebalance.
    recent: VecDeque<Recent>,
}

impl Sessions {
    pub(crate) fn open(&mut self, user: &str, session: Uuid, gateway: &str) {
        self.by_user
            .entry(user.to_string())
            .or_default()
            .insert(session, gateway.to_string());
        let now = Instant::now();
        while self.recent.front().is_some_and(|r| {
            now.duration_since(r.0) > RECENT_FOR || self.recent.len() >= RECENT_MAX
        }) {
            self.recent.pop_front();
        }
        self.recent
            .push_back((now, session, gateway.to_string(), user.to_string()));
    }

    /// Sessions opened lately and still open.
    pub(crate) fn recent(&self) -> Vec<Recent> {
        let now = Instant::now();
        self.recent
            .iter()
            .filter(|(at, session, _, user)| {
                now.duration_since(*at) <= RECENT_FOR
                    && self
                        .by_user
                        .get(user)
                        .is_some_and(|s| s.contains_key(session))
            })
            .cloned()
            .collect()
    }

    pub(crate) fn close(&mut self, user: &str, session: &Uuid) {
        if let Some(s) = self.by_user.get_mut(user) {
            s.remove(session);
            if s.is_empty() {
                self.by_user.remove(user);
            }
        }
    }

    /// Gateways holding any of `users`, each with the users it holds (sorted).
    pub(crate) fn gateways_of<'a>(
        &self,
        users: impl IntoIterator<Item = &'a String>,
    ) -> Vec<(String, Vec<String>)> {
        let mut by_gw: HashMap<&str, Vec<String>> = HashMap::new();
        for u in users {
            if let Some(sessions) = self.by_user.get(u) {
                let mut gws: Vec<&str> = sessions.values().map(String::as_str).collect();
                gws.sort_unstable();
                gws.dedup();
                for gw in gws {
                    by_gw.entry(gw).or_default().push(u.clone());
                }
            }
        }
        let mut out: Vec<(String, Vec<String>)> = by_gw
            .into_iter()
            .map(|(g, mut us)| {
                us.sort();
                (g.to_string(), us)
            })
            .collect();
        out.sort();
        out
    }

    pub(crate) fn routed(&mut self, partition: i32, next_offset: i64) {
        self.positions.insert(partition, next_offset);
    }

    pub(crate) fn forget_partition(&mut self, partition: i32) {
        self.positions.remove(&partition);
    }

    /// `router_offsets` for SessionRouted: [`UNROUTED_PARTITION`] where this
    /// instance does not know the partition (not owned, or nothing routed yet).
    pub(crate) fn offsets(&self, partitions: i32) -> Vec<u64> {
        (0..partitions)
            .map(|p| {
                self.positions
                    .get(&p)
                    .map_or(UNROUTED_PARTITION, |o| *o as u64)
            })
            .collect()
    }

    pub(crate) fn users(&self) -> usize {
        self.by_user.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_entry_per_gateway_with_its_users() {
        let mut s = Sessions::default();
        let (a1, a2, b1) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        s.open("ann", a1, "gw-1");
        s.open("ann", a2, "gw-2");
        s.open("bob", b1, "gw-1");
        let users = ["ann".to_string(), "bob".to_string(), "cat".to_string()];
        assert_eq!(
            s.gateways_of(&users),
            vec![
                ("gw-1".into(), vec!["ann".into(), "bob".into()]),
                ("gw-2".into(), vec!["ann".into()])
            ]
        );
        s.close("ann", &a2);
        assert_eq!(s.gateways_of(&users).len(), 1);
        s.close("bob", &b1);
        s.close("ann", &a1);
        assert_eq!(s.users(), 0);
    }

    #[test]
    fn unknown_partitions_are_marked() {
        let mut s = Sessions::default();
        s.routed(1, 42);
        assert_eq!(
            s.offsets(3),
            vec![UNROUTED_PARTITION, 42, UNROUTED_PARTITION]
        );
        s.forget_partition(1);
        assert_eq!(s.offsets(2), vec![UNROUTED_PARTITION, UNROUTED_PARTITION]);
    }
}
