//! `loadgen`: the send -> deliver benchmark of the whole platform.
//!
//! Starts the platform from the release binaries (G gateways, one instance of
//! each worker) against the running stack (`make infra-up`), opens N
//! WebSocket connections spread over the gateways and over 127.0.0.x source
//! addresses, makes M group chats (every user in one), and drives an
//! open-loop send rate. It prints send->deliver latency (p50/p99/p99.9, HDR
//! histogram, measured at every recipient), where the time goes (send ->
//! sequenced, sequenced -> delivered), delivered msg/s, errors, and gateway
//! memory per idle connection (RSS delta / connections), and writes a short
//! report (default `tests/reports/loadgen.md`).
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
#[command(about = "send->deliver latency and gateway memory of the whole platform")]
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
    /// Open-loop send rate, messages per second (over all chats).
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// How long to send, seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Source addresses 127.0.0.2 .. 127.0.0.(1+n) used round-robin.
    #[arg(long, default_value_t = 4)]
    source_ips: u8,
    /// Where to write the report ("-" for none).
    #[arg(long, default_value = "tests/reports/loadgen.md")]
    report: String,
}

/// Shared measurements.
struct Stats {
    /// client_msg_id -> send instant.
    sent_at: Mutex<HashMap<String, Instant>>,
    /// send -> delivered, microseconds, at every recipient.
    e2e: Mutex<Histogram<u64>>,
    /// send -> sequenced and sequenced -> delivered, milliseconds (wall clock).
    to_seq: Mutex<Histogram<u64>>,
    seq_to_deliver: Mutex<Histogram<u64>>,
    delivered: AtomicU64,
    acks: AtomicU64,
    errors: AtomicU64,
    measuring: std::sync::atomic::AtomicBool,
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

struct Conn {
    user: String,
    writer: Arc<AsyncMutex<WsWriter>>,
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
        sent_at: Mutex::new(HashMap::new()),
        e2e: Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 3)?),
        to_seq: Mutex::new(Histogram::new_with_bounds(1, 120_000, 3)?),
        seq_to_deliver: Mutex::new(Histogram::new_with_bounds(1, 120_000, 3)?),
        delivered: AtomicU64::new(0),
        acks: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        measuring: std::sync::atomic::AtomicBool::new(false),
    });

    // Connect: dev-login tokens, then the socket, hello, and a first sync.
    println!("connecting {} clients ...", args.connections);
    let t_connect = Instant::now();
    let http = reqwest::Client::new();
    let mut conns: Vec<Conn> = Vec::with_capacity(args.connections);
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut joins = tokio::task::JoinSet::new();
    for i in 0..args.connections {
        let gw = platform.gateway(i % args.gateways);
        let (http, sem, stats) = (http.clone(), sem.clone(), stats.clone());
        let src = IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            2 + (i % args.source_ips.max(1) as usize) as u8,
        ));
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
            tokio::spawn(read_loop(rx, stats));
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
    let chat_ids: Arc<Mutex<HashMap<usize, String>>> = Arc::default();
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
    if let Ok(acks) = CHAT_ACKS.lock() {
        let mut ids = chat_ids.lock().unwrap();
        for (k, v) in acks.iter() {
            if let Some(c) = k
                .strip_prefix("create-")
                .and_then(|c| c.parse::<usize>().ok())
            {
                ids.insert(c, v.clone());
            }
        }
    }
    let ids = chat_ids.lock().unwrap().clone();
    println!("{} groups created", ids.len());
    anyhow::ensure!(!ids.is_empty(), "no group was created");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Open-loop sends: message k goes to chat k % chats, from a member in turn.
    println!("sending {} msg/s for {} s ...", args.rate, args.seconds);
    stats.measuring.store(true, Ordering::SeqCst);
    let total = args.rate * args.seconds;
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let started = Instant::now();
    let mut sends = tokio::task::JoinSet::new();
    for k in 0..total {
        tokio::time::sleep_until((started + interval * k as u32).into()).await;
        let c = (k as usize) % args.chats;
        let Some(chat) = ids.get(&c) else { continue };
        let m = &members[c];
        let sender = m[(k as usize / args.chats) % m.len()];
        let id = format!("m{k}");
        let frame =
            json!({"type": "send", "chat": chat, "client_msg_id": id, "text": format!("load {k}")});
        stats.sent_at.lock().unwrap().insert(id, Instant::now());
        let w = conns[sender].writer.clone();
        let stats2 = stats.clone();
        sends.spawn(async move {
            if w.lock().await.send(&frame).await.is_err() {
                stats2.errors.fetch_add(1, Ordering::Relaxed);
            }
        });
        while sends.try_join_next().is_some() {}
    }
    while sends.join_next().await.is_some() {}
    let send_secs = started.elapsed().as_secs_f64();
    // Let the last deliveries arrive.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let elapsed = started.elapsed().as_secs_f64();
    heartbeat.abort();
    let rss_busy: u64 = gw_pids.iter().map(|p| rss_kib(*p)).sum();

    let group = args.connections / args.chats.max(1);
    // Every member gets each message, the sender's own device included.
    let expected = total * group as u64;
    let delivered = stats.delivered.load(Ordering::Relaxed);
    let e2e = stats.e2e.lock().unwrap().clone();
    let to_seq = stats.to_seq.lock().unwrap().clone();
    let seq_del = stats.seq_to_deliver.lock().unwrap().clone();
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let summary = format!(
        "connections {} over {} gateways, {} groups of {}, {} msg/s offered for {} s ({:.0} msg/s sent)\n\
         deliveries {} of {} expected ({:.0}/s), acks {}, errors {}\n\
         send->deliver ms: p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\n\
         where the time goes (wall-clock ms, p50/p99): send->sequenced {}/{}, sequenced->delivered {}/{}\n\
         gateway memory: {:.2} KiB per idle connection (RSS {} -> {} KiB over {} gateways; {} KiB while sending)\n\
         connect time: {:.1} s for {} connections",
        conns.len(),
        args.gateways,
        ids.len(),
        group,
        args.rate,
        args.seconds,
        total as f64 / send_secs,
        delivered,
        expected,
        delivered as f64 / elapsed,
        stats.acks.load(Ordering::Relaxed),
        stats.errors.load(Ordering::Relaxed),
        ms(&e2e, 0.5),
        ms(&e2e, 0.99),
        ms(&e2e, 0.999),
        e2e.max() as f64 / 1000.0,
        to_seq.value_at_quantile(0.5),
        to_seq.value_at_quantile(0.99),
        seq_del.value_at_quantile(0.5),
        seq_del.value_at_quantile(0.99),
        per_conn_kib,
        rss_before,
        rss_idle,
        args.gateways,
        rss_busy,
        connect_secs,
        conns.len(),
    );
    println!("\n{summary}");
    if args.report != "-" {
        let path = chat_tests::repo_root().join(&args.report);
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(
            &path,
            format!(
                "# loadgen: latest run\n\nThe whole platform on one {}-core box: Kafka, Cassandra, the registry, \
                 the gateways, one sequencer, router and history projector, and this load generator, all on loopback. \
                 Release build. Command: `cargo run --release -p chat-tests --bin loadgen -- {}`\n\n```\n{summary}\n```\n",
                std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                std::env::args().skip(1).collect::<Vec<_>>().join(" ")
            ),
        )?;
        println!("report written to {}", path.display());
    }
    platform.stop().await;
    Ok(())
}

