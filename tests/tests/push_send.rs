//! Push workers against the fake providers (tests/py/push_fakes.py), real
//! Kafka and Cassandra: retries as records with backoff and `Retry-After`,
//! dead tokens removed through the log, refusals dead-lettered with the
//! provider's answer, payloads checked by independent implementations
//! (http_ece decrypts Web Push, the webhook HMAC, APNs/FCM/VAPID JWTs), and
//! a worker killed with SIGKILL in the middle of 1,000 tasks.
//!
//! Tasks are produced directly onto `chat.push`, as the push projector would.

use chat_log::{read_raw, LogConfig};
use chat_schemas::{Body, Envelope};
use chat_tests::push::{group_settled, task, wait_for, Fakes, Worker};
use chat_tests::TestLog;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::Duration;
use uuid::Uuid;

const GROUP: &str = "chat-push-worker";

fn keyspace() -> String {
    format!("push_{}", &Uuid::new_v4().simple().to_string()[..10])
}

/// Every record of `topic` decoded (from its beginning).
async fn read_all(
    log: &TestLog,
    topic: &str,
) -> anyhow::Result<Vec<(Vec<(String, Vec<u8>)>, Envelope)>> {
    let raw = read_raw(&log.config, topic, 100_000, Duration::from_secs(2)).await?;
    let mut out = Vec::new();
    for r in raw {
        let (_, env) = log
            .registry
            .decode(&r.payload)
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        out.push((r.headers, env));
    }
    Ok(out)
}

/// Waits until the worker's groups have committed everything on `chat.push` and the retry topic.
async fn wait_settled(log: &LogConfig, push: &str, worker: &mut Worker) -> anyhow::Result<()> {
    let retry = format!("{}chat.push-retry", log.topic_prefix);
    let out = worker.log_file.clone();
    let exited = std::sync::Mutex::new(worker);
    wait_for(
        "the worker to settle chat.push and its retry topic",
        Duration::from_secs(60),
        || async {
            if let Some(status) = exited.lock().unwrap().exited() {
                anyhow::bail!("chat-push-worker exited: {status}");
            }
            let main = group_settled(log, GROUP, push).await?;
            let retries = main
                && group_settled(log, &format!("{GROUP}-retry"), &retry)
                    .await
                    .unwrap_or(false);
            Ok((main && retries).then_some(()))
        },
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}\n--- worker output ---\n{}",
            std::fs::read_to_string(&out).unwrap_or_default()
        )
    })
}

