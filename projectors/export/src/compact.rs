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
