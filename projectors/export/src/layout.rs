//! Where the export's files live and what their names say.
//!
//! ```text
//! <out>/.lock                                   held by the one process using <out>
//! <out>/topic=<topic>/date=YYYY-MM-DD/hour=HH/part-p<PPPP>-<first>-<last>.parquet
//! ```
//!
//! Hive-style directories, so DuckDB (`hive_partitioning`), Spark and
//! pyarrow (`partitioning="hive"`) add `topic`, `date` and `hour` columns.
//! The date and hour are UTC, of the event's `sequenced_ts`. A file holds
//! rows of one Kafka partition `P` with offsets in `first..=last` (20
//! digits, zero-padded, so names sort by offset); the same numbers are in
//! its footer's key-value metadata. Every name starting with `.` or `_` is
//! not part of the data set (temp files `.tmp-*.partial` being written, `.hour=HH.compact`
//! directories of a compaction): pyarrow and Spark skip them by default.
//!
//! On start, [`scan`] lists the committed files; the next offset to export
//! of each partition is the highest `last` + 1 ([`Scan::resume_positions`]);
//! temp files and compaction directories a crash left are deleted
//! ([`Scan::discard_leftovers`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::ExportError;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// Prefix of a file being written (never read by anyone).
pub const TEMP_PREFIX: &str = ".tmp-";
/// Suffix of a hidden hour directory built (or left) by a compaction.
pub const COMPACT_SUFFIX: &str = ".compact";

/// An hour of UTC time: hours since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hour(pub i64);

impl Hour {
    pub fn of_ms(ms: i64) -> Self {
        Hour(ms.div_euclid(HOUR_MS))
    }

    /// The first millisecond after this hour.
    pub fn end_ms(self) -> i64 {
        (self.0 + 1) * HOUR_MS
    }

    /// `YYYY-MM-DD` of the hour's day.
    pub fn date(self) -> String {
        let (y, m, d) = civil_from_days((self.0 * HOUR_MS).div_euclid(DAY_MS));
        format!("{y:04}-{m:02}-{d:02}")
    }

    /// The hour of the day, 0..=23.
    pub fn hour_of_day(self) -> i64 {
        self.0.rem_euclid(24)
    }

    /// Parses the directory names `date=YYYY-MM-DD` and `hour=HH`.
    pub fn parse(date_dir: &str, hour_dir: &str) -> Option<Self> {
        let date = date_dir.strip_prefix("date=")?;
        let hour: i64 = hour_dir.strip_prefix("hour=")?.parse().ok()?;
        let mut parts = date.split('-');
        let y: i64 = parts.next()?.parse().ok()?;
        let m: u32 = parts.next()?.parse().ok()?;
        let d: u32 = parts.next()?.parse().ok()?;
        if parts.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
            return None;
        }
        if !(0..24).contains(&hour) {
            return None;
        }
        Some(Hour(days_from_civil(y, m, d) * 24 + hour))
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number (inverse of [`days_from_civil`]).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The directory of one topic's export.
pub fn topic_dir(out: &Path, topic: &str) -> PathBuf {
    out.join(format!("topic={topic}"))
}

/// The directory of one hour of one topic.
pub fn hour_dir(out: &Path, topic: &str, hour: Hour) -> PathBuf {
    topic_dir(out, topic)
        .join(format!("date={}", hour.date()))
        .join(format!("hour={:02}", hour.hour_of_day()))
}

/// What a data file's name says: the rows of one Kafka partition with
/// offsets in `first..=last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FileName {
    pub partition: i32,
    pub first: i64,
    pub last: i64,
}

impl FileName {
    pub fn render(&self) -> String {
        format!(
            "part-p{:04}-{:020}-{:020}.parquet",
            self.partition, self.first, self.last
        )
    }

