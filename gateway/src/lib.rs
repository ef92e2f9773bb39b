//! The WebSocket edge of the platform.
//!
//! What it owns: client connections (authentication before the upgrade, the
//! JSON protocol v1 of PROTOCOL.md), producing client commands to
//! `chat.commands` and sessions to `chat.sessions`, tailing its own
//! partition of `chat.deliveries` to write events and command results to
//! sockets, and catching a connection up from Cassandra (`sync`, `history`)
//! without a gap or a duplicate at the hand-off to live events.
//!
//! What it does not own: ordering and validation of commands (the
//! sequencer), routing decisions (the delivery router), storage (the
//! projectors; read here through `chat_projectors::store`).
//!
//! Modules: [`config`], [`auth`] (tokens, devices, origins), [`protocol`]
//! (frames and codes), [`connection`] (one socket, one task), [`fanout`]
//! (deliveries partition and local routing), [`sync`] (catch-up and
//! hand-off), [`history`] (the Cassandra reads), [`ratelimit`], [`metrics`],
//! [`server`] (listener, start-up, shutdown), [`web`] (the embedded browser
//! app in `gateway/web/`).
#![forbid(unsafe_code)]

pub mod auth;
pub mod config;
pub mod connection;
pub mod fanout;
pub mod history;
pub mod metrics;
pub mod protocol;
pub mod ratelimit;
pub mod server;
pub mod sync;
pub mod web;

pub use config::GatewayConfig;
pub use history::{HistoryReader, MemoryHistory};
pub use server::{run, Gateway, GatewayHandle};
