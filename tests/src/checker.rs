//! The fault suite's checker (issue 9), in the style of Jepsen's: devices
//! send continuously across the gateways and record every ack; every event
//! each device receives is recorded with its connection and arrival time; a
//! device whose connection breaks (its gateway killed, or closed by the
//! gateway) reconnects to another gateway and syncs as PROTOCOL.md asks
//! (`since` = its last checkpoint, `chats` = its last seq of every chat). At
//! the end every device's received history and Cassandra's history are
//! compared with the acks: lost, duplicated, reordered, and the longest time
//! the platform refused or stalled writes.
//!
//! Only acks a client received count as acknowledged: a send whose answer
//! was lost with a killed gateway is sent again with the same
//! `client_msg_id` after the reconnect (the platform must answer it with the
//! seq it already has, not append it twice).
//!
//! A device treats `(chat, seq)` as an event's identity, as PROTOCOL.md
//! asks: a repeat of an event on a later connection is dropped and counted
//! as a repeat (allowed), a repeat on the same connection is a duplicate.

use crate::platform::{Client, Options, Platform};
use crate::ws::Incoming;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The cluster `infra/stack.sh cluster-up` starts (override: CHAT_CLUSTER_BROKERS).
pub const CLUSTER: &str = "127.0.0.1:19092,127.0.0.1:19094,127.0.0.1:19096";
/// The users of the load: each sends from one device and is in every chat.
pub const USERS: [&str; 4] = ["ann", "bob", "cat", "dan"];
/// Groups of all users the load sends to, round robin.
pub const CHATS: usize = 6;
/// How long the final reads (every device's events, Cassandra's history) may take.
pub const WAIT: Duration = Duration::from_secs(120);
/// How long a message may stay unacknowledged after sending stopped before
/// the checker gives up on it.
pub const GIVE_UP: Duration = Duration::from_secs(60);
/// How long a device keeps trying to reconnect and sync.
pub const RECONNECT_FOR: Duration = Duration::from_secs(180);

/// The 3-broker cluster's bootstrap servers, or None (with a message saying
/// the test is skipped) when nothing listens there.
pub fn cluster_or_skip(test: &str) -> Option<String> {
    let brokers = std::env::var("CHAT_CLUSTER_BROKERS").unwrap_or_else(|_| CLUSTER.into());
    let first: SocketAddr = brokers.split(',').next()?.parse().ok()?;
    if std::net::TcpStream::connect_timeout(&first, Duration::from_secs(1)).is_err() {
        eprintln!(
            "SKIPPED {test}: the 3-broker cluster is not running (nothing at {first}): \
             start it with `make cluster-up`, or run `make test-faults`"
        );
        return None;
    }
    Some(brokers)
}

/// The platform of the fault tests on the cluster: 2 gateways, `workers` of
/// each worker, replication 3, `min.insync.replicas` 2, send limits high
/// enough that the load is not rate limited.
pub fn cluster_options(brokers: String, workers: usize) -> Options {
    Options {
        gateways: 2,
        workers,
        brokers: Some(brokers),
        replication_factor: 3,
        min_insync_replicas: 2,
        gateway_env: env(&[
            ("CHAT_LIMITS__SEND_RATE_PER_S", "100"),
            ("CHAT_LIMITS__SEND_BURST", "200"),
        ]),
        ..Options::default()
    }
}

/// `(key, value)` pairs as the harness's environment lists.
pub fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// One acknowledged message, as its sender saw it.
#[derive(Clone, Debug)]
pub struct Ack {
    pub chat: String,
    pub seq: u64,
    pub client_msg_id: String,
    /// Since the load's clock started: first attempt, and the ack.
    pub first_sent: Duration,
    pub acked: Duration,
    pub attempts: u32,
}

/// One `event` frame a device received.
#[derive(Clone, Debug)]
pub struct Received {
    pub chat: String,
    pub seq: u64,
    pub client_msg_id: String,
    /// The device's connection it came on (0: the first).
    pub conn: u32,
    /// Since the load's clock started.
    pub at: Duration,
    /// From a `sync` answer (false: live).
    pub from_sync: bool,
}

#[derive(Default, Debug)]
pub struct SenderReport {
    pub acks: Vec<Ack>,
    pub unavailable: u32,
    pub rate_limited: u32,
    /// Requests the gateway did not answer within the client's 30 s.
    pub unanswered: u32,
    /// Still not acknowledged a minute after sending stopped (given up).
    pub unacked: Vec<String>,
    /// Sends refused with another code than `unavailable`/`rate_limited`
    /// (none is expected: every chat exists and every sender is a member).
    pub refused: Vec<String>,
}

