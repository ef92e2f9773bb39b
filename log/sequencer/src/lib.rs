//! The sequencer: the single writer of each partition of `chat.events`.
//!
//! It consumes `chat.commands` (key: chat id) as a consumer-group member. For
//! each partition it owns it holds the fold of the same partition of
//! `chat.events` ([`state::PartitionState`]), kept in a state store and
//! restored from it or its changelog whenever it gains the partition
//! ([`store`]). For each command it checks membership and rights, drops a
//! retry it already sequenced (same chat, sender, device and client message
//! id, within the dedupe window) and answers it with the original seq, and
//! appends accepted commands to `chat.events` with the next gap-free
//! per-chat `seq`, in the same partition number.
//!
//! Every batch is one Kafka transaction per input partition
//! (`transactional.id = <prefix>-<partition>`): the appended events, the
//! `CommandResult` answers for the gateways, the changed state (changelog)
//! and the input offsets commit together or not at all; a new owner of a partition fences the old one. So
//! two sequencers never write the same partition, and a command is sequenced
//! exactly once even across crashes (`kill -9` included).
//!
//! Not here: delivery (the router), storage (the projectors).
#![forbid(unsafe_code)]

pub mod state;
pub mod store;
pub mod worker;

pub use worker::{run, SequencerConfig};
