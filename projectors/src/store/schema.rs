//! Schema migrations: an ordered, append-only list, each recorded in
//! `schema_migrations` once applied.
//!
//! Rules for adding one:
//! - never edit a released migration; append a new version instead;
//! - only additive changes (new tables, new columns), so running services keep
//!   working and a projection can be rebuilt from the log at any time;
//! - every statement is guarded (`IF NOT EXISTS`, `ADD IF NOT EXISTS`) so a
//!   migration interrupted half way is simply re-run.
//!
//! Room left for later features: read receipts use `user_chats.last_read_seq`
//! (per user) and can get their own per-chat table; media is referenced from
//! the message `body` JSON; offline queues and push tasks get their own tables.

use std::collections::BTreeSet;

use super::{rows, Replication, Store, StoreError};

/// One schema change. `{ks}` in a statement stands for the keyspace name.
#[derive(Debug)]
pub struct Migration {
    /// Position in the order of application; recorded once applied.
    pub version: i32,
    /// What the migration adds, for humans reading `schema_migrations`.
    pub description: &'static str,
    /// CQL statements, each idempotent.
    pub statements: &'static [&'static str],
}

/// Every migration, in order of application.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "history tables",
    statements: &[
        // Every sequenced chat event (not only MessageSent), so sync replays them.
        // bucket = seq / MESSAGES_PER_BUCKET keeps each partition bounded.
        "CREATE TABLE IF NOT EXISTS {ks}.messages (
            chat_id uuid, bucket int, seq bigint,
            event_id uuid, kind text,
            sender_user text, sender_device text, client_msg_id text,
            body text, server_ts timestamp, sequenced_ts timestamp, trace_id text,
            PRIMARY KEY ((chat_id, bucket), seq)
        ) WITH CLUSTERING ORDER BY (seq DESC)
          AND comment = 'every sequenced chat event; bucket = seq / 1024; body is the event as JSON'",
        // last_seq is written only with USING TIMESTAMP <seq>, so replays never move it back.
        "CREATE TABLE IF NOT EXISTS {ks}.chats (
            chat_id uuid PRIMARY KEY,
            kind text, title text, created_by text, created_at timestamp,
            max_members int, last_seq bigint
        ) WITH comment = 'one row per chat; last_seq has write time = seq'",
        "CREATE TABLE IF NOT EXISTS {ks}.chat_members (
            chat_id uuid, user_id text, role text, joined_seq bigint,
            PRIMARY KEY ((chat_id), user_id)
        ) WITH comment = 'current members of a chat'",
        "CREATE TABLE IF NOT EXISTS {ks}.user_chats (
            user_id text, chat_id uuid, role text,
            joined_seq bigint, left_seq bigint, last_read_seq bigint, muted boolean,
            PRIMARY KEY ((user_id), chat_id)
        ) WITH comment = 'the chats of a user, with per-user state'",
        "CREATE TABLE IF NOT EXISTS {ks}.direct_chats (
            user_low text, user_high text, chat_id uuid,
            PRIMARY KEY ((user_low, user_high))
        ) WITH comment = 'the one 1:1 chat of a user pair (user_low < user_high)'",
    ],
}, Migration {
    version: 2,
    description: "reconnect sync markers and projector progress",
    statements: &[
        // One row per (user, second, chat) in which the chat changed while the user
        // was a member: `changed_at >= floor(T)` finds every chat changed since T
        // without reading every chat of the user. Rows expire after 30 days.
        "CREATE TABLE IF NOT EXISTS {ks}.user_changes (
            user_id text, changed_at timestamp, chat_id uuid,
            PRIMARY KEY ((user_id), changed_at, chat_id)
        ) WITH CLUSTERING ORDER BY (changed_at DESC, chat_id ASC)
          AND default_time_to_live = 2592000
          AND comment = 'chats changed per user, changed_at floored to the second; 30-day TTL'",
        // next_offset is written only with USING TIMESTAMP <next_offset>: it never moves back.
        "CREATE TABLE IF NOT EXISTS {ks}.projector_progress (
            projector text, partition int, next_offset bigint,
            PRIMARY KEY ((projector), partition)
        ) WITH comment = 'per projector and chat.events partition: every event before next_offset is written'",
    ],
}, Migration {
    version: 3,
    description: "receipts, presence and devices",
    statements: &[
        // Each pointer cell is written USING TIMESTAMP <up_to_seq>: it only moves forward.
        "CREATE TABLE IF NOT EXISTS {ks}.chat_receipts (
            chat_id uuid, user_id text, read_seq bigint, delivered_seq bigint,
            PRIMARY KEY ((chat_id), user_id)
        ) WITH comment = 'per chat and member: read pointer, and the highest delivery pointer of their devices'",
        // Projected from chat.presence, written USING TIMESTAMP <the record's time in us>.
        "CREATE TABLE IF NOT EXISTS {ks}.presence (
            user_id text PRIMARY KEY, status text, last_seen timestamp
        ) WITH comment = 'latest presence per user (from chat.presence); a hidden user is offline with no last_seen'",
        "CREATE TABLE IF NOT EXISTS {ks}.user_devices (
            user_id text, device_id text, first_seen timestamp, last_seen timestamp,
            revoked_at timestamp,
            PRIMARY KEY ((user_id), device_id)
        ) WITH comment = 'devices of a user (from chat.sessions); tokens issued before revoked_at are refused'",
    ],
}, Migration {
    version: 4,
    description: "push registrations and push progress",
    statements: &[
        // Projected from chat.sessions (PushRegistrationChanged, DeviceRevoked) by chat-push,
        // written USING TIMESTAMP <the record's time in us>.
        "CREATE TABLE IF NOT EXISTS {ks}.push_registrations (
            user_id text, device_id text, provider text, push_token text, locale text,
            updated_at timestamp,
            PRIMARY KEY ((user_id), device_id)
        ) WITH comment = 'push registration of each device (from chat.sessions); a revoked or unregistered device has no row'",
        // notified_seq is written only USING TIMESTAMP <seq>: it never moves back.
        "CREATE TABLE IF NOT EXISTS {ks}.push_notified (
            chat_id uuid PRIMARY KEY, notified_seq bigint
        ) WITH comment = 'per chat: every message up to notified_seq has its push tasks on chat.push (chat-push)'",
        // From PushSettingsChanged on chat.sessions, USING TIMESTAMP <the record's time in us>.
        "CREATE TABLE IF NOT EXISTS {ks}.push_settings (
            user_id text PRIMARY KEY, time_zone text, dnd_start_minute int, dnd_end_minute int,
            allowed_chats list<uuid>
        ) WITH comment = 'do-not-disturb schedule per user (from chat.sessions)'",
    ],
}, Migration {
    version: 5,
    description: "daily chat statistics (the example backfill projection)",
    statements: &[
        // Whole state of the day as of last_seq, written USING TIMESTAMP last_seq.
        "CREATE TABLE IF NOT EXISTS {ks}.chat_daily_stats (
            chat_id uuid, day date, messages bigint, events bigint,
            active_members frozen<set<text>>, last_seq bigint,
            PRIMARY KEY ((chat_id), day)
        ) WITH CLUSTERING ORDER BY (day DESC)
          AND comment = 'per chat and UTC day: messages, events, members who sent a message; state as of last_seq'",
    ],
}];

