//! `log-latency`: one hop of the log on loopback. Produces envelopes at an
//! open-loop rate through the typed producer (Avro + registry, acks=all) and
//! measures the time until the typed consumer (a consumer group member)
//! handed each one to its handler. Prints p50/p90/p99/p99.9/max and writes a
//! short report (default `tests/reports/log-latency.md`).
//!
//! Needs the stack: `make infra-up`, then `make bench` (or
//! `cargo run --release -p chat-tests --bin log-latency -- --help`).

use chat_log::EventConsumer;
use chat_tests::{one_of_every_kind, TestLog};
use clap::Parser;
use hdrhistogram::Histogram;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(about = "Kafka produce->consume latency of the typed log, on loopback")]
struct Args {
    /// Records to send.
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// Open-loop send rate, records per second.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Producer linger.ms.
    #[arg(long, default_value_t = 0)]
    linger_ms: u32,
    /// Consumer fetch.wait.max.ms.
    #[arg(long, default_value_t = 100)]
    fetch_wait_ms: u32,
    /// Where to write the report ("-" for none).
    #[arg(long, default_value = "tests/reports/log-latency.md")]
    report: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut log = TestLog::start("bench").await?;
    log.config.linger_ms = args.linger_ms;
    log.config.fetch_wait_max_ms = args.fetch_wait_ms;
    let producer = chat_log::EventProducer::connect(&log.config, log.registry.clone()).await?;
    let topic = log.topics.events.clone();

    let sent_at: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let stop = CancellationToken::new();
    let consumer = EventConsumer::connect(
        &log.config,
        "bench",
        &[&topic],
        producer.clone(),
        &log.topics.dlq,
    )
    .await?;
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let warm = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let consumer_task = {
        let (sent_at, hist, stop, received, warm) = (
            sent_at.clone(),
            hist.clone(),
            stop.clone(),
            received.clone(),
            warm.clone(),
        );
        let total = args.messages;
        tokio::spawn(async move {
            let handler = |ev: chat_log::ConsumedEvent| {
                let t0 = sent_at.lock().unwrap().remove(&ev.envelope.event_id);
                match t0 {
                    Some(t0) => {
                        let us = t0.elapsed().as_micros() as u64;
                        let _ = hist.lock().unwrap().record(us.max(1));
                        if received.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 >= total
                        {
                            stop.cancel();
                        }
                    }
                    // A warm-up record: the consumer owns its partitions now.
                    None => warm.store(true, std::sync::atomic::Ordering::Relaxed),
                }
                async { Ok(()) }
            };
            consumer.run(handler, stop.clone()).await
        })
    };
    // Warm up until the consumer owns its partitions (group join, first
    // fetch): those records are not measured.
    let template = one_of_every_kind().remove(0);
    let warm_deadline = Instant::now() + Duration::from_secs(60);
    let mut w = 0u128;
    while !warm.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < warm_deadline {
        for p in 0..log.config.chat_partitions as u128 * 4 {
            let mut e = template.clone();
            e.event_id = Uuid::new_v4();
            let key = Uuid::from_u128(w * 1000 + p).to_string();
            producer.send(&topic, &key, &e).await?;
        }
        w += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let started = Instant::now();
    let mut errors = 0u64;
    let mut inflight = tokio::task::JoinSet::new();
    for i in 0..args.messages {
        let due = started + interval * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let mut e = template.clone();
        e.event_id = Uuid::new_v4();
        e.chat_id = Some(Uuid::from_u128(u128::from(i % 64)));
        sent_at.lock().unwrap().insert(e.event_id, Instant::now());
        let (p, topic) = (producer.clone(), topic.clone());
        inflight.spawn(async move {
            p.send(&topic, &e.chat_id.unwrap_or_default().to_string(), &e)
                .await
        });
        while let Some(done) = inflight.try_join_next() {
            if !matches!(done, Ok(Ok(_))) {
                errors += 1;
            }
        }
    }
    while let Some(done) = inflight.join_next().await {
        if !matches!(done, Ok(Ok(_))) {
            errors += 1;
        }
    }
    let send_secs = started.elapsed().as_secs_f64();
    let _ = tokio::time::timeout(Duration::from_secs(60), consumer_task).await;
    stop.cancel();
    let elapsed = started.elapsed().as_secs_f64();
    let got = received.load(std::sync::atomic::Ordering::Relaxed);
    let h = hist.lock().unwrap().clone();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let summary = format!(
        "records {} at {} msg/s offered ({:.0} msg/s achieved send, {:.0} msg/s delivered), errors {}, lost {}\n\
         produce->consume latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\n\
         settings: linger.ms={} fetch.wait.max.ms={} acks=all idempotence=on, {} partitions, Avro via registry",
        args.messages,
        args.rate,
        args.messages as f64 / send_secs,
        got as f64 / elapsed,
        errors,
        args.messages.saturating_sub(got),
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0,
        args.linger_ms,
        args.fetch_wait_ms,
        log.config.chat_partitions,
    );
    println!("{summary}");
    if args.report != "-" {
        let path = chat_tests::repo_root().join(&args.report);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let text = format!(
            "# log-latency: latest run\n\nOne hop of the typed log on loopback (single Kafka broker, Apicurio registry), \
             measured by `make bench` (`cargo run --release -p chat-tests --bin log-latency`).\n\n```\n{summary}\n```\n\n\
             Machine: {} cores. Run at {} (unix seconds).\n",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        );
        std::fs::write(&path, text)?;
        println!("report written to {}", path.display());
    }
    Ok(())
}