fn statuses(reqs: &[Value]) -> Vec<u64> {
    reqs.iter()
        .map(|r| r["status"].as_u64().unwrap_or(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_backoff_removals_and_dead_letters() {
    let log = TestLog::start("push-retry").await.unwrap();
    let fakes = Fakes::start().await.unwrap();
    let mut worker = Worker::spawn(Worker::env_for(&log.config, &keyspace(), &fakes)).unwrap();
    let chat = Uuid::new_v4();
    // APNs: 503 twice then 200.
    fakes.script("aa01", json!([{"status": 503, "reason": "ServiceUnavailable"}, {"status": 503, "reason": "ServiceUnavailable"}])).await.unwrap();
    // FCM: 429 with Retry-After: 2, then 200.
    fakes
        .script(
            "fcm-429",
            json!([{"status": 429, "reason": "QUOTA_EXCEEDED", "retry_after": 2}]),
        )
        .await
        .unwrap();
    // APNs: 410 Unregistered.
    fakes
        .script("aa03", json!([{"status": 410, "reason": "Unregistered"}]))
        .await
        .unwrap();
    // FCM: 400 INVALID_ARGUMENT.
    fakes
        .script(
            "fcm-400",
            json!([{"status": 400, "reason": "INVALID_ARGUMENT"}]),
        )
        .await
        .unwrap();
    let tasks = [
        task("bob", chat, 1, "d-503", "apns", "aa01", "Chat", "503 twice"),
        task(
            "carol",
            chat,
            1,
            "d-429",
            "fcm",
            "fcm-429",
            "Chat",
            "429 retry-after",
        ),
        task("dave", chat, 1, "d-410", "apns", "aa03", "Chat", "410"),
        task("erin", chat, 1, "d-400", "fcm", "fcm-400", "Chat", "400"),
    ];
    for t in &tasks {
        log.producer
            .send(&log.topics.push, &t.sender_user, t)
            .await
            .unwrap();
    }
    wait_settled(&log.config, &log.topics.push, &mut worker)
        .await
        .unwrap();
    let out = worker.output();

    // 503, 503, 200: delivered once, after a backoff that grows (base 300 ms, jitter on the upper half).
    let r = fakes.requests("aa01").await.unwrap();
    assert_eq!(statuses(&r), vec![503, 503, 200], "{out}");
    let t: Vec<f64> = r.iter().map(|x| x["t"].as_f64().unwrap()).collect();
    assert!(
        t[1] - t[0] >= 0.15,
        "first retry after {:.3} s",
        t[1] - t[0]
    );
    assert!(
        t[2] - t[1] >= 0.30,
        "second retry after {:.3} s",
        t[2] - t[1]
    );
    // Every attempt carried the same apns-id (derived from the dedupe key).
    let ids: HashSet<&str> = r.iter().map(|x| x["apns_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 1);

    // 429 with Retry-After: 2: not retried before 2 s.
    let r = fakes.requests("fcm-429").await.unwrap();
    assert_eq!(statuses(&r), vec![429, 200], "{out}");
    let gap = r[1]["t"].as_f64().unwrap() - r[0]["t"].as_f64().unwrap();
    assert!(gap >= 2.0, "retried {gap:.3} s after a Retry-After: 2");

    // The retries are records on the retry topic: attempt 2 and 3 for the 503s, 2 for the 429.
    let retry_topic = format!("{}chat.push-retry", log.config.topic_prefix);
    let retries = read_all(&log, &retry_topic).await.unwrap();
    let attempts = |key: &str| -> Vec<u32> {
        retries
            .iter()
            .filter_map(|(_, e)| match &e.body {
                Body::PushTask(t) if t.dedupe_key.as_deref() == Some(key) => Some(t.attempt),
                _ => None,
            })
            .collect()
    };
    assert_eq!(attempts(&format!("{chat}:1:d-503")), vec![2, 3]);
    assert_eq!(attempts(&format!("{chat}:1:d-429")), vec![2]);
    assert!(
        attempts(&format!("{chat}:1:d-410")).is_empty(),
        "410 must not be retried"
    );
    assert!(
        attempts(&format!("{chat}:1:d-400")).is_empty(),
        "400 must not be retried"
    );

    // 410 Unregistered: tried once, and a removal event on chat.sessions.
    assert_eq!(statuses(&fakes.requests("aa03").await.unwrap()), vec![410]);
    let sessions = read_all(&log, &log.topics.sessions).await.unwrap();
    let removals: Vec<_> = sessions
        .iter()
        .filter_map(|(_, e)| match &e.body {
            Body::PushRegistrationChanged(c) => Some((e.sender_user.clone(), c.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(removals.len(), 1, "{removals:?}");
    let (user, c) = &removals[0];
    assert_eq!(
        (user.as_str(), c.device_id.as_str(), c.provider.as_str()),
        ("dave", "d-410", "apns")
    );
    assert_eq!(c.token, None);
    assert_eq!(c.reason.as_deref(), Some("unregistered"));
    assert!(
        c.provider_detail
            .as_deref()
            .unwrap_or("")
            .contains("Unregistered"),
        "{c:?}"
    );

    // 400: dead-lettered once with FCM's answer.
    assert_eq!(
        statuses(&fakes.requests("fcm-400").await.unwrap()),
        vec![400]
    );
    let dlq = read_all(&log, &log.topics.dlq).await.unwrap();
    assert_eq!(dlq.len(), 1, "exactly one dead letter");
    let (headers, env) = &dlq[0];
    let error = headers
        .iter()
        .find(|(k, _)| k == "dlq.error")
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default();
    assert!(
        error.contains("400") && error.contains("INVALID_ARGUMENT"),
        "dlq.error = {error}"
    );
    assert!(matches!(&env.body, Body::PushTask(t) if t.device_id.as_deref() == Some("d-400")));

    let counts = fakes.counts().await.unwrap();
    assert_eq!(counts["violations"], json!([]), "{counts}");
    // One OAuth2 grant served both FCM sends and their retries (cached token).
    assert_eq!(counts["token_grants"], json!(1), "{counts}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_verify_with_independent_implementations() {
    let log = TestLog::start("push-payloads").await.unwrap();
    let fakes = Fakes::start().await.unwrap();
    let mut worker = Worker::spawn(Worker::env_for(&log.config, &keyspace(), &fakes)).unwrap();
    let chat = Uuid::new_v4();
    let sub = fakes.subscription().await.unwrap();
    let sub_json = json!({"endpoint": sub["endpoint"], "keys": sub["keys"]}).to_string();
    let hook = fakes.url("/hook/bot-1");
    let text = "Grüße — the payload 🍉 must survive encryption";
    let tasks = [
        task(
            "bob",
            chat,
            7,
            "browser",
            "webpush",
            &sub_json,
            "Team chat",
            text,
        ),
        task("bot", chat, 7, "hook", "webhook", &hook, "Team chat", text),
        task(
            "bob",
            chat,
            7,
            "iphone",
            "apns",
            "0a0b0c0d",
            "Team chat",
            text,
        ),
        task(
            "bob",
            chat,
            7,
            "pixel",
            "fcm",
            "fcm-token-1",
            "Team chat",
            text,
        ),
    ];
    for t in &tasks {
        log.producer
            .send(&log.topics.push, &t.sender_user, t)
            .await
            .unwrap();
    }
    wait_settled(&log.config, &log.topics.push, &mut worker)
        .await
        .unwrap();
    let counts = fakes.counts().await.unwrap();
    assert_eq!(
        counts["violations"],
        json!([]),
        "{counts}\n{}",
        worker.output()
    );

    // Web Push: http_ece decrypted what the platform encrypted.
    let r = fakes.requests(sub["id"].as_str().unwrap()).await.unwrap();
    assert_eq!(statuses(&r), vec![200]);
    let p = &r[0]["payload"];
    assert_eq!(p["title"], "Team chat");
    assert_eq!(p["body"], text);
    assert_eq!(p["data"]["dedupe_key"], format!("{chat}:7:browser"));
    assert_eq!(p["data"]["chat_id"], chat.to_string());
    assert_eq!(p["_headers"]["topic"], chat.simple().to_string());
    assert_eq!(p["_headers"]["ttl"], "86400");

    // Webhook: the HMAC verified (the fake refuses otherwise) and the body is the task.
    let r = fakes.requests("bot-1").await.unwrap();
    assert_eq!(statuses(&r), vec![200]);
    let p = &r[0]["payload"];
    assert_eq!(p["_signature_ok"], true);
    assert_eq!(
        (p["body"].as_str(), p["seq"].as_u64(), p["badge"].as_u64()),
        (Some(text), Some(7), Some(3))
    );
    assert_eq!(p["dedupe_key"], format!("{chat}:7:hook"));

    // APNs: the provider token verified against the test key; apns-id derived from the dedupe key.
    let r = fakes.requests("0a0b0c0d").await.unwrap();
    assert_eq!(statuses(&r), vec![200]);
    let expected_id = Uuid::new_v5(
        &Uuid::NAMESPACE_URL,
        format!("chat-push:{chat}:7:iphone").as_bytes(),
    );
    assert_eq!(r[0]["apns_id"], expected_id.to_string());
    assert_eq!(r[0]["payload"]["aps"]["alert"]["body"], text);
    assert_eq!(r[0]["payload"]["aps"]["badge"], 3);

    // FCM: the OAuth2 assertion verified; data values are strings.
    let r = fakes.requests("fcm-token-1").await.unwrap();
    assert_eq!(statuses(&r), vec![200]);
    assert_eq!(r[0]["payload"]["notification"]["body"], text);
    assert_eq!(r[0]["payload"]["data"]["seq"], "7");
    assert_eq!(r[0]["payload"]["android"]["collapse_key"], chat.to_string());

    // SIGTERM: the worker drains and exits 0.
    let status = worker.terminate().unwrap();
    assert!(status.success(), "exit {status}\n{}", worker.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_batch_neither_drops_nor_repeats() {
    const N: usize = 1000;
    let log = TestLog::start("push-kill").await.unwrap();
    let fakes = Fakes::start().await.unwrap();
    // Slow answers, so the kill lands while requests are in flight.
    fakes.delay(50).await.unwrap();
    let chat = Uuid::new_v4();
    let mut keys = Vec::with_capacity(N);
    for i in 0..N {
        let user = format!("user-{}", i % 50);
        let device = format!("dev-{i}");
        let token = format!("{:08x}", i);
        let t = task(
            &user,
            chat,
            (i / 50) as u64 + 1,
            &device,
            "apns",
            &token,
            "Chat",
            "hello",
        );
        if let Body::PushTask(p) = &t.body {
            keys.push(p.dedupe_key.clone().unwrap());
        }
        log.producer
            .send(&log.topics.push, &user, &t)
            .await
            .unwrap();
    }
    let mut worker = Worker::spawn(Worker::env_for(&log.config, &keyspace(), &fakes)).unwrap();
    let accepted = |c: &Value| c["accepted"].as_object().map(|m| m.len()).unwrap_or(0);
    let before = wait_for(
        "100 notifications before the kill",
        Duration::from_secs(60),
        || async {
            let c = fakes.counts().await?;
            Ok((accepted(&c) >= 100).then_some(accepted(&c)))
        },
    )
    .await
    .unwrap();
    worker.kill9();
    assert!(before < N, "the worker finished before the kill: {before}");
    worker.start().unwrap();
    wait_settled(&log.config, &log.topics.push, &mut worker)
        .await
        .unwrap();

    let c = fakes.counts().await.unwrap();
    assert_eq!(c["violations"], json!([]));
    let acc = c["accepted"].as_object().unwrap();
    let ids = c["apns_ids_per_key"].as_object().unwrap();
    let reqs = c["requests"].as_object().unwrap();
    let missing: Vec<&String> = keys.iter().filter(|k| !acc.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "{} notifications dropped, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    // Exactly one notification per (chat, seq, device): one apns-id per key,
    // which APNs treats as one notification.
    let multi: Vec<_> = ids.iter().filter(|(_, n)| n.as_u64() != Some(1)).collect();
    assert!(
        multi.is_empty(),
        "keys with more than one apns-id: {multi:?}"
    );
    assert_eq!(acc.len(), N);
    // Requests repeated on the wire: only those in flight at the kill (at
    // most push.concurrency, 64), never a settled one.
    let repeated = reqs
        .values()
        .filter(|n| n.as_u64().unwrap_or(0) > 1)
        .count();
    eprintln!("accepted before the kill: {before}; keys requested twice (in flight at the kill): {repeated}");
    assert!(repeated <= 64, "{repeated} keys requested more than once");
}
