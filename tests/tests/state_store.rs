//! The sequencer's and router's state stores (issue 9) against the real
//! Kafka: a restart restores from the instance's own store with nothing to
//! read again, a new instance (an empty store) from the changelog, neither
//! from offset 0 of `chat.events`; and what is restored is exact: the next
//! seq, the dedupe index within its window, the membership at each seq.

use chat_log::{TailItem, TailStart, TopicTail, HEADER_GATEWAY_ID, HEADER_RECIPIENTS};
use chat_schemas::*;
use chat_tests::envelopes::{command, event, group, session_opened, text};
use chat_tests::{free_addr, metric, TestLog};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;

fn state_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("chat-state-test-{name}-{}", Uuid::new_v4()))
}

struct Running {
    stop: chat_runtime::Shutdown,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    admin: SocketAddr,
}

impl Running {
    async fn stop(self) {
        self.stop.trigger();
        self.task.await.unwrap().unwrap();
    }

    /// `<prefix>_state_restores_total{source=...}` of this instance.
    async fn restores(&self, prefix: &str, source: &str) -> f64 {
        let label = format!("source=\"{source}\"");
        metric(
            self.admin,
            &format!("{prefix}_state_restores_total"),
            Some(&label),
        )
        .await
    }
}

fn start_sequencer(log: &TestLog, dir: &Path, window_secs: u64) -> Running {
    let admin = free_addr();
    let mut config = chat_sequencer::SequencerConfig {
        listen: admin,
        group_id: format!("{}sequencer", log.config.topic_prefix),
        transactional_prefix: format!("{}seq", log.config.topic_prefix),
        log: log.config.clone(),
        dedupe_window_secs: window_secs,
        ..Default::default()
    };
    config.state.dir = dir.to_path_buf();
    let stop = chat_runtime::Shutdown::new();
    let task = tokio::spawn(chat_sequencer::run(config, stop.clone()));
    Running { stop, task, admin }
}

/// Sends `cmds` as the gateway `gw-test` would and waits for the result of
/// each (by command event id).
async fn send_and_wait(log: &TestLog, cmds: &[Envelope]) -> HashMap<Uuid, CommandResult> {
    let tail = TopicTail::open(
        &log.config,
        log.registry.clone(),
        &log.topics.results,
        None,
        TailStart::End,
    )
    .await
    .unwrap();
    for c in cmds {
        log.producer
            .send_with(
                &log.topics.commands,
                None,
                &c.chat_id.unwrap().to_string(),
                c,
                &[(HEADER_GATEWAY_ID, b"gw-test".as_slice())],
            )
            .await
            .unwrap();
    }
    let want: HashSet<Uuid> = cmds.iter().map(|c| c.event_id).collect();
    let mut got = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while got.len() < want.len() {
        match tokio::time::timeout_at(deadline, tail.next()).await {
            Ok(Ok(TailItem::Event(ev))) => {
                if let Body::CommandResult(r) = ev.envelope.body {
                    if want.contains(&r.command_event_id) {
                        got.insert(r.command_event_id, r);
                    }
                }
            }
            Ok(_) => {}
            Err(_) => panic!("only {} of {} results within 90 s", got.len(), want.len()),
        }
    }
    got
}

