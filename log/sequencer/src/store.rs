//! The state store of the sequencer and of the router: where a partition's
//! fold lives when it does not fit in memory, and how it comes back after a
//! restart or a rebalance without reading `chat.events` from offset 0.
//!
//! The Kafka Streams pattern, in two layers:
//!
//! - **A local store**, one [redb](https://docs.rs/redb) file per partition
//!   (`<state.dir>/<changelog topic>-<partition>.redb`): chats, the dedupe
//!   index (sequencer only) and the mark `applied` = the offset of
//!   `chat.events` the store has folded up to, all written in one redb
//!   transaction after each batch committed. [`PartitionState`] caches it
//!   in memory up to `state.cache_chats` chats. redb is pure Rust: no C++
//!   build (RocksDB takes minutes on two cores), one file, ACID
//!   transactions, crash-safe.
//! - **A changelog**, a compacted topic co-partitioned with `chat.events`
//!   (`chat.sequencer-state`, `chat.router-state`): per batch, the changed
//!   chats (key: chat id) and the `@applied` mark. The sequencer writes them
//!   inside its Kafka transaction, so the committed changelog is exactly the
//!   fold of the committed events; the router writes them after its
//!   deliveries were acknowledged and before it commits its offset.
//!
//! [`restore`] picks the cheapest source that is correct:
//!
//! 1. **local**: the store's `applied` mark is in the log (the event there is
//!    the one the store saw) and at most `state.catch_up_max_events` behind:
//!    fold the events since the mark;
//! 2. **changelog**: a new host (or a store too far behind): read the
//!    changelog partition (one record per chat, compacted), then fold the
//!    events after its `@applied` mark, and for the sequencer the events of
//!    the dedupe window for their dedupe keys only;
//! 3. **log**: no changelog yet (a log written before it existed): fold the
//!    partition from offset 0, once.
//!
//! A restart costs the changes since the last checkpoint (local) or the
//! number of chats plus the dedupe window (changelog), not the log's length.
//! A batch that fails is undone by dropping the in-memory state: the store
//! holds only committed batches, and the next owner restores from it.

use chat_log::{LogConfig, SchemaRegistry, TailItem, TailStart, TopicTail};
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

use crate::state::{
    Backing, Changes, ChatState, DedupeKey, Deduped, FoldError, PartitionState, RebuildError,
};
use chat_schemas::{ChatKind, Role};

const CHATS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chats");
const DEDUPE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("dedupe");
/// (sequenced at, big-endian ms) ++ dedupe key: what the sweep removes first.
const DEDUPE_BY_TIME: TableDefinition<&[u8], ()> = TableDefinition::new("dedupe_by_time");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const APPLIED: &str = "applied";

/// The changelog key of the `@applied` mark.
pub const APPLIED_KEY: &[u8] = b"@applied";
/// First byte of every stored value: the encoding's version.
const VERSION: u8 = 1;
/// Events folded between two writes of a long catch-up.
const CHUNK: u64 = 20_000;
/// How often a store write is made durable (fsync); writes between are
/// kept by the OS and lost in a machine crash, which only makes the next
/// catch-up longer.
const DURABLE_EVERY: Duration = Duration::from_secs(1);
/// How often expired dedupe entries are removed.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The state-store settings of a service (`state.*` keys).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// Directory of this instance's store files. Give every instance its own
    /// persistent directory: a restart then restores from it (two instances
    /// must not share one). Empty: a new directory under the system's temp
    /// dir for each run (a restart restores from the changelog).
    pub dir: PathBuf,
    /// Most chats of a partition kept in memory (the rest are read from the
    /// store when a command or event touches them).
    pub cache_chats: usize,
    /// A local store further behind the log than this many offsets is not
    /// caught up from the log: the changelog is read instead.
    pub catch_up_max_events: i64,
    /// The store's page cache per partition, MiB (redb's default is 1 GiB
    /// per file, which would make memory follow the store's size).
    pub store_cache_mib: usize,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::new(),
            cache_chats: 50_000,
            catch_up_max_events: 200_000,
            store_cache_mib: 16,
        }
    }
}