/// What [`Store::migrate`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// Versions applied by this run, in order.
    pub applied: Vec<i32>,
    /// Versions found already recorded.
    pub already: Vec<i32>,
}

impl Store {
    /// Fails with [`StoreError::Config`] naming the missing migrations unless
    /// every migration of this build is applied. Services call it at start:
    /// they never migrate themselves (`chat-admin migrate` does).
    pub async fn require_migrated(&self) -> Result<(), StoreError> {
        let ks = &self.keyspace;
        let hint = "run `chat-admin migrate` with the same store settings";
        if !self
            .tables()
            .await?
            .iter()
            .any(|t| t == "schema_migrations")
        {
            return Err(StoreError::Config(format!(
                "keyspace {ks} does not exist or has no tables: {hint}"
            )));
        }
        let recorded = self.recorded_migrations().await?;
        let missing: Vec<i32> = MIGRATIONS
            .iter()
            .map(|m| m.version)
            .filter(|v| !recorded.contains(v))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(StoreError::Config(format!(
                "keyspace {ks} lacks migrations {missing:?}: {hint}"
            )))
        }
    }

    async fn recorded_migrations(&self) -> Result<BTreeSet<i32>, StoreError> {
        let what = "read schema_migrations";
        let cql = format!("SELECT version FROM {}.schema_migrations", self.keyspace);
        let result = self.query(what, cql, ()).await?;
        Ok(rows::<(i32,)>(what, result)?
            .into_iter()
            .map(|(v,)| v)
            .collect())
    }

    /// Creates the keyspace (with `replication`, if it does not exist yet) and
    /// applies every migration not recorded in `schema_migrations`. Safe to run
    /// again at any time: a second run applies nothing. Run it from one process
    /// at a time (the admin tool), not from every service replica.
    pub async fn migrate(&self, replication: &Replication) -> Result<MigrationReport, StoreError> {
        replication.validate()?;
        let ks = &self.keyspace;
        let keyspace = format!(
            "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {}",
            replication.cql_map()
        );
        self.query("create keyspace", keyspace, ()).await?;
        let ledger = format!(
            "CREATE TABLE IF NOT EXISTS {ks}.schema_migrations \
             (version int PRIMARY KEY, description text, applied_at timestamp)"
        );
        self.query("create schema_migrations", ledger, ()).await?;
        self.agree().await?;

        let recorded = self.recorded_migrations().await?;

        let mut report = MigrationReport::default();
        for m in MIGRATIONS {
            if recorded.contains(&m.version) {
                report.already.push(m.version);
                continue;
            }
            let what = format!("apply migration {} ({})", m.version, m.description);
            for statement in m.statements {
                self.query(&what, statement.replace("{ks}", ks), ()).await?;
            }
            self.agree().await?;
            let record = format!(
                "INSERT INTO {ks}.schema_migrations (version, description, applied_at) \
                 VALUES (?, ?, toTimestamp(now()))"
            );
            self.query(&what, record, (m.version, m.description))
                .await?;
            tracing::info!(keyspace = %ks, version = m.version, description = m.description, "applied migration");
            report.applied.push(m.version);
        }
        Ok(report)
    }
}