fn assert_result(r: &CommandResult, outcome: CommandOutcome, seq: u64, what: &str) {
    assert_eq!((r.outcome, r.seq), (outcome, Some(seq)), "{what}: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequencer_restores_from_its_store_or_the_changelog_never_from_offset_0() {
    chat_runtime::telemetry::init(chat_runtime::telemetry::LogFormat::Pretty);
    let log = TestLog::start("store-seq").await.unwrap();
    let chats: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let per_chat = 40u64;
    let (dir_a, dir_c, dir_d) = (state_dir("a"), state_dir("c"), state_dir("d"));

    // A: creates the chats and sequences 40 messages in each.
    let a = start_sequencer(&log, &dir_a, 3600);
    let mut cmds = Vec::new();
    for c in &chats {
        cmds.push(command(*c, "ann", "create", group(&["bob"])));
    }
    for i in 0..per_chat {
        for c in &chats {
            cmds.push(command(*c, "ann", &format!("m{i}"), text(&format!("{i}"))));
        }
    }
    let results = send_and_wait(&log, &cmds).await;
    assert!(results
        .values()
        .all(|r| r.outcome == CommandOutcome::Accepted));
    assert!(
        a.restores("chat_sequencer", "empty").await >= 1.0,
        "new topics: nothing to restore"
    );
    a.stop().await;

    // B: the same instance restarted (its store kept): restored locally
    // with no event read again; next seq and dedupe exact.
    let b = start_sequencer(&log, &dir_a, 3600);
    let mut next = Vec::new();
    for c in &chats {
        next.push(command(*c, "ann", "m40", text("40")));
        next.push(command(*c, "ann", "m3", text("3 again")));
    }
    let results = send_and_wait(&log, &next).await;
    for pair in next.chunks(2) {
        assert_result(
            &results[&pair[0].event_id],
            CommandOutcome::Accepted,
            per_chat + 2,
            "new message after a restart",
        );
        assert_result(
            &results[&pair[1].event_id],
            CommandOutcome::Duplicate,
            5,
            "a retry of m3 (seq 5) after a restart",
        );
    }
    assert!(b.restores("chat_sequencer", "local").await >= 1.0);
    assert_eq!(b.restores("chat_sequencer", "changelog").await, 0.0);
    assert_eq!(b.restores("chat_sequencer", "log").await, 0.0);
    assert_eq!(
        metric(b.admin, "chat_sequencer_state_restore_events_total", None).await,
        0.0,
        "a clean restart reads no event again"
    );
    b.stop().await;

    // C: a new instance (empty store): restored from the changelog, and the
    // window's events only for their dedupe keys.
    let c = start_sequencer(&log, &dir_c, 3600);
    let mut next = Vec::new();
    for chat in &chats {
        next.push(command(*chat, "ann", "m41", text("41")));
        next.push(command(*chat, "ann", "m10", text("10 again")));
    }
    let results = send_and_wait(&log, &next).await;
    for pair in next.chunks(2) {
        assert_result(
            &results[&pair[0].event_id],
            CommandOutcome::Accepted,
            per_chat + 3,
            "new message on a new instance",
        );
        assert_result(
            &results[&pair[1].event_id],
            CommandOutcome::Duplicate,
            12,
            "a retry of m10 (seq 12) on a new instance",
        );
    }
    assert!(c.restores("chat_sequencer", "changelog").await >= 1.0);
    assert_eq!(c.restores("chat_sequencer", "local").await, 0.0);
    assert_eq!(c.restores("chat_sequencer", "log").await, 0.0);
    c.stop().await;

    // D: a 1 s dedupe window, 2 s later: m41 is a new command now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d = start_sequencer(&log, &dir_d, 1);
    let again: Vec<Envelope> = chats
        .iter()
        .map(|chat| command(*chat, "ann", "m41", text("41 after the window")))
        .collect();
    let results = send_and_wait(&log, &again).await;
    for cmd in &again {
        assert_result(
            &results[&cmd.event_id],
            CommandOutcome::Accepted,
            per_chat + 4,
            "a client_msg_id past the dedupe window",
        );
    }
    d.stop().await;
    for dir in [dir_a, dir_c, dir_d] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn start_router(log: &TestLog, dir: &Path) -> Running {
    let admin = free_addr();
    let mut config = chat_router::RouterConfig {
        listen: admin,
        group_id: format!("{}router", log.config.topic_prefix),
        log: log.config.clone(),
        ..Default::default()
    };
    config.state.dir = dir.to_path_buf();
    let stop = chat_runtime::Shutdown::new();
    let task = tokio::spawn(chat_router::run(config, stop.clone()));
    Running { stop, task, admin }
}

/// Appends `events` of `chat`, then reads `chat.deliveries` until the record
/// of `last_seq` for `last_gateway` arrived and then to the end: every
/// (gateway, seq, recipients) of the chat.
async fn route(
    log: &TestLog,
    chat: Uuid,
    events: Vec<Envelope>,
    last_seq: u64,
    last_gateway: &str,
) -> Vec<(String, u64, String)> {
    for e in &events {
        log.producer
            .send(&log.topics.events, &chat.to_string(), e)
            .await
            .unwrap();
    }
    let tail = TopicTail::open(
        &log.config,
        log.registry.clone(),
        &log.topics.deliveries,
        None,
        TailStart::Beginning,
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut keep = |ev: &chat_log::ConsumedEvent| {
        if ev.envelope.chat_id == Some(chat) {
            if let Some(seq) = ev.envelope.seq {
                let gw = String::from_utf8(ev.key.clone().unwrap()).unwrap();
                got.push((gw, seq, ev.header(HEADER_RECIPIENTS).unwrap()));
            }
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, tail.next()).await {
            Ok(Ok(TailItem::Event(ev))) => {
                keep(&ev);
                let gw = ev.key.clone().unwrap_or_default();
                if ev.envelope.chat_id == Some(chat)
                    && ev.envelope.seq == Some(last_seq)
                    && gw == last_gateway.as_bytes()
                {
                    break;
                }
            }
            Ok(_) => {}
            Err(_) => panic!("seq {last_seq} never reached {last_gateway}: {got:?}"),
        }
    }
    // Everything the router wrote before that record was acknowledged
    // before it: read to the end.
    tail.read_to_end(|item| {
        if let TailItem::Event(ev) = item {
            keep(&ev);
        }
    })
    .await
    .unwrap();
    got.sort();
    got.dedup();
    got
}

fn rows(want: &[(&str, u64, &str)]) -> Vec<(String, u64, String)> {
    want.iter()
        .map(|(g, s, r)| (g.to_string(), *s, r.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_restores_membership_from_its_store_or_the_changelog() {
    let log = TestLog::start("store-router").await.unwrap();
    for (u, g) in [
        ("ann", "gw-a"),
        ("bob", "gw-a"),
        ("cat", "gw-b"),
        ("dan", "gw-c"),
    ] {
        log.producer
            .send(&log.topics.sessions, u, &session_opened(u, g))
            .await
            .unwrap();
    }
    let chat = Uuid::new_v4();
    let member = |u: &str, role| ChatMember {
        user_id: u.into(),
        role,
    };
    let msg = || text("hi");
    let (dir_a, dir_c) = (state_dir("ra"), state_dir("rc"));

    // R1 routes a create, a message, cat's removal and a message.
    let r1 = start_router(&log, &dir_a);
    let created = Body::ChatCreated(ChatCreated {
        kind: ChatKind::Group,
        title: None,
        members: vec![
            member("ann", Role::Admin),
            member("bob", Role::Member),
            member("cat", Role::Member),
        ],
        max_members: 10,
    });
    let removed = Body::MemberRemoved(MemberRemoved {
        user_id: "cat".into(),
        reason: RemovalReason::Removed,
    });
    let first = vec![
        event(chat, 1, "ann", created),
        event(chat, 2, "ann", msg()),
        event(chat, 3, "ann", removed),
        event(chat, 4, "ann", msg()),
    ];
    let got = route(&log, chat, first, 4, "gw-a").await;
    assert_eq!(
        got,
        rows(&[
            ("gw-a", 1, "ann,bob"),
            ("gw-a", 2, "ann,bob"),
            ("gw-a", 3, "ann,bob"),
            ("gw-a", 4, "ann,bob"),
            ("gw-b", 1, "cat"),
            ("gw-b", 2, "cat"),
            ("gw-b", 3, "cat"),
        ])
    );
    r1.stop().await;

    // R2: restarted with its store: cat is still removed, nothing re-read.
    let r2 = start_router(&log, &dir_a);
    let got = route(&log, chat, vec![event(chat, 5, "ann", msg())], 5, "gw-a").await;
    assert!(
        got.contains(&("gw-a".into(), 5, "ann,bob".into()))
            && !got.iter().any(|(_, s, r)| *s == 5 && r.contains("cat")),
        "{got:?}"
    );
    assert!(r2.restores("chat_router", "local").await >= 1.0);
    assert_eq!(r2.restores("chat_router", "changelog").await, 0.0);
    assert_eq!(r2.restores("chat_router", "log").await, 0.0);
    assert_eq!(
        metric(r2.admin, "chat_router_state_restore_events_total", None).await,
        0.0
    );
    r2.stop().await;

    // R3: a new instance: membership from the changelog; dan joins.
    let r3 = start_router(&log, &dir_c);
    let added = Body::MemberAdded(MemberAdded {
        user_id: "dan".into(),
        role: Role::Member,
    });
    let got = route(
        &log,
        chat,
        vec![event(chat, 6, "ann", added), event(chat, 7, "ann", msg())],
        7,
        "gw-c",
    )
    .await;
    let seven: Vec<_> = got.iter().filter(|(_, s, _)| *s == 7).cloned().collect();
    assert_eq!(
        seven,
        rows(&[("gw-a", 7, "ann,bob"), ("gw-c", 7, "dan")]),
        "{got:?}"
    );
    assert!(r3.restores("chat_router", "changelog").await >= 1.0);
    assert_eq!(r3.restores("chat_router", "log").await, 0.0);
    r3.stop().await;
    for dir in [dir_a, dir_c] {
        let _ = std::fs::remove_dir_all(dir);
    }
}
