//! `restore-bench`: restart-to-serving time and memory of the sequencer and
//! the router as the log grows (issue 9: "it must not grow with the log").
//!
//! Starts one sequencer and one router from the release binaries (no
//! gateways, no projectors) against the running stack (`make infra-up`),
//! appends commands to `chat.commands` until `chat.events` holds each
//! target of `--events` (e.g. 1,000,000 then 5,000,000), and at each target:
//!
//! - RSS of both processes after the load;
//! - `--rounds` clean restarts (SIGTERM, start again with the same state
//!   directory): the time from the start until a probe message to each
//!   partition was sequenced, routed and written to a gateway's deliveries
//!   ("serving"), the restore sources and events read again, RSS after;
//! - one kill -9 and restart (same state directories), and one restart as
//!   a new host (state directories removed: the changelog).
//!
//! `cargo run --release -p chat-tests --bin restore-bench -- --help`

use anyhow::Context;
use chat_log::{Outgoing, TailItem, TailStart, TopicTail};
use chat_schemas::Envelope;
use chat_tests::envelopes::{command, group, session_opened, text};
use chat_tests::metric;
use chat_tests::platform::{Options, Platform, Role};
use clap::Parser;
use std::collections::HashSet;
use std::time::{Duration, Instant};
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(
    about = "restart-to-serving time and memory of the sequencer and router as the log grows"
)]
struct Args {
    /// Events in the log at which to measure, ascending, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000000,5000000")]
    events: Vec<u64>,
    /// Group chats the load is spread over (3 members each).
    #[arg(long, default_value_t = 100_000)]
    chats: u64,
    /// Clean restarts measured at each size.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// `state.cache_chats` of both services (chats per partition in memory).
    #[arg(long, default_value_t = 20_000)]
    cache_chats: usize,
    /// Commands per produce batch.
    #[arg(long, default_value_t = 5_000)]
    batch: usize,
    /// `debug` or `release` binaries.
    #[arg(long, default_value = "release")]
    profile: String,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

struct Bench {
    platform: Platform,
    probe_chats: Vec<Uuid>,
    probes_sent: u64,
}

impl Bench {
    fn outgoing(&self, partition: Option<i32>, e: Envelope) -> Outgoing {
        Outgoing {
            topic: self.platform.log.topics.commands.clone(),
            partition,
            key: e.chat_id.map(|c| c.to_string()).unwrap_or_default(),
            envelope: e,
            headers: Vec::new(),
        }
    }

    async fn send(&self, records: Vec<Outgoing>) -> anyhow::Result<()> {
        self.platform.log.producer.send_batch(records).await?;
        Ok(())
    }

    /// Commands the running sequencer handled and events the router routed
    /// since they started.
    async fn progress(&self) -> (f64, f64) {
        let seq = metric(
            self.platform.admin(Role::Sequencer, 0),
            "chat_sequencer_commands_total",
            None,
        )
        .await;
        let routed = metric(
            self.platform.admin(Role::Router, 0),
            "chat_router_events_total",
            None,
        )
        .await;
        (seq, routed)
    }

    fn rss(&self) -> (u64, u64) {
        let of = |r| {
            self.platform
                .pids(r)
                .first()
                .map(|p| rss_kib(*p))
                .unwrap_or(0)
        };
        (of(Role::Sequencer), of(Role::Router))
    }