    pub fn parse(name: &str) -> Option<Self> {
        let rest = name.strip_prefix("part-p")?.strip_suffix(".parquet")?;
        let mut parts = rest.split('-');
        let partition = parts.next()?.parse().ok()?;
        let first = parts.next()?.parse().ok()?;
        let last = parts.next()?.parse().ok()?;
        if parts.next().is_some() || first > last {
            return None;
        }
        Some(Self {
            partition,
            first,
            last,
        })
    }
}

/// One committed data file.
#[derive(Clone, Debug)]
pub struct DataFile {
    pub path: PathBuf,
    pub hour: Hour,
    pub name: FileName,
}

/// What [`scan`] found under a topic's directory.
#[derive(Debug, Default)]
pub struct Scan {
    /// Committed data files, by hour then name.
    pub files: Vec<DataFile>,
    /// Temp files and compaction directories left by a crash.
    pub leftovers: Vec<PathBuf>,
    /// Other entries that are not ours (reported, left alone).
    pub foreign: Vec<PathBuf>,
}

fn hidden(name: &str) -> bool {
    name.starts_with('.') || name.starts_with('_')
}

fn entries(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>, ExportError> {
    let mut out = Vec::new();
    let read = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(ExportError::io(dir)(e)),
    };
    for entry in read {
        let entry = entry.map_err(ExportError::io(dir))?;
        let is_dir = entry.file_type().map_err(ExportError::io(dir))?.is_dir();
        out.push((
            entry.file_name().to_string_lossy().into_owned(),
            entry.path(),
            is_dir,
        ));
    }
    out.sort();
    Ok(out)
}

/// Lists the export of `topic` under `out`.
pub fn scan(out: &Path, topic: &str) -> Result<Scan, ExportError> {
    let mut scan = Scan::default();
    for (date_name, date_path, is_dir) in entries(&topic_dir(out, topic))? {
        if !is_dir || !date_name.starts_with("date=") {
            scan.foreign.push(date_path);
            continue;
        }
        for (hour_name, hour_path, is_dir) in entries(&date_path)? {
            if is_dir && hour_name.starts_with(".hour=") && hour_name.ends_with(COMPACT_SUFFIX) {
                scan.leftovers.push(hour_path);
                continue;
            }
            let Some(hour) = Hour::parse(&date_name, &hour_name).filter(|_| is_dir) else {
                scan.foreign.push(hour_path);
                continue;
            };
            let before = scan.files.len();
            for (name, path, is_dir) in entries(&hour_path)? {
                if !is_dir && name.starts_with(TEMP_PREFIX) {
                    scan.leftovers.push(path);
                } else if let Some(parsed) = FileName::parse(&name).filter(|_| !is_dir) {
                    scan.files.push(DataFile {
                        path,
                        hour,
                        name: parsed,
                    });
                } else if !hidden(&name) {
                    scan.foreign.push(path);
                }
            }
            // A file whose range another file of its partition in the same
            // hour covers is a small file a compaction merged (a crash
            // between the merged file's rename and the small files' unlink,
            // possible only where the directory swap is not supported).
            let hour_files = scan.files.split_off(before);
            for f in &hour_files {
                let covered = hour_files.iter().any(|g| {
                    g.path != f.path
                        && g.name.partition == f.name.partition
                        && g.name.first <= f.name.first
                        && g.name.last >= f.name.last
                        && (g.name.first, g.name.last) != (f.name.first, f.name.last)
                });
                if covered {
                    scan.leftovers.push(f.path.clone());
                } else {
                    scan.files.push(f.clone());
                }
            }
        }
    }
    Ok(scan)
}

impl Scan {
    /// Per partition, the next offset to export: after the highest offset
    /// any committed file of that partition holds.
    pub fn resume_positions(&self) -> BTreeMap<i32, i64> {
        let mut next = BTreeMap::new();
        for f in &self.files {
            let at = next.entry(f.name.partition).or_insert(0);
            *at = (*at).max(f.name.last + 1);
        }
        next
    }

