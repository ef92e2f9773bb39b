//! The export's Parquet files: schema, writing and reading rows.
//!
//! Written with the `parquet` crate's low-level column writer (no Arrow):
//! Snappy pages, statistics on, one row group per [`ROW_GROUP_ROWS`] rows.
//! Strings are `BYTE_ARRAY (STRING)`, times `INT64 (TIMESTAMP(MILLIS, UTC))`,
//! absent Avro optionals are Parquet nulls. The footer's key-value metadata
//! names the topic, partition and offset range
//! ([`META_TOPIC`], [`META_PARTITION`], [`META_FIRST`], [`META_LAST`]).

use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, Int32Type, Int64Type};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::reader::FileReader;
use parquet::file::serialized_reader::SerializedFileReader;
use parquet::file::writer::{SerializedColumnWriter, SerializedFileWriter};
use parquet::record::Field;
use parquet::schema::parser::parse_message_type;
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use crate::row::ExportRow;
use crate::ExportError;

/// The Parquet schema of every export file. Columns are only ever added
/// (at the end, optional), never renamed or retyped.
pub const SCHEMA: &str = "
message chat_event {
  REQUIRED INT32 kafka_partition;
  REQUIRED INT64 kafka_offset;
  REQUIRED BYTE_ARRAY event_id (STRING);
  OPTIONAL BYTE_ARRAY chat_id (STRING);
  OPTIONAL INT64 seq;
  REQUIRED BYTE_ARRAY event_type (STRING);
  REQUIRED BYTE_ARRAY sender_user (STRING);
  REQUIRED BYTE_ARRAY sender_device (STRING);
  OPTIONAL BYTE_ARRAY client_msg_id (STRING);
  OPTIONAL INT64 client_ts (TIMESTAMP(MILLIS,true));
  REQUIRED INT64 server_ts (TIMESTAMP(MILLIS,true));
  OPTIONAL INT64 sequenced_ts (TIMESTAMP(MILLIS,true));
  REQUIRED BYTE_ARRAY trace_id (STRING);
  REQUIRED INT32 schema_id;
  OPTIONAL BYTE_ARRAY text (STRING);
  OPTIONAL INT64 target_seq;
  OPTIONAL INT64 up_to_seq;
  OPTIONAL BYTE_ARRAY member_user (STRING);
  REQUIRED BYTE_ARRAY body_json (STRING);
}";

/// Rows per row group.
pub const ROW_GROUP_ROWS: usize = 100_000;
pub const META_TOPIC: &str = "chat.export.topic";
pub const META_PARTITION: &str = "chat.export.partition";
pub const META_FIRST: &str = "chat.export.first_offset";
pub const META_LAST: &str = "chat.export.last_offset";

fn perr(path: &Path) -> impl Fn(parquet::errors::ParquetError) -> ExportError + '_ {
    move |source| ExportError::Parquet {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `rows` (one partition's, in offset order) to `path` and syncs it
/// to disk. The caller renames it into place.
pub fn write_rows(path: &Path, topic: &str, rows: &[ExportRow]) -> Result<(), ExportError> {
    let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
        return Err(ExportError::Invalid {
            path: path.to_path_buf(),
            detail: "no rows to write".into(),
        });
    };
    let schema = Arc::new(parse_message_type(SCHEMA).map_err(perr(path))?);
    let meta = vec![
        KeyValue::new(META_TOPIC.into(), topic.to_string()),
        KeyValue::new(META_PARTITION.into(), first.kafka_partition.to_string()),
        KeyValue::new(META_FIRST.into(), first.kafka_offset.to_string()),
        KeyValue::new(META_LAST.into(), last.kafka_offset.to_string()),
    ];
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_created_by(format!("chat-export {}", env!("CARGO_PKG_VERSION")))
        .set_key_value_metadata(Some(meta))
        .build();
    let file = File::create(path).map_err(ExportError::io(path))?;
    let mut writer =
        SerializedFileWriter::new(file, schema, Arc::new(props)).map_err(perr(path))?;
    for chunk in rows.chunks(ROW_GROUP_ROWS) {
        let mut group = writer.next_row_group().map_err(perr(path))?;
        let mut column = 0;
        while let Some(mut col) = group.next_column().map_err(perr(path))? {
            write_column(&mut col, column, chunk).map_err(perr(path))?;
            col.close().map_err(perr(path))?;
            column += 1;
        }
        group.close().map_err(perr(path))?;
    }
    let file = writer.into_inner().map_err(perr(path))?;
    file.sync_all().map_err(ExportError::io(path))
}

type PResult<T> = Result<T, parquet::errors::ParquetError>;

fn req_i32(col: &mut SerializedColumnWriter<'_>, v: impl Iterator<Item = i32>) -> PResult<()> {
    let values: Vec<i32> = v.collect();
    col.typed::<Int32Type>().write_batch(&values, None, None)?;
    Ok(())
}

fn req_i64(col: &mut SerializedColumnWriter<'_>, v: impl Iterator<Item = i64>) -> PResult<()> {
    let values: Vec<i64> = v.collect();
    col.typed::<Int64Type>().write_batch(&values, None, None)?;
    Ok(())
}

fn opt_i64(
    col: &mut SerializedColumnWriter<'_>,
    v: impl Iterator<Item = Option<i64>>,
) -> PResult<()> {
    let (mut values, mut defs) = (Vec::new(), Vec::new());
    for x in v {
        defs.push(i16::from(x.is_some()));
        values.extend(x);
    }
    col.typed::<Int64Type>()
        .write_batch(&values, Some(&defs), None)?;
    Ok(())
}

fn req_str<'a>(
    col: &mut SerializedColumnWriter<'_>,
    v: impl Iterator<Item = &'a str>,
) -> PResult<()> {
    let values: Vec<ByteArray> = v.map(ByteArray::from).collect();
    col.typed::<ByteArrayType>()
        .write_batch(&values, None, None)?;
    Ok(())
}