/// A user's device: its connection (replaced on reconnect) and everything
/// it received and was answered.
pub struct Device {
    pub user: String,
    pub device: String,
    token: String,
    gateways: Vec<SocketAddr>,
    /// The gateway it is connected to.
    pub gw: usize,
    client: Client,
    /// Its current connection (0: the first).
    pub conn: u32,
    pub events: Vec<Received>,
    checkpoint: Value,
    /// When and why a connection broke.
    pub reconnects: Vec<(Duration, String)>,
    /// A reconnect that did not succeed within [`RECONNECT_FOR`].
    pub failed: Option<String>,
    pub sender: SenderReport,
    t0: Instant,
}

enum Answer {
    Frame(Value),
    /// Nothing within the client's 30 s.
    None,
    /// The connection broke; the device reconnected and synced.
    Reconnected,
}

impl Device {
    /// Connects `user`'s `device` to gateway `gw` and syncs it (a new device).
    pub async fn connect(
        p: &Platform,
        gw: usize,
        user: &str,
        device: &str,
        t0: Instant,
    ) -> anyhow::Result<Self> {
        let token = p.token(user, device).await?;
        let gateways = p.gateways();
        let client = Client::connect_to(gateways[gw], &token, device).await?;
        let mut d = Self {
            user: user.into(),
            device: device.into(),
            token,
            gateways,
            gw,
            client,
            conn: 0,
            events: Vec::new(),
            checkpoint: Value::Null,
            reconnects: Vec::new(),
            failed: None,
            sender: SenderReport::default(),
            t0,
        };
        d.sync().await?;
        Ok(d)
    }

    fn record(&mut self, v: &Value, from_sync: bool) {
        if v["type"] != "event" {
            return;
        }
        let Some(seq) = v["seq"].as_u64() else {
            return;
        };
        self.events.push(Received {
            chat: v["chat"].as_str().unwrap_or_default().to_string(),
            seq,
            client_msg_id: v["client_msg_id"].as_str().unwrap_or_default().to_string(),
            conn: self.conn,
            at: self.t0.elapsed(),
            from_sync,
        });
    }

    /// Records the frames `request`/`sync` set aside (live events).
    fn absorb(&mut self) {
        for v in self.client.take_all_set_aside() {
            self.record(&v, false);
        }
    }

    /// The highest seq received of every chat.
    pub fn tops(&self) -> HashMap<String, u64> {
        let mut top: HashMap<String, u64> = HashMap::new();
        for e in &self.events {
            let t = top.entry(e.chat.clone()).or_default();
            *t = (*t).max(e.seq);
        }
        top
    }

    /// `sync` with the last checkpoint and the last seq of every chat held.
    async fn sync(&mut self) -> anyhow::Result<()> {
        let chats: serde_json::Map<String, Value> = self
            .tops()
            .into_iter()
            .map(|(c, s)| (c, json!(s)))
            .collect();
        let (events, synced) = self
            .client
            .sync(self.checkpoint.clone(), Value::Object(chats))
            .await?;
        for v in &events {
            self.record(v, true);
        }
        self.checkpoint = synced["checkpoint"].clone();
        self.absorb();
        Ok(())
    }

