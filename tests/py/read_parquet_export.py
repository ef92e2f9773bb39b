"""Reads a chat-export output directory with pyarrow, as an analyst would,
and prints one JSON object: every row's identifying columns and the data
files pyarrow chose (hidden names starting with '.' or '_' are skipped by
pyarrow.dataset by default, as the analytics contract says).

Usage: read_parquet_export.py <out dir>
"""

import json
import os
import sys

import pyarrow.dataset as ds


def main() -> None:
    root = sys.argv[1]
    dataset = ds.dataset(root, format="parquet", partitioning="hive")
    columns = [
        "topic", "date", "hour", "kafka_partition", "kafka_offset", "event_id",
        "chat_id", "seq", "event_type", "text", "sequenced_ts", "body_json",
    ]
    table = dataset.to_table(columns=columns)
    rows = []
    for r in table.to_pylist():
        ts = r["sequenced_ts"]
        rows.append({
            "topic": str(r["topic"]),
            "date": str(r["date"]),
            "hour": int(r["hour"]),
            "partition": r["kafka_partition"],
            "offset": r["kafka_offset"],
            "event_id": r["event_id"],
            "chat_id": r["chat_id"],
            "seq": r["seq"],
            "event_type": r["event_type"],
            "text": r["text"],
            # A timezone-aware datetime: back to epoch milliseconds.
            "sequenced_ms": None if ts is None else round(ts.timestamp() * 1000),
            "body": json.loads(r["body_json"]),
        })
    files = sorted(os.path.relpath(f, root) for f in dataset.files)
    print(json.dumps({
        "schema": {f.name: str(f.type) for f in dataset.schema},
        "files": files,
        "rows": rows,
    }))


if __name__ == "__main__":
    main()