fn opt_str<'a>(
    col: &mut SerializedColumnWriter<'_>,
    v: impl Iterator<Item = Option<&'a str>>,
) -> PResult<()> {
    let (mut values, mut defs) = (Vec::new(), Vec::new());
    for x in v {
        defs.push(i16::from(x.is_some()));
        values.extend(x.map(ByteArray::from));
    }
    col.typed::<ByteArrayType>()
        .write_batch(&values, Some(&defs), None)?;
    Ok(())
}

/// Writes column number `index` of [`SCHEMA`] for `rows`.
fn write_column(
    col: &mut SerializedColumnWriter<'_>,
    index: usize,
    rows: &[ExportRow],
) -> PResult<()> {
    let r = rows.iter();
    match index {
        0 => req_i32(col, r.map(|x| x.kafka_partition)),
        1 => req_i64(col, r.map(|x| x.kafka_offset)),
        2 => req_str(col, r.map(|x| x.event_id.as_str())),
        3 => opt_str(col, r.map(|x| x.chat_id.as_deref())),
        4 => opt_i64(col, r.map(|x| x.seq)),
        5 => req_str(col, r.map(|x| x.event_type.as_str())),
        6 => req_str(col, r.map(|x| x.sender_user.as_str())),
        7 => req_str(col, r.map(|x| x.sender_device.as_str())),
        8 => opt_str(col, r.map(|x| x.client_msg_id.as_deref())),
        9 => opt_i64(col, r.map(|x| x.client_ts)),
        10 => req_i64(col, r.map(|x| x.server_ts)),
        11 => opt_i64(col, r.map(|x| x.sequenced_ts)),
        12 => req_str(col, r.map(|x| x.trace_id.as_str())),
        13 => req_i32(col, r.map(|x| x.schema_id)),
        14 => opt_str(col, r.map(|x| x.text.as_deref())),
        15 => opt_i64(col, r.map(|x| x.target_seq)),
        16 => opt_i64(col, r.map(|x| x.up_to_seq)),
        17 => opt_str(col, r.map(|x| x.member_user.as_deref())),
        18 => req_str(col, r.map(|x| x.body_json.as_str())),
        n => Err(parquet::errors::ParquetError::General(format!(
            "column {n} is not in the export schema"
        ))),
    }
}

