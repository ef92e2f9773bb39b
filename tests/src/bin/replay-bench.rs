//! `replay-bench`: how fast the history projector rebuilds its tables from
//! offset 0 of `chat.events` (a new consumer group into an empty keyspace).
//!
//! Against the running stack (`make infra-up`): fills `chat.events` of a
//! fresh topic prefix with `--events` sequenced events (by default
//! 1,000,000: one `ChatCreated` with all but two members and two
//! `MemberAdded` per group, then `MessageSent` from random members of random
//! groups of `--members`, `sequenced_ts` spaced as a live load of `--rate`
//! msg/s would be), starts one `chat-history` (release) from offset 0 into
//! a fresh keyspace, and measures the time until `projector_progress`
//! reaches the exact end offset of every partition. Prints events/s,
//! elapsed, the projector's and Cassandra's CPU seconds (from
//! `/proc/<pid>/stat`), and checks the rebuilt `messages` of a sample of
//! chats (row count = events written for the chat).
//!
//! Then (unless `--skip-admin`) the operator's path: `chat-admin replay
//! --projection history` into another fresh keyspace, killed (`kill -9`)
//! at `--kill-at` of the events, run again (it resumes from the keyspace's
//! `projector_progress`), and `chat-admin verify` against the keyspace the
//! live projector built, which must report no difference. Prints the
//! events/s of both and the load average.
//!
//! `cargo run --release -p chat-tests --bin replay-bench -- --help`

use anyhow::Context;
use chat_log::Outgoing;
use chat_projectors::store;
use chat_schemas::{Body, MemberAdded, Role as MemberRole};
use chat_tests::envelopes::{envelope, group, text};
use chat_tests::metric;
use chat_tests::platform::{Options, Platform, Role};
use clap::Parser;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(about = "history projector replay rate: rebuild from offset 0 into an empty keyspace")]
struct Args {
    /// Events in `chat.events` (creations and member additions included).
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Group chats (the default is the loadgen's 10,000 clients in 1,000
    /// groups of 10; more groups at the same rate write more markers).
    #[arg(long, default_value_t = 1_000)]
    groups: u64,
    /// Members per group (each user is in two groups).
    #[arg(long, default_value_t = 10)]
    members: u64,
    /// Partitions of `chat.events`.
    #[arg(long, default_value_t = 12)]
    partitions: i32,
    /// `sequenced_ts` of consecutive messages is 1000/rate ms apart, as in
    /// a live load of this many msg/s.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Records per produce batch.
    #[arg(long, default_value_t = 5_000)]
    batch: usize,
    /// Chats whose `messages` rows are counted after the replay.
    #[arg(long, default_value_t = 50)]
    sample: usize,
    /// `debug` or `release` binaries.
    #[arg(long, default_value = "release")]
    profile: String,
    /// A `chat-history` executable to run instead of the workspace's
    /// (e.g. a build of an earlier commit).
    #[arg(long)]
    history_binary: Option<PathBuf>,
    /// Extra environment for the projector, `KEY=VALUE` (repeatable), e.g.
    /// `CHAT_BATCH_MAX_EVENTS=2000`.
    #[arg(long = "env")]
    env: Vec<String>,
    /// Give up after this many seconds of replay.
    #[arg(long, default_value_t = 1_800)]
    timeout_s: u64,
    /// Skip the `chat-admin replay` / kill / resume / `verify` phase.
    #[arg(long)]
    skip_admin: bool,
    /// Fraction of the events after which the first `chat-admin replay` is
    /// killed (`kill -9`).
    #[arg(long, default_value_t = 0.5)]
    kill_at: f64,
    /// Extra arguments for `chat-admin replay` (repeatable), e.g.
    /// `--admin-arg=--write-concurrency --admin-arg=32`.
    #[arg(long = "admin-arg", allow_hyphen_values = true)]
    admin_args: Vec<String>,
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command (which may contain spaces) in parentheses.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime 15.
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / 100.0
}

/// The pid of the process listening on TCP `port` of the local host (the
/// owner of the listening socket's inode, from /proc), if any.
fn listener_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEX_IP:HEX_PORT; state 0A is LISTEN.
            let listening = f.get(3) == Some(&"0A");
            let on_port = f
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if listening && on_port {
                inodes.extend(f.get(9).map(|i| format!("socket:[{i}]")));
            }
        }
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.to_string_lossy() == *i) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// The pid of the Cassandra the store talks to: the listener of the port
/// of the first `store.nodes` entry.
fn cassandra_pid(nodes: &[String]) -> Option<u32> {
    let port = nodes.first()?.rsplit(':').next()?.parse().ok()?;
    listener_pid(port)
}