impl StateConfig {
    /// Removes `dir` if it is the temporary directory of an instance
    /// without a configured one (at shutdown: nothing restores from it).
    pub fn remove_if_temporary(&self, dir: &Path) {
        if self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// The directory to use (see [`StateConfig::dir`]).
    pub fn dir(&self, service: &str) -> PathBuf {
        if self.dir.as_os_str().is_empty() {
            std::env::temp_dir().join(format!("chat-{service}-{}", uuid::Uuid::new_v4()))
        } else {
            self.dir.clone()
        }
    }
}

/// How far a store (or a changelog) has folded `chat.events`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The next offset of the partition to fold.
    pub next: i64,
    /// The offset and event id of the newest event folded: a duplicate's
    /// answer names the offset; a restore checks the log still has that
    /// event there (a log recreated under the store is not this log).
    pub newest: Option<(i64, [u8; 16])>,
}

impl Applied {
    pub fn newest_offset(&self) -> Option<i64> {
        self.newest.map(|(o, _)| o)
    }
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {error}")]
    Db { path: String, error: String },
    #[error("state store value cannot be decoded: {0}")]
    Encoding(String),
}

/// One partition's local store.
#[derive(Debug)]
pub struct Store {
    db: Database,
    path: PathBuf,
    /// The dedupe window (ms); None: entries never expire.
    window_ms: Option<i64>,
    last_durable: Mutex<Instant>,
    /// None: not swept since it was opened (the first write sweeps).
    last_sweep: Mutex<Option<Instant>>,
}

