//! `push-bench`: pushes per second one `chat-push-worker` sends against the
//! local fake providers (tests/py/push_fakes.py), and the latency from a
//! task's creation (`created_ts`, stamped when it is appended to
//! `chat.push`) to the provider receiving its request under light load.
//!
//! Against the running stack (Kafka, registry, Cassandra). Per run: a fresh
//! topic prefix and keyspace; `--tasks` APNs tasks (HTTP/2, multiplexed on
//! one connection) are appended to `chat.push` first, then one worker is
//! started; the rate is (tasks - 1) / (last accepted request - first
//! accepted request), as the fake timed them (start-up excluded). Then the
//! light-load phase: `--light` tasks at `--light-rate` per second, each
//! created just before it is appended; latency = fake arrival - created_ts.
//!
//! `cargo run -p chat-tests --bin push-bench -- --runs 3`
//! (`CHAT_PUSH_WORKER_PROFILE=release` runs a release worker, if built).

use anyhow::Context;
use chat_log::Outgoing;
use chat_tests::push::{task, wait_for, Fakes, Worker};
use chat_tests::TestLog;
use clap::Parser;
use std::time::Duration;
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(about = "push worker throughput and task->request latency against the local fakes")]
struct Args {
    /// Tasks of the throughput phase, per run.
    #[arg(long, default_value_t = 5_000)]
    tasks: usize,
    /// Runs (each on fresh topics and keyspace).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Tasks of the light-load latency phase, per run.
    #[arg(long, default_value_t = 200)]
    light: usize,
    /// Their rate, per second.
    #[arg(long, default_value_t = 20)]
    light_rate: u64,
    /// push.concurrency of the worker.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = chat_tests::third_party_python()
        .context("push-bench needs the fakes' Python deps: make py-deps")?;
    let mut rates = Vec::new();
    let mut lat_all: Vec<f64> = Vec::new();
    println!("load average before: {}", loadavg());
    for run in 1..=args.runs {
        let fakes = Fakes::start().await?;
        let log = TestLog::start("push-bench").await?;
        let chat = Uuid::new_v4();
        let mut batch = Vec::with_capacity(args.tasks);
        for i in 0..args.tasks {
            let user = format!("user-{}", i % 100);
            let t = task(
                &user,
                chat,
                (i / 100) as u64 + 1,
                &format!("dev-{i}"),
                "apns",
                &format!("{i:08x}"),
                "Chat",
                "benchmark",
            );
            batch.push(Outgoing {
                topic: log.topics.push.clone(),
                partition: None,
                key: user,
                envelope: t,
                headers: vec![],
            });
        }
        for chunk in batch.chunks(1000) {
            log.producer.send_batch(chunk.to_vec()).await?;
        }
        let mut env = Worker::env_for(
            &log.config,
            &format!("push_bench_{}", &Uuid::new_v4().simple().to_string()[..10]),
            &fakes,
        );
        env.push((
            "CHAT_PUSH__CONCURRENCY".into(),
            args.concurrency.to_string(),
        ));
        env.push((
            "RUST_LOG".into(),
            std::env::var("PUSH_BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
        ));
        let mut worker = Worker::spawn(env)?;
        eprintln!("worker log: {}", worker.log_file.display());
        let n = args.tasks;
        let times = wait_for("every task accepted", Duration::from_secs(600), || async {
            let t = fakes.times().await?;
            Ok((t.len() >= n).then_some(t))
        })
        .await
        .with_context(|| worker.output())?;
        let mut arrivals: Vec<f64> = times.iter().map(|(a, _)| *a).collect();
        arrivals.sort_by(|a, b| a.total_cmp(b));
        let span = arrivals[n - 1] - arrivals[0];
        let rate = (n - 1) as f64 / span;
        rates.push(rate);

        // Light load: one task at a time, created just before it is appended.
        let gap = Duration::from_millis(1000 / args.light_rate.max(1));
        for i in 0..args.light {
            let user = format!("light-{}", i % 10);
            let t = task(
                &user,
                chat,
                1_000_000 + i as u64,
                &format!("light-{i}"),
                "apns",
                &format!("{:08x}", 0x1000_0000 + i),
                "Chat",
                "light",
            );
            log.producer.send(&log.topics.push, &user, &t).await?;
            tokio::time::sleep(gap).await;
        }
        let total = n + args.light;
        let times = wait_for(
            "every light task accepted",
            Duration::from_secs(120),
            || async {
                let t = fakes.times().await?;
                Ok((t.len() >= total).then_some(t))
            },
        )
        .await?;
        let mut lat: Vec<f64> = times[n..]
            .iter()
            .filter_map(|(a, c)| c.map(|c| a * 1000.0 - c as f64))
            .collect();
        lat.sort_by(|a, b| a.total_cmp(b));
        println!(
            "run {run}: {n} tasks in {span:.2} s = {rate:.0} pushes/s; light load ({} tasks at {}/s): task->request p50 {:.1} ms, p99 {:.1} ms; load average {}",
            args.light, args.light_rate, pct(&lat, 0.5), pct(&lat, 0.99), loadavg()
        );
        lat_all.extend(lat);
        let _ = worker.terminate();
    }
    rates.sort_by(|a, b| a.total_cmp(b));
    lat_all.sort_by(|a, b| a.total_cmp(b));
    println!(
        "summary: pushes/s median {:.0} (min {:.0}, max {:.0}, spread {:.0}%); task->request over all runs p50 {:.1} ms p99 {:.1} ms; load average after: {}",
        pct(&rates, 0.5),
        rates[0],
        rates[rates.len() - 1],
        100.0 * (rates[rates.len() - 1] - rates[0]) / pct(&rates, 0.5),
        pct(&lat_all, 0.5),
        pct(&lat_all, 0.99),
        loadavg()
    );
    Ok(())
}
