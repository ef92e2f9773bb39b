//! Projector workers that build Cassandra tables from the log, and the
//! Cassandra schema they write to.
//!
//! Kafka is the source of truth; everything in Cassandra is a projection of it.
//! This crate owns the workers that consume the log and write those
//! projections (chat history now; offline queues and push tasks later), and
//! the schema migrations of the tables they write.
//!
//! Contract of every projector:
//! - projections are idempotent, keyed by `(chat_id, seq)`, so replaying the
//!   log (after a crash, a rebalance or a deliberate rebuild) is harmless;
//! - consumer offsets are stored only after the write succeeded, so a record
//!   is never skipped, at worst projected twice.
//!
//! Workers: [`history`] (`chat-history`): `chat.events` -> the history
//! tables, the reconnect-sync markers and its progress; [`presence`]
//! (`chat-presence`); [`push`] (`chat-push`: push tasks for devices not
//! connected); [`daily_stats`] (`chat-daily-stats`, the example backfill
//! projection, run by [`replay`]).
//!
//! Operating them: [`replay`] (rebuild any projection from the log into a
//! keyspace, or run a group-less projection service), [`alias`] (services
//! following a keyspace alias), [`admin`] (`chat-admin`'s commands).
//!
//! [`store`] is the one boundary to Cassandra: no other module uses the driver.
#![forbid(unsafe_code)]

pub mod admin;
pub mod alias;
pub mod daily_stats;
pub mod history;
pub mod presence;
pub mod push;
pub mod replay;
pub mod store;