    /// Restarts both services as `how` says and measures the time until a
    /// probe to every partition was delivered.
    async fn restart(&mut self, how: Restart) -> anyhow::Result<Measured> {
        let log = &self.platform.log;
        let tail = TopicTail::open(
            &log.config,
            log.registry.clone(),
            &log.topics.deliveries,
            None,
            TailStart::End,
        )
        .await?;
        if how == Restart::Kill {
            self.platform.kill(Role::Sequencer, 0);
            self.platform.kill(Role::Router, 0);
        } else {
            self.platform.terminate(Role::Sequencer, 0)?;
            self.platform.terminate(Role::Router, 0)?;
        }
        if how == Restart::NewHost {
            for r in [Role::Sequencer, Role::Router] {
                let _ = std::fs::remove_dir_all(self.platform.state_dir(r, 0));
            }
        }
        let t0 = Instant::now();
        self.platform.restart(Role::Sequencer, 0).await?;
        self.platform.restart(Role::Router, 0).await?;
        self.probes_sent += 1;
        let round = self.probes_sent;
        let probes: Vec<Outgoing> = self
            .probe_chats
            .iter()
            .enumerate()
            .map(|(p, c)| {
                self.outgoing(
                    Some(p as i32),
                    command(*c, "ann", &format!("probe-{round}"), text("probe")),
                )
            })
            .collect();
        self.send(probes).await?;
        let mut waiting: HashSet<Uuid> = self.probe_chats.iter().copied().collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        while !waiting.is_empty() {
            match tokio::time::timeout_at(deadline, tail.next()).await {
                Ok(Ok(TailItem::Event(ev))) => {
                    if ev.envelope.client_msg_id.as_deref() == Some(&format!("probe-{round}")) {
                        if let Some(c) = ev.envelope.chat_id {
                            waiting.remove(&c);
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => anyhow::bail!("{} probes not delivered in 600 s", waiting.len()),
            }
        }
        let serving = t0.elapsed();
        let seq_admin = self.platform.admin(Role::Sequencer, 0);
        let router_admin = self.platform.admin(Role::Router, 0);
        let sources = |admin, prefix: &'static str| async move {
            let mut out = Vec::new();
            for s in ["local", "changelog", "log"] {
                let n = metric(
                    admin,
                    &format!("{prefix}_state_restores_total"),
                    Some(&format!("source=\"{s}\"")),
                )
                .await;
                if n > 0.0 {
                    out.push(format!("{s} {n}"));
                }
            }
            out.join(", ")
        };
        let (rss_seq, rss_router) = self.rss();
        Ok(Measured {
            serving,
            seq_sources: sources(seq_admin, "chat_sequencer").await,
            router_sources: sources(router_admin, "chat_router").await,
            seq_events_read: metric(seq_admin, "chat_sequencer_state_restore_events_total", None)
                .await,
            router_events_read: metric(
                router_admin,
                "chat_router_state_restore_events_total",
                None,
            )
            .await,
            seq_restore_s: metric(seq_admin, "chat_sequencer_state_restore_seconds_sum", None)
                .await,
            rss_seq,
            rss_router,
        })
    }
}

/// How the services are stopped before they start again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Restart {
    /// SIGTERM, same state directory.
    Clean,
    /// SIGKILL, same state directory (the store's last second may be lost).
    Kill,
    /// SIGTERM, state directory removed: restored from the changelog.
    NewHost,
}

impl Restart {
    fn label(self) -> &'static str {
        match self {
            Restart::Clean => "clean restart (SIGTERM, same state dir)",
            Restart::Kill => "kill -9 and restart (same state dir)",
            Restart::NewHost => "restart as a new host (no state dir: changelog)",
        }
    }
}

struct Measured {
    serving: Duration,
    seq_sources: String,
    router_sources: String,
    seq_events_read: f64,
    router_events_read: f64,
    seq_restore_s: f64,
    rss_seq: u64,
    rss_router: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    chat_runtime::telemetry::init(chat_runtime::telemetry::LogFormat::Pretty);
    let profile: &'static str = if args.profile == "debug" {
        "debug"
    } else {
        "release"
    };
    let platform = Platform::start_with(
        "restore-bench",
        Options {
            gateways: 0,
            workers: 1,
            profile,
            worker_roles: vec![Role::Sequencer, Role::Router],
            worker_env: vec![(
                "CHAT_STATE__CACHE_CHATS".into(),
                args.cache_chats.to_string(),
            )],
            ..Options::default()
        },
    )
    .await
    .context("starting the sequencer and the router")?;
    let partitions = platform.log.config.chat_partitions;
    let mut bench = Bench {
        platform,
        probe_chats: (0..partitions).map(|_| Uuid::new_v4()).collect(),
        probes_sent: 0,
    };
    // `probe` has a session on gateway gw-bench: the router writes the
    // probes to its deliveries. The load chats' members have none.
    let log = &bench.platform.log;
    let session = session_opened("probe", "gw-bench");
    log.producer
        .send(&log.topics.sessions, "probe", &session)
        .await?;
    let creates: Vec<Outgoing> = bench
        .probe_chats
        .iter()
        .enumerate()
        .map(|(p, c)| {
            bench.outgoing(
                Some(p as i32),
                command(*c, "ann", "create", group(&["probe"])),
            )
        })
        .collect();
    bench.send(creates).await?;
    let chats: Vec<Uuid> = (0..args.chats).map(|_| Uuid::new_v4()).collect();
    for part in chats.chunks(args.batch) {
        let creates = part
            .iter()
            .map(|c| bench.outgoing(None, command(*c, "ann", "create", group(&["bob", "cat"]))))
            .collect();
        bench.send(creates).await?;
    }
    let mut sent = u64::from(partitions as u32) + args.chats;
    // Counters restart with the processes: what they must reach since.
    let mut base_seq = 0.0;
    let mut base_routed = 0.0;
    println!(
        "| events in chat.events | what | restart-to-serving (s) | sequencer restores (events read again) | router restores (events read again) | sequencer restore time, sum over partitions (s) | RSS sequencer / router (MiB) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut next_id = 0u64;
    for target in &args.events {
        let t_load = Instant::now();
        while sent < *target {
            let n = (*target - sent).min(args.batch as u64);
            let records = (0..n)
                .map(|i| {
                    let c = chats[((next_id + i) % args.chats) as usize];
                    let user = ["ann", "bob", "cat"][((next_id + i) % 3) as usize];
                    bench.outgoing(
                        None,
                        command(c, user, &format!("m{}", next_id + i), text("load")),
                    )
                })
                .collect();
            bench.send(records).await?;
            next_id += n;
            sent += n;
            // Keep the backlog bounded: at most 20 batches ahead.
            loop {
                let (seq, _) = bench.progress().await;
                if seq + base_seq + (20 * args.batch) as f64 >= sent as f64 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        loop {
            let (seq, routed) = bench.progress().await;
            if seq + base_seq >= sent as f64 && routed + base_routed >= sent as f64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let load_s = t_load.elapsed().as_secs_f64();
        let (rss_seq, rss_router) = bench.rss();
        eprintln!(
            "{sent} events sequenced and routed ({load_s:.0} s for this step); RSS sequencer {} MiB, router {} MiB",
            rss_seq / 1024,
            rss_router / 1024
        );
        println!(
            "| {sent} | after the load | | | | | {} / {} |",
            rss_seq / 1024,
            rss_router / 1024
        );
        let rounds: Vec<Restart> = std::iter::repeat_n(Restart::Clean, args.rounds)
            .chain([Restart::Kill, Restart::NewHost])
            .collect();
        for how in rounds {
            let m = bench.restart(how).await?;
            sent += u64::from(partitions as u32);
            let (seq, routed) = bench.progress().await;
            base_seq = sent as f64 - seq;
            base_routed = sent as f64 - routed;
            println!(
                "| {sent} | {} | {:.2} | {} ({}) | {} ({}) | {:.2} | {} / {} |",
                how.label(),
                m.serving.as_secs_f64(),
                m.seq_sources,
                m.seq_events_read,
                m.router_sources,
                m.router_events_read,
                m.seq_restore_s,
                m.rss_seq / 1024,
                m.rss_router / 1024
            );
        }
    }
    bench.platform.stop().await;
    Ok(())
}
