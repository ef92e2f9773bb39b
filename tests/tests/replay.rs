//! Operating the log (issue 14): `chat-admin replay` into a fresh keyspace,
//! interrupted (`kill -9`) and resumed, `verify` against the live
//! projection (and a tampered row it must report), `switch` moving a
//! running gateway's reads and the history projector to a rebuilt keyspace
//! without a failed request, and the example backfill projection
//! (`chat-daily-stats`): exact counts, then a live message followed.

use chat_log::Outgoing;
use chat_projectors::store::{self, Store, StoreConfig};
use chat_schemas::Envelope;
use chat_tests::admin::{chat_admin, command, last_json, output};
use chat_tests::envelopes::{envelope, group, text};
use chat_tests::platform::{Options, Platform, Role};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(90);

fn fresh_keyspace(tag: &str) -> String {
    format!("{tag}_{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// Writes sequenced events straight to `chat.events` (no sequencer): per
/// chat a creation with `members`, then `messages` messages from them in
/// turn, at `sequenced_ts` = `ts(i)` for the i-th event of the chat.
/// Returns the end offset of every partition written.
async fn write_chats(
    p: &Platform,
    chats: &[Uuid],
    members: &[&str],
    messages: u64,
    ts: impl Fn(u64) -> i64,
) -> HashMap<i32, i64> {
    let topic = p.log.topics.events.clone();
    let mut records = Vec::new();
    for &chat in chats {
        let mut e = envelope(chat, members[0], "create", Some(1), group(&members[1..]));
        e.sequenced_ts = Some(ts(0));
        records.push((chat, e));
        for i in 1..=messages {
            let sender = members[(i as usize) % members.len()];
            let mut e = envelope(chat, sender, &format!("m{i}"), Some(i + 1), text("hi"));
            e.sequenced_ts = Some(ts(i));
            records.push((chat, e));
        }
    }
    produce(p, &topic, records).await
}

async fn produce(p: &Platform, topic: &str, records: Vec<(Uuid, Envelope)>) -> HashMap<i32, i64> {
    let mut ends = HashMap::new();
    for chunk in records.chunks(2_000) {
        let out: Vec<Outgoing> = chunk
            .iter()
            .map(|(chat, e)| Outgoing {
                topic: topic.to_string(),
                partition: None,
                key: chat.to_string(),
                envelope: e.clone(),
                headers: Vec::new(),
            })
            .collect();
        for r in p.log.producer.send_batch(out).await.unwrap() {
            let end = ends.entry(r.partition).or_insert(0);
            *end = (*end).max(r.offset + 1);
        }
    }
    ends
}

/// Waits until `projector`'s progress in `store` reached `ends` exactly.
async fn wait_progress(store: &Store, projector: &str, ends: &HashMap<i32, i64>) {
    let deadline = Instant::now() + WAIT;
    loop {
        let progress = store.progress(projector).await.unwrap_or_default();
        if ends
            .iter()
            .all(|(p, e)| progress.get(p).copied().unwrap_or(0) >= *e)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{projector} in {} not at {ends:?}: {progress:?}",
            store.keyspace()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `history` read through the gateway: must succeed; its event count.
async fn history(c: &mut chat_tests::platform::Client, chat: &str) -> usize {
    let page = c
        .request(json!({"type": "history", "chat": chat, "limit": 100}))
        .await
        .unwrap();
    assert_eq!(page["type"], "history", "a failed read: {page}");
    page["events"].as_array().unwrap().len()
}

fn cfg(store: &StoreConfig, keyspace: &str) -> StoreConfig {
    StoreConfig {
        keyspace: keyspace.to_string(),
        ..store.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_interrupted_and_resumed_verifies_equal_and_a_tampered_row_differs() {
    let p = Platform::start_with(
        "replay",
        Options {
            gateways: 0,
            workers: 1,
            worker_roles: vec![Role::History],
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let live = store::connect(&p.store).await.unwrap();
    let chats: Vec<Uuid> = (0..40).map(|_| Uuid::new_v4()).collect();
    let base = chat_runtime::now_ms() - 3_600_000;
    let ends = write_chats(&p, &chats, &["ann", "bob", "cat", "dan"], 150, |i| {
        base + (i as i64) * 1_000
    })
    .await;
    let total: i64 = ends.values().sum();
    assert_eq!(total, 40 * 151);
    wait_progress(&live, "history", &ends).await;

    // Replay into a fresh keyspace; kill -9 at half.
    let ks = fresh_keyspace("r");
    let rebuilt = live.with_keyspace(&ks);
    let args = [
        "replay",
        "--projection",
        "history",
        "--keyspace",
        &ks,
        "--batch-max-events",
        "100",
        "--write-concurrency",
        "2",
        "--json",
    ];
    let metrics = chat_tests::free_addr();
    let metrics_arg = metrics.to_string();
    let mut first_args = args.to_vec();
    first_args.extend(["--metrics-listen", metrics_arg.as_str()]);
    let mut first = chat_admin(&p.log.config, &p.store, "debug", &first_args)
        .unwrap()
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let mut seen_metrics = (0.0, 0.0);
    let at_kill = loop {
        let events = chat_tests::metric(metrics, "chat_replay_events_total", None).await;
        let lag = chat_tests::metric(metrics, "chat_replay_lag_records", None).await;
        if events > 0.0 {
            seen_metrics = (events, lag);
        }
        let done: i64 = rebuilt
            .progress("history")
            .await
            .unwrap_or_default()
            .values()
            .sum();
        if done >= total / 2 {
            first.start_kill().unwrap();
            break done;
        }
        if let Ok(Some(status)) = first.try_wait() {
            panic!("replay ended before half ({done} of {total}): {status}");
        }
        assert!(Instant::now() < deadline, "replay stuck at {done}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    first.wait().await.unwrap();
    assert!(at_kill < total, "killed after the end: {at_kill}");
    // The metrics the dashboard names, while it ran.
    assert!(seen_metrics.0 > 0.0, "no chat_replay_events_total");
    assert!(
        seen_metrics.1 > 0.0 && seen_metrics.0 + seen_metrics.1 <= total as f64,
        "chat_replay_lag_records {seen_metrics:?}"
    );

    // Resumed: continues from the recorded progress, not from 0.
    let (code, stdout) = output(chat_admin(&p.log.config, &p.store, "debug", &args).unwrap())
        .await
        .unwrap();
    assert_eq!(code, 0, "{stdout}");
    let report = last_json(&stdout).unwrap();
    assert_eq!(report["resumed"], true, "{report}");
    assert_eq!(report["complete"], true, "{report}");
    let resumed_events = report["events"].as_i64().unwrap();
    assert!(
        resumed_events <= total - at_kill + 12 * 100,
        "resumed run re-read {resumed_events} of {total} ({at_kill} done before the kill)"
    );
    assert!(report["events_per_s"].as_f64().unwrap() > 0.0);
    let progress = rebuilt.progress("history").await.unwrap();
    for (part, end) in &ends {
        assert_eq!(progress.get(part), Some(end), "partition {part}");
    }

    // Verify: no difference.
    let verify = [
        "verify",
        "--projection",
        "history",
        "--keyspace",
        &ks,
        "--against",
        &p.store.keyspace,
        "--json",
    ];
    let (code, stdout) = output(chat_admin(&p.log.config, &p.store, "debug", &verify).unwrap())
        .await
        .unwrap();
    let report = last_json(&stdout).unwrap();
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["equal"], true, "{report}");
    let messages = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "messages")
        .unwrap()
        .clone();
    assert_eq!(messages["live"]["rows"], json!(total), "{messages}");

    // Tamper with one row of the rebuilt keyspace: verify must see it.
    let session = scylla::client::session_builder::SessionBuilder::new()
        .known_nodes(&p.store.nodes)
        .build()
        .await
        .unwrap();
    session
        .query_unpaged(
            format!("UPDATE {ks}.messages SET body = 'tampered' WHERE chat_id = ? AND bucket = 0 AND seq = 5"),
            (chats[7],),
        )
        .await
        .unwrap();
    let (code, stdout) = output(chat_admin(&p.log.config, &p.store, "debug", &verify).unwrap())
        .await
        .unwrap();
    let report = last_json(&stdout).unwrap();
    assert_eq!(code, 3, "{report}");
    assert_eq!(report["equal"], false);
    assert_eq!(report["differences"], 1, "{report}");
    let messages = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "messages")
        .unwrap()
        .clone();
    assert_eq!(
        messages["listed"][0]["key"],
        format!("{}/0", chats[7]),
        "{messages}"
    );

    rebuilt.drop_keyspace().await.unwrap();
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_stats_backfill_counts_exactly_then_follows_live() {
    let p = Platform::start_with(
        "daily",
        Options {
            gateways: 0,
            workers: 0,
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let live = store::connect(&p.store).await.unwrap();
    const DAY: i64 = 86_400_000;
    let today = chat_runtime::now_ms().div_euclid(DAY);
    let day0 = today - 2;
    // Chat a: 30 messages on day0 (ann, bob, cat in turn), 12 on day0 + 1.
    // Chat b: 7 messages on day0 + 1.
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let day_ts = |d: i64, i: u64| d * DAY + 3_600_000 + i as i64 * 1_000;
    let mut records = Vec::new();
    let mut seq = 0;
    let mut push = |chat: Uuid, sender: &str, body, at: i64, seq: &mut u64| {
        *seq += 1;
        let mut e = envelope(chat, sender, &format!("m{seq}"), Some(*seq), body);
        e.sequenced_ts = Some(at);
        records.push((chat, e));
    };
    push(
        a,
        "ann",
        group(&["bob", "cat", "dan"]),
        day_ts(day0, 0),
        &mut seq,
    );
    for i in 1..=30u64 {
        let who = ["ann", "bob", "cat"][(i % 3) as usize];
        push(a, who, text("x"), day_ts(day0, i), &mut seq);
    }
    for i in 1..=12u64 {
        push(a, "dan", text("y"), day_ts(day0 + 1, i), &mut seq);
    }
    let mut seq_b = 0;
    push(b, "eve", group(&["fay"]), day_ts(day0 + 1, 0), &mut seq_b);
    for i in 1..=7u64 {
        push(b, "fay", text("z"), day_ts(day0 + 1, i), &mut seq_b);
    }
    let topic = p.log.topics.events.clone();
    let ends = produce(&p, &topic, records).await;

    // The service: from offset 0, catches up, follows.
    let listen = chat_tests::free_addr().to_string();
    let mut service = command("chat-daily-stats", &p.log.config, &p.store, "debug", &[])
        .unwrap()
        .env("CHAT_LISTEN", &listen)
        .spawn()
        .unwrap();
    wait_progress(&live, "daily_stats", &ends).await;
    let a0 = live.daily(a, day0).await.unwrap().expect("a day0");
    assert_eq!((a0.messages, a0.events), (30, 31), "{a0:?}");
    assert_eq!(
        a0.active_members.iter().cloned().collect::<Vec<_>>(),
        vec!["ann", "bob", "cat"]
    );
    let a1 = live.daily(a, day0 + 1).await.unwrap().expect("a day1");
    assert_eq!(
        (a1.messages, a1.events, a1.active_members.len()),
        (12, 12, 1)
    );
    let b1 = live.daily(b, day0 + 1).await.unwrap().expect("b day1");
    assert_eq!((b1.messages, b1.events), (7, 8), "{b1:?}");
    assert_eq!(live.daily_of_chat(b).await.unwrap().len(), 1);

    // A live message (today) is followed: the exact count, and how fast.
    let mut e = envelope(b, "eve", "live", Some(9), text("now"));
    e.sequenced_ts = Some(chat_runtime::now_ms());
    let sent = Instant::now();
    produce(&p, &topic, vec![(b, e)]).await;
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(r) = live.daily(b, today).await.unwrap() {
            assert_eq!((r.messages, r.events, r.last_seq), (1, 1, 9), "{r:?}");
            break;
        }
        assert!(Instant::now() < deadline, "live message not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let followed = sent.elapsed();
    eprintln!("daily stats followed a live message in {followed:?}");
    assert!(
        followed < Duration::from_secs(5),
        "followed in {followed:?}"
    );
    // The counter is bumped after the batch's rows are written: wait for it
    // (the row above can be visible a moment before).
    let deadline = Instant::now() + WAIT;
    loop {
        let metrics = chat_tests::metric(
            listen.parse().unwrap(),
            "chat_daily_stats_events_total",
            None,
        )
        .await;
        if metrics >= 52.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "events metric {metrics}, want >= 52"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A restart re-reads nothing twice: the counts stay exact.
    service.start_kill().unwrap();
    service.wait().await.unwrap();
    let mut service = command("chat-daily-stats", &p.log.config, &p.store, "debug", &[])
        .unwrap()
        .env("CHAT_LISTEN", chat_tests::free_addr().to_string())
        .spawn()
        .unwrap();

    // The same projection rebuilt by chat-admin replay verifies equal.
    let ks = fresh_keyspace("d");
    let (code, stdout) = output(
        chat_admin(
            &p.log.config,
            &p.store,
            "debug",
            &[
                "replay",
                "--projection",
                "daily-stats",
                "--keyspace",
                &ks,
                "--json",
            ],
        )
        .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(code, 0, "{stdout}");
    let (code, stdout) = output(
        chat_admin(
            &p.log.config,
            &p.store,
            "debug",
            &[
                "verify",
                "--projection",
                "daily-stats",
                "--keyspace",
                &ks,
                "--against",
                &p.store.keyspace,
                "--json",
            ],
        )
        .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(code, 0, "{stdout}");
    let a0 = live.daily(a, day0).await.unwrap().unwrap();
    assert_eq!((a0.messages, a0.events), (30, 31));
    service.start_kill().unwrap();
    live.with_keyspace(&ks).drop_keyspace().await.unwrap();
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_moves_gateway_reads_and_the_projector_without_a_failed_request() {
    // The control keyspace of this test only.
    let control_ks = fresh_keyspace("c");
    let base = StoreConfig {
        control_keyspace: control_ks.clone(),
        ..StoreConfig::default()
    };
    let control = store::connect(&cfg(&base, &control_ks)).await.unwrap();
    control.ensure_control(&base.replication).await.unwrap();
    let alias = "chat";
    let follow: Vec<(String, String)> = vec![
        ("CHAT_STORE__KEYSPACE_ALIAS".into(), alias.into()),
        ("CHAT_STORE__CONTROL_KEYSPACE".into(), control_ks.clone()),
        ("CHAT_STORE__ALIAS_POLL_MS".into(), "200".into()),
    ];
    let mut p = Platform::start_with(
        "switch",
        Options {
            gateways: 1,
            workers: 1,
            gateway_env: follow.clone(),
            history_env: follow.clone(),
            presence_env: follow.clone(),
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let mut store_cfg = p.store.clone();
    store_cfg.control_keyspace = control_ks.clone();
    let old = store::connect(&p.store).await.unwrap();

    let mut ann = p.connect(0, "ann", "ann-1").await.unwrap();
    ann.sync(Value::Null, json!({})).await.unwrap();
    let ack = ann
        .request(json!({"type": "create_chat", "kind": "group", "title": "g", "members": ["bob"]}))
        .await
        .unwrap();
    assert_eq!(ack["type"], "ack", "{ack}");
    let chat = ack["chat"].as_str().unwrap().to_string();
    let mut last_seq = 1;
    for i in 0..20 {
        let a = ann
            .request(json!({"type": "send", "chat": chat, "client_msg_id": format!("b{i}"), "text": format!("before {i}")}))
            .await
            .unwrap();
        assert_eq!(a["type"], "ack", "{a}");
        last_seq = a["seq"].as_u64().unwrap();
    }

    // Rebuild into K2 and keep following until the switch is done.
    let k2 = fresh_keyspace("s");
    let new = old.with_keyspace(&k2);
    let mut follower = chat_admin(
        &p.log.config,
        &store_cfg,
        "debug",
        &[
            "replay",
            "--projection",
            "history",
            "--keyspace",
            &k2,
            "--follow",
        ],
    )
    .unwrap()
    .spawn()
    .unwrap();
    let live_progress = old.progress("history").await.unwrap();
    wait_progress(&new, "history", &live_progress).await;

    // Reads keep succeeding while the alias moves.
    assert_eq!(history(&mut ann, &chat).await as u64, last_seq);
    let (code, stdout) = output(
        chat_admin(
            &p.log.config,
            &store_cfg,
            "debug",
            &["switch", "--alias", alias, "--to", &k2, "--json"],
        )
        .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(code, 0, "{stdout}");
    assert_eq!(last_json(&stdout).unwrap()["switched"], true);
    for _ in 0..10 {
        assert_eq!(history(&mut ann, &chat).await as u64, last_seq);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Stop the follower: from now on only the history projector (which
    // must have moved) writes K2.
    follower.start_kill().unwrap();
    follower.wait().await.unwrap();

    // A message after the switch: read through the gateway from K2, and
    // absent from the old keyspace once the projector moved (the first
    // messages may still reach the old one during the poll interval).
    let deadline = Instant::now() + WAIT;
    let mut i = 0;
    loop {
        i += 1;
        let a = ann
            .request(json!({"type": "send", "chat": chat, "client_msg_id": format!("a{i}"), "text": format!("after {i}")}))
            .await
            .unwrap();
        assert_eq!(a["type"], "ack", "{a}");
        let seq = a["seq"].as_u64().unwrap();
        // The gateway's read barrier waits for K2's progress: the read sees it.
        assert_eq!(history(&mut ann, &chat).await as u64, seq);
        let in_new = new
            .messages_page(Uuid::parse_str(&chat).unwrap(), None, Some(seq - 1), 1)
            .await
            .unwrap();
        assert_eq!(in_new.len(), 1, "seq {seq} not in {k2}");
        let in_old = old
            .messages_page(Uuid::parse_str(&chat).unwrap(), None, Some(seq - 1), 1)
            .await
            .unwrap();
        if in_old.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the projector never moved to {k2}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The old keyspace is kept until dropped.
    assert!(old.keyspace_exists(&p.store.keyspace).await.unwrap());
    p.kill(Role::Gateway, 0);
    new.drop_keyspace().await.unwrap();
    control.drop_keyspace().await.unwrap();
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_explain_what_they_cannot_reach_and_have_help() {
    let log = chat_tests::log_config("replay-errors");
    let store = StoreConfig::default();
    let run = |env: Vec<(&'static str, &'static str)>, args: &'static [&'static str]| {
        let mut cmd = chat_admin(&log, &store, "debug", args).unwrap();
        cmd.envs(env)
            .env("CHAT_LOG__CONNECT_TIMEOUT_MS", "2000")
            .env("CHAT_STORE__CONNECT_TIMEOUT_MS", "2000")
            .stderr(std::process::Stdio::piped());
        async move {
            let out = cmd.output().await.unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let replay: &'static [&'static str] = &[
        "replay",
        "--projection",
        "history",
        "--keyspace",
        "never_created_x",
    ];
    let (code, err) = run(vec![("CHAT_LOG__BROKERS", "127.0.0.1:1")], replay).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach Kafka at 127.0.0.1:1"), "{err}");
    let (code, err) = run(
        vec![(
            "CHAT_LOG__REGISTRY_URL",
            "http://127.0.0.1:1/apis/ccompat/v7",
        )],
        replay,
    )
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach the schema registry"), "{err}");
    let (code, err) = run(vec![("CHAT_STORE__NODES", "127.0.0.1:1")], replay).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot reach Cassandra at 127.0.0.1:1"),
        "{err}"
    );
    let verify: &'static [&'static str] = &[
        "verify",
        "--projection",
        "history",
        "--keyspace",
        "a",
        "--against",
        "b",
    ];
    let (code, err) = run(vec![("CHAT_STORE__NODES", "127.0.0.1:1")], verify).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach Cassandra"), "{err}");
    let switch: &'static [&'static str] = &["switch", "--alias", "chat", "--show"];
    let (code, err) = run(vec![("CHAT_STORE__NODES", "127.0.0.1:1")], switch).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach Cassandra"), "{err}");
    // Nothing was created for the replay that could not start.
    let s = store::connect(&store).await.unwrap();
    assert!(!s.keyspace_exists("never_created_x").await.unwrap());
    for cmd in ["replay", "verify", "switch", "drop-keyspace"] {
        let args: &'static [&'static str] = Box::leak(Box::new([cmd, "--help"]));
        let (code, _) = run(vec![], args).await;
        assert_eq!(code, 0, "{cmd} --help");
    }
}
