//! The push projector (`chat-push`) end to end: real Kafka, Cassandra and
//! registry, the platform's processes, clients over WebSocket registering
//! push tokens, and `chat.push` read back with the log's consumer helpers.

use chat_log::{ConsumedEvent, TailItem, TailStart, TopicTail};
use chat_projectors::store;
use chat_schemas::{Body, PushTask};
use chat_tests::consume_n;
use chat_tests::platform::{Client, Options, Platform, Role};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// The coalescing window of these tests: a burst sent within it is one push.
const COALESCE_MS: &str = "2000";

async fn platform(test: &str) -> Platform {
    platform_with(test, COALESCE_MS).await
}

async fn platform_with(test: &str, coalesce_ms: &str) -> Platform {
    Platform::start_with(
        test,
        Options {
            gateways: 1,
            workers: 1,
            worker_roles: vec![
                Role::Sequencer,
                Role::Router,
                Role::History,
                Role::Presence,
                Role::Push,
            ],
            push_env: vec![("CHAT_COALESCE_MS".into(), coalesce_ms.into())],
            ..Options::default()
        },
    )
    .await
    .unwrap()
}

/// Connects and completes the first sync.
async fn online(p: &Platform, user: &str, device: &str) -> Client {
    let mut c = p.connect(0, user, device).await.unwrap();
    c.sync(Value::Null, json!({})).await.unwrap();
    c
}

async fn register(c: &mut Client, provider: &str, token: &str) -> Value {
    c.request(
        json!({"type": "push_register", "provider": provider, "token": token, "locale": "en-GB"}),
    )
    .await
    .unwrap()
}

/// A Web Push subscription of the right shape (65-byte point, 16-byte secret).
fn subscription() -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut point = vec![4u8];
    point.extend([7u8; 64]);
    json!({
        "endpoint": "https://push.example.test/send/abc",
        "keys": {"p256dh": b64.encode(point), "auth": b64.encode([9u8; 16])}
    })
    .to_string()
}

/// Waits until `chat.sessions` holds a `SessionClosed` for each of
/// `devices` of `user`: the projector will then see them offline.
async fn wait_closed(p: &Platform, user: &str, devices: &[&str]) {
    let tail = TopicTail::open(
        &p.log.config,
        p.log.registry.clone(),
        &p.log.topics.sessions,
        None,
        TailStart::Beginning,
    )
    .await
    .unwrap();
    let mut left: HashSet<String> = devices.iter().map(|d| d.to_string()).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !left.is_empty() {
        let item = tokio::time::timeout_at(deadline, tail.next())
            .await
            .expect("sessions closed in time")
            .unwrap();
        if let TailItem::Event(ev) = item {
            if let Body::SessionClosed(c) = &ev.envelope.body {
                if ev.envelope.sender_user == user {
                    left.remove(&c.device_id);
                }
            }
        }
    }
}

