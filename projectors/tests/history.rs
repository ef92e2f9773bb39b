//! The history projector against the real stack (`make infra-up`): events
//! produced to a per-test `chat.events`, projected into per-test keyspaces
//! (dropped at the end). `CHAT_LOG__*` / `CHAT_STORE__NODES` override addresses.

use chat_log::{EventProducer, LogConfig, SchemaRegistry, TailStart, TopicTail, Topics};
use chat_projectors::history::{run_history, HistoryConfig, HistoryStatus, HISTORY_PROJECTOR};
use chat_projectors::store::{self, Store, StoreConfig};
use chat_runtime::Shutdown;
use chat_schemas::*;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

const BASE: i64 = 1_767_225_600_000;
/// The scenario's times are written in "ms" of a clock where a second is
/// one `user_changes` bucket: `t(10_300)` is 10.3 buckets after BASE.
fn t(ms: i64) -> i64 {
    BASE + ms * (store::CHANGE_BUCKET_MS / 1000)
}
const TABLES: &[&str] = &[
    "messages",
    "chats",
    "chat_members",
    "user_chats",
    "direct_chats",
    "user_changes",
    "projector_progress",
];

fn log_config(test: &str) -> LogConfig {
    let mut cfg = LogConfig::default();
    if let Ok(b) = std::env::var("CHAT_LOG__BROKERS") {
        cfg.brokers = b;
    }
    if let Ok(r) = std::env::var("CHAT_LOG__REGISTRY_URL") {
        cfg.registry_url = r;
    }
    cfg.topic_prefix = format!("t.{test}.{}.", &Uuid::new_v4().simple().to_string()[..8]);
    cfg.chat_partitions = 3;
    cfg
}

fn store_config() -> StoreConfig {
    let mut cfg = StoreConfig {
        keyspace: format!("t_{}", Uuid::new_v4().simple()),
        ..StoreConfig::default()
    };
    if let Ok(nodes) = std::env::var("CHAT_STORE__NODES") {
        cfg.nodes = nodes.split(',').map(|n| n.trim().to_string()).collect();
    }
    cfg
}

/// A per-test log (topics created, schemas registered) and producer.
async fn test_log(test: &str) -> (LogConfig, Topics, EventProducer) {
    let config = log_config(test);
    let topics = Topics::new(&config);
    chat_log::topics::ensure_topics(&config, &topics.specs())
        .await
        .unwrap();
    let registry = Arc::new(SchemaRegistry::new(&config).unwrap());
    for t in topics.envelope_topics() {
        registry.register_envelope(&t).await.unwrap();
    }
    let producer = EventProducer::connect(&config, registry).await.unwrap();
    (config, topics, producer)
}

/// A migrated keyspace.
async fn keyspace() -> (StoreConfig, Store) {
    let cfg = store_config();
    let store = store::connect(&cfg).await.unwrap();
    store.migrate(&cfg.replication).await.unwrap();
    (cfg, store)
}

fn ev(chat: Uuid, seq: Option<u64>, at: i64, sender: &str, body: Body) -> Envelope {
    Envelope {
        event_id: Uuid::new_v4(),
        chat_id: Some(chat),
        seq,
        sender_user: sender.into(),
        sender_device: format!("{sender}-phone"),
        client_msg_id: matches!(body, Body::MessageSent(_)).then(|| format!("c-{}", at)),
        client_ts: Some(at - 20),
        server_ts: at - 5,
        sequenced_ts: seq.map(|_| at),
        trace_id: format!("trace-{at}"),
        body,
    }
}

fn text(t: &str) -> Body {
    Body::MessageSent(MessageSent {
        kind: MessageKind::Text,
        text: Some(t.into()),
        media: None,
        reply_to_seq: None,
    })
}

fn member(user: &str, role: Role) -> ChatMember {
    ChatMember {
        user_id: user.into(),
        role,
    }
}

struct Chats {
    old: Uuid,
    group: Uuid,
    direct: Uuid,
}