/// A small deterministic generator (the log's content is the same each run).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    chat_runtime::telemetry::init(chat_runtime::telemetry::LogFormat::Pretty);
    let load_start = load_average();
    anyhow::ensure!(args.members >= 3, "--members must be at least 3");
    let profile: &'static str = if args.profile == "debug" {
        "debug"
    } else {
        "release"
    };
    let mut history_env = vec![("RUST_LOG".to_string(), "warn".to_string())];
    for kv in &args.env {
        let (k, v) = kv.split_once('=').context("--env takes KEY=VALUE")?;
        history_env.push((k.to_string(), v.to_string()));
    }
    let mut platform = Platform::start_with(
        "replay-bench",
        Options {
            gateways: 0,
            workers: 0,
            profile,
            chat_partitions: Some(args.partitions),
            history_env,
            history_binary: args.history_binary.clone(),
            ..Options::default()
        },
    )
    .await
    .context("creating the topics and the keyspace")?;

    // Fill chat.events.
    let t_fill = Instant::now();
    let log = &platform.log;
    let topic = log.topics.events.clone();
    let chats: Vec<Uuid> = (0..args.groups).map(|_| Uuid::new_v4()).collect();
    let users = (args.groups * args.members / 2).max(args.members);
    let member = |g: u64, k: u64| format!("u{}", (g * args.members + k) % users);
    let base_ts = chat_runtime::now_ms() - 86_400_000;
    let step_ms = 1_000.0 / args.rate.max(1) as f64;
    let mut seqs: Vec<u64> = vec![0; chats.len()];
    let mut written: Vec<u64> = vec![0; chats.len()];
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut rng = Lcg(42);
    let mut i: u64 = 0;
    let setup_per_group = 3;
    anyhow::ensure!(
        args.events >= args.groups * setup_per_group,
        "--events must cover 3 setup events per group"
    );
    while i < args.events {
        let n = (args.events - i).min(args.batch as u64);
        let mut records = Vec::with_capacity(n as usize);
        for j in i..i + n {
            let at = base_ts + (j as f64 * step_ms) as i64;
            let (g, body, sender) = if j < args.groups * setup_per_group {
                // Setup first: each group's creation, then its two additions.
                let g = j % args.groups;
                let phase = j / args.groups;
                let creator = member(g, 0);
                let body = match phase {
                    0 => {
                        let names: Vec<String> =
                            (0..args.members - 2).map(|k| member(g, k)).collect();
                        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                        group(&refs)
                    }
                    p => Body::MemberAdded(MemberAdded {
                        user_id: member(g, args.members - 3 + p),
                        role: MemberRole::Member,
                    }),
                };
                (g, body, creator)
            } else {
                let g = rng.below(args.groups);
                let sender = member(g, rng.below(args.members));
                (g, text("replay"), sender)
            };
            let gi = g as usize;
            seqs[gi] += 1;
            written[gi] += 1;
            let mut e = envelope(chats[gi], &sender, &format!("r{j}"), Some(seqs[gi]), body);
            e.server_ts = at - 2;
            e.sequenced_ts = Some(at);
            records.push(Outgoing {
                topic: topic.clone(),
                partition: None,
                key: chats[gi].to_string(),
                envelope: e,
                headers: Vec::new(),
            });
        }
        for p in log.producer.send_batch(records).await? {
            let end = ends.entry(p.partition).or_insert(0);
            *end = (*end).max(p.offset + 1);
        }
        i += n;
    }
    let fill_s = t_fill.elapsed().as_secs_f64();
    let total: i64 = ends.values().sum();
    eprintln!(
        "filled {} with {total} events in {fill_s:.1} s over {} partitions",
        topic,
        ends.len()
    );

    // Replay.
    let store = store::connect(&platform.store).await?;
    let cassandra = cassandra_pid(&platform.store.nodes);
    if cassandra.is_none() {
        eprintln!("Cassandra's pid not found: its CPU is not measured");
    }
    let cass_cpu0 = cassandra.map_or(0.0, cpu_seconds);
    let t0 = Instant::now();
    platform.start_another(Role::History).await?;
    let pid = platform
        .pids(Role::History)
        .first()
        .copied()
        .context("no projector pid")?;
    let deadline = t0 + Duration::from_secs(args.timeout_s);
    // When progress was first seen, and how many events it covered then.
    let mut first_progress: Option<(Duration, i64)> = None;
    let mut proj_cpu = 0.0;
    loop {
        let progress = store.progress("history").await.unwrap_or_default();
        if first_progress.is_none() && progress.values().any(|o| *o > 0) {
            first_progress = Some((t0.elapsed(), progress.values().sum()));
        }
        if ends.iter().all(|(p, end)| progress.get(p) == Some(end)) {
            break;
        }
        proj_cpu = cpu_seconds(pid).max(proj_cpu);
        anyhow::ensure!(
            Instant::now() < deadline,
            "not caught up in {} s: {progress:?} vs {ends:?}",
            args.timeout_s
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = t0.elapsed();
    proj_cpu = cpu_seconds(pid).max(proj_cpu);
    let cass_cpu = cassandra.map_or(0.0, cpu_seconds) - cass_cpu0;
    let admin = platform.admin(Role::History, 0);
    let markers = metric(admin, "chat_history_change_markers_written_total", None).await;
    let retries = metric(admin, "chat_history_store_retries_total", None).await;
    let (first_at, first_done) = first_progress.unwrap_or_default();
    let steady = (total - first_done) as f64 / (elapsed - first_at).as_secs_f64().max(0.001);

    // Check a sample of chats: every event of the chat is in `messages`.
    let mut checked = 0;
    for gi in (0..chats.len()).step_by((chats.len() / args.sample.max(1)).max(1)) {
        let n = store.count_messages(chats[gi], seqs[gi]).await?;
        anyhow::ensure!(
            n == written[gi],
            "chat {}: {n} messages rows, {} events",
            chats[gi],
            written[gi]
        );
        let head = store.chat(chats[gi]).await?.map(|c| c.last_seq);
        anyhow::ensure!(head == Some(seqs[gi]), "chat {}: head {head:?}", chats[gi]);
        checked += 1;
    }

    println!("| events | elapsed (s) | events/s | events/s after the first progress | projector CPU (s) | Cassandra CPU (s) | markers | store retries | fill (s) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {total} | {:.1} | {:.0} | {:.0} | {proj_cpu:.1} | {cass_cpu:.1} | {markers:.0} | {retries:.0} | {fill_s:.1} |",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        steady,
    );
    eprintln!(
        "checked {checked} chats: messages rows = events, chats.last_seq = last seq; first progress after {:.1} s",
        first_at.as_secs_f64()
    );
    if !args.skip_admin {
        admin_phase(&args, &platform, profile, &store, total).await?;
    }
    eprintln!(
        "load average (1, 5, 15 min) at start: {load_start}; at end: {}",
        load_average()
    );
    platform.stop().await;
    Ok(())
}

/// `chat-admin replay` into a fresh keyspace, `kill -9` at `--kill-at`,
/// the same command again (resumes), then `chat-admin verify` against the
/// live keyspace the projector built. Prints one table row.
async fn admin_phase(
    args: &Args,
    platform: &Platform,
    profile: &str,
    live: &store::Store,
    total: i64,
) -> anyhow::Result<()> {
    use chat_tests::admin::{chat_admin, last_json, output};
    let ks = format!("rb_{}", &Uuid::new_v4().simple().to_string()[..12]);
    let rebuilt = live.with_keyspace(&ks);
    let mut replay: Vec<&str> = vec![
        "replay",
        "--projection",
        "history",
        "--keyspace",
        &ks,
        "--json",
        "--progress-interval",
        "10",
    ];
    replay.extend(args.admin_args.iter().map(String::as_str));
    let log = &platform.log.config;
    let half = (total as f64 * args.kill_at) as i64;
    let t1 = Instant::now();
    let mut first = chat_admin(log, &platform.store, profile, &replay)?.spawn()?;
    loop {
        let done: i64 = rebuilt
            .progress("history")
            .await
            .unwrap_or_default()
            .values()
            .sum();
        if done >= half {
            first.start_kill()?;
            break;
        }
        if let Some(status) = first.try_wait()? {
            anyhow::bail!("chat-admin replay ended before {half} events: {status}");
        }
        anyhow::ensure!(
            t1.elapsed().as_secs() < args.timeout_s,
            "first replay too slow"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.wait().await?;
    let first_s = t1.elapsed().as_secs_f64();
    let at_kill: i64 = rebuilt.progress("history").await?.values().sum();
    eprintln!(
        "chat-admin replay killed (kill -9) after {first_s:.1} s at {at_kill} of {total} events"
    );
    let t2 = Instant::now();
    let (code, stdout) = output(chat_admin(log, &platform.store, profile, &replay)?).await?;
    let second_wall = t2.elapsed().as_secs_f64();
    anyhow::ensure!(
        code == 0,
        "resumed chat-admin replay exited {code}: {stdout}"
    );
    let report = last_json(&stdout)?;
    anyhow::ensure!(
        report["complete"] == true && report["resumed"] == true,
        "{report}"
    );
    let resumed_events = report["events"].as_i64().unwrap_or(0);
    let resumed_rate = report["events_per_s"].as_f64().unwrap_or(0.0);
    let t3 = Instant::now();
    let verify = [
        "verify",
        "--projection",
        "history",
        "--keyspace",
        &ks,
        "--against",
        live.keyspace(),
        "--json",
    ];
    let (code, stdout) = output(chat_admin(log, &platform.store, profile, &verify)?).await?;
    let verify_s = t3.elapsed().as_secs_f64();
    let verdict = last_json(&stdout)?;
    let rows: u64 = verdict["tables"]
        .as_array()
        .map(|t| t.iter().filter_map(|t| t["live"]["rows"].as_u64()).sum())
        .unwrap_or(0);
    println!();
    println!("| events | first run: killed after (s) at events | resumed run: events, s | resumed events/s (chat-admin) | both runs events/s (wall) | verify (s), rows per side | verify |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {total} | {first_s:.1} s at {at_kill} | {resumed_events}, {:.1} s | {resumed_rate:.0} | {:.0} | {verify_s:.1} s, {rows} | {} |",
        report["elapsed_s"].as_f64().unwrap_or(0.0),
        total as f64 / (first_s + second_wall),
        if code == 0 && verdict["equal"] == true {
            "no difference".to_string()
        } else {
            format!("{} partitions differ (exit {code})", verdict["differences"])
        }
    );
    rebuilt.drop_keyspace().await.ok();
    anyhow::ensure!(code == 0, "verify found differences: {verdict}");
    Ok(())
}
