//! Push-send test support (tests/tests/push_send.rs, push-bench): the fake
//! providers of tests/py/push_fakes.py as a child process, a
//! `chat-push-worker` process configured against them, push tasks, and
//! "has this consumer group settled this topic" (committed offsets at the
//! end), the exact state a test waits for before it counts requests.

use anyhow::Context;
use chat_log::LogConfig;
use chat_schemas::{Body, Envelope, PushTask};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;

use crate::{now_ms, repo_root, third_party_python};

/// The fake providers (one process, one port: APNs h2c, FCM + OAuth, Web Push, webhooks).
pub struct Fakes {
    child: tokio::process::Child,
    pub port: u16,
    /// Where the fake wrote the test keys the worker reads.
    pub keys: PathBuf,
    http: reqwest::Client,
}

impl Fakes {
    pub async fn start() -> anyhow::Result<Self> {
        let python = third_party_python()?;
        let keys = std::env::temp_dir().join(format!("push-fakes-{}", Uuid::new_v4().simple()));
        let mut child = tokio::process::Command::new(python)
            .arg(repo_root().join("tests/py/push_fakes.py"))
            .arg("--keys-dir")
            .arg(&keys)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("start tests/py/push_fakes.py")?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("push_fakes.py did not start within 30 s")??
            .context("push_fakes.py exited (are the py deps installed? make py-deps)")?;
        let port = line
            .strip_prefix("LISTENING ")
            .and_then(|p| p.trim().parse().ok())
            .with_context(|| format!("unexpected first line {line:?}"))?;
        Ok(Self {
            child,
            port,
            keys,
            http: reqwest::Client::new(),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let r = self.http.post(self.url(path)).json(&body).send().await?;
        Ok(r.error_for_status()?.json().await?)
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let r = self.http.get(self.url(path)).send().await?;
        Ok(r.error_for_status()?.json().await?)
    }

    /// A new Web Push subscription (`{id, endpoint, keys: {p256dh, auth}}`).
    pub async fn subscription(&self) -> anyhow::Result<Value> {
        self.post("/control/subscription", json!({})).await
    }

    /// Answers for the next requests of `token` (then 200 again), e.g.
    /// `[{"status": 503}, {"status": 429, "retry_after": 2}, {"status": 410, "reason": "Unregistered"}]`.
    pub async fn script(&self, token: &str, answers: Value) -> anyhow::Result<()> {
        self.post(
            "/control/script",
            json!({"token": token, "answers": answers}),
        )
        .await
        .map(drop)
    }

    /// Every provider answer waits `ms`.
    pub async fn delay(&self, ms: u64) -> anyhow::Result<()> {
        self.post("/control/delay", json!({"ms": ms}))
            .await
            .map(drop)
    }

    /// Every request for `token`, in arrival order: `{t, status, dedupe_key, apns_id, payload}`.
    pub async fn requests(&self, token: &str) -> anyhow::Result<Vec<Value>> {
        let v = self
            .get(&format!("/control/requests?token={token}"))
            .await?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// `{requests, accepted, apns_ids_per_key, violations, token_grants, ...}`.
    pub async fn counts(&self) -> anyhow::Result<Value> {
        self.get("/control/counts").await
    }

    /// `(arrival seconds, task created_ts ms)` of every accepted request.
    pub async fn times(&self) -> anyhow::Result<Vec<(f64, Option<i64>)>> {
        Ok(serde_json::from_value(self.get("/control/times").await?)?)
    }

    pub fn webhook_secret(&self) -> String {
        std::fs::read_to_string(self.keys.join("webhook.secret")).unwrap_or_default()
    }
}

impl Drop for Fakes {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.keys);
    }
}

/// A `chat-push-worker` process.
pub struct Worker {
    child: Option<std::process::Child>,
    env: Vec<(String, String)>,
    pub log_file: PathBuf,
    runs: usize,
}

impl Worker {
    /// The worker's environment: every provider enabled against `fakes`,
    /// a keyspace of its own for the sent-markers, fast retries.
    pub fn env_for(log: &LogConfig, keyspace: &str, fakes: &Fakes) -> Vec<(String, String)> {
        let k = |f: &str| format!("@{}", fakes.keys.join(f).display());
        let base = fakes.url("");
        [
            ("CHAT_LOG__BROKERS", log.brokers.clone()),
            ("CHAT_LOG__REGISTRY_URL", log.registry_url.clone()),
            ("CHAT_LOG__TOPIC_PREFIX", log.topic_prefix.clone()),
            ("CHAT_LOG__CHAT_PARTITIONS", log.chat_partitions.to_string()),
            ("CHAT_STORE__KEYSPACE", keyspace.to_string()),
            ("CHAT_PUSH__RETRY_BASE_MS", "300".into()),
            ("CHAT_PUSH__RETRY_MAX_MS", "5000".into()),
            ("CHAT_PUSH__APNS__ENABLED", "true".into()),
            ("CHAT_PUSH__APNS__BASE_URL", base.clone()),
            ("CHAT_PUSH__APNS__TEAM_ID", "TEAM123456".into()),
            ("CHAT_PUSH__APNS__KEY_ID", "KEY1234567".into()),
            ("CHAT_PUSH__APNS__TOPIC", "org.example.chat".into()),
            ("CHAT_PUSH__APNS__KEY", k("apns.p8")),
            ("CHAT_PUSH__FCM__ENABLED", "true".into()),
            ("CHAT_PUSH__FCM__BASE_URL", base),
            (
                "CHAT_PUSH__FCM__SERVICE_ACCOUNT",
                k("fcm-service-account.json"),
            ),
            ("CHAT_PUSH__WEBPUSH__ENABLED", "true".into()),
            ("CHAT_PUSH__WEBPUSH__VAPID_PRIVATE_KEY", k("vapid.key")),
            (
                "CHAT_PUSH__WEBPUSH__VAPID_SUBJECT",
                "mailto:ops@example.org".into(),
            ),
            ("CHAT_PUSH__WEBHOOK__ENABLED", "true".into()),
            ("CHAT_PUSH__WEBHOOK__SECRET", fakes.webhook_secret()),
            ("RUST_LOG", "info,chat_push_send=debug".into()),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b))
        .collect()
    }

