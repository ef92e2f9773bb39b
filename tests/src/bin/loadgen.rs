//! `loadgen`: the send -> deliver benchmark of the whole platform.
//!
//! Starts the platform from the release binaries (G gateways, one instance of
//! each worker) against the running stack (`make infra-up`), opens N
//! WebSocket connections spread over the gateways and over 127.0.0.x source
//! addresses, makes M group chats (every user in one), and drives an
//! open-loop send rate. Clients behave like the browser app: each sends a
//! `delivered` receipt 300 ms after the last event it got (a trailing
//! debounce), and the share `--reading` of them has the chat open and also
//! sends `read` 150 ms after it (`--no-receipts` switches both off).
//!
//! It prints send->deliver latency (p50/p99/p99.9, HDR histogram, measured at
//! every recipient), where the time goes (send -> sequenced, sequenced ->
//! delivered), deliveries against the expected count, errors, the CPU
//! seconds of every process of the platform over the run (Kafka, Cassandra,
//! the registry and each service, from `/proc/<pid>/stat`; the load
//! generator's own excluded) and the CPU per message, and gateway memory per
//! idle connection (RSS delta / connections). `--sweep` raises the rate step
//! by step on the same platform until p99 passes `--sweep-p99-ms` and reports
//! the highest rate that stayed under it. Each scenario's latest result is
//! kept in its own section of the report (default `tests/reports/loadgen.md`).
//!
//! `cargo run --release -p chat-tests --bin loadgen -- --help`

use anyhow::Context;
use chat_tests::platform::{Options, Platform, Role};
use chat_tests::ws::{self, Incoming, WsWriter};
use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Mutex as AsyncMutex;

#[derive(Parser, Debug, Clone)]
#[command(
    about = "send->deliver latency, CPU per message and gateway memory of the whole platform"
)]
struct Args {
    /// WebSocket connections (one user and device each).
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Gateway processes the connections are spread over.
    #[arg(long, default_value_t = 2)]
    gateways: usize,
    /// Group chats; every user is in exactly one (group size = connections / chats).
    #[arg(long, default_value_t = 1_000)]
    chats: usize,
    /// Open-loop send rate, messages per second (over all chats); the first rate of a sweep.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// How long to send, seconds (per step of a sweep).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Source addresses 127.0.0.2 .. 127.0.0.(1+n) used round-robin.
    #[arg(long, default_value_t = 4)]
    source_ips: u8,
    /// Partitions of every chat topic: 3 like every earlier run of this
    /// benchmark (a one-box deployment); production's default is 12, which
    /// costs more per message at a given rate (fewer records per request).
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// Send no `delivered`/`read` receipts (the browser app sends them).
    #[arg(long)]
    no_receipts: bool,
    /// Share of clients that have their chat open and also send `read`.
    #[arg(long, default_value_t = 0.2)]
    reading: f64,
    /// Raise the rate by `--sweep-factor` per step until p99 > `--sweep-p99-ms`.
    #[arg(long)]
    sweep: bool,
    #[arg(long, default_value_t = 1.5)]
    sweep_factor: f64,
    #[arg(long, default_value_t = 100)]
    sweep_p99_ms: u64,
    /// Highest rate a sweep tries.
    #[arg(long, default_value_t = 20_000)]
    sweep_max: u64,
    /// After the last send, how long to wait for every delivery (an
    /// overloaded platform delivers late, not never: the count is checked).
    #[arg(long, default_value_t = 180)]
    drain_secs: u64,
    /// Where to write the report ("-" for none).
    #[arg(long, default_value = "tests/reports/loadgen.md")]
    report: String,
    /// The report section this run replaces (default: derived from the load).
    #[arg(long)]
    section: Option<String>,
}

