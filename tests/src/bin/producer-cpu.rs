//! `producer-cpu`: the CPU a librdkafka producer spends to send small records
//! to many partitions at a fixed rate, with and without idempotence. Made to
//! find out why the gateway's and router's producer threads were busy (see
//! ARCHITECTURE.md "Measured"). Needs the stack (`make infra-up`).
//!
//! `cargo run --release -p chat-tests --bin producer-cpu -- --help`

use chat_tests::TestLog;
use clap::Parser;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "CPU of one producer sending small records to many partitions")]
struct Args {
    /// Records per second.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    /// Seconds to send.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// linger.ms.
    #[arg(long, default_value_t = 5)]
    linger_ms: u32,
    /// enable.idempotence (max.in.flight is then at most 5).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    idempotence: bool,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 12)]
    partitions: i32,
    /// max.in.flight.requests.per.connection.
    #[arg(long, default_value_t = 5)]
    max_in_flight: u32,
}

fn cpu_secs() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = s.rfind(')').map(|i| &s[i + 2..]).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = chat_tests::log_config("prodcpu");
    config.chat_partitions = args.partitions;
    let log = TestLog::start_config(config).await?;
    let topic = log.topics.commands.clone();
    let partitions = log.config.chat_partitions;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &log.config.brokers)
        .set("enable.idempotence", args.idempotence.to_string())
        .set("acks", "all")
        .set("linger.ms", args.linger_ms.to_string())
        .set(
            "max.in.flight.requests.per.connection",
            args.max_in_flight.to_string(),
        )
        .create()?;
    let payload = vec![b'x'; 300];
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let total = args.rate * args.seconds;
    let cpu0 = cpu_secs();
    let t0 = Instant::now();
    let mut pending = Vec::new();
    for k in 0..total {
        tokio::time::sleep_until((t0 + interval.mul_f64(k as f64)).into()).await;
        let key = format!("chat-{}", k % 1000);
        let rec = FutureRecord::to(&topic)
            .key(&key)
            .payload(&payload)
            .partition((k % partitions as u64) as i32);
        match producer.send_result(rec) {
            Ok(d) => pending.push(d),
            Err((e, _)) => anyhow::bail!("enqueue: {e}"),
        }
        if pending.len() >= 1000 {
            for d in pending.drain(..) {
                d.await?.map_err(|(e, _)| e)?;
            }
        }
    }
    for d in pending.drain(..) {
        d.await?.map_err(|(e, _)| e)?;
    }
    producer.flush(Duration::from_secs(10))?;
    let cpu = cpu_secs() - cpu0;
    println!(
        "{} records to {partitions} partitions at {}/s, linger.ms={} idempotence={} max.in.flight={}: \
         CPU {cpu:.2} s over {:.1} s ({:.0} us per record)",
        total,
        args.rate,
        args.linger_ms,
        args.idempotence,
        args.max_in_flight,
        t0.elapsed().as_secs_f64(),
        cpu * 1e6 / total as f64
    );
    Ok(())
}
