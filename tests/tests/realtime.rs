//! Presence, typing, receipts, unread counts and devices end to end: real
//! Kafka, Cassandra and registry, the platform's processes (presence service
//! included), clients over WebSocket.

use chat_tests::platform::{Client, Options, Platform, Role};
use chat_tests::ws::{self, Incoming};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Connects and completes the first sync.
async fn online(p: &Platform, gw: usize, user: &str, device: &str) -> Client {
    let mut c = p.connect(gw, user, device).await.unwrap();
    c.sync(Value::Null, json!({})).await.unwrap();
    c
}

async fn create(c: &mut Client, kind: &str, members: &[&str]) -> String {
    let ack = c
        .request(json!({"type": "create_chat", "kind": kind, "members": members}))
        .await
        .unwrap();
    assert_eq!(ack["type"], "ack", "{ack}");
    ack["chat"].as_str().unwrap().to_string()
}

/// `watch`es `chats`, retrying while the history projection has not caught
/// up with a chat just created; returns the `presence` answer.
async fn watch(c: &mut Client, chats: &[&str]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = c
            .request(json!({"type": "watch", "chats": chats}))
            .await
            .unwrap();
        if a["type"] == "presence" || Instant::now() > deadline {
            assert_eq!(a["type"], "presence", "{a}");
            return a;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads frames for `dur`, sending `ping` every second (the heartbeat);
/// stops early when `done` says so. Returns every JSON frame read.
async fn listen(c: &mut Client, dur: Duration, mut done: impl FnMut(&Value) -> bool) -> Vec<Value> {
    let end = Instant::now() + dur;
    let mut out = Vec::new();
    let mut next_ping = Instant::now();
    while Instant::now() < end {
        if Instant::now() >= next_ping {
            c.tx.send(&json!({"type": "ping"})).await.unwrap();
            next_ping = Instant::now() + Duration::from_secs(1);
        }
        let left = end
            .min(next_ping)
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match c.next(left).await.unwrap() {
            Some(Incoming::Json(v)) => {
                let stop = done(&v);
                out.push(v);
                if stop {
                    break;
                }
            }
            Some(Incoming::Closed(code, reason)) => panic!("closed {code}: {reason}"),
            None => {}
        }
    }
    out
}

/// The entries about `user` in `presence` frames.
fn presence_of(frames: &[Value], user: &str) -> Vec<Value> {
    frames
        .iter()
        .filter(|f| f["type"] == "presence")
        .flat_map(|f| f["users"].as_array().cloned().unwrap_or_default())
        .filter(|u| u["user"] == user)
        .collect()
}

fn is_presence(v: &Value, user: &str, status: &str) -> bool {
    v["type"] == "presence"
        && v["users"].as_array().is_some_and(|us| {
            us.iter()
                .any(|u| u["user"] == user && u["status"] == status)
        })
}

const TTL_MS: u64 = 4_000;
const BATCH_MS: u64 = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_expires_after_the_ttl_reaches_only_watchers_and_survives_a_dead_gateway() {
    // Only bob's gateway (1) has the short heartbeat TTL: the others keep
    // the default, so no other client can time out while the test sets up
    // on a busy machine. eve is alone on gateway 2, which is killed later.
    let ttl = TTL_MS.to_string();
    let mut p = Platform::start_with(
        "presence",
        Options {
            gateways: 3,
            workers: 1,
            gateway_env: env(&[
                ("gw1:CHAT_TIMEOUTS__IDLE_MS", &ttl),
                ("CHAT_TIMEOUTS__HEARTBEAT_INTERVAL_MS", "5000"),
                ("CHAT_TIMEOUTS__PRESENCE_BATCH_MS", &BATCH_MS.to_string()),
                ("CHAT_TIMEOUTS__GATEWAY_HEARTBEAT_MS", "1000"),
            ]),
            presence_env: env(&[("CHAT_GATEWAY_TTL_MS", "4000")]),
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let mut ann = online(&p, 0, "ann", "a1").await;
    let mut cat = online(&p, 0, "cat", "c1").await;
    let mut dan = online(&p, 0, "dan", "d1").await;
    let mut eve = online(&p, 2, "eve", "e1").await;
    let ann_bob = create(&mut ann, "direct", &["bob"]).await;
    let ann_eve = create(&mut ann, "direct", &["eve"]).await;
    let cat_dan = create(&mut cat, "direct", &["dan"]).await;
    // bob and cat share a group, but cat never opens it.
    let _group = create(&mut cat, "group", &["bob", "dan"]).await;

    // ann watches bob and eve; cat watches dan only.
    let answer = watch(&mut ann, &[&ann_bob, &ann_eve]).await;
    let mut users: Vec<&str> = answer["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user"].as_str().unwrap())
        .collect();
    users.sort();
    assert_eq!(
        users,
        ["bob", "eve"],
        "presence of the watched chats' members: {answer}"
    );
    watch(&mut cat, &[&cat_dan]).await;

    // bob connects, syncs, and then his network dies: no close frame, no
    // FIN, nothing more from him after the answer to his sync.
    let bob = online(&p, 1, "bob", "b1").await;
    let cut = Instant::now();
    let mut seen_offline = None;
    let (ann_frames, cat_frames, dan_frames, eve_frames) = tokio::join!(
        // Everyone listens (and pings) as long as the others: a client that
        // stopped pinging would hit the TTL itself.
        listen(&mut ann, Duration::from_secs(TTL_MS / 1000 + 6), |v| {
            if is_presence(v, "bob", "offline") && seen_offline.is_none() {
                seen_offline = Some(cut.elapsed());
            }
            false
        }),
        listen(&mut cat, Duration::from_secs(TTL_MS / 1000 + 6), |_| false),
        listen(&mut dan, Duration::from_secs(TTL_MS / 1000 + 6), |_| false),
        listen(&mut eve, Duration::from_secs(TTL_MS / 1000 + 6), |_| false),
    );
    let offline = presence_of(&ann_frames, "bob");
    assert_eq!(
        offline.first().map(|u| u["status"].clone()),
        Some(json!("online")),
        "ann saw bob come online, then go: {offline:?}"
    );
    let last = offline.last().expect("ann saw bob go offline");
    assert_eq!(last["status"], "offline");
    assert!(
        last["last_seen"].as_i64().is_some(),
        "offline carries last_seen: {last}"
    );
    let took = seen_offline.expect("the offline frame was seen");
    println!(
        "bob offline at a watcher {} ms after his last frame (TTL {TTL_MS} ms + batch {BATCH_MS} ms)",
        took.as_millis()
    );
    assert!(
        took <= Duration::from_millis(TTL_MS + BATCH_MS + 2_000),
        "offline within TTL + one batch window (+2 s for the log hops and the 250 ms idle check): {took:?}"
    );
    // Nobody who does not watch bob heard about him: not cat (who shares a
    // group with him), not dan, not eve.
    for (who, frames) in [
        ("cat", &cat_frames),
        ("dan", &dan_frames),
        ("eve", &eve_frames),
    ] {
        assert!(
            presence_of(frames, "bob").is_empty(),
            "{who} does not watch bob but got {:?}",
            presence_of(frames, "bob")
        );
    }
    drop(bob);

    // dan hides his presence: his watcher sees him offline without last_seen.
    let ok = dan
        .request(json!({"type": "presence_settings", "hidden": true}))
        .await
        .unwrap();
    assert_eq!(ok["type"], "ok", "{ok}");
    let (cat_frames, _) = tokio::join!(
        listen(&mut cat, Duration::from_secs(15), |v| is_presence(
            v, "dan", "offline"
        )),
        listen(&mut dan, Duration::from_secs(3), |_| false),
    );
    let hidden = presence_of(&cat_frames, "dan");
    let hidden = hidden.last().expect("cat saw dan hide");
    assert_eq!(
        (&hidden["status"], &hidden["last_seen"]),
        (&json!("offline"), &Value::Null)
    );

    // Gateway 2 (eve) dies without a goodbye: the presence service
    // expires its sessions once its heartbeats stop.
    p.kill(Role::Gateway, 2);
    let killed = Instant::now();
    let ann_frames = listen(&mut ann, Duration::from_secs(30), |v| {
        is_presence(v, "eve", "offline")
    })
    .await;
    assert!(
        is_presence(ann_frames.last().unwrap(), "eve", "offline"),
        "eve went offline after her gateway died: {ann_frames:?}"
    );
    println!(
        "eve offline at a watcher {} ms after her gateway was killed (gateway TTL 4000 ms)",
        killed.elapsed().as_millis()
    );
    p.stop().await;
}

/// Sends SIGSTOP or SIGCONT to a process (no libc dependency).
fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

/// Finding 2 of the log-guarantees issue: a presence service that stalls
/// longer than the gateway TTL (here: stopped for twice the TTL) must not
/// close live sessions when it resumes. Gateway expiry follows the log's
/// time (the heartbeats written meanwhile), not the stalled loop's clock.
/// One gateway only: nothing but its own heartbeats says it is alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_presence_service_closes_no_live_session() {
    let p = Platform::start_with(
        "presence-stall",
        Options {
            gateways: 1,
            workers: 1,
            gateway_env: env(&[
                ("CHAT_TIMEOUTS__GATEWAY_HEARTBEAT_MS", "1000"),
                ("CHAT_TIMEOUTS__PRESENCE_BATCH_MS", &BATCH_MS.to_string()),
            ]),
            presence_env: env(&[("CHAT_GATEWAY_TTL_MS", &TTL_MS.to_string())]),
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let mut ann = online(&p, 0, "ann", "a1").await;
    let mut bob = online(&p, 0, "bob", "b1").await;
    let chat = create(&mut ann, "direct", &["bob"]).await;
    // ann watches bob and sees him online before the stall.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = watch(&mut ann, &[&chat]).await;
        let bob_online = presence_of(std::slice::from_ref(&answer), "bob")
            .iter()
            .any(|u| u["status"] == "online");
        if bob_online {
            break;
        }
        assert!(Instant::now() < deadline, "bob never online: {answer}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let pid = p.pids(Role::Presence)[0];
    signal(pid, "-STOP");
    let stall = Duration::from_millis(TTL_MS * 2);
    let (ann_stalled, _) = tokio::join!(
        listen(&mut ann, stall, |_| false),
        listen(&mut bob, stall, |_| false),
    );
    signal(pid, "-CONT");
    // Longer than the TTL plus a check after the resume: a wrong expiry
    // would be appended, folded and published by then.
    let after = Duration::from_millis(TTL_MS + 4_000);
    let (ann_after, _) = tokio::join!(
        listen(&mut ann, after, |_| false),
        listen(&mut bob, after, |_| false),
    );
    let seen: Vec<Value> = ann_stalled.into_iter().chain(ann_after).collect();
    let offline: Vec<Value> = presence_of(&seen, "bob")
        .into_iter()
        .filter(|u| u["status"] != "online")
        .collect();
    assert!(
        offline.is_empty(),
        "bob's session was closed by the stalled presence service: {offline:?}"
    );
    // Not even briefly (the gateway would re-announce a wrongly closed
    // session, and one presence window could hide the blip): the session
    // log holds no close of either session.
    let tail = chat_log::TopicTail::open(
        &p.log.config,
        p.log.registry.clone(),
        &p.log.topics.sessions,
        None,
        chat_log::TailStart::Beginning,
    )
    .await
    .unwrap();
    let mut closes = Vec::new();
    tail.read_to_end(|item| {
        if let chat_log::TailItem::Event(ev) = item {
            if let chat_schemas::Body::SessionClosed(c) = &ev.envelope.body {
                closes.push((ev.envelope.sender_user.clone(), c.reason.clone()));
            }
        }
    })
    .await
    .unwrap();
    assert!(closes.is_empty(), "sessions closed: {closes:?}");

    // bob's socket still receives live events.
    let ack = ann
        .request(json!({"type": "send", "chat": chat, "client_msg_id": "after-stall", "text": "still there?"}))
        .await
        .unwrap();
    assert_eq!(ack["type"], "ack", "{ack}");
    let seq = ack["seq"].clone();
    let got = listen(&mut bob, Duration::from_secs(10), |v| {
        v["type"] == "event" && v["chat"] == chat.as_str() && v["seq"] == seq
    })
    .await;
    assert!(
        got.last()
            .is_some_and(|v| v["type"] == "event" && v["seq"] == seq),
        "the message after the stall was not delivered live: {got:?}"
    );
    // And the presence table agrees: bob is online.
    let answer = watch(&mut ann, &[&chat]).await;
    assert!(
        presence_of(std::slice::from_ref(&answer), "bob")
            .iter()
            .all(|u| u["status"] == "online"),
        "{answer}"
    );
    p.stop().await;
}

/// The edge of log-time expiry: the only gateway dies, so no heartbeat
/// moves the log clock. Once the presence service has folded everything
/// the partition holds, wall time counts and the dead gateway's sessions
/// are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sessions_of_the_last_gateway_expire_when_it_dies() {
    let mut p = Platform::start_with(
        "presence-last-gw",
        Options {
            gateways: 1,
            workers: 1,
            gateway_env: env(&[("CHAT_TIMEOUTS__GATEWAY_HEARTBEAT_MS", "1000")]),
            presence_env: env(&[("CHAT_GATEWAY_TTL_MS", &TTL_MS.to_string())]),
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let bob = online(&p, 0, "bob", "b1").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.kill(Role::Gateway, 0);
    let killed = Instant::now();
    drop(bob);
    let closed = loop {
        let closes: Vec<String> = read_all(&p, &p.log.topics.sessions)
            .await
            .into_iter()
            .filter_map(|e| match e.body {
                chat_schemas::Body::SessionClosed(c) if e.sender_user == "bob" => Some(c.reason),
                _ => None,
            })
            .collect();
        if !closes.is_empty() {
            break closes;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "bob's session never expired"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(closed, ["gateway_expired"]);
    println!(
        "the last gateway's session closed {} ms after it died (TTL {TTL_MS} ms)",
        killed.elapsed().as_millis()
    );
    assert!(killed.elapsed() < Duration::from_millis(TTL_MS + 5_000));
    p.stop().await;
}

/// A wrong close heals: a `gateway_expired` close of a session whose
/// connection is open (injected here, as a presence service with a wrong
/// view would append it) is forwarded by the router to the gateway, which
/// announces the session again; live delivery to the socket resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrongly_expired_session_is_announced_again_and_delivery_resumes() {
    let p = Platform::start("presence-heal", 1, 1).await.unwrap();
    let mut ann = online(&p, 0, "ann", "a1").await;
    let mut bob = online(&p, 0, "bob", "b1").await;
    let chat = create(&mut ann, "direct", &["bob"]).await;
    let opened: Vec<(Uuid, String)> = read_all(&p, &p.log.topics.sessions)
        .await
        .into_iter()
        .filter(|e| e.sender_user == "bob")
        .filter_map(|e| match e.body {
            chat_schemas::Body::SessionOpened(o) => Some((o.session_id, o.gateway_id)),
            _ => None,
        })
        .collect();
    let [(session, gateway)] = &opened[..] else {
        panic!("one session of bob: {opened:?}")
    };
    let close = chat_schemas::Envelope {
        event_id: Uuid::new_v4(),
        chat_id: None,
        seq: None,
        sender_user: "bob".into(),
        sender_device: "presence".into(),
        client_msg_id: None,
        client_ts: None,
        server_ts: chat_runtime::now_ms(),
        sequenced_ts: None,
        trace_id: "heal".into(),
        body: chat_schemas::Body::SessionClosed(chat_schemas::SessionClosed {
            gateway_id: gateway.clone(),
            device_id: "b1".into(),
            session_id: *session,
            reason: "gateway_expired".into(),
        }),
    };
    p.log
        .producer
        .send(&p.log.topics.sessions, "bob", &close)
        .await
        .unwrap();
    // The gateway announces the session again, after the close.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let kinds: Vec<&'static str> = read_all(&p, &p.log.topics.sessions)
            .await
            .into_iter()
            .filter(|e| e.sender_user == "bob")
            .filter_map(|e| match e.body {
                chat_schemas::Body::SessionOpened(o) if o.session_id == *session => Some("open"),
                chat_schemas::Body::SessionClosed(c) if c.session_id == *session => Some("close"),
                _ => None,
            })
            .collect();
        if kinds == ["open", "close", "open"] {
            break;
        }
        assert!(Instant::now() < deadline, "not announced again: {kinds:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The router routes to it again: a message reaches bob's open socket.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    loop {
        n += 1;
        let ack = ann
            .request(json!({"type": "send", "chat": chat, "client_msg_id": format!("h{n}"), "text": "back?"}))
            .await
            .unwrap();
        assert_eq!(ack["type"], "ack", "{ack}");
        let seq = ack["seq"].clone();
        let got = listen(&mut bob, Duration::from_secs(3), |v| {
            v["type"] == "event" && v["chat"] == chat.as_str() && v["seq"] == seq
        })
        .await;
        if got.last().is_some_and(|v| v["seq"] == seq) {
            break;
        }
        assert!(Instant::now() < deadline, "no live delivery after the heal");
    }
    p.stop().await;
}

/// Every record of `topic` now in the log (all partitions).
async fn read_all(p: &Platform, topic: &str) -> Vec<chat_schemas::Envelope> {
    let tail = chat_log::TopicTail::open(
        &p.log.config,
        p.log.registry.clone(),
        topic,
        None,
        chat_log::TailStart::Beginning,
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tail.read_to_end(|item| {
        if let chat_log::TailItem::Event(ev) = item {
            out.push(ev.envelope);
        }
    })
    .await
    .unwrap();
    out
}

/// Finding 7 (part): a hidden flag and a device revocation must outlive
/// `chat.sessions`' retention. Retention is simulated by deleting every
/// record of `chat.sessions` and truncating `user_devices`; the presence
/// service restarts and rebuilds from its durable home, `chat.user-settings`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hidden_presence_and_revoked_devices_outlive_the_session_log() {
    let mut p = Platform::start_with(
        "user-settings",
        Options {
            gateways: 1,
            workers: 1,
            gateway_env: env(&[
                ("CHAT_TIMEOUTS__GATEWAY_HEARTBEAT_MS", "1000"),
                ("CHAT_TIMEOUTS__PRESENCE_BATCH_MS", &BATCH_MS.to_string()),
            ]),
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let mut ann = online(&p, 0, "ann", "laptop").await;
    let mut phone = online(&p, 0, "ann", "phone").await;
    let mut dan = online(&p, 0, "dan", "d1").await;
    let old_token = p.token("ann", "phone").await.unwrap();
    let chat = create(&mut ann, "direct", &["dan"]).await;
    watch(&mut ann, &[&chat]).await;
    let ok = dan
        .request(json!({"type": "presence_settings", "hidden": true}))
        .await
        .unwrap();
    assert_eq!(ok["type"], "ok", "{ok}");
    let ok = ann
        .request(json!({"type": "revoke_device", "device": "phone"}))
        .await
        .unwrap();
    assert_eq!(ok["type"], "ok", "{ok}");
    loop {
        match phone.next(WAIT).await.unwrap() {
            Some(Incoming::Closed(code, _)) => break assert_eq!(code, 4003),
            Some(Incoming::Json(_)) => continue,
            None => panic!("the revoked device was not closed"),
        }
    }
    // Both settings reach their durable home.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let kept = read_all(&p, &p.log.topics.user_settings).await;
        if kept.len() >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "settings not copied: {kept:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop(dan);

    // A week passes: chat.sessions forgets, and user_devices is rebuilt
    // from scratch (truncated; the presence service rewrites it).
    p.kill(Role::Presence, 0);
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &p.log.config.brokers)
            .create()
            .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for part in 0..p.log.config.chat_partitions {
        tpl.add_partition_offset(&p.log.topics.sessions, part, rdkafka::Offset::End)
            .unwrap();
    }
    let opts = rdkafka::admin::AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let deleted = admin.delete_records(&tpl, &opts).await.unwrap();
    assert!(
        deleted.elements().iter().all(|e| e.error().is_ok()),
        "{deleted:?}"
    );
    let cql = scylla::client::session_builder::SessionBuilder::new()
        .known_nodes(&p.store.nodes)
        .build()
        .await
        .unwrap();
    cql.query_unpaged(format!("TRUNCATE {}.user_devices", p.store.keyspace), ())
        .await
        .unwrap();
    p.restart(Role::Presence, 0).await.unwrap();

    // The phone's old token stays refused once presence rebuilt.
    let url = format!("http://{}/ws?token={old_token}&device=phone", p.gateway(0));
    let deadline = Instant::now() + Duration::from_secs(45);
    let refused = loop {
        let r = reqwest::get(&url).await.unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        if status == 401 || Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        (refused.0, &refused.1["error"]),
        (401, &json!("device_revoked")),
        "{refused:?}"
    );
    // dan is still hidden: connecting again does not show him online.
    let _dan = online(&p, 0, "dan", "d2").await;
    let frames = listen(&mut ann, Duration::from_secs(5), |v| {
        is_presence(v, "dan", "online")
    })
    .await;
    let shown: Vec<Value> = presence_of(&frames, "dan")
        .into_iter()
        .filter(|u| u["status"] == "online")
        .collect();
    assert!(shown.is_empty(), "hidden dan shown online: {shown:?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_in_200_groups_going_online_reaches_only_the_watchers() {
    let p = Platform::start_with(
        "fanout",
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
    const POOL: usize = 50;
    const GROUPS: usize = 200;
    let pool: Vec<String> = (0..POOL).map(|i| format!("m{i:02}")).collect();
    let mut clients = Vec::new();
    for (i, u) in pool.iter().enumerate() {
        clients.push(online(&p, i % 2, u, "d").await);
    }
    let mut uma = online(&p, 0, "uma", "u1").await;
    // 200 groups of uma and 5 of the 50 others: every other user shares 20
    // groups with her.
    let mut groups = Vec::new();
    for g in 0..GROUPS {
        let members: Vec<&str> = (0..5).map(|j| pool[(g * 5 + j) % POOL].as_str()).collect();
        groups.push(create(&mut uma, "group", &members).await);
    }
    uma.tx.close().await.unwrap();
    drop(uma);
    // Three of them open one of those groups; the 47 others open nothing.
    let watchers = [0usize, 1, 2];
    for w in watchers {
        let chat = groups[w / 5].clone();
        let a = watch(&mut clients[w], &[&chat]).await;
        let uma_state = presence_of(std::slice::from_ref(&a), "uma");
        assert_eq!(uma_state.len(), 1, "{a}");
    }
    // Let uma's offline change settle, then she comes online.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for c in clients.iter_mut() {
        let _ = listen(c, Duration::from_millis(20), |_| false).await;
    }
    let _uma = online(&p, 1, "uma", "u1").await;
    let frames = futures::future::join_all(
        clients
            .iter_mut()
            .map(|c| listen(c, Duration::from_secs(6), |_| false)),
    )
    .await;
    let per_client: Vec<usize> = frames
        .iter()
        .map(|f| {
            presence_of(f, "uma")
                .iter()
                .filter(|u| u["status"] == "online")
                .count()
        })
        .collect();
    let total: usize = per_client.iter().sum();
    println!(
        "uma (in {GROUPS} groups, {POOL} co-members, {} watchers) came online: {total} presence frames delivered",
        watchers.len()
    );
    for (i, n) in per_client.iter().enumerate() {
        let expected = usize::from(watchers.contains(&i));
        assert_eq!(*n, expected, "{} got {n} presence frames for uma", pool[i]);
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_watchers_only_is_rate_limited_and_never_history() {
    let p = Platform::start("typing", 2, 1).await.unwrap();
    let mut ann = online(&p, 0, "ann", "a1").await;
    let mut ann2 = online(&p, 1, "ann", "a2").await;
    let mut bob = online(&p, 1, "bob", "b1").await;
    let mut cat = online(&p, 0, "cat", "c1").await;
    let g = create(&mut ann, "group", &["bob", "cat"]).await;
    let other = create(&mut bob, "group", &["cat"]).await;
    watch(&mut bob, &[&g]).await;
    watch(&mut ann2, &[&g]).await;
    watch(&mut cat, &[&other]).await;

    let before = chat_tests::now_ms();
    ann.tx
        .send(&json!({"type": "typing", "chat": g, "active": true}))
        .await
        .unwrap();
    // The same chat again at once: refused.
    let again = ann
        .request(json!({"type": "typing", "chat": g, "active": true}))
        .await
        .unwrap();
    assert_eq!(again["code"], "rate_limited", "{again}");
    let is_typing = |v: &Value| v["type"] == "typing";
    let (bob_f, ann2_f, cat_f, ann_f) = tokio::join!(
        listen(&mut bob, Duration::from_secs(15), is_typing),
        listen(&mut ann2, Duration::from_secs(15), is_typing),
        listen(&mut cat, Duration::from_secs(4), |_| false),
        listen(&mut ann, Duration::from_secs(4), |_| false),
    );
    let t = bob_f.last().unwrap();
    assert_eq!(
        (
            &t["type"],
            &t["chat"],
            &t["user"],
            &t["device"],
            &t["active"]
        ),
        (
            &json!("typing"),
            &json!(g),
            &json!("ann"),
            &json!("a1"),
            &json!(true)
        ),
        "{t}"
    );
    let expires = t["expires_at"].as_i64().unwrap();
    assert!(
        expires > before && expires <= chat_tests::now_ms() + 10_000,
        "{t}"
    );
    assert!(
        is_typing(ann2_f.last().unwrap()),
        "ann's other device watching the chat sees it"
    );
    let typing_frames = |f: &[Value]| f.iter().filter(|v| is_typing(v)).count();
    assert_eq!(typing_frames(&cat_f), 0, "cat does not watch the chat");
    assert_eq!(typing_frames(&ann_f), 0, "not echoed to the typing device");
    assert_eq!(typing_frames(&bob_f), 1, "the refused one was not routed");

    // Refused: a chat ann is not in, a chat that does not exist.
    let no = ann
        .request(json!({"type": "typing", "chat": other}))
        .await
        .unwrap();
    assert_eq!(no["code"], "not_member", "{no}");
    let unknown = uuid::Uuid::new_v4().to_string();
    let no = ann
        .request(json!({"type": "typing", "chat": unknown}))
        .await
        .unwrap();
    assert_eq!(no["code"], "unknown_chat", "{no}");

    // Presence of users ann shares no chat with cannot be asked for.
    let no = ann
        .request(json!({"type": "watch", "chats": [other]}))
        .await
        .unwrap();
    assert_eq!(no["code"], "not_member", "{no}");
    let too_many: Vec<String> = (0..17).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let no = ann
        .request(json!({"type": "watch", "chats": too_many}))
        .await
        .unwrap();
    assert_eq!(no["code"], "too_large", "{no}");

    // Never in history, never in a sync.
    let msg = ann
        .request(json!({"type": "send", "chat": g, "client_msg_id": "m1", "text": "hi"}))
        .await
        .unwrap();
    assert_eq!(msg["seq"], 2, "typing took no seq: {msg}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let page = loop {
        let page = bob
            .request(json!({"type": "history", "chat": g}))
            .await
            .unwrap();
        if page["events"].as_array().is_some_and(|e| e.len() == 2) || Instant::now() > deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let kinds: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["ChatCreated", "MessageSent"], "{page}");
    let mut fresh = p.connect(0, "bob", "b-new").await.unwrap();
    fresh
        .tx
        .send(&json!({"type": "sync", "since": null}))
        .await
        .unwrap();
    let synced = listen(&mut fresh, Duration::from_secs(30), |v| {
        v["type"] == "synced"
    })
    .await;
    assert!(synced.iter().any(|v| v["type"] == "synced"));
    assert!(synced
        .iter()
        .all(|v| v["kind"] != "Typing" && v["type"] != "typing"));
    p.stop().await;
}

/// A tiny deterministic generator for the interleavings.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// `chats` until the chat's entry satisfies `ok` (the projection lags the
/// acks a little); returns the entry and `unread_total`.
async fn chat_entry(c: &mut Client, chat: &str, ok: impl Fn(&Value) -> bool) -> (Value, u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let a = c.request(json!({"type": "chats"})).await.unwrap();
        let e = a["chats"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["chat"] == chat)
            .cloned()
            .unwrap_or(Value::Null);
        if ok(&e) || Instant::now() > deadline {
            return (e, a["unread_total"].as_u64().unwrap());
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_pointers_only_move_forward_and_unread_counts_agree_on_every_device() {
    let p = Platform::start("receipts", 2, 1).await.unwrap();
    let mut bob = online(&p, 0, "bob", "b1").await;
    let mut phone = online(&p, 0, "ann", "phone").await;
    let mut laptop = online(&p, 1, "ann", "laptop").await;
    let chat = create(&mut bob, "direct", &["ann"]).await;
    let not_mine = create(&mut bob, "group", &["cat"]).await;
    watch(&mut bob, &[&chat]).await;

    // Random interleavings of bob's sends and ann's reads on two devices,
    // with backward, repeated and not-yet-existing pointers.
    let mut rng = Lcg(0x5eed);
    let (mut last, mut pointer) = (1u64, 0u64);
    for step in 0..60 {
        match rng.next(3) {
            0 => {
                let a = bob
                    .request(json!({"type": "send", "chat": chat, "client_msg_id": format!("s{step}"), "text": "x"}))
                    .await
                    .unwrap();
                assert_eq!(a["type"], "ack", "{a}");
                last = a["seq"].as_u64().unwrap();
            }
            device => {
                let dev = if device == 1 { &mut phone } else { &mut laptop };
                let up_to = 1 + rng.next(last + 2);
                let a = dev
                    .request(json!({"type": "read", "chat": chat, "up_to_seq": up_to}))
                    .await
                    .unwrap();
                if up_to > last {
                    assert_eq!(a["code"], "seq_out_of_range", "read {up_to} of {last}: {a}");
                } else if up_to < pointer {
                    assert_eq!(
                        a["code"], "stale_receipt",
                        "read {up_to} after {pointer}: {a}"
                    );
                } else {
                    assert_eq!(
                        (&a["type"], &a["seq"]),
                        (&json!("ack"), &json!(up_to)),
                        "{a}"
                    );
                    assert_eq!(a["duplicate"], up_to == pointer, "{a}");
                    pointer = up_to;
                }
            }
        }
    }
    // And three more unread, so the counts compared below are not zero.
    for i in 0..3 {
        let a = bob
            .request(json!({"type": "send", "chat": chat, "client_msg_id": format!("t{i}"), "text": "y"}))
            .await
            .unwrap();
        last = a["seq"].as_u64().unwrap();
    }
    println!("after 60 random steps and 3 sends: last seq {last}, ann's read pointer {pointer}");
    // Every device of ann reports the same unread count: last - pointer.
    let expected = last - pointer;
    for (name, dev) in [("phone", &mut phone), ("laptop", &mut laptop)] {
        // Waits for the exact state asserted (a stale answer can show the
        // same unread count with a lower last seq and read pointer).
        let (e, total) = chat_entry(dev, &chat, |e| {
            e["unread"] == expected && e["last_read_seq"] == pointer && e["last_seq"] == last
        })
        .await;
        assert_eq!(
            (&e["unread"], &e["last_read_seq"], &e["last_seq"]),
            (&json!(expected), &json!(pointer), &json!(last)),
            "{name}: {e}"
        );
        assert_eq!(total, expected, "{name}: the only chat with unread events");
    }
    // The laptop heard of the phone's reads live (a badge clears at once).
    let frames = listen(&mut laptop, Duration::from_secs(10), |v| {
        v["type"] == "receipt" && v["up_to_seq"] == pointer && v["user"] == "ann"
    })
    .await;
    assert!(
        frames
            .iter()
            .any(|v| v["type"] == "receipt" && v["kind"] == "read" && v["up_to_seq"] == pointer),
        "own read receipts reach every device"
    );
    // The pointer survives a reconnect.
    drop(phone);
    let mut phone = online(&p, 1, "ann", "phone").await;
    let (e, _) = chat_entry(&mut phone, &chat, |e| e["last_read_seq"] == pointer).await;
    assert_eq!(e["last_read_seq"], pointer, "{e}");

    // Delivery receipts: the sender sees delivered and read marks.
    let d = laptop
        .request(json!({"type": "delivered", "chat": chat, "up_to_seq": last}))
        .await
        .unwrap();
    assert_eq!(d["type"], "ack", "{d}");
    let frames = listen(&mut bob, Duration::from_secs(15), |v| {
        v["type"] == "receipt" && v["kind"] == "delivered" && v["up_to_seq"] == last
    })
    .await;
    let mark = frames.last().unwrap();
    assert_eq!(
        (&mark["user"], &mark["device"]),
        (&json!("ann"), &json!("laptop")),
        "{mark}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = bob
            .request(json!({"type": "receipts", "chat": chat}))
            .await
            .unwrap();
        let ann_row = r["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["user"] == "ann")
            .cloned()
            .unwrap();
        if (ann_row["read_seq"] == pointer && ann_row["delivered_seq"] == last)
            || Instant::now() > deadline
        {
            assert_eq!(
                (&ann_row["read_seq"], &ann_row["delivered_seq"]),
                (&json!(pointer), &json!(last)),
                "{r}"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Muting on one device shows on the other; a muted chat still counts.
    let m = phone
        .request(json!({"type": "mute", "chat": chat, "muted": true}))
        .await
        .unwrap();
    assert_eq!(
        (&m["type"], &m["seq"]),
        (&json!("ack"), &Value::Null),
        "{m}"
    );
    let frames = listen(&mut laptop, Duration::from_secs(15), |v| {
        v["type"] == "muted"
    })
    .await;
    assert_eq!(frames.last().unwrap()["muted"], true, "{frames:?}");
    let (e, total) = chat_entry(&mut laptop, &chat, |e| e["muted"] == true).await;
    assert_eq!(
        (&e["muted"], &e["unread"]),
        (&json!(true), &json!(expected)),
        "{e}"
    );
    assert_eq!(total, expected, "muted chats count");

    // Refused: a chat ann is not in; nothing stored.
    let no = phone
        .request(json!({"type": "read", "chat": not_mine, "up_to_seq": 1}))
        .await
        .unwrap();
    assert_eq!(no["code"], "not_member", "{no}");
    let no = phone
        .request(json!({"type": "receipts", "chat": not_mine}))
        .await
        .unwrap();
    assert_eq!(no["code"], "not_member", "{no}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_device_closes_its_connection_and_refuses_its_token() {
    let p = Platform::start("revoke", 1, 1).await.unwrap();
    let mut phone = online(&p, 0, "ann", "phone").await;
    let mut laptop = online(&p, 0, "ann", "laptop").await;
    let old_token = p.token("ann", "phone").await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let devices = loop {
        let d = laptop.request(json!({"type": "devices"})).await.unwrap();
        if d["devices"].as_array().is_some_and(|l| l.len() == 2) || Instant::now() > deadline {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    };
    let list = devices["devices"].as_array().unwrap();
    let names: Vec<(&str, bool, bool)> = list
        .iter()
        .map(|d| {
            (
                d["device"].as_str().unwrap(),
                d["online"].as_bool().unwrap(),
                d["current"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [("laptop", true, true), ("phone", true, false)],
        "{devices}"
    );

    let ok = laptop
        .request(json!({"type": "revoke_device", "device": "phone"}))
        .await
        .unwrap();
    assert_eq!(ok["type"], "ok", "{ok}");
    let closed = loop {
        match phone.next(WAIT).await.unwrap() {
            Some(Incoming::Closed(code, reason)) => break (code, reason),
            Some(Incoming::Json(_)) => continue,
            None => panic!("the revoked device was not closed"),
        }
    };
    assert_eq!(closed.0, 4003, "{closed:?}");

    // Its token is refused from now on (once the revocation is projected).
    // A plain GET gets the same checks as an upgrade, before the upgrade
    // check (426 when everything else is fine), and shows the error body.
    let url = format!("http://{}/ws?token={old_token}&device=phone", p.gateway(0));
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let r = reqwest::get(&url).await.unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        if status == 401 || Instant::now() > deadline {
            break (status, body);
        }
        assert_eq!(status, 426, "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        (refused.0, &refused.1["error"]),
        (401, &json!("device_revoked")),
        "{refused:?}"
    );
    let upgrade = ws::connect(
        p.gateway(0),
        &format!("/ws?token={old_token}&device=phone"),
        None,
    )
    .await;
    assert!(upgrade.is_err(), "the WebSocket upgrade is refused too");
    // The laptop is untouched, and the list shows the revocation.
    let d = laptop.request(json!({"type": "devices"})).await.unwrap();
    let phone_row = d["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == "phone")
        .cloned()
        .unwrap();
    assert!(phone_row["revoked_at"].as_i64().is_some(), "{d}");
    assert_eq!(phone_row["online"], false, "{d}");
    // Signing in again later gives a new token that works.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let _phone = p.connect(0, "ann", "phone").await.unwrap();
    p.stop().await;
}
