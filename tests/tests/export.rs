//! The analytics export (`chat-export`) against the real stack, read back
//! by an independent reader (pyarrow, `tests/py/read_parquet_export.py`).
//!
//! One run: events produced to a test's `chat.events`, an exporter killed
//! with SIGKILL while records keep arriving, a half-written temp file
//! planted, a restart with `--until-end`, a compaction, a continuous run
//! stopped by SIGTERM, and a final `--until-end` that finds nothing new.
//! After each step every produced event is in the export exactly once,
//! with its partition, offset, seq and text.

use chat_export::layout::{FileName, Hour, OutLock};
use chat_log::{Outgoing, Produced};
use chat_schemas::{Body, Envelope, ReadReceipt};
use chat_tests::envelopes::{event, text};
use chat_tests::platform::binary;
use chat_tests::{free_addr, metric, repo_root, third_party_python, TestLog};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use uuid::Uuid;

const CHATS: usize = 12;

/// What the test produced, by event id.
#[derive(Clone, Debug)]
struct Expected {
    partition: i32,
    offset: i64,
    chat: Uuid,
    seq: Option<u64>,
    text: Option<String>,
    sequenced_ms: i64,
}

struct Producer {
    chats: Vec<Uuid>,
    next_seq: Vec<u64>,
}

impl Producer {
    /// The next `n` events, round-robin over the chats: messages with the
    /// chat's next seq, and every seventh a read receipt (no seq).
    fn batch(&mut self, n: usize, start: usize) -> Vec<Envelope> {
        (start..start + n)
            .map(|i| {
                let c = i % CHATS;
                let chat = self.chats[c];
                if i % 7 == 6 && self.next_seq[c] > 1 {
                    let mut e = event(
                        chat,
                        1,
                        "bob",
                        Body::ReadReceipt(ReadReceipt {
                            up_to_seq: self.next_seq[c] - 1,
                        }),
                    );
                    e.seq = None;
                    e
                } else {
                    let seq = self.next_seq[c];
                    self.next_seq[c] += 1;
                    event(chat, seq, "ann", text(&format!("chat {c} message {seq} ✓")))
                }
            })
            .collect()
    }
}

async fn produce(
    log: &TestLog,
    envelopes: Vec<Envelope>,
) -> anyhow::Result<Vec<(Envelope, Produced)>> {
    let records = envelopes
        .iter()
        .map(|e| Outgoing {
            topic: log.topics.events.clone(),
            partition: None,
            key: e.chat_id.unwrap().to_string(),
            envelope: e.clone(),
            headers: vec![],
        })
        .collect();
    let produced = log.producer.send_batch(records).await?;
    Ok(envelopes.into_iter().zip(produced).collect())
}

fn record(expected: &mut HashMap<String, Expected>, sent: Vec<(Envelope, Produced)>) {
    for (e, p) in sent {
        let text = match &e.body {
            Body::MessageSent(m) => m.text.clone(),
            _ => None,
        };
        expected.insert(
            e.event_id.to_string(),
            Expected {
                partition: p.partition,
                offset: p.offset,
                chat: e.chat_id.unwrap(),
                seq: e.seq,
                text,
                sequenced_ms: e.sequenced_ts.unwrap_or(e.server_ts),
            },
        );
    }
}

fn exporter(log: &TestLog, out: &Path, args: &[&str], extra_env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(binary("chat-export", "debug").unwrap());
    c.arg("--out")
        .arg(out)
        .args(args)
        .env("CHAT_LOG__BROKERS", &log.config.brokers)
        .env("CHAT_LOG__REGISTRY_URL", &log.config.registry_url)
        .env("CHAT_LOG__TOPIC_PREFIX", &log.config.topic_prefix)
        .env(
            "CHAT_LOG__CHAT_PARTITIONS",
            log.config.chat_partitions.to_string(),
        )
        .env("RUST_LOG", "warn,chat_export=info")
        .kill_on_drop(true);
    for (k, v) in extra_env {
        c.env(k, v);
    }
    c
}

/// Runs chat-export to completion; its exit status, stdout JSON and stderr.
async fn run_json(
    log: &TestLog,
    out: &Path,
    args: &[&str],
) -> anyhow::Result<(i32, Value, String)> {
    let o = exporter(log, out, args, &[]).output().await?;
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let json = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    Ok((o.status.code().unwrap_or(-1), json, stderr))
}

