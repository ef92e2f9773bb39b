//! Dead letters end to end: a consumer refuses a record (its handler cannot
//! take it until a "fix") and an undecodable record arrives; both land in
//! `chat.dlq` with their origin headers; `chat-admin dlq list/show --json`
//! shows them; after the fix `redrive` (run twice, and twice at once) puts
//! the refused record back to its partition and the consumer that refused
//! it handles it exactly once (another group on the same topic skips the
//! copy); `drop` hides the undecodable one.

use chat_log::{EventConsumer, HandlerError};
use chat_tests::platform::binary;
use chat_tests::{key_of, one_of_every_kind, TestLog};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

/// Runs `chat-admin dlq <args>` against the test's topics; (exit code, stdout, stderr).
async fn admin(log: &TestLog, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary("chat-admin", "debug").unwrap())
        .arg("dlq")
        .args(args)
        .env("CHAT_LOG__TOPIC_PREFIX", &log.config.topic_prefix)
        .env("CHAT_LOG__BROKERS", &log.config.brokers)
        .env("CHAT_LOG__REGISTRY_URL", &log.config.registry_url)
        .env("CHAT_LOG_FORMAT", "json")
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn admin_json(log: &TestLog, args: &[&str]) -> Value {
    let (code, out, err) = admin(log, args).await;
    assert_eq!(code, 0, "chat-admin dlq {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// Polls `chat-admin dlq list --json` until it shows `n` records.
async fn wait_listed(log: &TestLog, n: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (code, out, _) = admin(log, &["list", "--json"]).await;
        if code == 0 {
            let v: Vec<Value> = serde_json::from_str(&out).unwrap();
            if v.len() >= n {
                return v;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} dead letters never listed"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// How many times each event id was handled by one consumer group.
type Seen = Arc<Mutex<HashMap<Uuid, usize>>>;

/// A consumer of chat.events in `group` that refuses events whose text is
/// "poison" while `fixed` is false.
async fn start_consumer(
    log: &TestLog,
    group: &str,
    fixed: Arc<AtomicBool>,
    stop: CancellationToken,
) -> (Seen, tokio::task::JoinHandle<()>) {
    let consumer = EventConsumer::connect(
        &log.config,
        group,
        &[&log.topics.events],
        log.producer.clone(),
        &log.topics.dlq,
    )
    .await
    .unwrap();
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let task = tokio::spawn(async move {
        consumer
            .run(
                |ev| {
                    let poison = matches!(&ev.envelope.body,
                        chat_schemas::Body::MessageSent(m) if m.text.as_deref() == Some("poison"));
                    let refused = poison && !fixed.load(Ordering::SeqCst);
                    if !refused {
                        *s.lock().unwrap().entry(ev.envelope.event_id).or_default() += 1;
                    }
                    async move {
                        if refused {
                            Err(HandlerError::DeadLetter(
                                "refused: poison before the fix".into(),
                            ))
                        } else {
                            Ok(())
                        }
                    }
                },
                stop,
            )
            .await
            .unwrap();
    });
    (seen, task)
}

async fn wait_seen(seen: &Seen, id: Uuid, n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.lock().unwrap().get(&id).copied().unwrap_or(0) < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} not handled {n} times"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn message(chat: Uuid, text: &str) -> chat_schemas::Envelope {
    let mut e = one_of_every_kind().remove(0);
    e.chat_id = Some(chat);
    e.event_id = Uuid::new_v4();
    if let chat_schemas::Body::MessageSent(m) = &mut e.body {
        m.text = Some(text.into());
    }
    e
}

#[tokio::test]
async fn a_refused_record_is_dead_lettered_then_redriven_once_to_its_consumer() {
    let log = TestLog::start("dlq").await.unwrap();
    let fixed = Arc::new(AtomicBool::new(false));
    let stop = CancellationToken::new();
    let (seen, task) = start_consumer(&log, "projector-x", fixed.clone(), stop.clone()).await;
    let (other, other_task) =
        start_consumer(&log, "other", Arc::new(AtomicBool::new(true)), stop.clone()).await;

    let chat = Uuid::new_v4();
    let poison = message(chat, "poison");
    let at = log
        .producer
        .send(&log.topics.events, &key_of(&poison), &poison)
        .await
        .unwrap();
    // Bytes that are no Avro envelope at all, with a header to keep.
    let raw: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &log.config.brokers)
        .create()
        .unwrap();
    let garbage = raw
        .send(
            FutureRecord::to(&log.topics.events)
                .key("garbage")
                .payload("not an envelope")
                .headers(chat_log::dlq::owned_headers_of(&[(
                    "trace_id".into(),
                    b"trace-garbage".to_vec(),
                )])),
            Duration::from_secs(10),
        )
        .await
        .unwrap();

    // Both consumers dead-letter the garbage; only projector-x refuses the poison.
    let listed = wait_listed(&log, 3).await;
    assert_eq!(listed.len(), 3, "{listed:#?}");
    let refused: Vec<&Value> = listed
        .iter()
        .filter(|d| d["error"].as_str().unwrap().contains("refused"))
        .collect();
    assert_eq!(refused.len(), 1, "{listed:#?}");
    let d = refused[0];
    assert_eq!(d["topic"], log.topics.events.as_str());
    assert_eq!(d["partition"], at.partition);
    assert_eq!(d["offset"], at.offset);
    assert_eq!(d["group"], "projector-x");
    assert!(d["handled"].is_null());
    let poison_dlq = d["dlq_offset"].as_i64().unwrap();
    let undecodable: Vec<&Value> = listed
        .iter()
        .filter(|d| d["offset"] == garbage.offset && d["partition"] == garbage.partition)
        .collect();
    assert_eq!(
        undecodable.len(),
        2,
        "each group dead-letters it: {listed:#?}"
    );

    // Filters.
    let only = admin_json(&log, &["list", "--json", "--error", "refused"]).await;
    assert_eq!(only.as_array().unwrap().len(), 1);
    let none = admin_json(&log, &["list", "--json", "--topic", "chat.commands"]).await;
    assert_eq!(none.as_array().unwrap().len(), 0);
    let future = admin_json(&log, &["list", "--json", "--since", "4102444800000"]).await;
    assert_eq!(future.as_array().unwrap().len(), 0);
    let recent = admin_json(
        &log,
        &["list", "--json", "--since", "10m", "--topic", "chat.events"],
    )
    .await;
    assert_eq!(recent.as_array().unwrap().len(), 3);

    // show keeps the original headers and says whether the bytes decode.
    let u = undecodable[0]["dlq_offset"].as_i64().unwrap().to_string();
    let shown = admin_json(&log, &["show", &u, "--json"]).await;
    let headers = shown["headers"].to_string();
    assert!(headers.contains("trace-garbage"), "{shown:#}");
    assert!(shown["decode_error"].is_string(), "{shown:#}");
    assert_eq!(shown["key"], "garbage");

    // The text forms say the same.
    let (code, table, _) = admin(&log, &["list"]).await;
    assert_eq!(code, 0);
    println!("{table}");
    let origin = format!("{}[{}]@{}", log.topics.events, at.partition, at.offset);
    assert!(
        table
            .lines()
            .any(|l| l.contains(&origin) && l.contains("projector-x") && l.contains("refused")),
        "{table}"
    );
    let (code, text, _) = admin(&log, &["show", &u]).await;
    assert_eq!(code, 0);
    println!("{text}");
    assert!(
        text.contains("header       trace_id = trace-garbage"),
        "{text}"
    );
    assert!(text.contains("decodes now  no:"), "{text}");

    // An unreachable registry is named (show still prints the record).
    let out = Command::new(binary("chat-admin", "debug").unwrap())
        .args(["dlq", "show", &poison_dlq.to_string()])
        .env("CHAT_LOG__TOPIC_PREFIX", &log.config.topic_prefix)
        .env("CHAT_LOG__BROKERS", &log.config.brokers)
        .env("CHAT_LOG__REGISTRY_URL", "http://127.0.0.1:1")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("decodes now  no: cannot reach the schema registry at http://127.0.0.1:1"),
        "{text}"
    );

    // A redrive must name records or a filter.
    let (code, _, err) = admin(&log, &["redrive"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("name DLQ offsets or a filter"), "{err}");

    // The fix, then two redrives at once and one more: delivered once.
    fixed.store(true, Ordering::SeqCst);
    let p = poison_dlq.to_string();
    let args = ["redrive", p.as_str(), "--json"];
    let (a, b) = tokio::join!(admin(&log, &args), admin(&log, &args));
    let redriven: usize = [&a, &b]
        .iter()
        .filter(|(code, _, _)| *code == 0)
        .map(|(_, out, _)| {
            let v: Vec<Value> = serde_json::from_str(out).unwrap();
            v.iter().filter(|o| o["action"] == "redriven").count()
        })
        .sum();
    assert_eq!(redriven, 1, "two concurrent redrives: {a:?} {b:?}");
    let again = admin_json(&log, &["redrive", &p, "--json"]).await;
    assert_eq!(
        again.as_array().unwrap().len(),
        0,
        "already handled: {again}"
    );

    wait_seen(&seen, poison.event_id, 1).await;
    // Everything before a later event of the same partition is handled.
    let after = message(chat, "after");
    log.producer
        .send(&log.topics.events, &key_of(&after), &after)
        .await
        .unwrap();
    wait_seen(&seen, after.event_id, 1).await;
    wait_seen(&other, after.event_id, 1).await;
    assert_eq!(
        seen.lock().unwrap()[&poison.event_id],
        1,
        "handled once after the fix"
    );
    assert_eq!(
        other.lock().unwrap()[&poison.event_id],
        1,
        "the other group saw the original only, not the re-driven copy"
    );

    // The redriven record is listed as handled only with --all.
    let all = admin_json(&log, &["list", "--json", "--all"]).await;
    let handled = all
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["dlq_offset"] == poison_dlq)
        .unwrap();
    assert_eq!(handled["handled"]["action"], "redriven");
    assert!(handled["handled"]["to"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{}[{}]@", log.topics.events, at.partition)));

    // drop hides both undecodable records.
    let dropped = admin_json(&log, &["drop", "--topic", "chat.events", "--json"]).await;
    assert_eq!(dropped.as_array().unwrap().len(), 2, "{dropped}");
    assert!(dropped
        .as_array()
        .unwrap()
        .iter()
        .all(|o| o["action"] == "dropped"));
    let left = admin_json(&log, &["list", "--json"]).await;
    assert_eq!(left.as_array().unwrap().len(), 0, "{left}");
    let all = admin_json(&log, &["list", "--json", "--all"]).await;
    assert_eq!(all.as_array().unwrap().len(), 3);

    stop.cancel();
    task.await.unwrap();
    other_task.await.unwrap();
}

#[tokio::test]
async fn dlq_commands_say_which_service_cannot_be_reached() {
    let log = TestLog::start("dlq-down").await.unwrap();
    let out = Command::new(binary("chat-admin", "debug").unwrap())
        .args(["dlq", "list", "--json"])
        .env("CHAT_LOG__TOPIC_PREFIX", &log.config.topic_prefix)
        .env("CHAT_LOG__BROKERS", "127.0.0.1:1")
        .env("CHAT_LOG__CONNECT_TIMEOUT_MS", "2000")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach Kafka at 127.0.0.1:1"), "{err}");
    let out = Command::new(binary("chat-admin", "debug").unwrap())
        .args(["dlq", "show", "0"])
        .env("CHAT_LOG__TOPIC_PREFIX", &log.config.topic_prefix)
        .env("CHAT_LOG__BROKERS", "127.0.0.1:1")
        .env("CHAT_LOG__CONNECT_TIMEOUT_MS", "2000")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach Kafka"));
}

/// Reads frames until the `event` with `seq` arrives.
async fn wait_event(c: &mut chat_tests::platform::Client, seq: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.next(left).await {
            Ok(Some(chat_tests::ws::Incoming::Json(v)))
                if v["type"] == "event" && v["seq"].as_u64() == Some(seq) =>
            {
                return
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("event {seq} not delivered live"),
        }
    }
}

#[tokio::test]
async fn an_event_redriven_to_the_router_is_routed_and_its_partition_goes_on() {
    use chat_tests::platform::{Platform, Role};
    let p = Platform::start("dlq-router", 1, 1).await.unwrap();
    let mut alice = p.connect(0, "alice", "a1").await.unwrap();
    alice
        .sync(Value::Null, serde_json::json!({}))
        .await
        .unwrap();
    let ack = alice
        .request(serde_json::json!({"type": "create_chat", "kind": "group", "title": "r", "members": ["bob"]}))
        .await
        .unwrap();
    let chat = ack["chat"].as_str().unwrap().to_string();
    let a = alice
        .request(
            serde_json::json!({"type": "send", "chat": chat, "client_msg_id": "m1", "text": "one"}),
        )
        .await
        .unwrap();
    let seq1 = a["seq"].as_u64().unwrap();
    wait_event(&mut alice, seq1).await;

    // As if the router had refused m1: its bytes and origin in chat.dlq.
    let log = &p.log;
    let events = chat_log::read_raw(
        &log.config,
        &log.topics.events,
        1000,
        Duration::from_secs(3),
    )
    .await
    .unwrap();
    let mut m1 = None;
    for r in events {
        if let Ok((_, e)) = log.registry.decode(&r.payload).await {
            if e.chat_id.map(|c| c.to_string()).as_deref() == Some(chat.as_str())
                && e.seq == Some(seq1)
            {
                m1 = Some(r);
            }
        }
    }
    let m1 = m1.expect("m1 in chat.events");
    let group = format!("{}router", log.config.topic_prefix);
    let headers = chat_log::dlq::dead_letter_headers(
        &log.topics.events,
        m1.partition,
        m1.offset,
        "test: refused by the router",
        &group,
        &m1.headers,
    );
    let dead = log
        .producer
        .send_raw(
            &log.topics.dlq,
            m1.key.as_deref(),
            &m1.payload,
            chat_log::dlq::owned_headers_of(&headers),
        )
        .await
        .unwrap();

    let router = p.admin(Role::Router, 0);
    let before = chat_tests::metric(router, "chat_router_events_total", None).await;
    let done = admin_json(log, &["redrive", &dead.offset.to_string(), "--json"]).await;
    assert_eq!(done[0]["action"], "redriven", "{done}");
    // The router routes the copy (an old seq of its chat: folded as a
    // replay, not refused) ...
    let deadline = tokio::time::Instant::now() + WAIT;
    while chat_tests::metric(router, "chat_router_events_total", None).await < before + 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the re-driven event was not routed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... and the partition goes on: the next message arrives live.
    let a = alice
        .request(
            serde_json::json!({"type": "send", "chat": chat, "client_msg_id": "m2", "text": "two"}),
        )
        .await
        .unwrap();
    wait_event(&mut alice, a["seq"].as_u64().unwrap()).await;
    drop(alice);
    p.stop().await;
}