/// The measurements of one rate (one step of a sweep).
struct Step {
    /// client_msg_id -> send instant.
    sent_at: Mutex<HashMap<String, Instant>>,
    /// send -> delivered, microseconds, at every recipient.
    e2e: Mutex<Histogram<u64>>,
    /// send -> sequenced and sequenced -> delivered, milliseconds (wall clock).
    to_seq: Mutex<Histogram<u64>>,
    seq_to_deliver: Mutex<Histogram<u64>>,
    delivered: AtomicU64,
}

impl Step {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            sent_at: Mutex::new(HashMap::new()),
            e2e: Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 3)?),
            to_seq: Mutex::new(Histogram::new_with_bounds(1, 120_000, 3)?),
            seq_to_deliver: Mutex::new(Histogram::new_with_bounds(1, 120_000, 3)?),
            delivered: AtomicU64::new(0),
        })
    }
}

/// Shared measurements.
struct Stats {
    /// Steps by index; a message id `s<step>-<k>` names its step.
    steps: Mutex<Vec<Arc<Step>>>,
    acks: AtomicU64,
    errors: AtomicU64,
    receipts_sent: AtomicU64,
    receipt_errors: AtomicU64,
    /// Set before the platform stops: closed connections are expected then.
    stopping: std::sync::atomic::AtomicBool,
}

impl Stats {
    fn step(&self, id: &str) -> Option<Arc<Step>> {
        let n: usize = id.strip_prefix('s')?.split('-').next()?.parse().ok()?;
        self.steps.lock().unwrap().get(n).cloned()
    }
}

/// Receipts a client owes, sent by one ticker for all connections.
#[derive(Default)]
struct Owed {
    /// connection index -> (chat, delivered (seq, due), read (seq, due)).
    pending: Mutex<HashMap<usize, Pending>>,
}