/// H (old group, erin + alice) at t(0); G (group) from t(10_300), several
/// events per bucket; D (alice-dave direct) at t(20_000).
fn scenario() -> (Chats, Vec<Envelope>) {
    let (h, g) = (Uuid::new_v4(), Uuid::new_v4());
    let d = direct_chat_id("alice", "dave");
    let created = |kind, title: Option<&str>, members| {
        Body::ChatCreated(ChatCreated {
            kind,
            title: title.map(String::from),
            members,
            max_members: 256,
        })
    };
    let g_at = |seq: u64| t(10_000 + seq as i64 * 300);
    let mut events = vec![
        ev(
            h,
            Some(1),
            t(0),
            "erin",
            created(
                ChatKind::Group,
                Some("old"),
                vec![member("erin", Role::Admin), member("alice", Role::Member)],
            ),
        ),
        ev(h, Some(2), t(500), "erin", text("hello")),
        // Not sequenced: nothing to project.
        ev(
            h,
            None,
            t(600),
            "erin",
            Body::Typing(Typing {
                active: true,
                expires_at: t(5_000),
            }),
        ),
    ];
    let g_bodies = vec![
        (
            "alice",
            created(
                ChatKind::Group,
                Some("team"),
                vec![member("alice", Role::Admin), member("bob", Role::Member)],
            ),
        ),
        ("alice", text("welcome")),
        (
            "alice",
            Body::MemberAdded(MemberAdded {
                user_id: "carol".into(),
                role: Role::Member,
            }),
        ),
        ("bob", text("hi carol")),
        (
            "alice",
            Body::MemberRoleChanged(MemberRoleChanged {
                user_id: "bob".into(),
                role: Role::Admin,
            }),
        ),
        (
            "alice",
            Body::MemberRemoved(MemberRemoved {
                user_id: "carol".into(),
                reason: RemovalReason::Removed,
            }),
        ),
        ("bob", Body::ReadReceipt(ReadReceipt { up_to_seq: 4 })),
        // An older receipt never moves the read pointer back.
        ("bob", Body::ReadReceipt(ReadReceipt { up_to_seq: 2 })),
        (
            "alice",
            Body::MemberAdded(MemberAdded {
                user_id: "carol".into(),
                role: Role::Member,
            }),
        ),
        ("carol", text("back")),
    ];
    // Receipts are ordered in the partition but take no seq.
    let mut seq = 0;
    for (i, (sender, body)) in g_bodies.into_iter().enumerate() {
        let at = g_at(i as u64 + 1);
        let s = if body.receipt().is_some() {
            None
        } else {
            seq += 1;
            Some(seq)
        };
        events.push(ev(g, s, at, sender, body));
    }
    events.extend([
        ev(
            d,
            Some(1),
            t(20_100),
            "dave",
            created(
                ChatKind::Direct,
                None,
                vec![member("dave", Role::Member), member("alice", Role::Member)],
            ),
        ),
        ev(d, Some(2), t(20_200), "dave", text("psst")),
        ev(
            d,
            None,
            t(20_300),
            "alice",
            Body::ReadReceipt(ReadReceipt { up_to_seq: 2 }),
        ),
    ]);
    (
        Chats {
            old: h,
            group: g,
            direct: d,
        },
        events,
    )
}

/// Produces every event keyed by chat; returns `partition -> next offset`.
async fn produce(producer: &EventProducer, topic: &str, events: &[Envelope]) -> HashMap<i32, i64> {
    let mut ends = HashMap::new();
    for e in events {
        let key = e.chat_id.unwrap().to_string();
        let at = producer.send(topic, &key, e).await.unwrap();
        let end = ends.entry(at.partition).or_insert(0);
        *end = (*end).max(at.offset + 1);
    }
    ends
}

