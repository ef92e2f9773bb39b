//! The sequencer against the real Kafka: gap-free seqs, dedupe, refusals, and
//! two instances sharing the partitions.

use chat_log::{TailItem, TailStart, TopicTail, HEADER_GATEWAY_ID};
use chat_schemas::*;
use chat_tests::envelopes::{command, text};
use chat_tests::TestLog;
use std::collections::HashMap;
use std::time::Duration;
use uuid::Uuid;

async fn start_sequencer(
    log: &TestLog,
) -> (
    chat_runtime::Shutdown,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let config = chat_sequencer::SequencerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        group_id: format!("{}sequencer", log.config.topic_prefix),
        transactional_prefix: format!("{}seq", log.config.topic_prefix),
        log: log.config.clone(),
        ..Default::default()
    };
    let shutdown = chat_runtime::Shutdown::new();
    let task = tokio::spawn(chat_sequencer::run(config, shutdown.clone()));
    (shutdown, task)
}

/// Reads `topic` until `want` envelopes matched `keep`, or 60 s passed.
async fn collect(
    log: &TestLog,
    topic: &str,
    want: usize,
    keep: impl Fn(&Envelope) -> bool,
) -> Vec<Envelope> {
    let tail = TopicTail::open(
        &log.config,
        log.registry.clone(),
        topic,
        None,
        TailStart::Beginning,
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while out.len() < want {
        match tokio::time::timeout_at(deadline, tail.next()).await {
            Ok(Ok(TailItem::Event(ev))) if keep(&ev.envelope) => out.push(ev.envelope),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sequencers_assign_gap_free_seqs_dedupe_retries_and_refuse_non_members() {
    chat_runtime::telemetry::init(chat_runtime::telemetry::LogFormat::Pretty);
    let log = TestLog::start("seq").await.unwrap();
    let (stop_a, task_a) = start_sequencer(&log).await;
    let (stop_b, task_b) = start_sequencer(&log).await;
    let gw = b"gw-test".as_slice();
    let send = |e: Envelope| {
        let p = log.producer.clone();
        let topic = log.topics.commands.clone();
        async move {
            p.send_with(
                &topic,
                None,
                &e.chat_id.unwrap().to_string(),
                &e,
                &[(HEADER_GATEWAY_ID, gw)],
            )
            .await
            .unwrap()
        }
    };
    let chats: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    for c in &chats {
        let create = Body::ChatCreated(ChatCreated {
            kind: ChatKind::Group,
            title: Some("t".into()),
            members: vec![ChatMember {
                user_id: "bob".into(),
                role: Role::Member,
            }],
            max_members: 0,
        });
        send(command(*c, "ann", "create", create)).await;
    }
    let per_chat = 30;
    for i in 0..per_chat {
        for c in &chats {
            let user = if i % 2 == 0 { "ann" } else { "bob" };
            send(command(*c, user, &format!("m{i}"), text(&format!("{i}")))).await;
        }
    }
    // A retry of an already sent message, and a non-member.
    send(command(chats[0], "bob", "m1", text("1"))).await;
    send(command(chats[0], "eve", "e1", text("hi"))).await;

    let events = collect(
        &log,
        &log.topics.events,
        chats.len() * (per_chat + 1),
        |_| true,
    )
    .await;
    assert_eq!(
        events.len(),
        chats.len() * (per_chat + 1),
        "every accepted command appended once"
    );
    let mut by_chat: HashMap<Uuid, Vec<u64>> = HashMap::new();
    for e in &events {
        by_chat
            .entry(e.chat_id.unwrap())
            .or_default()
            .push(e.seq.unwrap());
    }
    for c in &chats {
        let expected: Vec<u64> = (1..=(per_chat as u64 + 1)).collect();
        assert_eq!(by_chat[c], expected, "gap-free and in order for chat {c}");
    }
    let results = collect(
        &log,
        &log.topics.results,
        chats.len() * (per_chat + 1) + 2,
        |e| matches!(e.body, Body::CommandResult(_)),
    )
    .await;
    let find = |user: &str, msg: &str| {
        results
            .iter()
            .filter(|e| {
                e.sender_user == user
                    && e.client_msg_id.as_deref() == Some(msg)
                    && e.chat_id == Some(chats[0])
            })
            .filter_map(|e| match &e.body {
                Body::CommandResult(r) => Some(r.clone()),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let retried = find("bob", "m1");
    assert_eq!(retried.len(), 2);
    assert_eq!(
        retried[0].seq, retried[1].seq,
        "the retry is answered with the original seq"
    );
    assert!(
        retried
            .iter()
            .any(|r| r.outcome == CommandOutcome::Duplicate),
        "{retried:?}"
    );
    let eve = find("eve", "e1");
    assert_eq!(eve.len(), 1);
    assert_eq!(eve[0].outcome, CommandOutcome::Rejected);
    assert_eq!(eve[0].code.as_deref(), Some("not_member"));

    stop_a.trigger();
    stop_b.trigger();
    task_a.await.unwrap().unwrap();
    task_b.await.unwrap().unwrap();
}