    /// After a broken connection: connects to the next gateway (the other
    /// one first), syncs, retrying until [`RECONNECT_FOR`] has passed.
    async fn reconnect(&mut self, why: String) -> anyhow::Result<()> {
        self.absorb();
        eprintln!(
            "{}/{}: connection {} to gateway {} broke at {:.1}s: {why}",
            self.user,
            self.device,
            self.conn,
            self.gw,
            self.t0.elapsed().as_secs_f64()
        );
        self.reconnects.push((self.t0.elapsed(), why));
        let started = Instant::now();
        let mut last_err = String::new();
        while started.elapsed() < RECONNECT_FOR {
            self.gw = (self.gw + 1) % self.gateways.len();
            match Client::connect_to(self.gateways[self.gw], &self.token, &self.device).await {
                Ok(c) => {
                    self.client = c;
                    self.conn += 1;
                    match self.sync().await {
                        Ok(()) => {
                            eprintln!(
                                "{}/{}: connection {} to gateway {} synced at {:.1}s",
                                self.user,
                                self.device,
                                self.conn,
                                self.gw,
                                self.t0.elapsed().as_secs_f64()
                            );
                            return Ok(());
                        }
                        Err(e) => last_err = format!("sync on gateway {}: {e:#}", self.gw),
                    }
                }
                Err(e) => last_err = format!("connect to gateway {}: {e:#}", self.gw),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let msg = format!(
            "{}/{}: no connection synced within {RECONNECT_FOR:?}: {last_err}",
            self.user, self.device
        );
        self.failed = Some(msg.clone());
        anyhow::bail!(msg)
    }

    /// A request; a broken connection is replaced (reconnect and sync) and
    /// reported so the caller sends the request again.
    async fn request(&mut self, frame: Value) -> anyhow::Result<Answer> {
        let r = self.client.request(frame).await;
        self.absorb();
        match r {
            Ok(v) => Ok(Answer::Frame(v)),
            Err(e) if e.to_string().starts_with("no answer") => Ok(Answer::None),
            Err(e) => {
                self.reconnect(format!("{e:#}")).await?;
                Ok(Answer::Reconnected)
            }
        }
    }

    /// Sends messages round-robin over `chats` until `stop`, each retried
    /// with the same `client_msg_id` until acknowledged (as PROTOCOL.md asks
    /// of a client answered `unavailable`, or whose connection broke).
    async fn send_until_stopped(&mut self, chats: &[String], stop: Arc<AtomicBool>) {
        let user = self.user.clone();
        let mut i = 0usize;
        'messages: while !stop.load(Ordering::Relaxed) {
            let chat = &chats[i % chats.len()];
            let client_msg_id = format!("{user}-{i}");
            let first_sent = self.t0.elapsed();
            let started = Instant::now();
            let mut attempts = 0;
            loop {
                if stop.load(Ordering::Relaxed) && started.elapsed() > GIVE_UP {
                    self.sender.unacked.push(client_msg_id);
                    break 'messages;
                }
                attempts += 1;
                let frame = json!({"type": "send", "chat": chat, "client_msg_id": client_msg_id,
                    "text": format!("{user} #{i}")});
                let a = match self.request(frame).await {
                    Ok(Answer::Frame(a)) => a,
                    Ok(Answer::None) => {
                        self.sender.unanswered += 1;
                        continue;
                    }
                    Ok(Answer::Reconnected) => continue,
                    Err(_) => {
                        self.sender.unacked.push(client_msg_id);
                        break 'messages;
                    }
                };
                if a["type"] == "ack" {
                    assert_eq!(a["client_msg_id"], client_msg_id.as_str(), "{a}");
                    self.sender.acks.push(Ack {
                        chat: chat.clone(),
                        seq: a["seq"].as_u64().unwrap(),
                        client_msg_id: client_msg_id.clone(),
                        first_sent,
                        acked: self.t0.elapsed(),
                        attempts,
                    });
                    break;
                }
                match a["code"].as_str() {
                    Some("unavailable") => {
                        self.sender.unavailable += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Some("rate_limited") => {
                        self.sender.rate_limited += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    _ => {
                        eprintln!(
                            "{user}: {client_msg_id} refused at {:.1}s: {a}",
                            self.t0.elapsed().as_secs_f64()
                        );
                        self.sender
                            .refused
                            .push(format!("{client_msg_id}: {}", a["code"]));
                        break;
                    }
                }
            }
            i += 1;
        }
    }

    /// Reads events (reconnecting when the connection breaks) until every
    /// chat of `until` reached its seq, or `deadline`; Err says what is missing.
    async fn receive_until(
        &mut self,
        until: &HashMap<String, u64>,
        deadline: Instant,
    ) -> anyhow::Result<()> {
        loop {
            let top = self.tops();
            let behind: Vec<String> = until
                .iter()
                .filter(|(chat, max)| top.get(*chat).copied().unwrap_or(0) < **max)
                .map(|(chat, max)| format!("{chat}: {} of {max}", top.get(chat).unwrap_or(&0)))
                .collect();
            if behind.is_empty() {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                anyhow::bail!("events stopped before the last acked seq: {behind:?}");
            }
            match self.client.next(left).await {
                Ok(Some(Incoming::Json(v))) => self.record(&v, false),
                Ok(Some(Incoming::Closed(code, reason))) => {
                    self.reconnect(format!("closed {code}: {reason}")).await?
                }
                Ok(None) => {}
                Err(e) => self.reconnect(format!("{e:#}")).await?,
            }
        }
    }
}

/// What a sequence of (seq, client_msg_id) of one chat shows against the acks.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub lost: usize,
    pub duplicated: usize,
    pub reordered: usize,
}

impl Tally {
    pub fn is_clean(&self) -> bool {
        *self == Tally::default()
    }
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, o: Self) {
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
    }
}

/// `seen`: one chat's events in the order they arrived (or were read).
/// Lost: an acked (seq, client_msg_id) not there, or a seq of 1..=`max`
/// missing. Duplicated: a seq seen twice, or a client_msg_id at two seqs.
/// Reordered: a seq not above the previous one, or a sender's messages in
/// another order than it sent them (ids are `<user>-<i>`).
pub fn tally(seen: &[(u64, String)], acked: &[&Ack], max: u64) -> Tally {
    let mut t = Tally::default();
    let by_seq: HashMap<u64, &str> = seen.iter().map(|(s, id)| (*s, id.as_str())).collect();
    for a in acked {
        if by_seq.get(&a.seq) != Some(&a.client_msg_id.as_str()) {
            t.lost += 1;
        }
    }
    let missing = (1..=max).filter(|s| !by_seq.contains_key(s)).count();
    t.lost = t.lost.max(missing);
    let mut seqs = HashSet::new();
    let mut ids: HashMap<&str, u64> = HashMap::new();
    let mut prev = 0;
    let mut last_of_sender: HashMap<&str, u64> = HashMap::new();
    for (seq, id) in seen {
        if !seqs.insert(*seq) {
            t.duplicated += 1;
            continue;
        }
        if !id.is_empty() {
            match ids.insert(id.as_str(), *seq) {
                Some(other) if other != *seq => t.duplicated += 1,
                _ => {}
            }
            if let Some((sender, n)) = id.rsplit_once('-') {
                if let Ok(n) = n.parse::<u64>() {
                    let last = last_of_sender.entry(sender).or_insert(0);
                    if n < *last {
                        t.reordered += 1;
                    }
                    *last = n;
                }
            }
        }
        if *seq <= prev {
            t.reordered += 1;
        }
        prev = *seq;
    }
    t
}

/// The longest interval in `[from, to]` with no ack at all, and its start.
pub fn longest_gap(mut times: Vec<Duration>, from: Duration, to: Duration) -> (Duration, Duration) {
    times.retain(|t| *t >= from && *t <= to);
    times.sort();
    let mut best = (Duration::ZERO, from);
    let mut prev = from;
    for t in times.into_iter().chain([to]) {
        if t - prev > best.0 {
            best = (t - prev, prev);
        }
        prev = t;
    }
    best
}

/// The continuous load: one sending device per user, all in every chat.
pub struct Load {
    pub t0: Instant,
    pub chats: Vec<String>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Device>>,
    marks: Vec<(String, Duration)>,
}

impl Load {
    /// Connects [`USERS`] (alternating over the gateways), creates
    /// [`CHATS`] groups of all of them and starts sending.
    pub async fn start(p: &Platform) -> Self {
        let t0 = Instant::now();
        let gateways = p.gateways().len();
        let mut devices = Vec::new();
        for (i, u) in USERS.iter().enumerate() {
            let d = Device::connect(p, i % gateways, u, &format!("{u}-dev"), t0)
                .await
                .unwrap_or_else(|e| panic!("{u}: {e:#}"));
            devices.push(d);
        }
        let mut chats = Vec::new();
        for g in 0..CHATS {
            // `unavailable` (the sequencers still joining their group on a
            // fresh cluster) is retried with the same client_msg_id.
            let mut tries = 0;
            let ack = loop {
                let a = devices[0]
                    .client
                    .request(
                        json!({"type": "create_chat", "kind": "group", "title": format!("g{g}"),
                        "members": &USERS[1..], "client_msg_id": format!("create-{g}")}),
                    )
                    .await
                    .unwrap();
                tries += 1;
                if a["code"] == "unavailable" && tries < 10 {
                    eprintln!("create_chat g{g}: {a}; again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                break a;
            };
            assert_eq!(ack["type"], "ack", "{ack}");
            chats.push(ack["chat"].as_str().unwrap().to_string());
        }
        // The clock starts with the sending.
        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (i, mut d) in devices.into_iter().enumerate() {
            d.absorb();
            d.t0 = t0;
            let stop = stop.clone();
            // Each device starts on a different chat.
            let mut mine = chats.clone();
            mine.rotate_left(i);
            tasks.push(tokio::spawn(async move {
                d.send_until_stopped(&mine, stop).await;
                d
            }));
        }
        Self {
            t0,
            chats,
            stop,
            tasks,
            marks: Vec::new(),
        }
    }

    /// The load's clock.
    pub fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    /// Notes a moment (printed with the figures); returns it.
    pub fn mark(&mut self, what: &str) -> Duration {
        let at = self.now();
        eprintln!("[{:6.1}s] {what}", at.as_secs_f64());
        self.marks.push((what.to_string(), at));
        at
    }

    /// Stops sending, waits for the last answers, reads every device's
    /// events up to the last acked seq of every chat and Cassandra's
    /// history, compares them with the acks and prints the figures
    /// (`FAULTS <label> ...` lines). `fault_at`: from when stalls count.
    pub async fn finish(mut self, p: &Platform, label: &str, fault_at: Duration) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        let stopped_at = self.mark("sending stopped");
        let mut devices = Vec::new();
        for t in self.tasks {
            devices.push(t.await.expect("a sender panicked"));
        }
        let acks: Vec<Ack> = devices
            .iter()
            .flat_map(|d| d.sender.acks.iter().cloned())
            .collect();
        let mut until: HashMap<String, u64> = HashMap::new();
        let mut acked_by_chat: HashMap<&str, Vec<&Ack>> = HashMap::new();
        for a in &acks {
            let u = until.entry(a.chat.clone()).or_default();
            *u = (*u).max(a.seq);
            acked_by_chat.entry(a.chat.as_str()).or_default().push(a);
        }
        // The acks themselves: one seq per (chat, seq).
        let mut ack_dups = 0;
        let mut seen_ack: HashSet<(&str, u64)> = HashSet::new();
        for a in &acks {
            if !seen_ack.insert((a.chat.as_str(), a.seq)) {
                ack_dups += 1;
            }
        }

        // What every device received.
        let mut failures = Vec::new();
        let deadline = Instant::now() + WAIT;
        for d in &mut devices {
            if let Some(f) = &d.failed {
                failures.push(f.clone());
                continue;
            }
            if let Err(e) = d.receive_until(&until, deadline).await {
                failures.push(format!("{}/{}: {e:#}", d.user, d.device));
            }
        }
        let mut clients = Tally::default();
        let mut repeats = 0;
        for d in &devices {
            let mut per_chat: HashMap<&str, Vec<(u64, String)>> = HashMap::new();
            // (chat, seq) -> (connection, client_msg_id) of its first arrival.
            let mut first: HashMap<(&str, u64), (u32, &str)> = HashMap::new();
            let mut in_conn_dups = 0;
            for e in &d.events {
                match first.get(&(e.chat.as_str(), e.seq)) {
                    None => {
                        first.insert((e.chat.as_str(), e.seq), (e.conn, e.client_msg_id.as_str()));
                        per_chat
                            .entry(e.chat.as_str())
                            .or_default()
                            .push((e.seq, e.client_msg_id.clone()));
                    }
                    // A repeat on a later connection with the same content:
                    // the client drops it (PROTOCOL.md).
                    Some((conn, id)) if *conn != e.conn && *id == e.client_msg_id => repeats += 1,
                    Some(_) => in_conn_dups += 1,
                }
            }
            let mut dt = Tally {
                duplicated: in_conn_dups,
                ..Tally::default()
            };
            for chat in &self.chats {
                let seen = per_chat.remove(chat.as_str()).unwrap_or_default();
                let acked = acked_by_chat
                    .get(chat.as_str())
                    .cloned()
                    .unwrap_or_default();
                let t = tally(&seen, &acked, until.get(chat).copied().unwrap_or(0));
                if !t.is_clean() {
                    eprintln!("{}/{} chat {chat}: {t:?}", d.user, d.device);
                }
                dt += t;
            }
            if in_conn_dups > 0 {
                eprintln!(
                    "{}/{}: {in_conn_dups} events twice on one connection",
                    d.user, d.device
                );
            }
            clients += dt;
        }

        // Cassandra's history of every chat, once the projector caught up.
        let mut store_tally = Tally::default();
        match chat_projectors::store::connect(&p.store).await {
            Err(e) => failures.push(format!("cassandra: {e:#}")),
            Ok(store) => {
                let deadline = Instant::now() + WAIT;
                for chat in &self.chats {
                    let id: uuid::Uuid = chat.parse().unwrap();
                    let max = until.get(chat).copied().unwrap_or(0);
                    loop {
                        let last = store.last_seq(id).await.ok().flatten().unwrap_or(0);
                        if last >= max {
                            break;
                        }
                        if Instant::now() > deadline {
                            failures.push(format!(
                                "cassandra: history of {chat} at seq {last}, not {max}"
                            ));
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    let rows = match store.messages_page(id, None, Some(0), 1_000_000).await {
                        Ok(rows) => rows,
                        Err(e) => {
                            failures.push(format!("cassandra: history of {chat}: {e:#}"));
                            continue;
                        }
                    };
                    let seen: Vec<(u64, String)> = rows
                        .iter()
                        .map(|r| (r.seq, r.client_msg_id.clone().unwrap_or_default()))
                        .collect();
                    let acked = acked_by_chat
                        .get(chat.as_str())
                        .cloned()
                        .unwrap_or_default();
                    let t = tally(&seen, &acked, max);
                    if !t.is_clean() {
                        eprintln!("cassandra chat {chat}: {t:?}");
                    }
                    store_tally += t;
                }
            }
        }

        let times: Vec<Duration> = acks.iter().map(|a| a.acked).collect();
        let stall = longest_gap(times.clone(), fault_at, stopped_at);
        let (base_gap, _) = longest_gap(times, Duration::ZERO, fault_at);
        let sum = |f: fn(&SenderReport) -> u32| devices.iter().map(|d| f(&d.sender)).sum::<u32>();
        let (unavailable, rate_limited, unanswered) = (
            sum(|r| r.unavailable),
            sum(|r| r.rate_limited),
            sum(|r| r.unanswered),
        );
        let unacked: Vec<String> = devices
            .iter()
            .flat_map(|d| d.sender.unacked.iter().cloned())
            .collect();
        let refused: Vec<String> = devices
            .iter()
            .flat_map(|d| d.sender.refused.iter().cloned())
            .collect();
        let reconnects: Vec<String> = devices
            .iter()
            .flat_map(|d| {
                d.reconnects.iter().map(|(at, why)| {
                    format!("{}/{} at {:.1}s: {why}", d.user, d.device, at.as_secs_f64())
                })
            })
            .collect();
        // The devices' connections close when they are dropped below (the
        // gateways then log `SessionClosed`): closes from now on are the
        // checker's own.
        let released_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        let report = Report {
            label: label.to_string(),
            released_ms,
            logs: p.logs_dir().display().to_string(),
            acks,
            clients,
            store: store_tally,
            ack_dups,
            repeats,
            reconnects,
            unacked,
            refused,
            failures,
            stall,
            base_gap,
            fault_at,
            stopped_at,
            devices: devices
                .into_iter()
                .map(|d| DeviceRecord {
                    user: d.user,
                    device: d.device,
                    events: d.events,
                    reconnects: d.reconnects.len(),
                })
                .collect(),
        };
        report.print(&self.marks, unavailable, rate_limited, unanswered);
        report
    }
}

/// What one device ended with.
pub struct DeviceRecord {
    pub user: String,
    pub device: String,
    pub events: Vec<Received>,
    pub reconnects: usize,
}

/// The figures of one run.
pub struct Report {
    pub label: String,
    pub logs: String,
    pub acks: Vec<Ack>,
    pub clients: Tally,
    pub store: Tally,
    /// Two acks naming the same (chat, seq).
    pub ack_dups: usize,
    /// Events received again on a later connection (dropped by (chat, seq)).
    pub repeats: usize,
    /// Every broken connection: who, when, why.
    pub reconnects: Vec<String>,
    pub unacked: Vec<String>,
    pub refused: Vec<String>,
    /// Devices that could not reconnect or did not get every acked event,
    /// history that did not catch up.
    pub failures: Vec<String>,
    /// Longest time with no ack at all from the fault on, and its start.
    pub stall: (Duration, Duration),
    /// The same before the fault.
    pub base_gap: Duration,
    pub fault_at: Duration,
    pub stopped_at: Duration,
    pub devices: Vec<DeviceRecord>,
    /// Wall clock (ms since the epoch) when the checker closed the devices'
    /// connections (a `SessionClosed` after it is the checker's own).
    pub released_ms: i64,
}

impl Report {
    fn print(
        &self,
        marks: &[(String, Duration)],
        unavailable: u32,
        rate_limited: u32,
        unanswered: u32,
    ) {
        let l = &self.label;
        let before = self.acks.iter().filter(|a| a.acked < self.fault_at).count();
        let retried = self.acks.iter().filter(|a| a.attempts > 1).count();
        let marks: Vec<String> = marks
            .iter()
            .map(|(w, at)| format!("{w} at {:.1}s", at.as_secs_f64()))
            .collect();
        eprintln!("\nFAULTS {l}: {}", marks.join(", "));
        eprintln!(
            "FAULTS {l}: acked {} messages ({before} before the fault), {retried} needed a retry; \
             answers unavailable {unavailable}, rate_limited {rate_limited}, none within 30 s {unanswered}",
            self.acks.len()
        );
        eprintln!(
            "FAULTS {l}: clients ({} devices x {} chats): lost {}, duplicated {}, reordered {}; \
             cassandra: lost {}, duplicated {}, reordered {}; acks naming one seq twice: {}; \
             repeats after a reconnect (dropped by (chat, seq)): {}",
            self.devices.len(),
            CHATS,
            self.clients.lost,
            self.clients.duplicated,
            self.clients.reordered,
            self.store.lost,
            self.store.duplicated,
            self.store.reordered,
            self.ack_dups,
            self.repeats
        );
        let slowest = self.acks.iter().max_by_key(|a| a.acked - a.first_sent);
        eprintln!(
            "FAULTS {l}: longest stall: {} ms with no ack at all (from {:.1}s; before the fault the longest was {} ms); \
             slowest message {}",
            self.stall.0.as_millis(),
            self.stall.1.as_secs_f64(),
            self.base_gap.as_millis(),
            slowest
                .map(|a| format!(
                    "{} ms from first attempt to ack ({} attempts, {})",
                    (a.acked - a.first_sent).as_millis(),
                    a.attempts,
                    a.client_msg_id
                ))
                .unwrap_or_else(|| "none".into())
        );
        eprintln!(
            "FAULTS {l}: reconnects {} {:?}; refused sends {}; unacked {}; failures {:?}; logs in {}",
            self.reconnects.len(),
            self.reconnects,
            self.refused.len(),
            self.unacked.len(),
            self.failures,
            self.logs
        );
    }

    /// Fails the test if anything acknowledged was lost, duplicated or
    /// reordered (on a device or in Cassandra), or the run shows nothing.
    pub fn assert_nothing_lost(&self) {
        let logs = &self.logs;
        assert!(
            self.failures.is_empty(),
            "{}: {:?}; logs in {logs}",
            self.label,
            self.failures
        );
        assert!(
            self.unacked.is_empty(),
            "messages never acknowledged (the platform did not recover): {:?}; logs in {logs}",
            self.unacked
        );
        assert!(
            self.refused.is_empty(),
            "sends refused after the fault (the sequencer lost state?): {:?}; logs in {logs}",
            self.refused
        );
        // Debug builds on a shared 2-core box ack a few messages a second
        // at worst; fewer than this means the platform hardly worked.
        assert!(self.acks.len() > 20, "too few messages to mean anything");
        assert_eq!(
            self.ack_dups, 0,
            "two acks named the same seq; logs in {logs}"
        );
        assert!(
            self.clients.is_clean(),
            "clients: {:?}; logs in {logs}",
            self.clients
        );
        assert!(
            self.store.is_clean(),
            "cassandra: {:?}; logs in {logs}",
            self.store
        );
    }

    /// Acks acknowledged in `[from, to)`.
    pub fn acked_between(&self, from: Duration, to: Duration) -> usize {
        self.acks
            .iter()
            .filter(|a| a.acked >= from && a.acked < to)
            .count()
    }
}

/// A service's `/metrics` samples whose name contains any of `names`.
pub async fn metrics(admin: SocketAddr, names: &[&str]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(r) = reqwest::get(format!("http://{admin}/metrics")).await else {
        return out;
    };
    let Ok(text) = r.text().await else {
        return out;
    };
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if names.iter().any(|n| name.contains(n)) {
            if let Ok(v) = value.parse() {
                out.insert(name.to_string(), v);
            }
        }
    }
    out
}