/// Reads every row of an export file, in file order.
pub fn read_rows(path: &Path) -> Result<Vec<ExportRow>, ExportError> {
    let file = File::open(path).map_err(ExportError::io(path))?;
    let reader = SerializedFileReader::new(file).map_err(perr(path))?;
    let mut out = Vec::with_capacity(
        usize::try_from(reader.metadata().file_metadata().num_rows()).unwrap_or(0),
    );
    for row in reader.get_row_iter(None).map_err(perr(path))? {
        let row = row.map_err(perr(path))?;
        let fields: HashMap<&str, &Field> = row
            .get_column_iter()
            .map(|(name, f)| (name.as_str(), f))
            .collect();
        let bad = |name: &str| ExportError::Invalid {
            path: path.to_path_buf(),
            detail: format!("column {name} missing or of another type"),
        };
        let long = |name: &str| -> Result<Option<i64>, ExportError> {
            match fields.get(name) {
                Some(Field::Long(v) | Field::TimestampMillis(v)) => Ok(Some(*v)),
                Some(Field::Null) | None => Ok(None),
                Some(_) => Err(bad(name)),
            }
        };
        let int = |name: &str| -> Result<i32, ExportError> {
            match fields.get(name) {
                Some(Field::Int(v)) => Ok(*v),
                _ => Err(bad(name)),
            }
        };
        let text = |name: &str| -> Result<Option<String>, ExportError> {
            match fields.get(name) {
                Some(Field::Str(s)) => Ok(Some(s.clone())),
                Some(Field::Null) | None => Ok(None),
                Some(_) => Err(bad(name)),
            }
        };
        let need = |v: Option<String>, name: &str| v.ok_or_else(|| bad(name));
        out.push(ExportRow {
            kafka_partition: int("kafka_partition")?,
            kafka_offset: long("kafka_offset")?.ok_or_else(|| bad("kafka_offset"))?,
            event_id: need(text("event_id")?, "event_id")?,
            chat_id: text("chat_id")?,
            seq: long("seq")?,
            event_type: need(text("event_type")?, "event_type")?,
            sender_user: need(text("sender_user")?, "sender_user")?,
            sender_device: need(text("sender_device")?, "sender_device")?,
            client_msg_id: text("client_msg_id")?,
            client_ts: long("client_ts")?,
            server_ts: long("server_ts")?.ok_or_else(|| bad("server_ts"))?,
            sequenced_ts: long("sequenced_ts")?,
            trace_id: need(text("trace_id")?, "trace_id")?,
            schema_id: int("schema_id")?,
            text: text("text")?,
            target_seq: long("target_seq")?,
            up_to_seq: long("up_to_seq")?,
            member_user: text("member_user")?,
            body_json: need(text("body_json")?, "body_json")?,
        });
    }
    Ok(out)
}

/// The footer's key-value metadata of an export file.
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>, ExportError> {
    let file = File::open(path).map_err(ExportError::io(path))?;
    let reader = SerializedFileReader::new(file).map_err(perr(path))?;
    Ok(reader
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kv| {
            kv.iter()
                .map(|k| (k.key.clone(), k.value.clone().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(offset: i64, with_options: bool) -> ExportRow {
        ExportRow {
            kafka_partition: 2,
            kafka_offset: offset,
            event_id: format!("00000000-0000-0000-0000-{offset:012}"),
            chat_id: with_options.then(|| "c".to_string()),
            seq: with_options.then_some(offset + 1),
            event_type: "MessageSent".into(),
            sender_user: "ann".into(),
            sender_device: "ann-phone".into(),
            client_msg_id: with_options.then(|| format!("m{offset}")),
            client_ts: with_options.then_some(5),
            server_ts: 1_700_000_000_000 + offset,
            sequenced_ts: with_options.then_some(1_700_000_000_001 + offset),
            trace_id: "t".into(),
            schema_id: 7,
            text: with_options.then(|| format!("héllo {offset}")),
            target_seq: None,
            up_to_seq: with_options.then_some(3),
            member_user: None,
            body_json: "{\"text\":\"x\"}".into(),
        }
    }

    #[test]
    fn rows_round_trip_with_nulls_and_metadata() {
        let dir = std::env::temp_dir().join(format!("chat-export-pq-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.parquet");
        let rows: Vec<ExportRow> = (10..260).map(|o| row(o, o % 3 != 0)).collect();
        write_rows(&path, "chat.events", &rows).unwrap();
        assert_eq!(read_rows(&path).unwrap(), rows);
        let meta = read_metadata(&path).unwrap();
        assert_eq!(meta[META_PARTITION], "2");
        assert_eq!(meta[META_FIRST], "10");
        assert_eq!(meta[META_LAST], "259");
        assert_eq!(meta[META_TOPIC], "chat.events");
        assert!(write_rows(&dir.join("b.parquet"), "t", &[]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
