//! The example backfill projection: `chat.events` -> `chat_daily_stats`
//! (per chat and UTC day of `sequenced_ts`: messages, events, members who
//! sent a message). **The template a team copies** for a new projection:
//!
//! 1. a table in a new migration (`store/schema.rs`) and its typed writes
//!    and reads (`store/daily.rs`);
//! 2. a fold of one partition's events, in log order, into writes that are
//!    idempotent (this file: [`DailyStats`]), exposed as a
//!    [`crate::replay::Projection`];
//! 3. nothing else: [`crate::replay::run`] reads the log group-less from
//!    the projection's own `projector_progress` rows (offset 0 the first
//!    time), batches per partition, writes partitions concurrently, records
//!    progress after each batch's writes, catches up and follows live
//!    (`chat-daily-stats`), and the same code rebuilds it into a new
//!    keyspace (`chat-admin replay --projection daily-stats`).
//!
//! **Exact under replays.** A row is the whole state of its (chat, day) as
//! of `last_seq`, the chat's highest seq counted into it. A chat's events
//! come in seq order (one partition, batches one after the other), so an
//! event whose seq is at or below its day's `last_seq` was counted already
//! and is skipped: a restart, a replay from any offset, or two writers of
//! the same log count each event once. Rows are written with
//! `USING TIMESTAMP last_seq`, so an older state never overwrites a newer
//! one. Membership is not needed: "active members" are the senders.

use chat_schemas::{Body, Envelope};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use uuid::Uuid;

use crate::history::ProjectError;
use crate::replay::{BatchDone, Projection};
use crate::store::{DailyRow, Store, StoreError};

/// The `projector_progress.projector` key of this projection.
pub const DAILY_STATS_PROJECTOR: &str = "daily_stats";

const DAY_MS: i64 = 86_400_000;
/// Chats cached per partition before the cache is emptied (reloaded on demand).
const MAX_CACHED: usize = 100_000;
const CONCURRENCY: usize = 16;

/// The UTC day (days since 1970-01-01) of an event.
pub fn day_of(e: &Envelope) -> i64 {
    e.sequenced_ts.unwrap_or(e.server_ts).div_euclid(DAY_MS)
}

#[derive(Default)]
struct PartitionState {
    /// Per chat, the row of the day of its last event.
    rows: HashMap<Uuid, DailyRow>,
    next_offset: Option<i64>,
}

/// The daily statistics projection (see the module doc).
pub struct DailyStats {
    store: Store,
    partitions: Mutex<HashMap<i32, PartitionState>>,
}

impl std::fmt::Debug for DailyStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DailyStats").finish_non_exhaustive()
    }
}

impl DailyStats {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            partitions: Mutex::default(),
        }
    }

    /// Folds one partition's events (log order) into rows and writes them.
    pub async fn project_batch(
        &self,
        partition: i32,
        events: &[(i64, &Envelope)],
    ) -> Result<BatchDone, StoreError> {
        let Some(&(first, _)) = events.first() else {
            return Ok(BatchDone::default());
        };
        let next_offset = events.last().map_or(first, |(o, _)| o + 1);
        // The cached rows of the partition (forgotten after a gap).
        let mut cached: HashMap<Uuid, DailyRow> = {
            let mut parts = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
            let state = parts.entry(partition).or_default();
            if state.next_offset != Some(first) || state.rows.len() > MAX_CACHED {
                state.rows.clear();
            }
            state.rows.clone_subset(events)
        };
        // Rows of (chat, day) neither cached nor seen yet: read them first.
        let mut wanted: HashSet<(Uuid, i64)> = HashSet::new();
        for (_, e) in events {
            let (Some(chat), Some(_)) = (e.chat_id, e.seq) else {
                continue;
            };
            let day = day_of(e);
            if cached.get(&chat).is_none_or(|r| r.day != day) {
                wanted.insert((chat, day));
            }
        }
        let loaded: Vec<((Uuid, i64), Option<DailyRow>)> = futures::stream::iter(wanted)
            .map(|(chat, day)| {
                let store = self.store.clone();
                async move { Ok::<_, StoreError>(((chat, day), store.daily(chat, day).await?)) }
            })
            .buffer_unordered(32)
            .try_collect()
            .await?;
        let mut rows: HashMap<(Uuid, i64), DailyRow> = loaded
            .into_iter()
            .map(|((chat, day), r)| {
                let r = r.unwrap_or_else(|| DailyRow {
                    chat,
                    day,
                    ..DailyRow::default()
                });
                ((chat, day), r)
            })
            .collect();
        for (chat, r) in cached.drain() {
            rows.entry((chat, r.day)).or_insert(r);
        }
        let mut touched: HashSet<(Uuid, i64)> = HashSet::new();
        let mut latest: HashMap<Uuid, i64> = HashMap::new();
        let mut counted = 0usize;
        for (_, e) in events {
            let (Some(chat), Some(seq)) = (e.chat_id, e.seq) else {
                continue;
            };
            let day = day_of(e);
            let Some(row) = rows.get_mut(&(chat, day)) else {
                continue;
            };
            latest.insert(chat, day);
            if seq <= row.last_seq {
                continue; // counted before (a replay, a restart)
            }
            row.events += 1;
            if matches!(e.body, Body::MessageSent(_)) {
                row.messages += 1;
                row.active_members.insert(e.sender_user.clone());
            }
            row.last_seq = seq;
            counted += 1;
            touched.insert((chat, day));
        }
        let writes: Vec<DailyRow> = touched
            .iter()
            .filter_map(|k| rows.get(k))
            .cloned()
            .collect();
        futures::stream::iter(writes)
            .map(|r| {
                let store = self.store.clone();
                async move { store.put_daily(&r).await }
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        // Only now does the cache follow (a failed batch folds again from the store).
        let mut parts = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        let state = parts.entry(partition).or_default();
        for (chat, day) in latest {
            if let Some(r) = rows.remove(&(chat, day)) {
                state.rows.insert(chat, r);
            }
        }
        state.next_offset = Some(next_offset);
        Ok(BatchDone {
            next_offset,
            events: events.len(),
            counted,
            malformed: 0,
        })
    }
}

trait CloneSubset {
    fn clone_subset(&self, events: &[(i64, &Envelope)]) -> HashMap<Uuid, DailyRow>;
}

impl CloneSubset for HashMap<Uuid, DailyRow> {
    /// The cached rows of the chats of `events`.
    fn clone_subset(&self, events: &[(i64, &Envelope)]) -> HashMap<Uuid, DailyRow> {
        let mut out = HashMap::new();
        for (_, e) in events {
            if let Some(chat) = e.chat_id {
                if let Some(r) = self.get(&chat) {
                    out.entry(chat).or_insert_with(|| r.clone());
                }
            }
        }
        out
    }
}

impl Projection for DailyStats {
    fn name(&self) -> &'static str {
        DAILY_STATS_PROJECTOR
    }
    fn topic(&self, topics: &chat_log::Topics) -> String {
        topics.events.clone()
    }
    fn project<'a>(
        &'a self,
        partition: i32,
        events: &'a [(i64, &'a Envelope)],
    ) -> BoxFuture<'a, Result<BatchDone, ProjectError>> {
        async move { Ok(self.project_batch(partition, events).await?) }.boxed()
    }
}