/// Chat ids from the creators' acks, by request id.
static CHAT_ACKS: std::sync::LazyLock<Mutex<HashMap<String, String>>> =
    std::sync::LazyLock::new(|| Mutex::new(HashMap::new()));

async fn read_loop(mut rx: ws::WsReader, stats: Arc<Stats>) {
    loop {
        let v = match rx.recv(Duration::from_secs(3600)).await {
            Ok(Some(Incoming::Json(v))) => v,
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
            Some("event") if v["kind"] == "MessageSent" => {
                let now = Instant::now();
                let id = v["client_msg_id"].as_str().unwrap_or_default();
                let sent = stats.sent_at.lock().unwrap().get(id).copied();
                if let (Some(t0), true) = (sent, stats.measuring.load(Ordering::Relaxed)) {
                    let us = now.duration_since(t0).as_micros() as u64;
                    let _ = stats.e2e.lock().unwrap().record(us.max(1));
                    if let Some(seq_ts) = v["ts"].as_i64() {
                        let sent_wall = wall_ms() - (us / 1000) as i64;
                        let _ = stats
                            .to_seq
                            .lock()
                            .unwrap()
                            .record((seq_ts - sent_wall).max(1) as u64);
                        let _ = stats
                            .seq_to_deliver
                            .lock()
                            .unwrap()
                            .record((wall_ms() - seq_ts).max(1) as u64);
                    }
                    stats.delivered.fetch_add(1, Ordering::Relaxed);
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
            Some("error") => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("error frame: {v}");
            }
            _ => {}
        }
    }
}
