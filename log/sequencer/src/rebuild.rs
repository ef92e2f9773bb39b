//! Reading a partition's fold back from `chat.events`: the one rebuild that
//! the sequencer (its state) and the router (its membership) both use.

use chat_log::{LogConfig, SchemaRegistry, TailItem, TailStart, TopicTail};
use std::collections::HashMap;
use std::sync::Arc;

use crate::state::{PartitionState, RebuildError};

/// Folds partition `p` of `events_topic` from its beginning up to `until`
/// (exclusive; `None`: its end now). Returns the state and the offset of the
/// newest event folded. Stops at the first record the fold refuses or that
/// cannot be decoded: that is logged at error level (as `who`) and returned
/// as a [`RebuildError`], and no state is handed out.
pub async fn fold_partition(
    config: &LogConfig,
    registry: Arc<SchemaRegistry>,
    events_topic: &str,
    p: i32,
    until: Option<i64>,
    who: &str,
) -> anyhow::Result<(PartitionState, Option<i64>)> {
    let tail = TopicTail::open(
        config,
        registry,
        events_topic,
        Some(vec![p]),
        TailStart::Beginning,
    )
    .await?;
    let ends = match until {
        Some(until) => HashMap::from([(p, until)]),
        None => tail.high_watermarks().await?,
    };
    let mut state = PartitionState::default();
    let mut newest = None;
    let mut failed: Option<RebuildError> = None;
    tail.read_until(&ends, |item| {
        if failed.is_some() {
            return;
        }
        match item {
            TailItem::Event(ev) => match state.apply(&ev.envelope) {
                Ok(()) => newest = Some(ev.offset),
                Err(source) => {
                    failed = Some(RebuildError::Fold {
                        partition: ev.partition,
                        offset: ev.offset,
                        source,
                    })
                }
            },
            TailItem::Undecodable {
                partition,
                offset,
                error,
            } => {
                failed = Some(RebuildError::Undecodable {
                    partition,
                    offset,
                    error,
                })
            }
        }
    })
    .await?;
    if let Some(e) = failed {
        e.log(who);
        return Err(e.into());
    }
    Ok((state, newest))
}
