//! `chat-admin`'s commands, one module each (the binary only parses and
//! dispatches).
//!
//! - [`dlq`]: `chat-admin dlq list|show|redrive|drop`, the operator's tools
//!   on dead letters.

pub mod dlq;