impl Store {
    /// Opens (creating) the store of `changelog_topic`'s partition `p` in `dir`.
    pub fn open(
        dir: &Path,
        changelog_topic: &str,
        p: i32,
        window_ms: Option<i64>,
        cache_mib: usize,
    ) -> Result<Self, StoreError> {
        let path = dir.join(format!("{changelog_topic}-{p}.redb"));
        let err = |e: &dyn std::fmt::Display| StoreError::Db {
            path: path.display().to_string(),
            error: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
        let db = redb::Builder::new()
            .set_cache_size(cache_mib.max(1) * 1024 * 1024)
            .create(&path)
            .map_err(|e| err(&e))?;
        let me = Self {
            db,
            path,
            window_ms,
            last_durable: Mutex::new(Instant::now()),
            last_sweep: Mutex::new(None),
        };
        me.create_tables()?;
        Ok(me)
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Db {
            path: self.path.display().to_string(),
            error: e.to_string(),
        }
    }

    fn create_tables(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        tx.open_table(CHATS).map_err(|e| self.err(e))?;
        tx.open_table(DEDUPE).map_err(|e| self.err(e))?;
        tx.open_table(DEDUPE_BY_TIME).map_err(|e| self.err(e))?;
        tx.open_table(META).map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    /// Empties the store (it is about to be restored from elsewhere).
    pub fn reset(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        tx.delete_table(CHATS).map_err(|e| self.err(e))?;
        tx.delete_table(DEDUPE).map_err(|e| self.err(e))?;
        tx.delete_table(DEDUPE_BY_TIME).map_err(|e| self.err(e))?;
        tx.delete_table(META).map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        self.create_tables()
    }

    /// The `applied` mark, if the store has folded anything.
    pub fn applied(&self) -> Result<Option<Applied>, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(META).map_err(|e| self.err(e))?;
        match t.get(APPLIED).map_err(|e| self.err(e))? {
            Some(v) => Ok(Some(decode_applied(v.value())?)),
            None => Ok(None),
        }
    }

    /// Chats in the store.
    pub fn chat_count(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(CHATS).map_err(|e| self.err(e))?;
        t.len().map_err(|e| self.err(e))
    }

    /// Writes `changes` and the mark `applied` in one transaction. Refuses
    /// (returns false, writes nothing) a mark older than the stored one: a
    /// task that lost its partition must not write over its successor.
    pub fn write(&self, changes: &Changes, applied: Applied) -> Result<bool, StoreError> {
        let mut tx = self.db.begin_write().map_err(|e| self.err(e))?;
        let durable = lock(&self.last_durable).elapsed() >= DURABLE_EVERY;
        if !durable {
            tx.set_durability(Durability::None);
        }
        {
            let mut meta = tx.open_table(META).map_err(|e| self.err(e))?;
            let current = match meta.get(APPLIED).map_err(|e| self.err(e))? {
                Some(v) => Some(decode_applied(v.value())?),
                None => None,
            };
            if current.is_some_and(|c| c.next > applied.next) {
                drop(meta);
                tx.abort().map_err(|e| self.err(e))?;
                return Ok(false);
            }
            meta.insert(APPLIED, encode_applied(&applied).as_slice())
                .map_err(|e| self.err(e))?;
            let mut chats = tx.open_table(CHATS).map_err(|e| self.err(e))?;
            for (id, chat) in &changes.chats {
                chats
                    .insert(id.as_bytes().as_slice(), encode_chat(chat).as_slice())
                    .map_err(|e| self.err(e))?;
            }
            let mut dedupe = tx.open_table(DEDUPE).map_err(|e| self.err(e))?;
            let mut by_time = tx.open_table(DEDUPE_BY_TIME).map_err(|e| self.err(e))?;
            for (key, d) in &changes.dedupe {
                let k = encode_key(key);
                dedupe
                    .insert(k.as_slice(), encode_deduped(d).as_slice())
                    .map_err(|e| self.err(e))?;
                by_time
                    .insert(time_key(d.at_ms, &k).as_slice(), ())
                    .map_err(|e| self.err(e))?;
            }
            if let Some(w) = self.window_ms {
                let due = lock(&self.last_sweep).is_none_or(|t| t.elapsed() >= SWEEP_EVERY);
                if due {
                    *lock(&self.last_sweep) = Some(Instant::now());
                    let cutoff = chat_runtime::now_ms().saturating_sub(w);
                    let end = time_key(cutoff, &[]);
                    let expired: Vec<Vec<u8>> = by_time
                        .range(..end.as_slice())
                        .map_err(|e| self.err(e))?
                        .filter_map(|r| r.ok().map(|(k, _)| k.value().to_vec()))
                        .collect();
                    for tk in &expired {
                        by_time.remove(tk.as_slice()).map_err(|e| self.err(e))?;
                        dedupe.remove(&tk[8..]).map_err(|e| self.err(e))?;
                    }
                    if !expired.is_empty() {
                        tracing::debug!(
                            expired = expired.len(),
                            "dedupe entries past the window removed"
                        );
                    }
                }
            }
        }
        tx.commit().map_err(|e| self.err(e))?;
        if durable {
            *lock(&self.last_durable) = Instant::now();
        }
        Ok(true)
    }

    /// Writes chat records as read from a changelog (already encoded).
    fn put_encoded_chats(&self, chats: &[(Uuid, Vec<u8>)]) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().map_err(|e| self.err(e))?;
        tx.set_durability(Durability::None);
        {
            let mut t = tx.open_table(CHATS).map_err(|e| self.err(e))?;
            for (id, v) in chats {
                t.insert(id.as_bytes().as_slice(), v.as_slice())
                    .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }
}

impl Drop for Store {
    /// Makes the last non-durable writes durable: a clean stop restores
    /// locally with nothing to catch up.
    fn drop(&mut self) {
        // An empty transaction with the default (immediate) durability.
        let flushed = match self.db.begin_write() {
            Ok(tx) => tx.commit().map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = flushed {
            tracing::warn!(path = %self.path.display(), error = %e, "state store not flushed");
        }
    }
}

impl Backing for Store {
    fn chat(&self, chat: &Uuid) -> Result<Option<ChatState>, String> {
        let read = || -> Result<Option<ChatState>, StoreError> {
            let tx = self.db.begin_read().map_err(|e| self.err(e))?;
            let t = tx.open_table(CHATS).map_err(|e| self.err(e))?;
            match t.get(chat.as_bytes().as_slice()).map_err(|e| self.err(e))? {
                Some(v) => Ok(Some(decode_chat(v.value())?)),
                None => Ok(None),
            }
        };
        read().map_err(|e| e.to_string())
    }

    fn dedupe(&self, key: &DedupeKey) -> Result<Option<Deduped>, String> {
        let read = || -> Result<Option<Deduped>, StoreError> {
            let tx = self.db.begin_read().map_err(|e| self.err(e))?;
            let t = tx.open_table(DEDUPE).map_err(|e| self.err(e))?;
            match t.get(encode_key(key).as_slice()).map_err(|e| self.err(e))? {
                Some(v) => Ok(decode_deduped(v.value())),
                None => Ok(None),
            }
        };
        read().map_err(|e| e.to_string())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- encoding (store values and changelog values are the same bytes) ----

#[derive(Serialize, Deserialize)]
struct StoredChat {
    group: bool,
    /// (user, admin)
    members: Vec<(String, bool)>,
    last_seq: u64,
    max_members: u32,
    read: Vec<(String, u64)>,
    delivered: Vec<(String, String, u64)>,
}

/// A chat's state as stored and as written to the changelog.
pub fn encode_chat(c: &ChatState) -> Vec<u8> {
    let stored = StoredChat {
        group: c.kind == ChatKind::Group,
        members: c
            .members
            .iter()
            .map(|(u, r)| (u.clone(), *r == Role::Admin))
            .collect(),
        last_seq: c.last_seq,
        max_members: c.max_members,
        read: c.read.iter().map(|(u, s)| (u.clone(), *s)).collect(),
        delivered: c
            .delivered
            .iter()
            .map(|((u, d), s)| (u.clone(), d.clone(), *s))
            .collect(),
    };
    let mut out = vec![VERSION];
    // Serialising owned strings and integers into a Vec cannot fail.
    out.extend(postcard::to_stdvec(&stored).unwrap_or_default());
    out
}

pub fn decode_chat(bytes: &[u8]) -> Result<ChatState, StoreError> {
    let body = versioned(bytes)?;
    let s: StoredChat =
        postcard::from_bytes(body).map_err(|e| StoreError::Encoding(e.to_string()))?;
    Ok(ChatState {
        kind: if s.group {
            ChatKind::Group
        } else {
            ChatKind::Direct
        },
        members: s
            .members
            .into_iter()
            .map(|(u, admin)| (u, if admin { Role::Admin } else { Role::Member }))
            .collect(),
        last_seq: s.last_seq,
        max_members: s.max_members,
        read: s.read.into_iter().collect(),
        delivered: s
            .delivered
            .into_iter()
            .map(|(u, d, s)| ((u, d), s))
            .collect(),
    })
}

pub fn encode_applied(a: &Applied) -> Vec<u8> {
    let mut out = vec![VERSION];
    out.extend(postcard::to_stdvec(a).unwrap_or_default());
    out
}

pub fn decode_applied(bytes: &[u8]) -> Result<Applied, StoreError> {
    postcard::from_bytes(versioned(bytes)?).map_err(|e| StoreError::Encoding(e.to_string()))
}

fn versioned(bytes: &[u8]) -> Result<&[u8], StoreError> {
    match bytes.split_first() {
        Some((&VERSION, body)) => Ok(body),
        Some((v, _)) => Err(StoreError::Encoding(format!("unknown version {v}"))),
        None => Err(StoreError::Encoding("empty value".into())),
    }
}

fn encode_key((chat, user, device, id): &DedupeKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + user.len() + device.len() + id.len() + 2);
    k.extend_from_slice(chat.as_bytes());
    k.extend_from_slice(user.as_bytes());
    k.push(0);
    k.extend_from_slice(device.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn time_key(at_ms: i64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&(at_ms.max(0) as u64).to_be_bytes());
    k.extend_from_slice(key);
    k
}

fn encode_deduped(d: &Deduped) -> [u8; 32] {
    let mut v = [0u8; 32];
    v[..8].copy_from_slice(&d.seq.to_be_bytes());
    v[8..24].copy_from_slice(d.event_id.as_bytes());
    v[24..].copy_from_slice(&d.at_ms.to_be_bytes());
    v
}

fn decode_deduped(v: &[u8]) -> Option<Deduped> {
    if v.len() != 32 {
        return None;
    }
    Some(Deduped {
        seq: u64::from_be_bytes(v[..8].try_into().ok()?),
        event_id: Uuid::from_slice(&v[8..24]).ok()?,
        at_ms: i64::from_be_bytes(v[24..].try_into().ok()?),
    })
}

/// The changelog records of a batch: each changed chat (key: chat id), then
/// the `@applied` mark (last: a reader that sees the mark has every chat
/// record of the batch before it).
pub fn changelog_records<'a>(
    chats: impl Iterator<Item = (&'a Uuid, &'a ChatState)>,
    applied: Option<Applied>,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = chats
        .map(|(id, c)| (id.to_string().into_bytes(), encode_chat(c)))
        .collect();
    if let Some(a) = applied {
        out.push((APPLIED_KEY.to_vec(), encode_applied(&a)));
    }
    out
}

// ---- restore ----

/// Where a restore read the state from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Local,
    Changelog,
    /// Folded from offset 0 (no changelog yet).
    Log,
    /// Nothing to restore: no changelog and no event.
    Empty,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Local => "local",
            Source::Changelog => "changelog",
            Source::Log => "log",
            Source::Empty => "empty",
        }
    }
}

/// A restored partition.
#[derive(Debug)]
pub struct Restored {
    pub state: PartitionState,
    /// How far the state has folded: at or past the restore's target (the
    /// router's store may be ahead of its committed offset: it goes on
    /// from `applied.next`).
    pub applied: Applied,
    pub source: Source,
    /// Events of `chat.events` read (folded, or for their dedupe keys).
    pub events_read: u64,
    /// Changelog records read.
    pub changelog_records: u64,
    pub elapsed: Duration,
}

/// What a restore needs besides the partition.
#[derive(Clone, Debug)]
pub struct RestoreCtx {
    pub log: LogConfig,
    pub registry: Arc<SchemaRegistry>,
    pub events_topic: String,
    pub changelog_topic: String,
    /// The router's fold (no pointers, no dedupe; a changelog may be ahead).
    pub routing: bool,
    pub window_ms: Option<i64>,
    pub catch_up_max_events: i64,
    pub cache_chats: usize,
    /// Who restores, for the logs.
    pub who: &'static str,
}

impl RestoreCtx {
    fn fresh_state(&self, store: &Arc<Store>) -> PartitionState {
        let backing: Arc<dyn Backing> = store.clone();
        if self.routing {
            PartitionState::for_routing(Some(backing))
        } else {
            PartitionState::backed(backing, self.window_ms)
        }
    }
}

/// Restores partition `p` into `store` and returns its state folded up to
/// `until` (exclusive; `None`: the end of the partition now), or further
/// for a router whose store is ahead. Fails (logged at error level) when
/// `chat.events` does not fold there: see [`RebuildError`].
pub async fn restore(
    ctx: &RestoreCtx,
    store: &Arc<Store>,
    p: i32,
    until: Option<i64>,
) -> anyhow::Result<Restored> {
    let t0 = Instant::now();
    let end = chat_log::consumer::high_watermark(&ctx.log, &ctx.events_topic, p).await?;
    let target = until.unwrap_or(end).min(end);
    let mut events_read = 0;

    // 1. The local store, if it is this log's and not too far behind.
    if let Some(a) = store.applied()? {
        let usable = a.next <= end
            && (a.next >= target || target - a.next <= ctx.catch_up_max_events)
            && newest_is_in_log(ctx, p, &a).await?;
        if usable {
            let mut state = ctx.fresh_state(store);
            let mut applied = a;
            if a.next < target {
                events_read += fold_range(
                    ctx,
                    store,
                    p,
                    a.next,
                    target,
                    &mut state,
                    &mut applied,
                    false,
                )
                .await?;
            }
            state.evict(ctx.cache_chats);
            return Ok(Restored {
                state,
                applied,
                source: Source::Local,
                events_read,
                changelog_records: 0,
                elapsed: t0.elapsed(),
            });
        }
        tracing::info!(
            who = ctx.who,
            partition = p,
            store_next = a.next,
            log_end = end,
            "the local state store is not usable here; restoring from the changelog"
        );
    }

    // 2. The changelog.
    store.reset()?;
    let mut mark: Option<Applied> = None;
    let mut chunk: Vec<(Uuid, Vec<u8>)> = Vec::new();
    let mut records = 0u64;
    let mut failed: Option<StoreError> = None;
    chat_log::read_partition_raw(&ctx.log, &ctx.changelog_topic, p, None, |r| {
        records += 1;
        if failed.is_some() {
            return;
        }
        let key = r.key.unwrap_or_default();
        if key == APPLIED_KEY {
            match decode_applied(&r.payload) {
                Ok(a) => mark = Some(a),
                Err(e) => failed = Some(e),
            }
        } else if let Some(id) = std::str::from_utf8(&key)
            .ok()
            .and_then(|k| Uuid::parse_str(k).ok())
        {
            chunk.push((id, r.payload));
            if chunk.len() >= CHUNK as usize {
                if let Err(e) = store.put_encoded_chats(&chunk) {
                    failed = Some(e);
                }
                chunk.clear();
            }
        }
    })
    .await?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    store.put_encoded_chats(&chunk)?;
    let (source, mut applied) = match mark {
        Some(a) if a.next <= end => (Source::Changelog, a),
        _ => {
            // No changelog (or one of another log): fold from offset 0.
            store.reset()?;
            (Source::Log, Applied::default())
        }
    };
    let mut state = ctx.fresh_state(store);
    if source == Source::Changelog && !ctx.routing {
        if let Some(w) = ctx.window_ms {
            let since = chat_runtime::now_ms().saturating_sub(w);
            let from = chat_log::offset_for_time(&ctx.log, &ctx.events_topic, p, since)
                .await?
                .unwrap_or(applied.next);
            if from < applied.next {
                events_read += fold_range(
                    ctx,
                    store,
                    p,
                    from,
                    applied.next,
                    &mut state,
                    &mut applied,
                    true,
                )
                .await?;
            }
        }
    }
    if applied.next < target {
        events_read += fold_range(
            ctx,
            store,
            p,
            applied.next,
            target,
            &mut state,
            &mut applied,
            false,
        )
        .await?;
    } else {
        store.write(&state.take_changes(), applied)?;
    }
    state.evict(ctx.cache_chats);
    let source = match source {
        Source::Log if events_read == 0 => Source::Empty,
        s => s,
    };
    Ok(Restored {
        state,
        applied,
        source,
        events_read,
        changelog_records: records,
        elapsed: t0.elapsed(),
    })
}

/// Whether the event the store saw last is still at its offset in the log.
async fn newest_is_in_log(ctx: &RestoreCtx, p: i32, a: &Applied) -> anyhow::Result<bool> {
    let Some((offset, id)) = a.newest else {
        return Ok(true);
    };
    let tail = TopicTail::open(
        &ctx.log,
        ctx.registry.clone(),
        &ctx.events_topic,
        Some(vec![p]),
        TailStart::Offsets(HashMap::from([(p, offset)])),
    )
    .await?;
    let mut found = None;
    tail.read_until(&HashMap::from([(p, offset + 1)]), |item| {
        if let TailItem::Event(ev) = item {
            if ev.offset == offset {
                found = Some(ev.envelope.event_id);
            }
        }
    })
    .await?;
    Ok(found.is_some_and(|f| *f.as_bytes() == id))
}

/// Folds events `[from, until)` of partition `p` into `state` (or, with
/// `dedupe_only`, only their dedupe keys), writing to `store` every
/// [`CHUNK`] events and at the end. Returns the number of events read.
#[allow(clippy::too_many_arguments)]
async fn fold_range(
    ctx: &RestoreCtx,
    store: &Arc<Store>,
    p: i32,
    from: i64,
    until: i64,
    state: &mut PartitionState,
    applied: &mut Applied,
    dedupe_only: bool,
) -> anyhow::Result<u64> {
    let tail = TopicTail::open(
        &ctx.log,
        ctx.registry.clone(),
        &ctx.events_topic,
        Some(vec![p]),
        TailStart::Offsets(HashMap::from([(p, from)])),
    )
    .await?;
    let mut n = 0u64;
    let mut failed: Option<anyhow::Error> = None;
    tail.read_until(&HashMap::from([(p, until)]), |item| {
        if failed.is_some() {
            return;
        }
        match item {
            TailItem::Event(ev) => {
                n += 1;
                if dedupe_only {
                    state.note_dedupe(&ev.envelope);
                } else {
                    let folded = if ctx.routing {
                        state.apply_again(&ev.envelope)
                    } else {
                        state.apply(&ev.envelope)
                    };
                    if let Err(source) = folded {
                        failed = Some(fold_failure(p, ev.offset, source).into());
                        return;
                    }
                    applied.next = ev.offset + 1;
                    applied.newest = Some((ev.offset, *ev.envelope.event_id.as_bytes()));
                }
                if n.is_multiple_of(CHUNK) {
                    if let Err(e) = store.write(&state.take_changes(), *applied) {
                        failed = Some(e.into());
                    }
                    state.evict(ctx.cache_chats);
                }
            }
            // The router's membership skips what nobody can read (its live
            // loop dead-lettered it); the sequencer's state must be exact.
            TailItem::Undecodable { offset, error, .. } if ctx.routing => {
                tracing::warn!(partition = p, offset, %error, "undecodable event skipped by the membership restore");
                applied.next = offset + 1;
            }
            TailItem::Undecodable {
                partition,
                offset,
                error,
            } => {
                failed = Some(
                    RebuildError::Undecodable {
                        partition,
                        offset,
                        error,
                    }
                    .into(),
                )
            }
        }
    })
    .await?;
    if let Some(e) = failed {
        if let Some(r) = e.downcast_ref::<RebuildError>() {
            r.log(ctx.who);
        }
        return Err(e);
    }
    if !dedupe_only {
        // Transaction markers after the last event: the fold is at `until`.
        applied.next = applied.next.max(until);
    }
    store.write(&state.take_changes(), *applied)?;
    Ok(n)
}

fn fold_failure(partition: i32, offset: i64, source: FoldError) -> RebuildError {
    RebuildError::Fold {
        partition,
        offset,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store(window_ms: Option<i64>) -> (Store, PathBuf) {
        let dir = std::env::temp_dir().join(format!("chat-store-unit-{}", Uuid::new_v4()));
        (Store::open(&dir, "t", 0, window_ms, 4).unwrap(), dir)
    }

    fn chat() -> ChatState {
        ChatState {
            kind: ChatKind::Group,
            members: [
                ("ann".to_string(), Role::Admin),
                ("bob".into(), Role::Member),
            ]
            .into(),
            last_seq: 7,
            max_members: 10,
            read: [("ann".to_string(), 7)].into(),
            delivered: [(("bob".to_string(), "phone".to_string()), 5)].into(),
        }
    }

    #[test]
    fn chats_and_marks_round_trip_and_an_older_mark_is_refused() {
        let (store, dir) = temp_store(None);
        let id = Uuid::new_v4();
        let key: DedupeKey = (id, "ann".into(), "phone".into(), "m1".into());
        let d = Deduped {
            seq: 3,
            event_id: Uuid::new_v4(),
            at_ms: chat_runtime::now_ms(),
        };
        let changes = Changes {
            chats: vec![(id, chat())],
            dedupe: vec![(key.clone(), d)],
        };
        let mark = Applied {
            next: 10,
            newest: Some((9, *Uuid::new_v4().as_bytes())),
        };
        assert!(store.write(&changes, mark).unwrap());
        assert_eq!(store.chat(&id).unwrap(), Some(chat()));
        assert_eq!(store.dedupe(&key).unwrap(), Some(d));
        assert_eq!(store.applied().unwrap(), Some(mark));
        let older = Applied { next: 9, ..mark };
        let other = Changes {
            chats: vec![(
                id,
                ChatState {
                    last_seq: 1,
                    ..chat()
                },
            )],
            dedupe: Vec::new(),
        };
        assert!(
            !store.write(&other, older).unwrap(),
            "an older mark is refused"
        );
        assert_eq!(store.chat(&id).unwrap().map(|c| c.last_seq), Some(7));
        // Reopened (a restart): the same.
        drop(store);
        let store = Store::open(&dir, "t", 0, None, 4).unwrap();
        assert_eq!(store.applied().unwrap(), Some(mark));
        assert_eq!(store.chat(&id).unwrap(), Some(chat()));
        store.reset().unwrap();
        assert_eq!(store.applied().unwrap(), None);
        assert_eq!(store.chat(&id).unwrap(), None);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn dedupe_entries_past_the_window_are_swept() {
        let (store, dir) = temp_store(Some(60_000));
        let now = chat_runtime::now_ms();
        let id = Uuid::new_v4();
        let key = |m: &str| -> DedupeKey { (id, "ann".into(), "phone".into(), m.into()) };
        let entry = |at_ms| Deduped {
            seq: 1,
            event_id: Uuid::new_v4(),
            at_ms,
        };
        let changes = Changes {
            chats: Vec::new(),
            dedupe: vec![(key("old"), entry(now - 120_000)), (key("new"), entry(now))],
        };
        // The first write of an opened store sweeps: the old entry goes.
        store.write(&changes, Applied::default()).unwrap();
        assert_eq!(store.dedupe(&key("old")).unwrap(), None);
        assert!(store.dedupe(&key("new")).unwrap().is_some());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_value_of_an_unknown_version_is_an_error_not_a_default() {
        let mut bytes = encode_chat(&chat());
        assert_eq!(decode_chat(&bytes).unwrap(), chat());
        bytes[0] = 9;
        assert!(decode_chat(&bytes).is_err());
        assert!(decode_applied(&[]).is_err());
    }
}
