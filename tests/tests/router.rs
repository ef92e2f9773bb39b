//! The delivery router against the real Kafka: one record per gateway that
//! holds a recipient, membership exact at each seq, SessionRouted on open.

use chat_log::{TailItem, TailStart, TopicTail, HEADER_RECIPIENTS};
use chat_schemas::*;
use chat_tests::envelopes::{event, session_opened as session};
use chat_tests::TestLog;
use std::time::Duration;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_goes_once_to_each_gateway_holding_a_member() {
    let log = TestLog::start("router").await.unwrap();
    // ann and bob on gw-a, cat on gw-b, dan (not a member) on gw-c.
    for (u, g) in [
        ("ann", "gw-a"),
        ("bob", "gw-a"),
        ("cat", "gw-b"),
        ("dan", "gw-c"),
    ] {
        log.producer
            .send(&log.topics.sessions, u, &session(u, g))
            .await
            .unwrap();
    }
    let chat = Uuid::new_v4();
    let key = chat.to_string();
    let members = ["bob", "cat"]
        .map(|u| ChatMember {
            user_id: u.into(),
            role: Role::Member,
        })
        .to_vec();
    let mut all = vec![Body::ChatCreated(ChatCreated {
        kind: ChatKind::Group,
        title: None,
        members: [
            vec![ChatMember {
                user_id: "ann".into(),
                role: Role::Admin,
            }],
            members,
        ]
        .concat(),
        max_members: 10,
    })];
    all.push(Body::MessageSent(MessageSent {
        kind: MessageKind::Text,
        text: Some("hi".into()),
        media: None,
        reply_to_seq: None,
    }));
    all.push(Body::MemberRemoved(MemberRemoved {
        user_id: "cat".into(),
        reason: RemovalReason::Removed,
    }));
    all.push(Body::MessageSent(MessageSent {
        kind: MessageKind::Text,
        text: Some("after".into()),
        media: None,
        reply_to_seq: None,
    }));
    for (i, b) in all.into_iter().enumerate() {
        log.producer
            .send(
                &log.topics.events,
                &key,
                &event(chat, i as u64 + 1, "ann", b),
            )
            .await
            .unwrap();
    }

    let config = chat_router::RouterConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        group_id: format!("{}router", log.config.topic_prefix),
        log: log.config.clone(),
        ..Default::default()
    };
    let shutdown = chat_runtime::Shutdown::new();
    let task = tokio::spawn(chat_router::run(config, shutdown.clone()));

    let tail = TopicTail::open(
        &log.config,
        log.registry.clone(),
        &log.topics.deliveries,
        None,
        TailStart::Beginning,
    )
    .await
    .unwrap();
    let mut got: Vec<(String, u64, String)> = Vec::new();
    // Sessions opened before the router started are answered again when it
    // is assigned the partitions: with one instance, every partition has a
    // position (none "unrouted"), even those that carry no event.
    let mut reannounced: Vec<SessionRouted> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while got.len() < 7 {
        match tokio::time::timeout_at(deadline, tail.next()).await {
            Ok(Ok(TailItem::Event(ev))) => {
                if let Body::SessionRouted(r) = ev.envelope.body {
                    reannounced.push(r);
                    continue;
                }
                let gw = String::from_utf8(ev.key.clone().unwrap()).unwrap();
                let recipients = ev.header(HEADER_RECIPIENTS).unwrap();
                got.push((gw, ev.envelope.seq.unwrap(), recipients));
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => break,
        }
    }
    assert!(
        reannounced.iter().any(|r| r
            .router_offsets
            .iter()
            .all(|o| *o < chat_schemas::UNROUTED_PARTITION)),
        "an answer names a position for every partition: {reannounced:?}"
    );
    got.sort();
    let want: Vec<(String, u64, String)> = [
        ("gw-a", 1, "ann,bob"),
        ("gw-a", 2, "ann,bob"),
        ("gw-a", 3, "ann,bob"),
        ("gw-a", 4, "ann,bob"),
        ("gw-b", 1, "cat"),
        ("gw-b", 2, "cat"),
        ("gw-b", 3, "cat"),
    ]
    .iter()
    .map(|(g, s, r)| (g.to_string(), *s, r.to_string()))
    .collect();
    assert_eq!(
        got, want,
        "one record per gateway per event; cat gets its removal, not what follows; dan nothing"
    );

    // A session opened now is answered with SessionRouted carrying offsets.
    let late = session("eve", "gw-e");
    log.producer
        .send(&log.topics.sessions, "eve", &late)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let Body::SessionOpened(o) = &late.body else {
        unreachable!()
    };
    let routed = loop {
        match tokio::time::timeout_at(deadline, tail.next()).await {
            Ok(Ok(TailItem::Event(ev))) => match ev.envelope.body {
                Body::SessionRouted(r) if r.session_id == o.session_id => break r,
                _ => {}
            },
            other => panic!("no SessionRouted: {other:?}"),
        }
    };
    assert_eq!(routed.session_id, o.session_id);
    assert_eq!(
        routed.router_offsets.len(),
        log.config.chat_partitions as usize
    );
    assert!(
        routed.router_offsets.contains(&4),
        "the chat's partition was routed up to offset 4: {:?}",
        routed.router_offsets
    );
    shutdown.trigger();
    task.await.unwrap().unwrap();
}
