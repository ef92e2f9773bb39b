//! The whole platform as real processes, for end-to-end tests: sequencers,
//! routers, history projectors and gateways started from the workspace's
//! binaries against the real stack, with a unique topic prefix, consumer
//! groups and keyspace per test. Processes can be killed with SIGKILL and
//! restarted. Each process's output goes to `target/e2e-logs/<prefix>/`.

use anyhow::Context;
use chat_projectors::store::{self, StoreConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::ws::{self, Incoming, WsReader, WsWriter};
use crate::{repo_root, TestLog};

/// Secret of the test gateways' HS256 tokens.
pub const TEST_SECRET: &str = "e2e-test-secret-not-for-production";

/// A role of the platform and its binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Sequencer,
    Router,
    History,
    Presence,
    Gateway,
    /// The push projector (`chat-push`); not among the default worker roles.
    Push,
}

impl Role {
    fn bin(self) -> &'static str {
        match self {
            Role::Sequencer => "chat-sequencer",
            Role::Router => "chat-router",
            Role::History => "chat-history",
            Role::Presence => "chat-presence",
            Role::Gateway => "chat-gateway",
            Role::Push => "chat-push",
        }
    }
}

struct Proc {
    name: String,
    role: Role,
    admin: SocketAddr,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

/// The running platform of one test.
pub struct Platform {
    pub log: TestLog,
    pub store: StoreConfig,
    procs: Vec<Proc>,
    logs: PathBuf,
    options: Options,
}

/// How to start a platform.
#[derive(Clone, Debug)]
pub struct Options {
    pub gateways: usize,
    /// Instances of each worker (sequencer, router, history projector).
    pub workers: usize,
    /// `debug` (tests) or `release` (benchmarks).
    pub profile: &'static str,
    /// Extra environment for the gateways (e.g. `CHAT_LIMITS__MAX_CONNECTIONS`).
    /// `{listen}` in a value becomes that gateway's own address (e.g.
    /// `CHAT_ALLOWED_ORIGINS=http://{listen}` for the browser app it serves).
    /// A key `gw<i>:KEY` sets `KEY` for gateway `i` only.
    pub gateway_env: Vec<(String, String)>,
    /// Extra environment for the presence services (e.g. `CHAT_GATEWAY_TTL_MS`).
    pub presence_env: Vec<(String, String)>,
    /// Extra environment for the sequencers and routers (e.g.
    /// `CHAT_STATE__CACHE_CHATS`).
    pub worker_env: Vec<(String, String)>,
    /// Kafka bootstrap servers instead of `CHAT_LOG__BROKERS` / the dev
    /// stack's (e.g. the 3-broker cluster of `infra/stack.sh cluster-up`).
    pub brokers: Option<String>,
    /// Replication factor of the test's topics (1: the dev stack).
    pub replication_factor: i32,
    /// `min.insync.replicas` of the test's acknowledged topics.
    pub min_insync_replicas: i32,
    /// Which workers `workers` counts (all four by default; a benchmark of
    /// the sequencer and router alone leaves out the projectors).
    pub worker_roles: Vec<Role>,
    /// Partitions of `chat.commands` / `chat.events` (None: the tests' 3).
    pub chat_partitions: Option<i32>,
    /// Extra environment for the history projectors (e.g.
    /// `CHAT_BATCH_MAX_EVENTS`).
    pub history_env: Vec<(String, String)>,
    /// Run this `chat-history` executable instead of the workspace's (a
    /// benchmark comparing builds).
    pub history_binary: Option<PathBuf>,
    /// Extra environment for the push projectors (e.g. `CHAT_COALESCE_MS`).
    pub push_env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            gateways: 2,
            workers: 2,
            profile: "debug",
            gateway_env: Vec::new(),
            presence_env: Vec::new(),
            worker_env: Vec::new(),
            brokers: None,
            replication_factor: 1,
            min_insync_replicas: 1,
            worker_roles: vec![Role::Sequencer, Role::Router, Role::History, Role::Presence],
            chat_partitions: None,
            history_env: Vec::new(),
            history_binary: None,
            push_env: Vec::new(),
        }
    }
}

