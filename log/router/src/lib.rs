//! The delivery router: turns each chat event into one record per gateway
//! that holds a recipient, so fan-out cost grows with gateways, not members.
//!
//! State:
//! - the session registry: every `SessionOpened`/`SessionClosed` on
//!   `chat.sessions` (all partitions, read from the beginning by every
//!   instance): user -> sessions -> (device, gateway);
//! - chat membership: the fold of the `chat.events` partitions this instance
//!   owns (consumer group `router`), rebuilt up to the first offset it routes
//!   whenever it gains a partition, so membership is exact at every seq.
//!
//! For each event the recipients are the chat's members after the event (the
//! sender's other devices included), plus a removed member for its own
//! removal. Records go to `chat.deliveries`, partition
//! `deliveries_partition(gateway)`, key = gateway id, header `recipients` =
//! the users on that gateway. Offsets are committed after the records were
//! acknowledged: at-least-once; gateways drop (chat, seq) they already sent.
//!
//! When a session opens, the router tells its gateway from which
//! `chat.events` offsets it routes to it (`SessionRouted`): everything before
//! was routed without it and is served from history.
#![forbid(unsafe_code)]

mod sessions;
mod worker;

pub use worker::{run, RouterConfig};