    /// Deletes what a crash left (a temp file never renamed, a compaction
    /// directory built or swapped out); returns how many.
    pub fn discard_leftovers(&mut self) -> Result<usize, ExportError> {
        let n = self.leftovers.len();
        for path in self.leftovers.drain(..) {
            tracing::info!(path = %path.display(), "discarding what an interrupted run left");
            let res = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match res {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ExportError::io(&path)(e)),
            }
        }
        Ok(n)
    }
}

/// Makes a rename or unlink in `dir` durable.
pub fn fsync_dir(dir: &Path) -> Result<(), ExportError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ExportError::io(dir))
}

/// The exclusive lock on an output directory (released when dropped).
#[derive(Debug)]
pub struct OutLock {
    _file: File,
}

impl OutLock {
    /// Creates `out` if needed and locks it, or fails at once if another
    /// process holds it.
    pub fn acquire(out: &Path) -> Result<Self, ExportError> {
        use rustix::fs::{flock, FlockOperation};
        std::fs::create_dir_all(out).map_err(ExportError::io(out))?;
        let path = out.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(ExportError::io(&path))?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Self { _file: file }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(ExportError::Locked(out.to_path_buf())),
            Err(e) => Err(ExportError::io(&path)(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_render_and_parse_back() {
        // 2026-12-01T23:41:48Z
        let ms = 1_796_168_508_000;
        let h = Hour::of_ms(ms);
        assert_eq!(h.date(), "2026-12-01");
        assert_eq!(h.hour_of_day(), 23);
        assert_eq!(Hour::parse("date=2026-12-01", "hour=23"), Some(h));
        assert_eq!(Hour::of_ms(0).date(), "1970-01-01");
        assert_eq!(
            Hour::parse("date=2024-02-29", "hour=00").unwrap().date(),
            "2024-02-29"
        );
        assert_eq!(Hour::parse("date=2024-02-29", "hour=24"), None);
        assert_eq!(Hour::parse("date=2024-13-01", "hour=01"), None);
        assert!(h.end_ms() > ms && h.end_ms() - ms <= HOUR_MS);
        for day in [-1000, 0, 365, 19_000, 20_788, 60_000] {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
    }

    #[test]
    fn file_names_round_trip_and_sort_by_offset() {
        let a = FileName {
            partition: 3,
            first: 9,
            last: 10,
        };
        let b = FileName {
            partition: 3,
            first: 11,
            last: 200,
        };
        assert_eq!(FileName::parse(&a.render()), Some(a));
        assert!(a.render() < b.render());
        assert_eq!(FileName::parse("part-p0003-2-1.parquet"), None);
        assert_eq!(FileName::parse(".tmp-part-p0003-1-2.parquet"), None);
    }

    #[test]
    fn resume_is_after_the_highest_offset_and_leftovers_are_found() {
        let dir = std::env::temp_dir().join(format!("chat-export-layout-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let h = hour_dir(&dir, "chat.events", Hour(500_000));
        std::fs::create_dir_all(&h).unwrap();
        for n in [(0, 0, 9), (0, 10, 19), (1, 5, 5), (1, 0, 7)] {
            let name = FileName {
                partition: n.0,
                first: n.1,
                last: n.2,
            };
            std::fs::write(h.join(name.render()), b"x").unwrap();
        }
        std::fs::write(
            h.join(".tmp-part-p0000-00000000000000000020-00000000000000000029.parquet"),
            b"half",
        )
        .unwrap();
        let compact = h.parent().unwrap().join(".hour=05.compact");
        std::fs::create_dir_all(&compact).unwrap();
        let mut s = scan(&dir, "chat.events").unwrap();
        assert_eq!(s.files.len(), 3);
        assert_eq!(s.resume_positions(), BTreeMap::from([(0, 20), (1, 8)]));
        assert_eq!(s.discard_leftovers().unwrap(), 3);
        assert!(scan(&dir, "chat.events").unwrap().leftovers.is_empty());
        let lock = OutLock::acquire(&dir).unwrap();
        assert!(matches!(
            OutLock::acquire(&dir),
            Err(ExportError::Locked(_))
        ));
        drop(lock);
        OutLock::acquire(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