/// Runs a projector (group `group`) until this run has projected exactly up
/// to `ends` (the partitions it is expected to read), then stops it (which
/// must take less than a few seconds).
async fn project(log: &LogConfig, store_cfg: &StoreConfig, group: &str, ends: &HashMap<i32, i64>) {
    let cfg = HistoryConfig {
        group_id: group.into(),
        log: log.clone(),
        store: store_cfg.clone(),
        ..HistoryConfig::default()
    };
    let store = store::connect(store_cfg).await.unwrap();
    let status = HistoryStatus::default();
    let shutdown = Shutdown::new();
    let task = tokio::spawn({
        let (status, shutdown) = (status.clone(), shutdown.clone());
        async move { run_history(&cfg, store, status, shutdown).await }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while status.positions() != *ends {
        assert!(!task.is_finished(), "projector stopped early");
        assert!(
            Instant::now() < deadline,
            "not caught up: {:?} vs {ends:?}",
            status.positions()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stopping = Instant::now();
    shutdown.trigger();
    let stopped = tokio::time::timeout(Duration::from_secs(10), task).await;
    stopped
        .expect("projector stops on shutdown")
        .unwrap()
        .unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopping.elapsed()
    );
}

async fn dump(store: &Store) -> Vec<(&'static str, Vec<String>)> {
    let mut out = Vec::new();
    for t in TABLES {
        out.push((*t, store.dump_table(t).await.unwrap()));
    }
    out
}

async fn check_first_projection(store: &Store, chats: &Chats, ends: &HashMap<i32, i64>) {
    let (g, d, h) = (chats.group, chats.direct, chats.old);
    let chat = store.chat(g).await.unwrap().unwrap();
    assert_eq!(
        (
            chat.kind.as_str(),
            chat.title.as_deref(),
            chat.created_by.as_str()
        ),
        ("group", Some("team"), "alice")
    );
    assert_eq!(
        (chat.created_at_ms, chat.max_members, chat.last_seq),
        (t(10_300), 256, 8)
    );
    assert_eq!(store.chat(d).await.unwrap().unwrap().kind, "direct");
    assert_eq!(store.chat(Uuid::new_v4()).await.unwrap(), None);

    let members = store.members(g).await.unwrap();
    let s = |u: &str, r: &str, j| (u.to_string(), r.to_string(), j);
    assert_eq!(
        members,
        [
            s("alice", "admin", 1),
            s("bob", "admin", 1),
            s("carol", "member", 7)
        ]
    );

    let of =
        |rows: Vec<store::UserChatRow>, chat| rows.into_iter().find(|r| r.chat_id == chat).unwrap();
    let carol = of(store.user_chats("carol").await.unwrap(), g);
    assert_eq!(
        (
            carol.role.as_str(),
            carol.joined_seq,
            carol.left_seq,
            carol.last_read_seq
        ),
        // Her own message (seq 8) counts as read.
        ("member", 7, None, 8)
    );
    let bob = of(store.user_chats("bob").await.unwrap(), g);
    assert_eq!(
        (bob.role.as_str(), bob.last_read_seq, bob.muted),
        ("admin", 4, false)
    );
    // The chat's pointers hold explicit receipts: bob's older receipt (2
    // after 4) did not move his pointer back.
    let pointers: Vec<(String, u64)> = store
        .receipts(g)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.user, r.read_seq))
        .collect();
    let p = |u: &str, n| (u.to_string(), n);
    assert_eq!(pointers, [p("bob", 4)]);
    let alice = store.user_chats("alice").await.unwrap();
    assert_eq!(alice.len(), 3);
    assert_eq!(of(alice, d).last_read_seq, 2);

    let direct = store.dump_table("direct_chats").await.unwrap();
    assert_eq!(
        direct,
        [format!(
            r#"{{"user_low": "alice", "user_high": "dave", "chat_id": "{d}"}}"#
        )]
    );

    let page = store.messages_page(g, None, Some(0), 100).await.unwrap();
    let kinds: Vec<&str> = page.iter().map(|m| m.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "ChatCreated",
            "MessageSent",
            "MemberAdded",
            "MessageSent",
            "MemberRoleChanged",
            "MemberRemoved",
            "MemberAdded",
            "MessageSent"
        ]
    );
    let m = &page[1];
    assert_eq!(
        (m.seq, m.sender_user.as_str(), m.sequenced_ts_ms),
        (2, "alice", t(10_600))
    );
    assert_eq!(
        m.body,
        r#"{"kind":"text","text":"welcome","media":null,"reply_to_seq":null}"#
    );
    assert_eq!(
        m.client_msg_id.as_deref(),
        Some(format!("c-{}", t(10_600)).as_str())
    );
    assert_eq!(m.trace_id, format!("trace-{}", t(10_600)));
    // The unsequenced Typing of H was not projected.
    assert_eq!(store.count_messages(h, 100).await.unwrap(), 2);

    // Reconnect sync: only chats changed at or after the point.
    let since = |user: &'static str, ms| store.changed_chats_since(user, ms);
    assert_eq!(since("alice", t(0)).await.unwrap(), [d, g, h]);
    assert_eq!(since("alice", t(12_000)).await.unwrap(), [d, g]);
    assert_eq!(since("alice", t(15_000)).await.unwrap(), [d]);
    assert!(since("bob", t(14_000)).await.unwrap().is_empty());
    assert_eq!(since("dave", t(12_000)).await.unwrap(), [d]);
    assert!(since("erin", t(1_000)).await.unwrap().is_empty());
    assert_eq!(since("carol", t(11_900)).await.unwrap(), [g]);
    // At most one marker per member, chat and bucket: G's markers of alice
    // are the buckets 10..=13 (receipts mark nothing). carol has the same
    // four: the one of bucket 12 comes from her re-add (seq 7).
    let changes = store.dump_table("user_changes").await.unwrap();
    let in_g = |user: &str| {
        let (user, chat) = (format!("\"{user}\""), g.to_string());
        changes
            .iter()
            .filter(|r| r.contains(&user) && r.contains(&chat))
            .count()
    };
    assert_eq!((in_g("alice"), in_g("bob"), in_g("carol")), (4, 4, 4));

    // Progress reached the high watermarks (absent partitions are empty).
    let progress = store.progress(HISTORY_PROJECTOR).await.unwrap();
    assert_eq!(progress, *ends);
}