#[derive(Default)]
struct Pending {
    chat: String,
    delivered: Option<(i64, Instant)>,
    read: Option<(i64, Instant)>,
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// User + system CPU time of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name, which may contain spaces: state is
            // field 3, utime 14, stime 15.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

fn clock_ticks_per_sec() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The processes whose CPU is the platform's: the stack's servers (pid files
/// of `infra/stack.sh`) and every service this run started.
fn platform_processes(platform: &Platform) -> Vec<(String, Vec<u32>)> {
    let run = std::env::var("CHAT_RUN_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| chat_tests::repo_root().join(".run"));
    let mut out = Vec::new();
    for name in ["kafka", "cassandra", "registry"] {
        let pid = std::fs::read_to_string(run.join(name).join("pid"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        out.push((name.to_string(), pid.into_iter().collect()));
    }
    for (name, role) in [
        ("gateways", Role::Gateway),
        ("sequencer", Role::Sequencer),
        ("router", Role::Router),
        ("history", Role::History),
        ("presence", Role::Presence),
    ] {
        out.push((name.to_string(), platform.pids(role)));
    }
    out
}

/// CPU seconds per process group between two samples.
struct CpuSample(Vec<(String, u64)>);

impl CpuSample {
    fn take(procs: &[(String, Vec<u32>)]) -> Self {
        Self(
            procs
                .iter()
                .map(|(n, pids)| (n.clone(), pids.iter().map(|p| cpu_ticks(*p)).sum()))
                .collect(),
        )
    }

    /// (name, seconds) since `earlier`, and the total.
    fn since(&self, earlier: &CpuSample, hz: f64) -> (Vec<(String, f64)>, f64) {
        let per: Vec<(String, f64)> = self
            .0
            .iter()
            .zip(&earlier.0)
            .map(|((n, b), (_, a))| (n.clone(), b.saturating_sub(*a) as f64 / hz))
            .collect();
        let total = per.iter().map(|(_, s)| s).sum();
        (per, total)
    }
}

struct Conn {
    user: String,
    writer: Arc<AsyncMutex<WsWriter>>,
}

/// The result of one rate.
struct RateResult {
    rate: u64,
    sent: u64,
    send_secs: f64,
    delivered: u64,
    expected: u64,
    e2e: Histogram<u64>,
    to_seq: Histogram<u64>,
    seq_del: Histogram<u64>,
    cpu: Vec<(String, f64)>,
    cpu_total: f64,
    window_secs: f64,
    receipts: u64,
    /// From the last send until every delivery arrived (or the drain timed out).
    drained_secs: f64,
    rss_busy: u64,
    /// Sequencer transactions committed and their total time (seconds).
    txns: f64,
    txn_secs: f64,
    /// Commands the sequencer handled.
    commands: f64,
}

impl RateResult {
    fn p99_ms(&self) -> f64 {
        self.e2e.value_at_quantile(0.99) as f64 / 1000.0
    }

    fn complete(&self) -> bool {
        self.delivered >= self.expected
    }

    fn summary(&self) -> String {
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let cpu_line = self
            .cpu
            .iter()
            .map(|(n, s)| format!("{n} {s:.1}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "rate {} msg/s offered for {:.0} s ({:.0} msg/s sent), receipts sent {}\n\
             deliveries {} of {} expected ({:.1} s after the last send)\n\
             send->deliver ms: p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\n\
             where the time goes (wall-clock ms, p50/p99): send->sequenced {}/{}, sequenced->delivered {}/{}\n\
             CPU seconds over {:.1} s: {cpu_line}; total {:.1} ({:.2} cores)\n\
             CPU per message: {:.2} ms (all platform processes, receipts included)\n\
             sequencer: {:.0} commands in {:.0} transactions ({:.1} per transaction, commit {:.1} ms on average)",
            self.rate,
            self.send_secs,
            self.sent as f64 / self.send_secs,
            self.receipts,
            self.delivered,
            self.expected,
            self.drained_secs,
            ms(&self.e2e, 0.5),
            ms(&self.e2e, 0.99),
            ms(&self.e2e, 0.999),
            self.e2e.max() as f64 / 1000.0,
            self.to_seq.value_at_quantile(0.5),
            self.to_seq.value_at_quantile(0.99),
            self.seq_del.value_at_quantile(0.5),
            self.seq_del.value_at_quantile(0.99),
            self.window_secs,
            self.cpu_total,
            self.cpu_total / self.window_secs,
            self.cpu_total * 1000.0 / self.sent.max(1) as f64,
            self.commands,
            self.txns,
            self.commands / self.txns.max(1.0),
            self.txn_secs * 1000.0 / self.txns.max(1.0),
        )
    }
}

/// Everything a rate step needs.
struct Bench {
    args: Args,
    conns: Vec<Conn>,
    members: Vec<Vec<usize>>,
    ids: HashMap<usize, String>,
    stats: Arc<Stats>,
    procs: Vec<(String, Vec<u32>)>,
    gw_pids: Vec<u32>,
    hz: f64,
    sequencer_admin: std::net::SocketAddr,
}

impl Bench {
    /// (transactions, their seconds, commands) of the sequencer so far.
    async fn sequencer_counts(&self) -> (f64, f64, f64) {
        let a = self.sequencer_admin;
        (
            chat_tests::metric(a, "chat_sequencer_batch_commit_seconds_count", None).await,
            chat_tests::metric(a, "chat_sequencer_batch_commit_seconds_sum", None).await,
            chat_tests::metric(a, "chat_sequencer_commands_total", None).await,
        )
    }
}

impl Bench {
    /// Sends `rate` msg/s for `args.seconds`, waits for the deliveries (at
    /// most `--drain-secs` after the last send) and the receipts they cause.
    async fn run_rate(&self, step_no: usize, rate: u64) -> anyhow::Result<RateResult> {
        let step = Arc::new(Step::new()?);
        {
            let mut steps = self.stats.steps.lock().unwrap();
            anyhow::ensure!(steps.len() == step_no, "steps out of order");
            steps.push(step.clone());
        }
        let receipts_before = self.stats.receipts_sent.load(Ordering::Relaxed);
        let seq_before = self.sequencer_counts().await;
        let cpu_before = CpuSample::take(&self.procs);
        let total = rate * self.args.seconds;
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let started = Instant::now();
        let mut sends = tokio::task::JoinSet::new();
        let mut sent = 0u64;
        for k in 0..total {
            tokio::time::sleep_until((started + interval.mul_f64(k as f64)).into()).await;
            let c = (k as usize) % self.args.chats;
            let Some(chat) = self.ids.get(&c) else {
                continue;
            };
            let m = &self.members[c];
            let sender = m[(k as usize / self.args.chats) % m.len()];
            let id = format!("s{step_no}-{k}");
            let frame = json!({"type": "send", "chat": chat, "client_msg_id": id, "text": format!("load {k}")});
            step.sent_at.lock().unwrap().insert(id, Instant::now());
            sent += 1;
            let w = self.conns[sender].writer.clone();
            let stats = self.stats.clone();
            sends.spawn(async move {
                if w.lock().await.send(&frame).await.is_err() {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                }
            });
            while sends.try_join_next().is_some() {}
        }
        while sends.join_next().await.is_some() {}
        let send_secs = started.elapsed().as_secs_f64();
        let group = self.args.connections / self.args.chats.max(1);
        // Every member gets each message, the sender's own device included.
        let expected = sent * group as u64;
        let deadline = Instant::now() + Duration::from_secs(self.args.drain_secs);
        while step.delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let drained_secs = started.elapsed().as_secs_f64() - send_secs;
        // The receipts the last deliveries cause (debounced 300 ms), and their trip.
        if !self.args.no_receipts {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        let window_secs = started.elapsed().as_secs_f64();
        let cpu_after = CpuSample::take(&self.procs);
        let (cpu, cpu_total) = cpu_after.since(&cpu_before, self.hz);
        let rss_busy = self.gw_pids.iter().map(|p| rss_kib(*p)).sum();
        let seq_after = self.sequencer_counts().await;
        let result = RateResult {
            rate,
            sent,
            send_secs,
            delivered: step.delivered.load(Ordering::Relaxed),
            expected,
            e2e: step.e2e.lock().unwrap().clone(),
            to_seq: step.to_seq.lock().unwrap().clone(),
            seq_del: step.seq_to_deliver.lock().unwrap().clone(),
            cpu,
            cpu_total,
            window_secs,
            receipts: self.stats.receipts_sent.load(Ordering::Relaxed) - receipts_before,
            drained_secs,
            rss_busy,
            txns: seq_after.0 - seq_before.0,
            txn_secs: seq_after.1 - seq_before.1,
            commands: seq_after.2 - seq_before.2,
        };
        Ok(result)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    chat_runtime::telemetry::init(chat_runtime::telemetry::LogFormat::Pretty);
    let per_gateway = args.connections.div_ceil(args.gateways) + 100;
    let options = Options {
        presence_env: Vec::new(),
        gateways: args.gateways,
        workers: 1,
        profile: "release",
        chat_partitions: Some(args.partitions),
        gateway_env: vec![
            (
                "CHAT_LIMITS__MAX_CONNECTIONS".into(),
                per_gateway.to_string(),
            ),
            ("CHAT_LIMITS__MAX_GROUP_MEMBERS".into(), "1000".into()),
            ("RUST_LOG".into(), "warn".into()),
        ],
        ..Options::default()
    };
    println!(
        "starting the platform: {} gateways (release build) ...",
        args.gateways
    );
    let platform = Platform::start_with("loadgen", options).await?;
    let gw_pids = platform.pids(Role::Gateway);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before: u64 = gw_pids.iter().map(|p| rss_kib(*p)).sum();

    let stats = Arc::new(Stats {
        steps: Mutex::new(Vec::new()),
        acks: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        receipts_sent: AtomicU64::new(0),
        receipt_errors: AtomicU64::new(0),
        stopping: std::sync::atomic::AtomicBool::new(false),
    });
    let owed = Arc::new(Owed::default());

    // Connect: dev-login tokens, then the socket, hello, and a first sync.
    println!("connecting {} clients ...", args.connections);
    let t_connect = Instant::now();
    let http = reqwest::Client::new();
    let mut conns: Vec<Conn> = Vec::with_capacity(args.connections);
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut joins = tokio::task::JoinSet::new();
    let reading_every = if args.reading > 0.0 {
        (1.0 / args.reading).round().max(1.0) as usize
    } else {
        usize::MAX
    };
    for i in 0..args.connections {
        let gw = platform.gateway(i % args.gateways);
        let (http, sem, stats, owed) = (http.clone(), sem.clone(), stats.clone(), owed.clone());
        let src = IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            2 + (i % args.source_ips.max(1) as usize) as u8,
        ));
        let behaviour = Behaviour {
            index: i,
            receipts: !args.no_receipts,
            reading: !args.no_receipts && i % reading_every == 0,
        };
        joins.spawn(async move {
            let _permit = sem.acquire().await?;
            let user = format!("u{i}");
            let token: Value = http
                .post(format!("http://{gw}/dev/login"))
                .json(&json!({"user": user, "device": "d"}))
                .send()
                .await?
                .json()
                .await?;
            let token = token["token"].as_str().context("no token")?;
            let (mut rx, mut tx) =
                ws::connect_from(gw, Some(src), &format!("/ws?token={token}&device=d"), None)
                    .await?;
            tx.send(&json!({"type": "sync", "id": "s0", "since": null}))
                .await?;
            loop {
                match rx.recv(Duration::from_secs(60)).await? {
                    Some(Incoming::Json(v)) if v["type"] == "synced" => break,
                    Some(Incoming::Json(_)) => {}
                    other => anyhow::bail!("{user}: no synced: {other:?}"),
                }
            }
            tokio::spawn(read_loop(rx, stats, owed, behaviour));
            Ok::<_, anyhow::Error>((
                i,
                Conn {
                    user,
                    writer: Arc::new(AsyncMutex::new(tx)),
                },
            ))
        });
    }
    let mut indexed = Vec::new();
    while let Some(r) = joins.join_next().await {
        indexed.push(r??);
    }
    indexed.sort_by_key(|(i, _)| *i);
    conns.extend(indexed.into_iter().map(|(_, c)| c));
    let connect_secs = t_connect.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_idle: u64 = gw_pids.iter().map(|p| rss_kib(*p)).sum();
    let per_conn_kib = (rss_idle.saturating_sub(rss_before)) as f64 / args.connections as f64;
    println!(
        "{} connected in {connect_secs:.1}s; gateway RSS {} -> {} KiB: {per_conn_kib:.2} KiB per idle connection",
        conns.len(),
        rss_before,
        rss_idle
    );

    // Heartbeats every 30 s keep idle sessions alive.
    let hb_writers: Vec<_> = conns.iter().map(|c| c.writer.clone()).collect();
    let heartbeat = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            for w in &hb_writers {
                let _ = w.lock().await.send(&json!({"type": "ping"})).await;
            }
        }
    });
    // One ticker sends every connection's receipts when they fall due.
    let receipt_writers: Vec<_> = conns.iter().map(|c| c.writer.clone()).collect();
    let ticker = tokio::spawn(send_receipts(owed.clone(), receipt_writers, stats.clone()));

    // Chats: user i is in chat i % chats; the chat's first member creates it.
    println!(
        "creating {} groups of ~{} members ...",
        args.chats,
        args.connections / args.chats.max(1)
    );
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); args.chats];
    for i in 0..conns.len() {
        members[i % args.chats].push(i);
    }
    let mut creates = tokio::task::JoinSet::new();
    for (c, m) in members.iter().enumerate() {
        let Some(&creator) = m.first() else { continue };
        let others: Vec<String> = m[1..].iter().map(|i| conns[*i].user.clone()).collect();
        let w = conns[creator].writer.clone();
        creates.spawn(async move {
            let frame = json!({"type": "create_chat", "id": format!("create-{c}"), "kind": "group", "title": format!("bench {c}"), "members": others, "client_msg_id": format!("create-{c}")});
            w.lock().await.send(&frame).await
        });
    }
    while let Some(r) = creates.join_next().await {
        r??;
    }
    // The acks come to the creators' read loops; the chat ids are in them.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let known = CHAT_ACKS.lock().map(|m| m.len()).unwrap_or(0);
        if known >= args.chats.min(conns.len()) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut ids = HashMap::new();
    if let Ok(acks) = CHAT_ACKS.lock() {
        for (k, v) in acks.iter() {
            if let Some(c) = k
                .strip_prefix("create-")
                .and_then(|c| c.parse::<usize>().ok())
            {
                ids.insert(c, v.clone());
            }
        }
    }
    println!("{} groups created", ids.len());
    anyhow::ensure!(!ids.is_empty(), "no group was created");
    // Let the creation settle (its events reach every member, whose
    // receipts come back as commands): until the sequencer handled no
    // command for 3 s. Then the idle CPU of the platform.
    let seq_admin = platform.admin(Role::Sequencer, 0);
    let settle_deadline = Instant::now() + Duration::from_secs(300);
    let (mut last, mut quiet) = (-1.0, 0);
    while quiet < 3 && Instant::now() < settle_deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let n = chat_tests::metric(seq_admin, "chat_sequencer_commands_total", None).await;
        quiet = if n == last { quiet + 1 } else { 0 };
        last = n;
    }
    println!("set-up settled after {} commands", last);
    let hz = clock_ticks_per_sec();
    let procs = platform_processes(&platform);
    let idle0 = CpuSample::take(&procs);
    let t_idle = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (idle_per, idle_total) = CpuSample::take(&procs).since(&idle0, hz);
    let idle_secs = t_idle.elapsed().as_secs_f64();
    let idle_cores = idle_total / idle_secs;
    let idle_line = idle_per
        .iter()
        .map(|(n, s)| format!("{n} {:.2}", s / idle_secs))
        .collect::<Vec<_>>()
        .join(", ");
    println!("platform CPU while idle: {idle_cores:.2} cores ({idle_line})");

