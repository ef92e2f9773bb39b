//! The analytics export: `chat.events` as Hive-partitioned Parquet files
//! that DuckDB, Spark or pandas/pyarrow read without Kafka.
//!
//! What this crate owns:
//! - [`row`]: the mapping of one decoded envelope to one Parquet row (the
//!   envelope's stable fields, a few body fields as columns, the whole body
//!   as JSON, and the record's Kafka partition and offset);
//! - [`parquet_io`]: the Parquet schema, writing and reading files of rows
//!   (low-level column writer and record reader of the `parquet` crate);
//! - [`layout`]: the directory layout
//!   (`<out>/topic=<topic>/date=YYYY-MM-DD/hour=HH/part-p<P>-<first>-<last>.parquet`),
//!   file names that carry the partition and offset range they hold, the
//!   resume positions derived from the files present, the output
//!   directory's lock, and the clean-up of what a crash left;
//! - [`export`]: the exporter (continuous, or `--until-end`), which
//!   buffers each partition's records and commits them as files (temp
//!   name, fsync, atomic rename);
//! - [`compact`]: merging the small files of an hour into one file per
//!   partition, swapped in atomically (the hour directory is exchanged
//!   with a complete replacement by `renameat2(RENAME_EXCHANGE)`).
//!
//! Exactly once per record across restarts (kill -9 included): a file is
//! visible only once complete, a partition's files are committed in offset
//! order, and on start the exporter resumes each partition after the
//! highest offset its files hold. Kafka's committed offsets are not used.
//! One exporter per output directory (a lock file enforces it).
#![forbid(unsafe_code)]

pub mod compact;
pub mod export;
pub mod layout;
pub mod parquet_io;
pub mod row;

/// What can go wrong in the export's file handling.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parquet file {path}: {source}")]
    Parquet {
        path: std::path::PathBuf,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("{path}: {detail}")]
    Invalid {
        path: std::path::PathBuf,
        detail: String,
    },
    #[error("another chat-export holds the lock on {0} (one exporter or compaction per output directory)")]
    Locked(std::path::PathBuf),
    #[error(transparent)]
    Log(#[from] chat_log::LogError),
}

impl ExportError {
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
        move |source| ExportError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