/// A port for a service to listen on. Chosen below Linux's ephemeral range
/// (32768-60999), where the many outgoing connections of the services
/// (Kafka, Cassandra) get their local ports and could take a port between
/// our probe and the service's bind; never the same port twice in one test
/// process.
fn free_port() -> anyhow::Result<SocketAddr> {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 500) as u16 * 20,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..2_000 {
        let mut port = NEXT.fetch_add(1, Ordering::SeqCst);
        if port >= 32_000 {
            NEXT.store(20_000, Ordering::SeqCst);
            port = 20_000;
        }
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return Ok(l.local_addr()?);
        }
    }
    anyhow::bail!("no free port between 20000 and 32000")
}

/// The workspace's target dir.
fn target_dir() -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target"))
}

/// Path of a workspace binary of `profile`, built if it is missing.
pub fn binary(name: &str, profile: &str) -> anyhow::Result<PathBuf> {
    let path = target_dir().join(profile).join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(repo_root())
            .args(["build", "--bins", "--workspace"]);
        if profile == "release" {
            cmd.arg("--release");
        }
        let status = cmd.status()?;
        anyhow::ensure!(status.success(), "cargo build --bins failed");
    }
    anyhow::ensure!(path.exists(), "{} not built", path.display());
    Ok(path)
}

impl Platform {
    /// Starts `gateways` gateways and `workers` instances of every worker.
    pub async fn start(test: &str, gateways: usize, workers: usize) -> anyhow::Result<Self> {
        Self::start_with(
            test,
            Options {
                gateways,
                workers,
                ..Options::default()
            },
        )
        .await
    }

