//! Hourly compaction: the small files of an hour become one file per Kafka
//! partition, and a reader never sees a row twice or not at all.
//!
//! For an hour where some partition has more than one file, the
//! replacement is built beside it as a hidden directory
//! `date=D/.hour=HH.compact/` (merged files written and synced, files that
//! need no merge hard-linked), then swapped with `hour=HH` in one
//! `renameat2(RENAME_EXCHANGE)`, and the old directory (now the hidden
//! one) is deleted. A reader listing `hour=HH` sees either every old file
//! or every new one. A reader that listed the old files and opens them
//! after the swap gets "file not found" (and retries), never a wrong
//! answer. A crash at any point leaves either the old or the new
//! directory in place plus a hidden `.compact` directory, which the next
//! start deletes.
//!
//! Where the file system cannot exchange (`EINVAL`/`ENOTSUP`), each merged
//! file is renamed into the hour and the small files are then deleted: a
//! reader listing the directory in between sees rows twice (the reader's
//! rule in `schemas/README.md`: dedupe on `(kafka_partition, kafka_offset)`),
//! and a crash in between is repaired on the next start (a file whose
//! range another file covers is deleted, see [`crate::layout::scan`]).

use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::layout::{self, DataFile, FileName, Hour, COMPACT_SUFFIX};
use crate::parquet_io;
use crate::ExportError;

/// What a compaction pass did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CompactReport {
    /// Hours whose files were merged (`YYYY-MM-DDTHH`).
    pub hours_compacted: Vec<String>,
    pub files_before: usize,
    pub files_after: usize,
    pub rows_merged: usize,
    /// Hours left alone because they may still get records.
    pub hours_open: usize,
}

/// Compacts every hour of `topic` under `out` for which `closed(hour)` is
/// true and some partition has several files. The caller holds the
/// directory's [`layout::OutLock`].
pub fn compact(
    out: &Path,
    topic: &str,
    closed: impl Fn(Hour) -> bool,
) -> Result<CompactReport, ExportError> {
    let mut scan = layout::scan(out, topic)?;
    scan.discard_leftovers()?;
    let mut by_hour: BTreeMap<Hour, Vec<DataFile>> = BTreeMap::new();
    for f in scan.files {
        by_hour.entry(f.hour).or_default().push(f);
    }
    let mut report = CompactReport::default();
    for (hour, files) in by_hour {
        let mut by_partition: BTreeMap<i32, Vec<DataFile>> = BTreeMap::new();
        for f in files {
            by_partition.entry(f.name.partition).or_default().push(f);
        }
        if by_partition.values().all(|f| f.len() <= 1) {
            continue;
        }
        if !closed(hour) {
            report.hours_open += 1;
            continue;
        }
        let (before, after, rows) = compact_hour(out, topic, hour, &by_partition)?;
        report.files_before += before;
        report.files_after += after;
        report.rows_merged += rows;
        report
            .hours_compacted
            .push(format!("{}T{:02}", hour.date(), hour.hour_of_day()));
    }
    Ok(report)
}