#[tokio::test]
async fn projects_rebuilds_identically_and_replays_idempotently() {
    let (log, topics, producer) = test_log("history").await;
    let (cfg1, store1) = keyspace().await;
    let (cfg2, store2) = keyspace().await;
    let (s1, s2) = (store1.clone(), store2.clone());
    let body = async move {
        let (chats, events) = scenario();
        // The first run stops in the middle of G (after seq 5); the second
        // resumes from the committed offsets with an empty membership cache.
        let (head, tail) = events.split_at(8);
        let head_ends = produce(&producer, &topics.events, head).await;
        project(&log, &cfg1, "history-a", &head_ends).await;
        assert_eq!(s1.chat(chats.group).await.unwrap().unwrap().last_seq, 5);
        let tail_ends = produce(&producer, &topics.events, tail).await;
        project(&log, &cfg1, "history-a", &tail_ends).await;

        let mut ends = head_ends.clone();
        ends.extend(tail_ends);
        let tail = TopicTail::open(
            &log,
            producer.registry().clone(),
            &topics.events,
            None,
            TailStart::End,
        );
        let high = tail.await.unwrap().high_watermarks().await.unwrap();
        let high: HashMap<i32, i64> = high.into_iter().filter(|(_, o)| *o > 0).collect();
        assert_eq!(high, ends);

        check_first_projection(&s1, &chats, &ends).await;
        let first = dump(&s1).await;

        // A rebuild from offset 0 into an empty keyspace gives the same content.
        project(&log, &cfg2, "history-b", &ends).await;
        assert_eq!(dump(&s2).await, first);

        // Replaying the whole log over the projection changes nothing.
        project(&log, &cfg1, "history-c", &ends).await;
        assert_eq!(dump(&s1).await, first);
    };
    let outcome = tokio::spawn(body).await;
    store1.drop_keyspace().await.unwrap();
    store2.drop_keyspace().await.unwrap();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[tokio::test]
async fn refuses_to_start_on_an_unmigrated_keyspace() {
    let cfg = HistoryConfig {
        store: store_config(),
        ..HistoryConfig::default()
    };
    let store = store::connect(&cfg.store).await.unwrap();
    let err = run_history(&cfg, store, HistoryStatus::default(), Shutdown::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("chat-admin migrate"), "{err}");
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// The binary: `--help` lists the options; it serves /health and /metrics,
/// projects, and exits cleanly within seconds of SIGTERM.
#[tokio::test]
async fn binary_serves_admin_and_stops_on_sigterm() {
    let exe = env!("CARGO_BIN_EXE_chat-history");
    let help = std::process::Command::new(exe)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for key in [
        "listen",
        "group_id",
        "log_format",
        "log.brokers",
        "log.topic_prefix",
        "store.nodes",
        "store.keyspace",
    ] {
        assert!(help.contains(key), "--help lacks {key}: {help}");
    }

    let (log, topics, producer) = test_log("history-bin").await;
    let (cfg, ks) = keyspace().await;
    let body = async move {
        let (_, events) = scenario();
        let ends = produce(&producer, &topics.events, &events).await;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut child = tokio::process::Command::new(exe)
            .env("CHAT_LISTEN", &addr)
            .env("CHAT_GROUP_ID", "history-bin")
            .env("CHAT_LOG__BROKERS", &log.brokers)
            .env("CHAT_LOG__REGISTRY_URL", &log.registry_url)
            .env("CHAT_LOG__TOPIC_PREFIX", &log.topic_prefix)
            .env("CHAT_STORE__NODES", cfg.nodes.join(","))
            .env("CHAT_STORE__KEYSPACE", &cfg.keyspace)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let total: i64 = ends.values().sum();
        loop {
            assert!(Instant::now() < deadline, "chat-history did not catch up");
            let health = http_get(&addr, "/health").unwrap_or_default();
            let metrics = http_get(&addr, "/metrics").unwrap_or_default();
            let projected = format!("chat_history_events_projected_total {total}");
            if health.starts_with("HTTP/1.1 200") && metrics.contains(&projected) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let stopping = Instant::now();
        let pid = child.id().unwrap().to_string();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        assert!(killed.unwrap().success());
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        assert!(status.expect("exits after SIGTERM").unwrap().success());
        assert!(
            stopping.elapsed() < Duration::from_secs(5),
            "{:?}",
            stopping.elapsed()
        );
        let progress = store::connect(&cfg)
            .await
            .unwrap()
            .progress(HISTORY_PROJECTOR)
            .await;
        assert_eq!(progress.unwrap(), ends);
    };
    let outcome = tokio::spawn(body).await;
    ks.drop_keyspace().await.unwrap();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}
