//! The messaging core end to end: real Kafka, Cassandra and registry, two
//! gateways and two instances of every worker as separate processes,
//! clients over WebSocket.

use chat_tests::platform::{Client, Platform, Role};
use chat_tests::ws::Incoming;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// Connects and completes the first sync; returns the client, the events the
/// sync delivered, and the checkpoint.
async fn online(p: &Platform, gw: usize, user: &str, device: &str) -> (Client, Vec<Value>, i64) {
    let mut c = p.connect(gw, user, device).await.unwrap();
    let (events, checkpoint) = sync(&mut c, Value::Null, json!({})).await;
    (c, events, checkpoint)
}

/// Sends `sync` and collects `event` frames until `synced`.
async fn sync(c: &mut Client, since: Value, chats: Value) -> (Vec<Value>, i64) {
    let (events, synced) = c.sync(since, chats).await.unwrap();
    (events, synced["checkpoint"].as_i64().unwrap())
}

async fn create_group(c: &mut Client, members: &[&str]) -> String {
    let ack = c
        .request(json!({"type": "create_chat", "kind": "group", "title": "g", "members": members}))
        .await
        .unwrap();
    assert_eq!(ack["type"], "ack", "{ack}");
    ack["chat"].as_str().unwrap().to_string()
}

/// Sends a message; like a well-behaved client, waits and retries (same
/// client_msg_id) when the gateway answers `rate_limited`.
async fn send(c: &mut Client, chat: &str, msg_id: &str, text: &str) -> Value {
    loop {
        let a = c
            .request(json!({"type": "send", "chat": chat, "client_msg_id": msg_id, "text": text}))
            .await
            .unwrap();
        if a["code"] != "rate_limited" {
            return a;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads `event` frames of `chat` until one with `seq >= until` arrived.
async fn events_until(c: &mut Client, chat: &str, until: u64) -> Vec<Value> {
    let mut out = Vec::new();
    while out
        .last()
        .and_then(|v: &Value| v["seq"].as_u64())
        .unwrap_or(0)
        < until
    {
        match c.next(WAIT).await.unwrap() {
            Some(Incoming::Json(v)) if v["type"] == "event" && v["chat"] == chat => out.push(v),
            Some(Incoming::Json(_)) => {}
            other => panic!(
                "stream ended before seq {until}: {other:?} after {} events",
                out.len()
            ),
        }
    }
    out
}

/// Reads `event` frames of any chat into `per_chat` until every one of
/// `chats` reached seq `until` (frames of all chats kept: they interleave).
async fn collect_until(
    c: &mut Client,
    chats: &[String],
    until: u64,
    per_chat: &mut HashMap<String, Vec<u64>>,
) {
    let done = |m: &HashMap<String, Vec<u64>>| {
        chats
            .iter()
            .all(|c| m.get(c).and_then(|v| v.last()).copied().unwrap_or(0) >= until)
    };
    while !done(per_chat) {
        match c.next(WAIT).await.unwrap() {
            Some(Incoming::Json(v)) if v["type"] == "event" => per_chat
                .entry(v["chat"].as_str().unwrap().to_string())
                .or_default()
                .push(v["seq"].as_u64().unwrap()),
            Some(Incoming::Json(_)) => {}
            other => panic!("stream ended before seq {until}: {other:?}; so far {per_chat:?}"),
        }
    }
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().filter_map(|e| e["seq"].as_u64()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_senders_in_one_group_every_device_sees_one_gap_free_order() {
    let p = Platform::start("order", 2, 2).await.unwrap();
    let users = ["ann", "bob", "cat", "dan"];
    // Two devices per user, on different gateways.
    let mut devices = Vec::new();
    for (i, u) in users.iter().enumerate() {
        for d in 0..2 {
            let (c, _, _) = online(&p, (i + d) % 2, u, &format!("{u}-{d}")).await;
            devices.push(c);
        }
    }
    let chat = create_group(&mut devices[0], &users[1..]).await;
    let per_user = 15;
    // Every user's first device sends concurrently.
    let mut senders = Vec::new();
    let mut watchers = Vec::new();
    for (i, c) in devices.into_iter().enumerate() {
        if i % 2 == 0 {
            senders.push((users[i / 2], c));
        } else {
            watchers.push(c);
        }
    }
    let total = 1 + (users.len() * per_user) as u64;
    let mut tasks = Vec::new();
    for (u, mut c) in senders {
        let chat = chat.clone();
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for i in 0..per_user {
                let a = send(&mut c, &chat, &format!("{u}-{i}"), &format!("{u} says {i}")).await;
                assert_eq!(a["type"], "ack", "{a}");
                acks.push(a["seq"].as_u64().unwrap());
            }
            (c, acks)
        }));
    }
    let mut all_acked = Vec::new();
    let mut receivers = watchers;
    for t in tasks {
        let (c, acks) = t.await.unwrap();
        all_acked.extend(acks);
        receivers.push(c);
    }
    all_acked.sort();
    assert_eq!(
        all_acked,
        (2..=total).collect::<Vec<_>>(),
        "acks are the gap-free seqs 2..={total}"
    );
    let mut orders: Vec<Vec<(u64, String)>> = Vec::new();
    for mut c in receivers {
        let evs = events_until(&mut c, &chat, total).await;
        let order: Vec<(u64, String)> = evs
            .iter()
            .map(|e| {
                (
                    e["seq"].as_u64().unwrap(),
                    e["client_msg_id"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        assert_eq!(
            seqs(&evs),
            (1..=total).collect::<Vec<_>>(),
            "every device sees 1..={total} once, in order"
        );
        orders.push(order);
    }
    assert!(
        orders.windows(2).all(|w| w[0] == w[1]),
        "every device sees the same order"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_acked_with_the_original_seq_and_stored_once() {
    let p = Platform::start("retry", 2, 2).await.unwrap();
    let (mut ann, _, _) = online(&p, 0, "ann", "ann-phone").await;
    let chat = create_group(&mut ann, &["bob"]).await;
    let first = send(&mut ann, &chat, "same-id", "hello").await;
    let retry = send(&mut ann, &chat, "same-id", "hello").await;
    assert_eq!(first["type"], "ack");
    assert_eq!(retry["type"], "ack");
    assert_eq!(first["seq"], retry["seq"]);
    assert_eq!(retry["duplicate"], true);
    // History is a projection: poll until the projector wrote the message.
    let deadline = tokio::time::Instant::now() + WAIT;
    let stored = loop {
        let page = ann
            .request(json!({"type": "history", "chat": chat, "limit": 50}))
            .await
            .unwrap();
        // Membership (and the chat itself) in history is a projection too:
        // right after the create's ack it may not be written yet.
        let lagging = page["code"] == "not_member" || page["code"] == "unknown_chat";
        if lagging && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        assert_eq!(page["type"], "history", "{page}");
        let stored: Vec<Value> = page["events"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e["client_msg_id"] == "same-id")
            .collect();
        if !stored.is_empty() || tokio::time::Instant::now() > deadline {
            break stored;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(stored.len(), 1, "stored once: {stored:?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_members_cannot_send_or_read_and_removed_members_stop_at_their_removal() {
    let p = Platform::start("members", 2, 2).await.unwrap();
    let (mut ann, _, _) = online(&p, 0, "ann", "ann-1").await;
    let (mut bob, _, _) = online(&p, 1, "bob", "bob-1").await;
    let (mut eve, _, _) = online(&p, 1, "eve", "eve-1").await;
    let chat = create_group(&mut ann, &["bob"]).await;
    assert_eq!(send(&mut ann, &chat, "m1", "one").await["seq"], 2);

    let refused = send(&mut eve, &chat, "e1", "let me in").await;
    assert_eq!(
        (refused["type"].as_str(), refused["code"].as_str()),
        (Some("error"), Some("not_member")),
        "{refused}"
    );
    let read = eve
        .request(json!({"type": "history", "chat": chat, "limit": 10}))
        .await
        .unwrap();
    assert_eq!(
        (read["type"].as_str(), read["code"].as_str()),
        (Some("error"), Some("not_member")),
        "{read}"
    );

    let removed = ann
        .request(json!({"type": "remove_member", "chat": chat, "user": "bob"}))
        .await
        .unwrap();
    assert_eq!(removed["type"], "ack", "{removed}");
    let removal_seq = removed["seq"].as_u64().unwrap();
    assert_eq!(
        send(&mut ann, &chat, "m2", "after bob left").await["type"],
        "ack"
    );
    let bob_saw = events_until(&mut bob, &chat, removal_seq).await;
    assert_eq!(bob_saw.last().unwrap()["kind"], "MemberRemoved");
    // Nothing after the removal reaches bob.
    let after = bob
        .rx
        .recv_until(Duration::from_secs(3), |v| {
            v["type"] == "event" && v["chat"] == chat.as_str()
        })
        .await
        .unwrap();
    assert!(after.is_none(), "bob got {after:?} after his removal");
    let refused = send(&mut bob, &chat, "b9", "still here?").await;
    assert_eq!(refused["code"], "not_member");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_catches_up_exactly_once_then_goes_live_without_a_gap() {
    let p = Platform::start("catchup", 2, 2).await.unwrap();
    let (mut ann, _, _) = online(&p, 0, "ann", "ann-1").await;
    let (bob, _, _) = online(&p, 1, "bob", "bob-1").await;
    let mut chats = Vec::new();
    for _ in 0..3 {
        chats.push(create_group(&mut ann, &["bob"]).await);
    }
    // bob's device has seen each chat's creation; remember where it is.
    let mut bob = bob;
    let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
    collect_until(&mut bob, &chats, 1, &mut seen).await;
    let last: BTreeMap<String, u64> = seen
        .iter()
        .map(|(c, s)| (c.clone(), s.iter().copied().max().unwrap_or(0)))
        .collect();
    let (_, checkpoint) = sync(&mut bob, Value::Null, json!({})).await;
    drop(bob);

    // 10 messages per chat while bob is away.
    for c in &chats {
        for i in 0..10 {
            assert_eq!(
                send(&mut ann, c, &format!("{c}-off-{i}"), "x").await["type"],
                "ack"
            );
        }
    }
    // bob comes back; ann keeps sending during the catch-up.
    let mut bob = p.connect(1, "bob", "bob-1").await.unwrap();
    let chats2 = chats.clone();
    let live = tokio::spawn(async move {
        for i in 0..10 {
            for c in &chats2 {
                let a = send(&mut ann, c, &format!("{c}-live-{i}"), "y").await;
                assert_eq!(a["type"], "ack");
            }
        }
    });
    let (caught_up, _) = sync(&mut bob, json!(checkpoint), json!(last)).await;
    live.await.unwrap();
    let mut per_chat: HashMap<String, Vec<u64>> = HashMap::new();
    for e in &caught_up {
        per_chat
            .entry(e["chat"].as_str().unwrap().to_string())
            .or_default()
            .push(e["seq"].as_u64().unwrap());
    }
    // Then the live events, all chats interleaved, until each reached 21.
    collect_until(&mut bob, &chats, 21, &mut per_chat).await;
    for c in &chats {
        assert_eq!(
            per_chat[c],
            (2..=21).collect::<Vec<_>>(),
            "chat {c}: every missed and live event once, in order"
        );
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_workers_mid_run_loses_no_acknowledged_message_and_duplicates_none() {
    let mut p = Platform::start("kill", 2, 2).await.unwrap();
    let (mut ann, _, _) = online(&p, 0, "ann", "ann-1").await;
    let chat = create_group(&mut ann, &["bob"]).await;
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    let total = 120;
    for i in 0..total {
        match i {
            30 => p.kill(Role::Sequencer, 0),
            50 => p.kill(Role::Router, 0),
            70 => p.kill(Role::History, 0),
            90 => {
                p.restart(Role::Sequencer, 0).await.unwrap();
                p.restart(Role::Router, 0).await.unwrap();
                p.restart(Role::History, 0).await.unwrap();
            }
            _ => {}
        }
        let id = format!("k{i}");
        // Retry with the same id until acknowledged (a worker may be moving).
        let mut tries = 0;
        loop {
            let a = send(&mut ann, &chat, &id, &format!("n{i}")).await;
            if a["type"] == "ack" {
                assert!(
                    acked
                        .insert(a["seq"].as_u64().unwrap(), id.clone())
                        .is_none(),
                    "a seq acked twice"
                );
                break;
            }
            tries += 1;
            assert!(tries < 20, "never acked: {a}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    assert_eq!(acked.len(), total);
    assert_eq!(
        acked.keys().copied().collect::<Vec<_>>(),
        (2..=total as u64 + 1).collect::<Vec<_>>()
    );
    // History holds every acknowledged message exactly once, in order.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut stored: Vec<Value> = Vec::new();
        let mut after = 0u64;
        loop {
            let page = ann
                .request(json!({"type": "history", "chat": chat, "after": after, "limit": 100}))
                .await
                .unwrap();
            let evs = page["events"].as_array().cloned().unwrap_or_default();
            if evs.is_empty() {
                break;
            }
            after = evs.last().unwrap()["seq"].as_u64().unwrap();
            stored.extend(evs);
        }
        let msgs: BTreeMap<u64, String> = stored
            .iter()
            .filter(|e| e["kind"] == "MessageSent")
            .map(|e| {
                (
                    e["seq"].as_u64().unwrap(),
                    e["client_msg_id"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let count = stored.iter().filter(|e| e["kind"] == "MessageSent").count();
        if msgs == acked && count == total {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "history has {count} messages, want {total} exactly once"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    p.stop().await;
}