fn compact_hour(
    out: &Path,
    topic: &str,
    hour: Hour,
    by_partition: &BTreeMap<i32, Vec<DataFile>>,
) -> Result<(usize, usize, usize), ExportError> {
    let hour_dir = layout::hour_dir(out, topic, hour);
    let date_dir = hour_dir.parent().map(Path::to_path_buf).unwrap_or_default();
    let staging = date_dir.join(format!(".hour={:02}{COMPACT_SUFFIX}", hour.hour_of_day()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(ExportError::io(&staging))?;
    }
    std::fs::create_dir(&staging).map_err(ExportError::io(&staging))?;
    let (mut before, mut rows_merged) = (0, 0);
    let mut merged: Vec<PathBuf> = Vec::new();
    for (partition, files) in by_partition {
        before += files.len();
        if let [only] = files.as_slice() {
            let to = staging.join(only.name.render());
            std::fs::hard_link(&only.path, &to).map_err(ExportError::io(&to))?;
            continue;
        }
        let mut rows = Vec::new();
        for f in files {
            rows.extend(parquet_io::read_rows(&f.path)?);
        }
        rows.sort_by_key(|r| r.kafka_offset);
        if let Some(w) = rows
            .windows(2)
            .find(|w| w[0].kafka_offset == w[1].kafka_offset)
        {
            return Err(ExportError::Invalid {
                path: hour_dir.clone(),
                detail: format!(
                    "partition {partition} offset {} is in two files; not compacting",
                    w[0].kafka_offset
                ),
            });
        }
        let name = FileName {
            partition: *partition,
            first: rows.first().map_or(0, |r| r.kafka_offset),
            last: rows.last().map_or(0, |r| r.kafka_offset),
        };
        let path = staging.join(name.render());
        parquet_io::write_rows(&path, topic, &rows)?;
        rows_merged += rows.len();
        merged.push(path);
    }
    layout::fsync_dir(&staging)?;
    let after = by_partition.len();
    match rustix::fs::renameat_with(
        rustix::fs::CWD,
        &staging,
        rustix::fs::CWD,
        &hour_dir,
        rustix::fs::RenameFlags::EXCHANGE,
    ) {
        Ok(()) => {
            layout::fsync_dir(&date_dir)?;
            // `staging` now holds the old files.
            std::fs::remove_dir_all(&staging).map_err(ExportError::io(&staging))?;
        }
        Err(e)
            if e == rustix::io::Errno::INVAL
                || e == rustix::io::Errno::NOTSUP
                || e == rustix::io::Errno::NOSYS =>
        {
            tracing::warn!(dir = %hour_dir.display(), error = %e, "directory exchange not supported here; replacing files one by one (readers may see rows twice for a moment)");
            for path in &merged {
                let name = path.file_name().unwrap_or_default();
                let to = hour_dir.join(name);
                std::fs::rename(path, &to).map_err(ExportError::io(&to))?;
            }
            layout::fsync_dir(&hour_dir)?;
            for files in by_partition.values().filter(|f| f.len() > 1) {
                for f in files {
                    std::fs::remove_file(&f.path).map_err(ExportError::io(&f.path))?;
                }
            }
            layout::fsync_dir(&hour_dir)?;
            std::fs::remove_dir_all(&staging).map_err(ExportError::io(&staging))?;
        }
        Err(e) => return Err(ExportError::io(&hour_dir)(e.into())),
    }
    tracing::info!(dir = %hour_dir.display(), files_before = before, files_after = after, "hour compacted");
    Ok((before, after, rows_merged))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row::ExportRow;

    fn row(partition: i32, offset: i64, hour: Hour) -> ExportRow {
        ExportRow {
            kafka_partition: partition,
            kafka_offset: offset,
            event_id: format!("e-{partition}-{offset}"),
            chat_id: None,
            seq: Some(offset),
            event_type: "MessageSent".into(),
            sender_user: "ann".into(),
            sender_device: "d".into(),
            client_msg_id: None,
            client_ts: None,
            server_ts: hour.0 * 3_600_000,
            sequenced_ts: Some(hour.0 * 3_600_000 + offset),
            trace_id: "t".into(),
            schema_id: 1,
            text: Some(format!("m{offset}")),
            target_seq: None,
            up_to_seq: None,
            member_user: None,
            body_json: "{}".into(),
        }
    }

    fn write(out: &Path, hour: Hour, partition: i32, offsets: std::ops::RangeInclusive<i64>) {
        let rows: Vec<ExportRow> = offsets.map(|o| row(partition, o, hour)).collect();
        let name = FileName {
            partition,
            first: rows[0].kafka_offset,
            last: rows[rows.len() - 1].kafka_offset,
        };
        let dir = layout::hour_dir(out, "chat.events", hour);
        std::fs::create_dir_all(&dir).unwrap();
        parquet_io::write_rows(&dir.join(name.render()), "chat.events", &rows).unwrap();
    }

    #[test]
    fn closed_hours_become_one_file_per_partition_with_the_same_rows() {
        let out = std::env::temp_dir().join(format!("chat-export-compact-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let (closed, open) = (Hour(490_000), Hour(490_001));
        write(&out, closed, 0, 0..=9);
        write(&out, closed, 0, 10..=14);
        // A late record of partition 0, after rows of the next hour.
        write(&out, closed, 0, 30..=30);
        write(&out, closed, 1, 0..=3);
        write(&out, open, 0, 15..=29);
        write(&out, open, 0, 31..=40);
        let before: Vec<ExportRow> = layout::scan(&out, "chat.events")
            .unwrap()
            .files
            .iter()
            .flat_map(|f| parquet_io::read_rows(&f.path).unwrap())
            .collect();
        let report = compact(&out, "chat.events", |h| h == closed).unwrap();
        assert_eq!(report.files_before, 4);
        assert_eq!(report.files_after, 2);
        assert_eq!(report.rows_merged, 16);
        assert_eq!(report.hours_open, 1);
        let scan = layout::scan(&out, "chat.events").unwrap();
        assert!(scan.leftovers.is_empty(), "{:?}", scan.leftovers);
        let names: Vec<(Hour, FileName)> = scan.files.iter().map(|f| (f.hour, f.name)).collect();
        assert!(names.contains(&(
            closed,
            FileName {
                partition: 0,
                first: 0,
                last: 30
            }
        )));
        assert!(names.contains(&(
            closed,
            FileName {
                partition: 1,
                first: 0,
                last: 3
            }
        )));
        assert_eq!(names.iter().filter(|(h, _)| *h == open).count(), 2);
        assert_eq!(scan.resume_positions(), BTreeMap::from([(0, 41), (1, 4)]));
        let mut after: Vec<ExportRow> = scan
            .files
            .iter()
            .flat_map(|f| parquet_io::read_rows(&f.path).unwrap())
            .collect();
        let mut before = before;
        let key = |r: &ExportRow| (r.kafka_partition, r.kafka_offset);
        before.sort_by_key(key);
        after.sort_by_key(key);
        assert_eq!(before, after);
        // Nothing left to do: a second pass changes nothing.
        let again = compact(&out, "chat.events", |h| h == closed).unwrap();
        assert!(again.hours_compacted.is_empty());
        std::fs::remove_dir_all(&out).unwrap();
    }
}