    /// Starts the platform as `options` say.
    pub async fn start_with(test: &str, options: Options) -> anyhow::Result<Self> {
        let (gateways, workers) = (options.gateways, options.workers);
        let mut config = crate::log_config(test);
        if let Some(b) = &options.brokers {
            config.brokers = b.clone();
        }
        if let Some(n) = options.chat_partitions {
            config.chat_partitions = n;
        }
        config.replication_factor = options.replication_factor;
        config.min_insync_replicas = options.min_insync_replicas;
        let log = TestLog::start_config(config).await?;
        let mut store = StoreConfig::default();
        if let Ok(n) = std::env::var("CHAT_STORE__NODES") {
            store.nodes = n.split(',').map(str::to_string).collect();
        }
        store.keyspace = format!("t_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let s = store::connect(&store).await?;
        s.migrate(&store.replication).await?;
        let logs = target_dir()
            .join("e2e-logs")
            .join(log.config.topic_prefix.trim_end_matches('.'));
        std::fs::create_dir_all(&logs)?;
        let mut me = Self {
            log,
            store,
            procs: Vec::new(),
            logs,
            options,
        };
        for i in 0..workers {
            for role in me.options.worker_roles.clone() {
                me.add(role, i)?;
            }
        }
        for i in 0..gateways {
            me.add(Role::Gateway, i)?;
        }
        for i in 0..me.procs.len() {
            me.spawn(i)?;
        }
        for i in 0..me.procs.len() {
            me.wait_healthy(i).await?;
        }
        Ok(me)
    }

    fn add(&mut self, role: Role, i: usize) -> anyhow::Result<()> {
        let prefix = self.log.config.topic_prefix.clone();
        let name = format!("{}-{i}", role.bin());
        let admin = free_port()?;
        let mut env = vec![
            ("CHAT_LISTEN".to_string(), admin.to_string()),
            ("CHAT_LOG__TOPIC_PREFIX".into(), prefix.clone()),
            (
                "CHAT_LOG__CHAT_PARTITIONS".into(),
                self.log.config.chat_partitions.to_string(),
            ),
            ("CHAT_LOG__BROKERS".into(), self.log.config.brokers.clone()),
            (
                "CHAT_LOG__REPLICATION_FACTOR".into(),
                self.log.config.replication_factor.to_string(),
            ),
            (
                "CHAT_LOG__MIN_INSYNC_REPLICAS".into(),
                self.log.config.min_insync_replicas.to_string(),
            ),
            (
                "CHAT_LOG__REGISTRY_URL".into(),
                self.log.config.registry_url.clone(),
            ),
        ];
        match role {
            Role::Sequencer => {
                env.push(("CHAT_GROUP_ID".into(), format!("{prefix}sequencer")));
                env.push(("CHAT_TRANSACTIONAL_PREFIX".into(), format!("{prefix}seq")));
                env.extend(self.options.worker_env.iter().cloned());
            }
            Role::Router => {
                env.push(("CHAT_GROUP_ID".into(), format!("{prefix}router")));
                env.extend(self.options.worker_env.iter().cloned());
            }
            Role::History => {
                env.push(("CHAT_GROUP_ID".into(), format!("{prefix}history")));
                env.push(("CHAT_STORE__KEYSPACE".into(), self.store.keyspace.clone()));
                env.push(("CHAT_STORE__NODES".into(), self.store.nodes.join(",")));
                env.extend(self.options.history_env.iter().cloned());
            }
            Role::Presence => {
                env.push(("CHAT_GROUP_ID".into(), format!("{prefix}presence")));
                env.push((
                    "CHAT_TABLE_GROUP_ID".into(),
                    format!("{prefix}presence-table"),
                ));
                env.push(("CHAT_STORE__KEYSPACE".into(), self.store.keyspace.clone()));
                env.push(("CHAT_STORE__NODES".into(), self.store.nodes.join(",")));
                env.extend(self.options.presence_env.iter().cloned());
            }
            Role::Push => {
                env.push(("CHAT_GROUP_ID".into(), format!("{prefix}push")));
                env.push((
                    "CHAT_REGISTRATIONS_GROUP_ID".into(),
                    format!("{prefix}push-registrations"),
                ));
                env.push(("CHAT_STORE__KEYSPACE".into(), self.store.keyspace.clone()));
                env.push(("CHAT_STORE__NODES".into(), self.store.nodes.join(",")));
                env.extend(self.options.push_env.iter().cloned());
            }
            Role::Gateway => {
                env.push(("CHAT_GATEWAY_ID".into(), format!("{prefix}gw{i}")));
                env.push(("CHAT_DEV_LOGIN".into(), "true".into()));
                env.push(("CHAT_AUTH__HS256_SECRET".into(), TEST_SECRET.into()));
                env.push(("CHAT_STORE__KEYSPACE".into(), self.store.keyspace.clone()));
                env.push(("CHAT_STORE__NODES".into(), self.store.nodes.join(",")));
                let listen = admin.to_string();
                let mine = format!("gw{i}:");
                env.extend(self.options.gateway_env.iter().filter_map(|(k, v)| {
                    let key = match k.split_once(':') {
                        None => k.as_str(),
                        Some(_) => k.strip_prefix(&mine)?,
                    };
                    Some((key.to_string(), v.replace("{listen}", &listen)))
                }));
            }
        }
        self.procs.push(Proc {
            name,
            role,
            admin,
            env,
            child: None,
        });
        Ok(())
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let p = &mut self.procs[i];
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{}.log", p.name)))?;
        let exe = match (&self.options.history_binary, p.role) {
            (Some(path), Role::History) => path.clone(),
            _ => binary(p.role.bin(), self.options.profile)?,
        };
        let mut cmd = Command::new(exe);
        // Each process keeps its state store across restarts, as a
        // deployment with a volume per instance does.
        cmd.env("CHAT_STATE__DIR", self.logs.join("state").join(&p.name))
            .envs(p.env.iter().cloned())
            .env(
                "RUST_LOG",
                std::env::var("E2E_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        p.child = Some(cmd.spawn().with_context(|| format!("spawn {}", p.name))?);
        Ok(())
    }

    async fn wait_healthy(&mut self, i: usize) -> anyhow::Result<()> {
        let url = format!("http://{}/health", self.procs[i].admin);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = reqwest::get(&url).await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if let Some(c) = self.procs[i].child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    anyhow::bail!(
                        "{} exited with {status}: see {}",
                        self.procs[i].name,
                        self.logs.display()
                    );
                }
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{} not healthy within 60 s: see {}",
                self.procs[i].name,
                self.logs.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn index(&self, role: Role, i: usize) -> usize {
        self.procs
            .iter()
            .position(|p| p.role == role && p.name.ends_with(&format!("-{i}")))
            .expect("no such process")
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self, role: Role, i: usize) {
        let idx = self.index(role, i);
        if let Some(mut c) = self.procs[idx].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit (graceful drain).
    pub fn terminate(&mut self, role: Role, i: usize) -> anyhow::Result<std::process::ExitStatus> {
        let idx = self.index(role, i);
        let mut c = self.procs[idx].child.take().context("not running")?;
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()?;
        Ok(c.wait()?)
    }

    /// Starts a killed process again with the same settings.
    pub async fn restart(&mut self, role: Role, i: usize) -> anyhow::Result<()> {
        let idx = self.index(role, i);
        self.spawn(idx)?;
        self.wait_healthy(idx).await
    }

    /// Starts one more instance of `role` (the next index) with the same
    /// settings as the others and waits until it is healthy; returns its
    /// index (for `kill`, `restart`, `admin`).
    pub async fn start_another(&mut self, role: Role) -> anyhow::Result<usize> {
        let i = self.procs.iter().filter(|p| p.role == role).count();
        self.add(role, i)?;
        let idx = self.procs.len() - 1;
        self.spawn(idx)?;
        self.wait_healthy(idx).await?;
        Ok(i)
    }

    /// The admin address (`/health`, `/metrics`) of instance `i` of `role`.
    pub fn admin(&self, role: Role, i: usize) -> SocketAddr {
        self.procs[self.index(role, i)].admin
    }

    /// The state-store directory of process `i` of `role` (kept across its
    /// restarts; remove it to restart as a new host would).
    pub fn state_dir(&self, role: Role, i: usize) -> PathBuf {
        self.logs
            .join("state")
            .join(&self.procs[self.index(role, i)].name)
    }

    /// Where this test's process logs are written.
    pub fn logs_dir(&self) -> &std::path::Path {
        &self.logs
    }

    /// Process ids of the running processes of `role`.
    pub fn pids(&self, role: Role) -> Vec<u32> {
        self.procs
            .iter()
            .filter(|p| p.role == role)
            .filter_map(|p| p.child.as_ref().map(Child::id))
            .collect()
    }

    /// The address clients connect to on gateway `i`.
    pub fn gateway(&self, i: usize) -> SocketAddr {
        self.procs[self.index(Role::Gateway, i)].admin
    }

    /// Every gateway's address, by index (a restarted gateway keeps its own).
    pub fn gateways(&self) -> Vec<SocketAddr> {
        (0..self.options.gateways)
            .map(|i| self.gateway(i))
            .collect()
    }

    /// A token from gateway 0's development login.
    pub async fn token(&self, user: &str, device: &str) -> anyhow::Result<String> {
        let resp: serde_json::Value = reqwest::Client::new()
            .post(format!("http://{}/dev/login", self.gateway(0)))
            .json(&serde_json::json!({ "user": user, "device": device }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        resp["token"]
            .as_str()
            .map(str::to_string)
            .context("no token in dev login answer")
    }

    /// Connects `user`'s `device` to gateway `gw` and reads its `hello`.
    pub async fn connect(&self, gw: usize, user: &str, device: &str) -> anyhow::Result<Client> {
        let token = self.token(user, device).await?;
        Client::connect_to(self.gateway(gw), &token, device).await
    }

    /// Stops every process and drops the keyspace.
    pub async fn stop(mut self) {
        for p in &mut self.procs {
            if let Some(mut c) = p.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if let Ok(s) = store::connect(&self.store).await {
            let _ = s.drop_keyspace().await;
        }
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        for p in &mut self.procs {
            if let Some(mut c) = p.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A connected test client.
pub struct Client {
    pub rx: WsReader,
    pub tx: WsWriter,
    next_id: u64,
    /// Frames that arrived while [`request`](Self::request) waited for its
    /// answer, handed out first by [`next`](Self::next).
    pending: std::collections::VecDeque<serde_json::Value>,
}

impl Client {
    /// Connects `device` with `token` (from any gateway's development
    /// login) to the gateway at `addr` and reads its `hello`.
    pub async fn connect_to(addr: SocketAddr, token: &str, device: &str) -> anyhow::Result<Self> {
        let (mut rx, tx) =
            ws::connect(addr, &format!("/ws?token={token}&device={device}"), None).await?;
        match rx.recv(Duration::from_secs(10)).await? {
            Some(Incoming::Json(v)) if v["type"] == "hello" => {}
            other => anyhow::bail!("expected hello, got {other:?}"),
        }
        Ok(Client {
            rx,
            tx,
            next_id: 0,
            pending: Default::default(),
        })
    }

    /// Takes every frame set aside by `request` or `sync` (in arrival order).
    pub fn take_all_set_aside(&mut self) -> Vec<serde_json::Value> {
        self.pending.drain(..).collect()
    }

    /// Sends a request frame with a fresh `id` and waits for the frame that
    /// answers it (same id).
    pub async fn request(
        &mut self,
        mut frame: serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        self.next_id += 1;
        let id = format!("r{}", self.next_id);
        frame["id"] = serde_json::json!(id);
        self.tx.send(&frame).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.rx.recv(left).await? {
                Some(Incoming::Json(v)) if v["id"] == id.as_str() => return Ok(v),
                Some(Incoming::Json(v)) => self.pending.push_back(v),
                Some(Incoming::Closed(code, reason)) => anyhow::bail!("closed {code}: {reason}"),
                None => anyhow::bail!("no answer to {frame}"),
            }
        }
    }

    /// Sends `sync` and collects the `event` frames until `synced`; a sync
    /// answered `unavailable` (the routers have not taken the session up
    /// yet: PROTOCOL.md) is sent again. Returns the events and `synced`.
    pub async fn sync(
        &mut self,
        since: serde_json::Value,
        chats: serde_json::Value,
    ) -> anyhow::Result<(Vec<serde_json::Value>, serde_json::Value)> {
        for _ in 0..20 {
            self.tx
                .send(&serde_json::json!({"type": "sync", "id": "sync", "since": since, "chats": chats}))
                .await?;
            let mut events = Vec::new();
            let mut others = Vec::new();
            loop {
                match self.next(Duration::from_secs(60)).await? {
                    Some(Incoming::Json(v)) if v["type"] == "event" => events.push(v),
                    Some(Incoming::Json(v)) if v["type"] == "synced" => {
                        self.pending.extend(others);
                        return Ok((events, v));
                    }
                    Some(Incoming::Json(v))
                        if v["type"] == "error"
                            && v["id"] == "sync"
                            && v["code"] == "unavailable" =>
                    {
                        anyhow::ensure!(events.is_empty(), "events before a refused sync");
                        self.pending.extend(others.drain(..));
                        break;
                    }
                    Some(Incoming::Json(v)) if v["type"] == "error" && v["id"] == "sync" => {
                        anyhow::bail!("sync refused: {v}")
                    }
                    Some(Incoming::Json(v)) => others.push(v),
                    other => anyhow::bail!("sync did not complete: {other:?}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        anyhow::bail!("sync stayed unavailable")
    }

    /// Takes the first frame set aside by `request` that satisfies `pred`
    /// (frames answered before the request's answer), leaving the others.
    pub fn take_set_aside(
        &mut self,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let i = self.pending.iter().position(pred)?;
        self.pending.remove(i)
    }

    /// The next frame: first those set aside by `request`, then the socket.
    pub async fn next(&mut self, timeout: Duration) -> anyhow::Result<Option<Incoming>> {
        match self.pending.pop_front() {
            Some(v) => Ok(Some(Incoming::Json(v))),
            None => self.rx.recv(timeout).await,
        }
    }
}