/// Sends `n` messages `prefix1..prefixn` without waiting in between, then
/// their acks; returns the seq of the last.
async fn burst(c: &mut Client, chat: &str, prefix: &str, n: usize) -> u64 {
    let started = Instant::now();
    for i in 1..=n {
        c.tx.send(
            &json!({"type": "send", "id": format!("{prefix}{i}"), "chat": chat,
            "client_msg_id": format!("{prefix}{i}"), "text": format!("{prefix}{i}")}),
        )
        .await
        .unwrap();
    }
    let mut last = 0;
    let mut acks = 0;
    while acks < n {
        let Some(chat_tests::ws::Incoming::Json(v)) =
            c.next(Duration::from_secs(30)).await.unwrap()
        else {
            panic!("no ack");
        };
        if v["type"] == "ack" {
            acks += 1;
            last = last.max(v["seq"].as_u64().unwrap());
        } else {
            assert_ne!(v["type"], "error", "{v}");
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the burst took {:?}",
        started.elapsed()
    );
    last
}

fn task(ev: &ConsumedEvent) -> PushTask {
    match &ev.envelope.body {
        Body::PushTask(t) => t.clone(),
        other => panic!("not a push task: {other:?}"),
    }
}

/// The `chats` answer of `c`: (unread_total, the entry of `chat`).
async fn chats(c: &mut Client, chat: &str) -> (u64, Value) {
    let a = c.request(json!({"type": "chats"})).await.unwrap();
    let entry = a["chats"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["chat"] == chat)
        .cloned()
        .unwrap_or(Value::Null);
    (a["unread_total"].as_u64().unwrap(), entry)
}

#[tokio::test(flavor = "multi_thread")]
async fn burst_to_offline_devices_is_one_push_each() {
    let p = platform("push_burst").await;
    // bob: phone (APNs) and laptop (Web Push) registered and offline; the
    // tablet (FCM) registered and connected; "old" registered, then revoked.
    let mut tablet = online(&p, "bob", "tablet").await;
    let ok = register(&mut tablet, "fcm", "fcm-token-tablet:APA91b").await;
    assert_eq!(ok["type"], "ok", "{ok}");
    let apns = "a1".repeat(32);
    let web = subscription();
    for (device, provider, token) in [
        ("phone", "apns", apns.as_str()),
        ("laptop", "webpush", web.as_str()),
        ("old", "fcm", "fcm-token-old"),
    ] {
        let mut c = online(&p, "bob", device).await;
        let ok = register(&mut c, provider, token).await;
        assert_eq!(ok["type"], "ok", "{device}: {ok}");
        c.tx.close().await.unwrap();
    }
    wait_closed(&p, "bob", &["phone", "laptop", "old"]).await;
    let ok = tablet
        .request(json!({"type": "revoke_device", "device": "old"}))
        .await
        .unwrap();
    assert_eq!(ok["type"], "ok", "{ok}");

    // The registrations table: phone, laptop and tablet; "old" lost its own.
    let s = store::connect(&p.store).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let regs = s.push_registrations("bob").await.unwrap();
        let devices: Vec<&str> = regs.iter().map(|r| r.device.as_str()).collect();
        if devices == ["laptop", "phone", "tablet"] {
            let phone = regs.iter().find(|r| r.device == "phone").unwrap();
            assert_eq!(
                (
                    phone.provider.as_str(),
                    phone.token.as_str(),
                    phone.locale.as_deref()
                ),
                ("apns", apns.as_str(), Some("en-GB"))
            );
            break;
        }
        assert!(Instant::now() < deadline, "registrations: {regs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // ann sends 5 messages to the group within a second.
    let mut ann = online(&p, "ann", "desk").await;
    let a = ann
        .request(
            json!({"type": "create_chat", "kind": "group", "members": ["bob"], "title": "team"}),
        )
        .await
        .unwrap();
    assert_eq!(a["type"], "ack", "{a}");
    let chat = a["chat"].as_str().unwrap().to_string();
    let last = burst(&mut ann, &chat, "m", 5).await;
    let sent_at = chrono_free_now();

    let group = format!("{}push-check", p.log.config.topic_prefix);
    let push = p.log.topics.push.clone();
    let got = consume_n(&p.log, &group, &[&push], 2, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    // Nothing else comes: no second task, none for the tablet or "old".
    let more = consume_n(&p.log, &group, &[&push], 1, Duration::from_secs(4))
        .await
        .unwrap();
    assert!(more.is_empty(), "unexpected tasks: {more:?}");

    let (unread_total, entry) = chats(&mut tablet, &chat).await;
    assert!(entry["unread"].as_u64().unwrap() >= 5, "{entry}");
    let mut devices = Vec::new();
    for ev in &got {
        let t = task(ev);
        let device = t.device_id.clone().unwrap();
        assert_eq!(ev.key.as_deref(), Some(b"bob".as_slice()), "keyed by user");
        assert_eq!(t.user_id, "bob");
        assert_eq!(t.chat_id.to_string(), chat);
        assert_eq!(t.seq, last);
        assert_eq!(t.count, Some(5), "{t:?}");
        assert_eq!(t.body_preview.as_deref(), Some("m5"), "{t:?}");
        assert_eq!(t.badge, Some(unread_total as u32), "{t:?}");
        assert_eq!(t.title, "team");
        assert_eq!(t.attempt, 1);
        assert_eq!(t.kind.as_deref(), Some("message"));
        assert_eq!(t.sender_id.as_deref(), Some("ann"));
        assert_eq!(t.locale.as_deref(), Some("en-GB"));
        assert_eq!(t.collapse_key.as_deref(), Some(chat.as_str()));
        assert_eq!(
            t.dedupe_key.as_deref(),
            Some(format!("{chat}:{last}:{device}").as_str())
        );
        assert!(t.created_ts.unwrap() >= sent_at - 60_000, "{t:?}");
        let expected = match device.as_str() {
            "phone" => ("apns", apns.clone()),
            "laptop" => ("webpush", web.clone()),
            other => panic!("a task for {other}: {t:?}"),
        };
        assert_eq!(
            (t.provider.as_deref(), t.token.clone()),
            (Some(expected.0), Some(expected.1))
        );
        devices.push(device);
    }
    devices.sort();
    assert_eq!(devices, ["laptop", "phone"]);

    // bob's phone comes back and syncs all 5, in order.
    let mut phone = p.connect(0, "bob", "phone").await.unwrap();
    let (events, _) = phone.sync(Value::Null, json!({})).await.unwrap();
    let texts: Vec<&str> = events
        .iter()
        .filter(|e| e["chat"] == chat.as_str() && e["kind"] == "MessageSent")
        .map(|e| e["body"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["m1", "m2", "m3", "m4", "m5"]);

    // Offline for longer than the sync markers are kept (30 days): a full
    // resync, flagged, with every chat; a recent checkpoint is not one.
    let month_ago = chrono_free_now() - 31 * 24 * 3600 * 1000;
    let mut laptop = p.connect(0, "bob", "laptop").await.unwrap();
    let (events, synced) = laptop.sync(json!(month_ago), json!({})).await.unwrap();
    assert_eq!(synced["full_resync"], true, "{synced}");
    assert!(
        events
            .iter()
            .any(|e| e["chat"] == chat.as_str() && e["seq"] == last),
        "{events:?}"
    );
    let (_, synced) = laptop
        .sync(synced["checkpoint"].clone(), json!({ chat.clone(): last }))
        .await
        .unwrap();
    assert!(synced.get("full_resync").is_none(), "{synced}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn muted_chats_and_bad_registrations() {
    let p = platform("push_muted").await;
    let mut desk = online(&p, "bob", "desk").await;

    // Refused registrations, with the documented codes.
    for (provider, token, code) in [
        ("pigeon", "x".to_string(), "invalid"),
        (
            "webpush",
            "{\"endpoint\":\"https://x\"}".to_string(),
            "invalid",
        ),
        ("webpush", "not json".to_string(), "invalid"),
        ("apns", "zz-not-hex".to_string(), "invalid"),
        ("fcm", "t".repeat(5000), "too_large"),
    ] {
        let e = register(&mut desk, provider, &token).await;
        assert_eq!(
            (&e["type"], &e["code"]),
            (&json!("error"), &json!(code)),
            "{provider}: {e}"
        );
    }
    // Registered then removed: desk has none.
    assert_eq!(
        register(&mut desk, "webhook", "https://hooks.example.test/bob").await["type"],
        "ok"
    );
    let ok = desk
        .request(json!({"type": "push_unregister"}))
        .await
        .unwrap();
    assert_eq!(ok["type"], "ok", "{ok}");

    let mut phone = online(&p, "bob", "phone").await;
    assert_eq!(
        register(&mut phone, "apns", &"b2".repeat(32)).await["type"],
        "ok"
    );
    phone.tx.close().await.unwrap();
    wait_closed(&p, "bob", &["phone"]).await;

    let mut ann = online(&p, "ann", "desk").await;
    let chat_of = |a: Value| {
        assert_eq!(a["type"], "ack", "{a}");
        a["chat"].as_str().unwrap().to_string()
    };
    let quiet = chat_of(
        ann.request(
            json!({"type": "create_chat", "kind": "group", "members": ["bob"], "title": "quiet"}),
        )
        .await
        .unwrap(),
    );
    let loud = chat_of(
        ann.request(
            json!({"type": "create_chat", "kind": "group", "members": ["bob"], "title": "loud"}),
        )
        .await
        .unwrap(),
    );
    let m = desk
        .request(json!({"type": "mute", "chat": quiet, "muted": true}))
        .await
        .unwrap();
    assert_eq!(m["type"], "ack", "{m}");

    burst(&mut ann, &quiet, "q", 3).await;
    // The control: a message in the chat that is not muted, sent after.
    let last = burst(&mut ann, &loud, "l", 1).await;

    let group = format!("{}push-check", p.log.config.topic_prefix);
    let push = p.log.topics.push.clone();
    let got = consume_n(&p.log, &group, &[&push], 1, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    let t = task(&got[0]);
    assert_eq!(
        (
            t.chat_id.to_string(),
            t.seq,
            t.device_id.as_deref(),
            t.count
        ),
        (loud.clone(), last, Some("phone"), Some(1))
    );
    let more = consume_n(&p.log, &group, &[&push], 1, Duration::from_secs(4))
        .await
        .unwrap();
    assert!(more.is_empty(), "a muted chat notified: {more:?}");

    // The muted chat still counts, in the unread total and in the badge.
    let (total, entry) = chats(&mut desk, &quiet).await;
    assert_eq!(entry["muted"], true, "{entry}");
    assert!(entry["unread"].as_u64().unwrap() >= 3, "{entry}");
    assert_eq!(t.badge, Some(total as u32), "{t:?}");

    // Do-not-disturb in bob's time zone (UTC+5:30), on from an hour ago
    // for the next two hours, "loud" allowed through: a message in another
    // chat is held back until it ends (not_before), one in "loud" is not.
    let night = chat_of(
        ann.request(
            json!({"type": "create_chat", "kind": "group", "members": ["bob"], "title": "night"}),
        )
        .await
        .unwrap(),
    );
    let now_minute = chrono_free_now() / 60_000;
    let local = (now_minute + 330).rem_euclid(1440);
    let hhmm = |m: i64| {
        format!(
            "{:02}:{:02}",
            m.rem_euclid(1440) / 60,
            m.rem_euclid(1440) % 60
        )
    };
    let ok = desk
        .request(json!({"type": "push_settings", "time_zone": "Asia/Kolkata",
            "dnd": {"start": hhmm(local - 60), "end": hhmm(local + 120)},
            "allowed_chats": [loud]}))
        .await
        .unwrap();
    assert_eq!(ok["type"], "ok", "{ok}");
    let dnd_end = (now_minute + 120) * 60_000;
    let held_seq = burst(&mut ann, &night, "n", 1).await;
    let allowed_seq = burst(&mut ann, &loud, "a", 1).await;
    let got = consume_n(&p.log, &group, &[&push], 2, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    for ev in &got {
        let t = task(ev);
        let created = t.created_ts.unwrap();
        if t.chat_id.to_string() == night {
            assert_eq!((t.seq, t.not_before), (held_seq, dnd_end), "held: {t:?}");
        } else {
            assert_eq!(t.chat_id.to_string(), loud);
            assert_eq!(
                (t.seq, t.not_before),
                (allowed_seq, created),
                "allowed: {t:?}"
            );
        }
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_window_open_when_the_projector_is_killed_is_not_lost() {
    // A long window, so the projector is surely killed while it is open.
    let mut p = platform_with("push_restart", "6000").await;
    let mut phone = online(&p, "bob", "phone").await;
    assert_eq!(
        register(&mut phone, "apns", &"c3".repeat(32)).await["type"],
        "ok"
    );
    phone.tx.close().await.unwrap();
    wait_closed(&p, "bob", &["phone"]).await;
    let mut ann = online(&p, "ann", "desk").await;
    let a = ann
        .request(json!({"type": "create_chat", "kind": "direct", "members": ["bob"]}))
        .await
        .unwrap();
    let chat = a["chat"].as_str().unwrap().to_string();
    let last = burst(&mut ann, &chat, "k", 5).await;

    // The projector holds the window (read, not flushed), then dies.
    let admin = p.admin(Role::Push, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while chat_tests::metric(admin, "chat_push_open_windows", None).await < 1.0 {
        assert!(Instant::now() < deadline, "the window never opened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        chat_tests::metric(admin, "chat_push_tasks_total", None).await,
        0.0
    );
    p.kill(Role::Push, 0);
    p.restart(Role::Push, 0).await.unwrap();

    let group = format!("{}push-check", p.log.config.topic_prefix);
    let push = p.log.topics.push.clone();
    let got = consume_n(&p.log, &group, &[&push], 1, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    let t = task(&got[0]);
    assert_eq!(
        (
            t.seq,
            t.count,
            t.kind.as_deref(),
            t.title.as_str(),
            t.body_preview.as_deref()
        ),
        (last, Some(5), Some("direct"), "ann", Some("k5"))
    );
    let more = consume_n(&p.log, &group, &[&push], 1, Duration::from_secs(4))
        .await
        .unwrap();
    assert!(more.is_empty(), "repeated: {more:?}");
    p.stop().await;
}

fn chrono_free_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
