//! `projector_progress`: how far each projector's writes have reached, per
//! `chat.events` partition. A row `(projector, partition) -> next_offset`
//! promises that the writes of every event of that partition before
//! `next_offset` are done. It is written with `USING TIMESTAMP next_offset`,
//! so it never moves back (a replay or a stale instance writes lower
//! offsets, which lose).

use scylla::statement::prepared::PreparedStatement;
use std::collections::HashMap;

use super::{Store, StoreError};

#[derive(Debug)]
pub(super) struct Prepared {
    put: PreparedStatement,
    select: PreparedStatement,
}

impl Store {
    async fn progress_prepared(&self) -> Result<&Prepared, StoreError> {
        let init = || async {
            let ks = &self.keyspace;
            Ok(Prepared {
                put: self
                    .prepare(format!(
                        "UPDATE {ks}.projector_progress USING TIMESTAMP ? SET next_offset = ? \
                         WHERE projector = ? AND partition = ?"
                    ))
                    .await?,
                select: self
                    .prepare(format!(
                        "SELECT partition, next_offset FROM {ks}.projector_progress \
                         WHERE projector = ?"
                    ))
                    .await?,
            })
        };
        self.progress.get_or_try_init(init).await
    }

    /// Records that `projector` has written every event of `partition` before
    /// `next_offset`. Call only once those writes succeeded. Never moves back.
    pub async fn put_progress(
        &self,
        projector: &str,
        partition: i32,
        next_offset: i64,
    ) -> Result<(), StoreError> {
        let p = self.progress_prepared().await?;
        let values = (next_offset, next_offset, projector, partition);
        self.execute("write projector progress", &p.put, values)
            .await
            .map(drop)
    }

    /// `partition -> next_offset` of `projector`: every event before that
    /// offset of that partition is projected. Partitions it never wrote are absent.
    pub async fn progress(&self, projector: &str) -> Result<HashMap<i32, i64>, StoreError> {
        let p = self.progress_prepared().await?;
        let rows: Vec<(i32, Option<i64>)> = self
            .execute_all("read projector progress", &p.select, (projector,))
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(partition, next)| Some((partition, next?)))
            .collect())
    }
}