/// Committed data files under `out` (names starting with `part-`), parsed.
fn committed(out: &Path) -> Vec<(PathBuf, FileName)> {
    fn walk(dir: &Path, found: &mut Vec<(PathBuf, FileName)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if path.is_dir() {
                walk(&path, found);
            } else if let Some(f) = FileName::parse(&name) {
                found.push((path, f));
            }
        }
    }
    let mut found = Vec::new();
    walk(out, &mut found);
    found.sort_by_key(|(_, f)| *f);
    found
}

/// Offsets the committed files cover (rows, as this topic has no gaps).
fn covered(out: &Path) -> i64 {
    committed(out)
        .iter()
        .map(|(_, f)| f.last - f.first + 1)
        .sum()
}

/// Reads the export with pyarrow and checks it holds every expected event
/// exactly once, with the right position, seq, text, topic, date and hour.
fn check_with_pyarrow(
    out: &Path,
    topic: &str,
    expected: &HashMap<String, Expected>,
) -> anyhow::Result<Value> {
    let o = std::process::Command::new(third_party_python()?)
        .arg(repo_root().join("tests/py/read_parquet_export.py"))
        .arg(out)
        .output()?;
    anyhow::ensure!(
        o.status.success(),
        "pyarrow reader failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let read: Value = serde_json::from_slice(&o.stdout)?;
    let rows = read["rows"].as_array().cloned().unwrap_or_default();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &rows {
        let id = r["event_id"].as_str().unwrap_or_default().to_string();
        *seen.entry(id.clone()).or_default() += 1;
        let Some(e) = expected.get(&id) else {
            anyhow::bail!("row for an event never produced: {r}");
        };
        let hour = Hour::of_ms(e.sequenced_ms);
        assert_eq!(r["partition"].as_i64(), Some(i64::from(e.partition)), "{r}");
        assert_eq!(r["offset"].as_i64(), Some(e.offset), "{r}");
        assert_eq!(
            r["chat_id"].as_str(),
            Some(e.chat.to_string().as_str()),
            "{r}"
        );
        assert_eq!(r["seq"].as_u64(), e.seq, "{r}");
        assert_eq!(r["text"].as_str(), e.text.as_deref(), "{r}");
        assert_eq!(r["topic"].as_str(), Some(topic), "{r}");
        assert_eq!(r["date"].as_str(), Some(hour.date().as_str()), "{r}");
        assert_eq!(r["hour"].as_i64(), Some(hour.hour_of_day()), "{r}");
        assert_eq!(r["sequenced_ms"].as_i64(), Some(e.sequenced_ms), "{r}");
        let kind = if e.seq.is_some() {
            "MessageSent"
        } else {
            "ReadReceipt"
        };
        assert_eq!(r["event_type"].as_str(), Some(kind), "{r}");
        if e.seq.is_some() {
            assert_eq!(r["body"]["text"].as_str(), e.text.as_deref(), "{r}");
        } else {
            assert!(r["body"]["up_to_seq"].is_u64(), "{r}");
        }
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "events exported more than once: {twice:?}"
    );
    let missing: Vec<_> = expected
        .keys()
        .filter(|id| !seen.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} events missing from the export, e.g. {:?}",
        missing.len(),
        expected.len(),
        missing.iter().take(3).collect::<Vec<_>>()
    );
    assert_eq!(rows.len(), expected.len());
    Ok(read)
}

async fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sigterm(child: &Child) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn every_event_is_exported_once_across_kill_restart_and_compaction() -> anyhow::Result<()> {
    let log = TestLog::start("export").await?;
    let topic = log.topics.events.clone();
    let out = std::env::temp_dir().join(format!("chat-export-test-{}", Uuid::new_v4().simple()));
    let mut producer = Producer {
        chats: (0..CHATS).map(|_| Uuid::new_v4()).collect(),
        next_seq: vec![1; CHATS],
    };
    let mut expected = HashMap::new();

    // 1. Events before the exporter starts.
    let first = producer.batch(400, 0);
    record(&mut expected, produce(&log, first).await?);

    // 2. A continuous exporter writing small files, killed with SIGKILL
    //    while more events arrive.
    let mut child = exporter(
        &log,
        &out,
        &["run"],
        &[
            ("CHAT_EXPORT__FLUSH_ROWS", "25"),
            ("CHAT_EXPORT__FLUSH_INTERVAL_MS", "100"),
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()?;
    let out2 = out.clone();
    wait_for(
        "the exporter to commit the first events",
        Duration::from_secs(60),
        || covered(&out2) >= 100,
    )
    .await;
    let second = producer.batch(800, 400);
    let live = {
        let log_config = log.config.clone();
        let registry = log.registry.clone();
        tokio::spawn(async move {
            let p = chat_log::EventProducer::connect(&log_config, registry).await?;
            let topic = chat_log::Topics::new(&log_config).events;
            let mut sent = Vec::new();
            for chunk in second.chunks(20) {
                for e in chunk {
                    let key = e.chat_id.unwrap().to_string();
                    sent.push((e.clone(), p.send(&topic, &key, e).await?));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok(sent)
        })
    };
    wait_for(
        "the exporter to export live events",
        Duration::from_secs(60),
        || covered(&out2) >= 400 + 100,
    )
    .await;
    assert!(
        !live.is_finished(),
        "events were still being produced at the kill"
    );
    child.start_kill()?;
    child.wait().await?;
    let at_kill = covered(&out);
    record(&mut expected, live.await??);
    assert!(
        at_kill < expected.len() as i64,
        "the kill came mid-way ({at_kill} of {})",
        expected.len()
    );

    // 3. A temp file as a kill during a write leaves it.
    let (some_file, _) = committed(&out).into_iter().next().unwrap();
    let planted = some_file
        .parent()
        .unwrap()
        .join(".tmp-part-p0000-00000000000099999000-00000000000099999999.parquet.partial");
    std::fs::write(&planted, b"half a file")?;

    // 4. Restart up to the end: resumes after the files, discards the temp file.
    let (code, report, stderr) = run_json(&log, &out, &["--json", "run", "--until-end"]).await?;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(report["mode"], "until_end");
    assert_eq!(report["leftovers_discarded"], 1, "{report}");
    assert!(!planted.exists());
    assert_eq!(
        report["rows"].as_i64().unwrap() + at_kill,
        expected.len() as i64,
        "the restart exported exactly what the killed run had not: {report}"
    );
    for p in report["partitions"].as_array().unwrap() {
        // (A partition none of the random chat keys hashed to has end 0.)
        if p["end"] != 0 {
            assert_eq!(p["next_offset"], p["end"], "{p}");
        }
    }
    let before = committed(&out).len();
    check_with_pyarrow(&out, &topic, &expected)?;

    // 5. Compaction (the current hour included): one file per hour and
    //    partition, the same rows.
    let (code, report, stderr) =
        run_json(&log, &out, &["--json", "compact", "--include-open"]).await?;
    assert_eq!(code, 0, "{stderr}");
    let files = committed(&out);
    let mut per_hour_partition: HashMap<(PathBuf, i32), usize> = HashMap::new();
    for (path, f) in &files {
        *per_hour_partition
            .entry((path.parent().unwrap().to_path_buf(), f.partition))
            .or_default() += 1;
    }
    assert!(per_hour_partition.values().all(|n| *n == 1), "{files:?}");
    assert_eq!(
        report["compaction"]["files_before"].as_u64(),
        Some(before as u64),
        "{report}"
    );
    assert_eq!(
        report["compaction"]["files_after"].as_u64(),
        Some(files.len() as u64),
        "{report}"
    );
    assert!(files.len() < before);
    let read = check_with_pyarrow(&out, &topic, &expected)?;
    assert_eq!(read["files"].as_array().unwrap().len(), files.len());
    assert_eq!(
        read["schema"]["sequenced_ts"], "timestamp[ms, tz=UTC]",
        "{}",
        read["schema"]
    );
    let meta = chat_export::parquet_io::read_metadata(&files[0].0)?;
    assert_eq!(
        meta["chat.export.first_offset"],
        files[0].1.first.to_string()
    );

    // 6. A continuous run stopped by SIGTERM writes what it read: files are
    //    flushed at 100,000 rows or after 10 minutes, so the rows it wrote
    //    can only come from the shutdown's flush.
    let third = producer.batch(60, 1200);
    record(&mut expected, produce(&log, third).await?);
    let before_term = covered(&out);
    let admin = free_addr();
    let listen = admin.to_string();
    let mut child = exporter(
        &log,
        &out,
        &["--json", "run"],
        &[
            ("CHAT_EXPORT__FLUSH_ROWS", "100000"),
            ("CHAT_EXPORT__FLUSH_INTERVAL_MS", "600000"),
            ("CHAT_EXPORT__COMPACT_INTERVAL_MS", "1000"),
            ("CHAT_EXPORT__LISTEN", &listen),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()?;
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let caught_up = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if line.contains("caught up with the log") {
                return anyhow::Ok(true);
            }
        }
        Ok(false)
    })
    .await??;
    assert!(caught_up, "the exporter ended before it caught up");
    assert_eq!(
        covered(&out),
        before_term,
        "nothing flushed before the signal"
    );
    assert_eq!(
        metric(admin, "chat_export_records_read_total", None).await,
        60.0
    );
    assert_eq!(
        metric(admin, "chat_export_rows_written_total", None).await,
        0.0
    );
    assert_eq!(metric(admin, "chat_export_caught_up", None).await, 1.0);
    let health = reqwest::get(format!("http://{admin}/health")).await?;
    assert_eq!(health.status(), 200);
    sigterm(&child);
    let o = child.wait_with_output().await?;
    assert!(o.status.success());
    let report: Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(report["interrupted"], true, "{report}");
    assert_eq!(report["rows"], 60, "{report}");
    assert_eq!(covered(&out) - before_term, 60, "{report}");
    check_with_pyarrow(&out, &topic, &expected)?;

    // 7. A restart finds nothing new: each event once.
    let (code, report, stderr) = run_json(&log, &out, &["--json", "run", "--until-end"]).await?;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(report["rows"], 0, "{report}");
    assert_eq!(covered(&out), expected.len() as i64, "{report}");
    let (code, status, stderr) = run_json(&log, &out, &["--json", "status"]).await?;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        status["files"].as_u64(),
        Some(committed(&out).len() as u64),
        "{status}"
    );
    std::fs::remove_dir_all(&out)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_kafka_registry_and_a_locked_directory_are_named() -> anyhow::Result<()> {
    let log = TestLog::start("export-errors").await?;
    let out = std::env::temp_dir().join(format!("chat-export-test-{}", Uuid::new_v4().simple()));
    let run = |env: &[(&str, &str)], args: &[&str]| {
        let mut c = exporter(&log, &out, args, env);
        async move { c.output().await }
    };
    let o = run(
        &[
            ("CHAT_LOG__BROKERS", "127.0.0.1:1"),
            ("CHAT_LOG__CONNECT_TIMEOUT_MS", "2000"),
        ],
        &["--json", "run", "--until-end"],
    )
    .await?;
    assert_eq!(o.status.code(), Some(1));
    let err: Value = serde_json::from_slice(&o.stderr)?;
    let msg = err["error"].as_str().unwrap_or_default();
    assert!(msg.contains("cannot reach Kafka at 127.0.0.1:1"), "{err}");
    assert_eq!(err["exit"], 1);

    let o = run(
        &[(
            "CHAT_LOG__REGISTRY_URL",
            "http://127.0.0.1:1/apis/ccompat/v7",
        )],
        &["run", "--until-end"],
    )
    .await?;
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("cannot reach the schema registry at http://127.0.0.1:1"),
        "{stderr}"
    );

    let lock = OutLock::acquire(&out)?;
    let o = run(&[], &["compact"]).await?;
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("another chat-export holds the lock"),
        "{stderr}"
    );
    drop(lock);

    let o = run(&[("CHAT_EXPORT__NO_SUCH_KEY", "1")], &["status"]).await?;
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::remove_dir_all(&out)?;
    Ok(())
}

/// Throughput of `chat-export run --until-end` (not part of `make test`):
/// `CHAT_EXPORT_BENCH_EVENTS` (default 100,000) text messages of ~40 bytes
/// over 12 partitions, then one export from the beginning, timed.
/// `cargo test -p chat-tests --test export -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn export_throughput() -> anyhow::Result<()> {
    let n: usize = std::env::var("CHAT_EXPORT_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let mut config = chat_tests::log_config("export-bench");
    config.chat_partitions = 12;
    let log = TestLog::start_config(config).await?;
    let out = std::env::temp_dir().join(format!("chat-export-bench-{}", Uuid::new_v4().simple()));
    let mut producer = Producer {
        chats: (0..CHATS).map(|_| Uuid::new_v4()).collect(),
        next_seq: vec![1; CHATS],
    };
    let started = std::time::Instant::now();
    for start in (0..n).step_by(5_000) {
        let batch = producer.batch(5_000.min(n - start), start);
        produce(&log, batch).await?;
    }
    println!(
        "produced {n} events in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let started = std::time::Instant::now();
    let (code, report, stderr) = run_json(&log, &out, &["--json", "run", "--until-end"]).await?;
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(report["rows"].as_u64(), Some(n as u64));
    let bytes: u64 = committed(&out)
        .iter()
        .map(|(p, _)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    println!(
        "exported {n} events in {secs:.1} s ({:.0} events/s, process included), {} files, {:.1} bytes/event on disk",
        n as f64 / secs,
        report["files_written"],
        bytes as f64 / n as f64
    );
    std::fs::remove_dir_all(&out)?;
    Ok(())
}