    let group = args.connections / args.chats.max(1);
    let bench = Bench {
        args: args.clone(),
        conns,
        members,
        ids,
        stats: stats.clone(),
        procs,
        gw_pids: gw_pids.clone(),
        hz,
        sequencer_admin: platform.admin(Role::Sequencer, 0),
    };
    let mut results = Vec::new();
    let mut rate = args.rate;
    loop {
        println!("sending {rate} msg/s for {} s ...", args.seconds);
        let r = bench.run_rate(results.len(), rate).await?;
        println!("\n{}\n", r.summary());
        let within = r.complete() && r.p99_ms() <= args.sweep_p99_ms as f64;
        results.push(r);
        let next = (rate as f64 * args.sweep_factor).round() as u64;
        if !args.sweep || !within || next > args.sweep_max {
            break;
        }
        rate = next;
        // Let the platform's queues settle between steps.
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    heartbeat.abort();
    ticker.abort();

    let head = format!(
        "connections {} over {} gateways, {} groups of {}, {} partitions, receipts {}\n\
         acks {}, errors {}, receipt errors {}\n\
         gateway memory: {:.2} KiB per idle connection (RSS {} -> {} KiB over {} gateways; {} KiB after sending)\n\
         connect time: {:.1} s for {} connections; platform CPU while idle {:.2} cores ({})",
        bench.conns.len(),
        args.gateways,
        bench.ids.len(),
        group,
        args.partitions,
        if args.no_receipts {
            "off".to_string()
        } else {
            format!("on (delivered by all, read by {:.0}%)", args.reading * 100.0)
        },
        stats.acks.load(Ordering::Relaxed),
        stats.errors.load(Ordering::Relaxed),
        stats.receipt_errors.load(Ordering::Relaxed),
        per_conn_kib,
        rss_before,
        rss_idle,
        args.gateways,
        results.last().map(|r| r.rss_busy).unwrap_or(0),
        connect_secs,
        bench.conns.len(),
        idle_cores,
        idle_line,
    );
    let mut body = head.clone();
    if args.sweep {
        body.push_str(&format!(
            "\n\nsweep (p99 bar {} ms, every message delivered):\n",
            args.sweep_p99_ms
        ));
        body.push_str("rate msg/s | p50 ms | p99 ms | CPU ms/msg | cores | delivered\n");
        for r in &results {
            body.push_str(&format!(
                "{} | {:.1} | {:.1} | {:.2} | {:.2} | {}/{}\n",
                r.rate,
                r.e2e.value_at_quantile(0.5) as f64 / 1000.0,
                r.p99_ms(),
                r.cpu_total * 1000.0 / r.sent.max(1) as f64,
                r.cpu_total / r.window_secs,
                r.delivered,
                r.expected
            ));
        }
        let best = results
            .iter()
            .filter(|r| r.complete() && r.p99_ms() <= args.sweep_p99_ms as f64)
            .map(|r| r.rate)
            .max();
        body.push_str(&match best {
            Some(b) => format!(
                "highest rate with p99 <= {} ms: {b} msg/s\n",
                args.sweep_p99_ms
            ),
            None => format!("no rate had p99 <= {} ms\n", args.sweep_p99_ms),
        });
    } else if let Some(r) = results.last() {
        body.push_str("\n\n");
        body.push_str(&r.summary());
    }
    println!("\n{body}");
    if args.report != "-" {
        let section = args.section.clone().unwrap_or_else(|| {
            if args.sweep {
                format!("sweep, {} clients", args.connections)
            } else {
                format!("{} clients at {} msg/s", args.connections, args.rate)
            }
        });
        write_report(&args, &section, &body)?;
    }
    let incomplete = results.iter().any(|r| !r.complete());
    stats.stopping.store(true, Ordering::SeqCst);
    platform.stop().await;
    if incomplete && !args.sweep {
        anyhow::bail!("not every message reached every member");
    }
    Ok(())
}

/// Replaces (or appends) `## <section>` in the report with this run.
fn write_report(args: &Args, section: &str, body: &str) -> anyhow::Result<()> {
    let path = chat_tests::repo_root().join(&args.report);
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let intro = "# loadgen: latest runs\n\nThe whole platform on one box: Kafka, Cassandra, the registry, the gateways, \
                 one sequencer, router, history projector and presence service, and the load generator, all on loopback; \
                 release build, on a freshly started stack. Each section is the latest run of its scenario \
                 (`loadgen --section`).\n";
    let mut sections: Vec<(String, String)> = Vec::new();
    for part in old.split("\n## ").skip(1) {
        let (name, rest) = part.split_once('\n').unwrap_or((part, ""));
        sections.push((name.trim().to_string(), rest.trim().to_string()));
    }
    let text = format!(
        "{} cores. Command: `cargo run --release -p chat-tests --bin loadgen -- {}`\n\n```\n{body}\n```",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    match sections.iter_mut().find(|(n, _)| n == section) {
        Some(s) => s.1 = text,
        None => sections.push((section.to_string(), text)),
    }
    let mut out = intro.to_string();
    for (n, t) in &sections {
        out.push_str(&format!("\n## {n}\n\n{t}\n"));
    }
    std::fs::write(&path, out)?;
    println!(
        "report written to {} (section \"{section}\")",
        path.display()
    );
    Ok(())
}

/// Chat ids from the creators' acks, by request id.
static CHAT_ACKS: std::sync::LazyLock<Mutex<HashMap<String, String>>> =
    std::sync::LazyLock::new(|| Mutex::new(HashMap::new()));

/// How one client behaves.
#[derive(Clone, Copy)]
struct Behaviour {
    index: usize,
    receipts: bool,
    reading: bool,
}

/// Sends the receipts that fell due, every 25 ms, like the browser app's
/// debounced timers.
async fn send_receipts(
    owed: Arc<Owed>,
    writers: Vec<Arc<AsyncMutex<WsWriter>>>,
    stats: Arc<Stats>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    loop {
        tick.tick().await;
        let now = Instant::now();
        let mut due = Vec::new();
        {
            let mut pending = owed.pending.lock().unwrap();
            pending.retain(|conn, p| {
                if let Some((seq, at)) = p.delivered {
                    if at <= now {
                        due.push((
                            *conn,
                            json!({"type": "delivered", "chat": p.chat, "up_to_seq": seq}),
                        ));
                        p.delivered = None;
                    }
                }
                if let Some((seq, at)) = p.read {
                    if at <= now {
                        due.push((
                            *conn,
                            json!({"type": "read", "chat": p.chat, "up_to_seq": seq}),
                        ));
                        p.read = None;
                    }
                }
                p.delivered.is_some() || p.read.is_some()
            });
        }
        for (conn, frame) in due {
            let Some(w) = writers.get(conn).cloned() else {
                continue;
            };
            let stats = stats.clone();
            stats.receipts_sent.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                if w.lock().await.send(&frame).await.is_err() {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    }
}

async fn read_loop(mut rx: ws::WsReader, stats: Arc<Stats>, owed: Arc<Owed>, me: Behaviour) {
    loop {
        let v = match rx.recv(Duration::from_secs(3600)).await {
            Ok(Some(Incoming::Json(v))) => v,
            _ if stats.stopping.load(Ordering::Relaxed) => return,
            Ok(Some(Incoming::Closed(code, reason))) => {
                eprintln!("connection closed: {code} {reason}");
                stats.errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(None) => continue,
            Err(e) => {
                eprintln!("read error: {e}");
                stats.errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        match v["type"].as_str() {
            Some("event") => {
                if v["kind"] == "MessageSent" {
                    record_delivery(&stats, &v);
                }
                if me.receipts {
                    if let (Some(chat), Some(seq)) = (v["chat"].as_str(), v["seq"].as_i64()) {
                        let now = Instant::now();
                        let mut pending = owed.pending.lock().unwrap();
                        let p = pending.entry(me.index).or_default();
                        p.chat = chat.to_string();
                        p.delivered = Some((seq, now + Duration::from_millis(300)));
                        if me.reading {
                            p.read = Some((seq, now + Duration::from_millis(150)));
                        }
                    }
                }
            }
            Some("ack") => {
                stats.acks.fetch_add(1, Ordering::Relaxed);
                if let (Some(id), Some(chat)) = (v["id"].as_str(), v["chat"].as_str()) {
                    if id.starts_with("create-") {
                        CHAT_ACKS
                            .lock()
                            .unwrap()
                            .insert(id.to_string(), chat.to_string());
                    }
                }
            }
            Some("error") if v["code"] == "stale_receipt" => {
                stats.receipt_errors.fetch_add(1, Ordering::Relaxed);
            }
            Some("error") => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("error frame: {v}");
            }
            _ => {}
        }
    }
}

/// Records one delivery of a message the benchmark sent.
fn record_delivery(stats: &Stats, v: &Value) {
    let now = Instant::now();
    let id = v["client_msg_id"].as_str().unwrap_or_default();
    let Some(step) = stats.step(id) else {
        return;
    };
    let Some(t0) = step.sent_at.lock().unwrap().get(id).copied() else {
        return;
    };
    let us = now.duration_since(t0).as_micros() as u64;
    let _ = step.e2e.lock().unwrap().record(us.max(1));
    if let Some(seq_ts) = v["ts"].as_i64() {
        let sent_wall = wall_ms() - (us / 1000) as i64;
        let _ = step
            .to_seq
            .lock()
            .unwrap()
            .record((seq_ts - sent_wall).max(1) as u64);
        let _ = step
            .seq_to_deliver
            .lock()
            .unwrap()
            .record((wall_ms() - seq_ts).max(1) as u64);
    }
    step.delivered.fetch_add(1, Ordering::Relaxed);
}