    /// Starts the worker (debug build unless `CHAT_PUSH_WORKER_PROFILE=release`).
    pub fn spawn(env: Vec<(String, String)>) -> anyhow::Result<Self> {
        let mut w = Self {
            child: None,
            env,
            log_file: std::env::temp_dir()
                .join(format!("chat-push-worker-{}.log", Uuid::new_v4().simple())),
            runs: 0,
        };
        w.start()?;
        Ok(w)
    }

    /// Starts it again (after [`kill9`](Self::kill9)) with the same settings.
    pub fn start(&mut self) -> anyhow::Result<()> {
        let profile = std::env::var("CHAT_PUSH_WORKER_PROFILE").unwrap_or_else(|_| "debug".into());
        let bin = crate::platform::binary("chat-push-worker", &profile)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)?;
        self.runs += 1;
        let child = std::process::Command::new(bin)
            .envs(self.env.iter().map(|(a, b)| (a.as_str(), b.as_str())))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start chat-push-worker")?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit.
    pub fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut c = self.child.take().context("not running")?;
        std::process::Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()?;
        Ok(c.wait()?)
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The worker's output so far (for failure messages).
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A push task for one device, as the push projector makes them.
#[allow(clippy::too_many_arguments)]
pub fn task(
    user: &str,
    chat: Uuid,
    seq: u64,
    device: &str,
    provider: &str,
    token: &str,
    title: &str,
    body: &str,
) -> Envelope {
    let dedupe = format!("{chat}:{seq}:{device}");
    Envelope {
        event_id: Uuid::now_v7(),
        chat_id: None,
        seq: None,
        sender_user: user.to_string(),
        sender_device: "push-test".into(),
        client_msg_id: None,
        client_ts: None,
        server_ts: now_ms(),
        sequenced_ts: None,
        trace_id: Uuid::new_v4().simple().to_string(),
        body: Body::PushTask(PushTask {
            user_id: user.to_string(),
            chat_id: chat,
            seq,
            title: title.to_string(),
            body_preview: Some(body.to_string()),
            attempt: 1,
            not_before: 0,
            device_id: Some(device.to_string()),
            provider: Some(provider.to_string()),
            token: Some(token.to_string()),
            locale: Some("en-GB".into()),
            count: Some(1),
            badge: Some(3),
            collapse_key: Some(chat.to_string()),
            dedupe_key: Some(dedupe),
            sender_id: Some("alice".into()),
            kind: Some("message".into()),
            created_ts: Some(now_ms()),
        }),
    }
}

/// True when consumer group `group` has committed offsets at the end of
/// every partition of `topic` (committed offsets are read first, ends
/// second: a record appended in between makes the answer false).
pub async fn group_settled(log: &LogConfig, group: &str, topic: &str) -> anyhow::Result<bool> {
    let (log, group, topic) = (log.clone(), group.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || -> anyhow::Result<bool> {
        // The local test stack: plaintext brokers.
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &log.brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()?;
        let t = Duration::from_secs(10);
        let md = c.fetch_metadata(Some(&topic), t)?;
        let parts: Vec<i32> = md
            .topics()
            .first()
            .map(|m| m.partitions().iter().map(|p| p.id()).collect())
            .unwrap_or_default();
        let mut tpl = TopicPartitionList::new();
        for p in &parts {
            tpl.add_partition(&topic, *p);
        }
        let committed = c.committed_offsets(tpl, t)?;
        for p in parts {
            let (_, high) = c.fetch_watermarks(&topic, p, t)?;
            let at = match committed.find_partition(&topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => 0,
            };
            if at < high {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?
}

/// Polls `f` every 100 ms until it gives `Some`, or fails after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
