//! What PROTOCOL.md promises a third-party client, end to end against the
//! real stack (issue 11): reads consistent with what the connection was
//! sent, idempotent group creation, errors that name their command, and a
//! sync that spans several frames. Each timing-sensitive property is tried
//! many times in a row and no trial may fail.

use chat_tests::platform::{Client, Options, Platform};
use chat_tests::ws::Incoming;
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);
/// Trials of each read-after-receive check (the lag they catch showed up in
/// about half of single trials before the read barrier).
const TRIALS: usize = 20;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn online(p: &Platform, gw: usize, user: &str, device: &str) -> Client {
    let mut c = p.connect(gw, user, device).await.unwrap();
    c.sync(Value::Null, json!({})).await.unwrap();
    c
}

/// The next `event` of `chat` with `seq` (other frames are skipped).
async fn event(c: &mut Client, chat: &str, seq: u64) -> Value {
    loop {
        match c.next(WAIT).await.unwrap() {
            Some(Incoming::Json(v))
                if v["type"] == "event" && v["chat"] == chat && v["seq"] == seq =>
            {
                return v
            }
            Some(Incoming::Json(_)) => {}
            other => panic!("no event {chat}/{seq}: {other:?}"),
        }
    }
}

/// A read, asked again while it is answered `unavailable` (PROTOCOL.md: the
/// gateway could not reach a state as new as what it sent in time; that is
/// not a stale answer, and the client retries).
async fn read_fresh(c: &mut Client, frame: Value) -> Value {
    for _ in 0..20 {
        let answer = c.request(frame.clone()).await.unwrap();
        if answer["code"] != "unavailable" {
            return answer;
        }
        eprintln!("read answered unavailable, asking again: {answer}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("{frame} stayed unavailable");
}

fn history_seqs(page: &Value) -> Vec<u64> {
    assert_eq!(page["type"], "history", "{page}");
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect()
}

/// Sends `typing` and then a `ping`: frames are answered in order, so a
/// refusal of the typing frame arrives before the pong. An `unavailable`
/// refusal (not stale) is tried again after the typing interval.
async fn typing_refusal(c: &mut Client, chat: &str) -> Option<Value> {
    for _ in 0..10 {
        c.tx.send(&json!({"type": "typing", "id": "t", "chat": chat}))
            .await
            .unwrap();
        let pong = c.request(json!({"type": "ping"})).await.unwrap();
        assert_eq!(pong["type"], "pong");
        match c.take_set_aside(|v| v["type"] == "error" && v["id"] == "t") {
            Some(e) if e["code"] == "unavailable" => {
                tokio::time::sleep(Duration::from_millis(1_100)).await;
            }
            other => return other,
        }
    }
    panic!("typing stayed unavailable");
}

#[tokio::test]
async fn reads_right_after_an_event_or_an_ack_reflect_it() {
    // Fast sends: the trials must not meet the rate limit.
    let p = Platform::start_with(
        "conformance_reads",
        Options {
            gateways: 2,
            workers: 1,
            gateway_env: env(&[
                ("CHAT_LIMITS__SEND_RATE_PER_S", "1000"),
                ("CHAT_LIMITS__SEND_BURST", "1000"),
            ]),
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let mut ann = online(&p, 0, "ann", "a1").await;
    let mut bob = online(&p, 1, "bob", "b1").await;
    let mut cat = online(&p, 1, "cat", "c1").await;
    let mut failures = Vec::new();
    for t in 0..TRIALS {
        // The creator's `chats` right after the ack lists the new chat.
        let ack = ann
            .request(
                json!({"type": "create_chat", "kind": "group", "title": format!("t{t}"),
                "members": ["bob"], "client_msg_id": format!("g{t}")}),
            )
            .await
            .unwrap();
        assert_eq!(ack["type"], "ack", "{ack}");
        let chat = ack["chat"].as_str().unwrap().to_string();
        let chats = read_fresh(&mut ann, json!({"type": "chats"})).await;
        if !chats["chats"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["chat"] == chat.as_str())
        {
            failures.push(format!(
                "trial {t}: creator's chats lacks the chat: {chats}"
            ));
        }

        // A member who just got ChatCreated can read it, type and watch.
        event(&mut bob, &chat, 1).await;
        let page = read_fresh(&mut bob, json!({"type": "history", "chat": chat})).await;
        if page["type"] != "history" || history_seqs(&page) != [1] {
            failures.push(format!(
                "trial {t}: member's history after ChatCreated: {page}"
            ));
        }
        if let Some(e) = typing_refusal(&mut bob, &chat).await {
            failures.push(format!("trial {t}: member's typing after ChatCreated: {e}"));
        }
        let watch = read_fresh(&mut bob, json!({"type": "watch", "chats": [chat]})).await;
        if watch["type"] != "presence" {
            failures.push(format!(
                "trial {t}: member's watch after ChatCreated: {watch}"
            ));
        }

        // A user just added sees the chat from the event that added them.
        let added = ann
            .request(json!({"type": "add_member", "chat": chat, "user": "cat",
                "client_msg_id": format!("a{t}")}))
            .await
            .unwrap();
        assert_eq!(added["seq"], 2, "{added}");
        event(&mut cat, &chat, 2).await;
        let page = read_fresh(&mut cat, json!({"type": "history", "chat": chat})).await;
        if page["type"] != "history" || history_seqs(&page) != [2] {
            failures.push(format!("trial {t}: added member's history: {page}"));
        }
        let chats = read_fresh(&mut cat, json!({"type": "chats"})).await;
        if !chats["chats"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["chat"] == chat.as_str())
        {
            failures.push(format!(
                "trial {t}: added member's chats lacks the chat: {chats}"
            ));
        }

        // A live message is in the recipient's history at once, and in the
        // sender's right after its ack.
        let sent = ann
            .request(
                json!({"type": "send", "chat": chat, "client_msg_id": format!("m{t}"),
                "text": "hi"}),
            )
            .await
            .unwrap();
        assert_eq!(sent["seq"], 3, "{sent}");
        let page = read_fresh(&mut ann, json!({"type": "history", "chat": chat})).await;
        if history_seqs(&page).last() != Some(&3) {
            failures.push(format!("trial {t}: sender's history after the ack: {page}"));
        }
        event(&mut bob, &chat, 3).await;
        let page = read_fresh(&mut bob, json!({"type": "history", "chat": chat})).await;
        if history_seqs(&page) != [1, 2, 3] {
            failures.push(format!(
                "trial {t}: recipient's history after the event: {page}"
            ));
        }
        // A read receipt acked is in the next `chats` answer.
        let read = bob
            .request(json!({"type": "read", "chat": chat, "up_to_seq": 3}))
            .await
            .unwrap();
        assert_eq!(read["type"], "ack", "{read}");
        let chats = read_fresh(&mut bob, json!({"type": "chats"})).await;
        let row = chats["chats"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["chat"] == chat.as_str())
            .cloned();
        if row.as_ref().map(|r| r["unread"].clone()) != Some(json!(0)) {
            failures.push(format!("trial {t}: unread after an acked read: {row:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} stale reads in {TRIALS} trials:\n{}",
        failures.len(),
        failures.join("\n")
    );
    p.stop().await;
}

#[tokio::test]
async fn group_creation_is_idempotent_and_errors_name_their_command() {
    let p = Platform::start_with(
        "conformance_idem",
        Options {
            gateways: 1,
            workers: 1,
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let mut ann = online(&p, 0, "ann", "a1").await;
    let mut created = Vec::new();
    for t in 0..TRIALS {
        let frame = json!({"type": "create_chat", "kind": "group", "title": format!("g{t}"),
            "members": ["bob", "cat"], "client_msg_id": format!("create-{t}")});
        let first = ann.request(frame.clone()).await.unwrap();
        let again = ann.request(frame).await.unwrap();
        assert_eq!(first["type"], "ack", "{first}");
        assert_eq!(first["duplicate"], false, "{first}");
        assert_eq!(again["type"], "ack", "{again}");
        assert_eq!(again["chat"], first["chat"], "a retry names the same group");
        assert_eq!(again["seq"], 1);
        assert_eq!(again["duplicate"], true, "{again}");
        created.push(first["chat"].as_str().unwrap().to_string());
        tokio::time::sleep(Duration::from_millis(200)).await; // stay under send_rate_per_s
    }
    let chats = read_fresh(&mut ann, json!({"type": "chats"})).await;
    let groups: Vec<&Value> = chats["chats"].as_array().unwrap().iter().collect();
    assert_eq!(groups.len(), TRIALS, "one group per client_msg_id: {chats}");
    for chat in &created {
        assert_eq!(
            groups.iter().filter(|g| g["chat"] == chat.as_str()).count(),
            1
        );
    }

    // Errors the gateway makes repeat the chat and client_msg_id.
    let chat = created[0].clone();
    let long = "x".repeat(4097);
    for (frame, code) in [
        (json!({"text": ""}), "invalid"),
        (json!({"text": long}), "too_large"),
        (json!({"text": "hi", "reply_to": -1}), "invalid"),
        (json!({"text": "hi", "reply_to": 0}), "invalid"),
    ] {
        let mut frame = frame;
        frame["type"] = json!("send");
        frame["chat"] = json!(chat);
        frame["client_msg_id"] = json!("bad-1");
        let e = ann.request(frame).await.unwrap();
        assert_eq!(e["type"], "error", "{e}");
        assert_eq!(e["code"], code, "{e}");
        assert_eq!(e["chat"], chat.as_str(), "{e}");
        assert_eq!(e["client_msg_id"], "bad-1", "{e}");
    }
    // Beyond the burst: every `rate_limited` names its command too.
    for i in 0..30 {
        ann.tx
            .send(
                &json!({"type": "send", "id": format!("burst-{i}"), "chat": chat,
                "client_msg_id": format!("burst-{i}"), "text": "x"}),
            )
            .await
            .unwrap();
    }
    let mut limited = 0;
    let mut answered = 0;
    while answered < 30 {
        match ann.next(WAIT).await.unwrap() {
            Some(Incoming::Json(v))
                if v["id"].as_str().is_some_and(|i| i.starts_with("burst-")) =>
            {
                answered += 1;
                if v["code"] == "rate_limited" {
                    limited += 1;
                    assert_eq!(v["chat"], chat.as_str(), "{v}");
                    assert_eq!(v["client_msg_id"], v["id"], "{v}");
                }
            }
            Some(Incoming::Json(_)) => {}
            other => panic!("burst not answered: {other:?}"),
        }
    }
    assert!(limited > 0, "30 sends at once must exceed the burst of 20");
    p.stop().await;
}

#[tokio::test]
async fn a_sync_may_name_more_chats_than_one_frame_holds() {
    // Small frames: 4,096 bytes hold (4096 - 1024) / 64 = 48 entries.
    let p = Platform::start_with(
        "conformance_sync",
        Options {
            gateways: 1,
            workers: 1,
            gateway_env: env(&[
                ("CHAT_LIMITS__MAX_FRAME_BYTES", "4096"),
                ("CHAT_LIMITS__MAX_TEXT_BYTES", "1024"),
                ("CHAT_LIMITS__SEND_RATE_PER_S", "1000"),
                ("CHAT_LIMITS__SEND_BURST", "1000"),
            ]),
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let mut ann = online(&p, 0, "ann", "a1").await;
    let mut chats = Vec::new();
    for i in 0..120 {
        let ack = ann
            .request(
                json!({"type": "create_chat", "kind": "group", "members": ["bob"],
                "client_msg_id": format!("c{i}")}),
            )
            .await
            .unwrap();
        assert_eq!(ack["type"], "ack", "{ack}");
        chats.push(ack["chat"].as_str().unwrap().to_string());
    }
    // A new device learns the limit from hello.
    let mut dev = p.connect(0, "ann", "a2").await.unwrap();
    let hello_limits = {
        let token = p.token("ann", "probe").await.unwrap();
        let (mut rx, _tx) = chat_tests::ws::connect(
            p.gateway(0),
            &format!("/ws?token={token}&device=probe"),
            None,
        )
        .await
        .unwrap();
        match rx.recv(WAIT).await.unwrap() {
            Some(Incoming::Json(h)) if h["type"] == "hello" => h["limits"].clone(),
            other => panic!("no hello: {other:?}"),
        }
    };
    let per = hello_limits["sync_chats_per_frame"].as_u64().unwrap() as usize;
    assert_eq!(per, 48, "{hello_limits}");
    assert!(hello_limits["max_sync_chats"].as_u64().unwrap() >= 5_000);

    // More entries than a frame may carry are refused with too_large ...
    let too_many: serde_json::Map<String, Value> = chats[..per + 1]
        .iter()
        .map(|c| (c.clone(), json!(0)))
        .collect();
    let e = dev
        .request(json!({"type": "sync", "since": null, "chats": too_many}))
        .await
        .unwrap();
    assert_eq!(e["code"], "too_large", "{e}");
    // ... and three frames carry them all: the answer covers every chat.
    let since = now_ms() + 120_000; // no chat changed "since": only named ones
    let parts: Vec<&[String]> = chats.chunks(per).collect();
    assert_eq!(parts.len(), 3);
    for part in &parts[..2] {
        let named: serde_json::Map<String, Value> =
            part.iter().map(|c| (c.clone(), json!(0))).collect();
        dev.tx
            .send(&json!({"type": "sync", "since": since, "chats": named, "more": true}))
            .await
            .unwrap();
    }
    let named: serde_json::Map<String, Value> =
        parts[2].iter().map(|c| (c.clone(), json!(0))).collect();
    dev.tx
        .send(&json!({"type": "sync", "id": "all", "since": since, "chats": named}))
        .await
        .unwrap();
    let mut got = std::collections::BTreeSet::new();
    loop {
        match dev.next(WAIT).await.unwrap() {
            Some(Incoming::Json(v)) if v["type"] == "event" => {
                assert_eq!(v["seq"], 1, "{v}");
                got.insert(v["chat"].as_str().unwrap().to_string());
            }
            Some(Incoming::Json(v)) if v["type"] == "synced" => {
                assert_eq!(v["id"], "all", "{v}");
                break;
            }
            other => panic!("sync did not complete: {other:?}"),
        }
    }
    let want: std::collections::BTreeSet<String> = chats.iter().cloned().collect();
    assert_eq!(got, want, "every chat named in any part is synced");
    p.stop().await;
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
