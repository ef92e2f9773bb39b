//! Rebuilds through a slow (and briefly failing) schema registry: a record
//! taken off Kafka is never dropped while its decode waits on the registry.
//!
//! A small TCP proxy in front of the real registry delays every response
//! (longer than the 200 ms poll timeout a tail used to put around the whole
//! fetch-and-decode) and can answer the first schema lookups with a 500.
//! Each test gives its clients a cold schema cache (a new `SchemaRegistry`)
//! pointed at the proxy, as after a start or a registry restart.

use chat_log::{
    BatchRecord, LogConfig, PartitionedConsumer, SchemaRegistry, TailItem, TailStart, TopicTail,
    HEADER_GATEWAY_ID,
};
use chat_schemas::*;
use chat_sequencer::state::PartitionState;
use chat_tests::envelopes::{envelope, group, text};
use chat_tests::TestLog;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

/// Every response of the registry held back this long (per chunk).
const DELAY: Duration = Duration::from_millis(400);

/// A proxy to the registry that delays each response chunk by `delay` and
/// answers the first `fail_lookups` schema-by-id requests with a 500.
struct SlowRegistry {
    addr: SocketAddr,
    path: String,
    task: tokio::task::JoinHandle<()>,
}

impl SlowRegistry {
    async fn start(config: &LogConfig, delay: Duration, fail_lookups: usize) -> Self {
        let (upstream, path) = split_url(&config.registry_url);
        let upstream = tokio::net::lookup_host(upstream.as_str())
            .await
            .unwrap()
            .next()
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fails = Arc::new(AtomicUsize::new(fail_lookups));
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream, delay, fails.clone()));
            }
        });
        Self { addr, path, task }
    }

    /// `config` with its registry behind this proxy.
    fn config(&self, config: &LogConfig) -> LogConfig {
        LogConfig {
            registry_url: format!("http://{}{}", self.addr, self.path),
            ..config.clone()
        }
    }
}

impl Drop for SlowRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `http://host:port/path` -> (`host:port`, `/path`).
fn split_url(url: &str) -> (String, String) {
    let rest = url.trim_start_matches("http://");
    match rest.find('/') {
        Some(i) => (
            rest[..i].to_string(),
            rest[i..].trim_end_matches('/').into(),
        ),
        None => (rest.to_string(), String::new()),
    }
}

async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    delay: Duration,
    fails: Arc<AtomicUsize>,
) {
    let mut head = vec![0u8; 16 * 1024];
    let n = match client.read(&mut head).await {
        Ok(0) | Err(_) => return,
        Ok(n) => n,
    };
    let lookup = head[..n].windows(13).any(|w| w == b"/schemas/ids/");
    let fail = lookup
        && fails
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |f| f.checked_sub(1))
            .is_ok();
    if fail {
        tokio::time::sleep(delay).await;
        let body = br#"{"error_code":50001,"message":"registry is starting"}"#;
        let answer = format!(
            "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        let _ = client.write_all(answer.as_bytes()).await;
        let _ = client.write_all(body).await;
        let _ = client.shutdown().await;
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    if server.write_all(&head[..n]).await.is_err() {
        return;
    }
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match server_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        tokio::time::sleep(delay).await;
        if client_write.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = client_write.shutdown().await;
    up.abort();
}

/// Appends a chat's sequenced log (ChatCreated, then messages: seqs 1..=n)
/// to `chat.events`; returns the chat and the offsets written.
async fn write_chat(log: &TestLog, n: u64) -> (Uuid, Vec<i64>) {
    let chat = Uuid::new_v4();
    let mut offsets = Vec::new();
    for seq in 1..=n {
        let body = if seq == 1 {
            group(&["bob"])
        } else {
            text(&format!("m{seq}"))
        };
        let e = envelope(chat, "ann", &format!("m{seq}"), Some(seq), body);
        let at = log
            .producer
            .send(&log.topics.events, &chat.to_string(), &e)
            .await
            .unwrap();
        offsets.push(at.offset);
    }
    (chat, offsets)
}

/// Reads `chat.events` to its end through `config`'s registry, with a cold
/// schema cache, as a rebuild does: (offset, seq) of every event handed out,
/// and the undecodable records.
async fn rebuild_read(config: &LogConfig, topic: &str) -> (Vec<(i64, u64)>, Vec<String>) {
    let registry = Arc::new(SchemaRegistry::new(config).unwrap());
    let tail = TopicTail::open(config, registry, topic, None, TailStart::Beginning)
        .await
        .unwrap();
    let mut events = Vec::new();
    let mut undecodable = Vec::new();
    let mut fold = PartitionState::default();
    let mut refused = Vec::new();
    tail.read_to_end(|item| match item {
        TailItem::Event(ev) => {
            if let Err(e) = fold.apply(&ev.envelope) {
                refused.push(e.to_string());
            }
            events.push((ev.offset, ev.envelope.seq.unwrap()));
        }
        TailItem::Undecodable { offset, error, .. } => {
            undecodable.push(format!("{offset}: {error}"))
        }
    })
    .await
    .unwrap();
    undecodable.extend(refused);
    (events, undecodable)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_through_a_slow_registry_hands_out_every_record_once_in_order() {
    let log = TestLog::start("slowreg").await.unwrap();
    let n = 30;
    let (_, offsets) = write_chat(&log, n).await;
    let proxy = SlowRegistry::start(&log.config, DELAY, 0).await;
    let config = proxy.config(&log.config);

    let started = std::time::Instant::now();
    let (events, problems) = rebuild_read(&config, &log.topics.events).await;
    assert!(problems.is_empty(), "{problems:?}");
    let seqs: Vec<u64> = events.iter().map(|(_, s)| *s).collect();
    assert_eq!(
        seqs,
        (1..=n).collect::<Vec<_>>(),
        "every record exactly once, in order"
    );
    let read: Vec<i64> = events.iter().map(|(o, _)| *o).collect();
    assert_eq!(read, offsets);
    assert!(
        started.elapsed() >= DELAY,
        "the registry was slow for this read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_error_during_a_rebuild_is_retried_not_a_lost_record() {
    let log = TestLog::start("slowreg500").await.unwrap();
    let n = 10;
    let (_, offsets) = write_chat(&log, n).await;
    // The first two schema lookups answer 500 (a registry starting up).
    let proxy = SlowRegistry::start(&log.config, Duration::from_millis(300), 2).await;
    let config = proxy.config(&log.config);

    let (events, problems) = rebuild_read(&config, &log.topics.events).await;
    assert!(problems.is_empty(), "{problems:?}");
    let read: Vec<i64> = events.iter().map(|(o, _)| *o).collect();
    assert_eq!(read, offsets, "every record, none undecodable");
    let seqs: Vec<u64> = events.iter().map(|(_, s)| *s).collect();
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_cancelled_while_its_records_decode_loses_none_of_them() {
    let log = TestLog::start("slowbatch").await.unwrap();
    let n = 20;
    let (_, offsets) = write_chat(&log, n).await;
    let proxy = SlowRegistry::start(&log.config, DELAY, 0).await;
    let config = proxy.config(&log.config);
    let registry = Arc::new(SchemaRegistry::new(&config).unwrap());
    let mut consumer = PartitionedConsumer::connect(
        &config,
        registry,
        &format!("{}cancelled", config.topic_prefix),
        &log.topics.events,
    )
    .await
    .unwrap();
    // Like the sequencer's select! (a failure report) or the presence
    // service's expiry tick: the wait for a batch is often cancelled, here
    // well before the slow registry answers.
    let never = tokio_util::sync::CancellationToken::new();
    let mut read = Vec::new();
    let mut cancelled = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while read.len() < offsets.len() && tokio::time::Instant::now() < deadline {
        let next = consumer.next_batch(4, Duration::from_millis(20), &never);
        match tokio::time::timeout(Duration::from_millis(150), next).await {
            Ok(batch) => {
                for r in batch.unwrap().unwrap().records {
                    match r {
                        BatchRecord::Event(ev) => read.push(ev.offset),
                        BatchRecord::Undecodable { offset, error, .. } => {
                            panic!("{offset} undecodable: {error}")
                        }
                    }
                }
            }
            Err(_) => cancelled += 1,
        }
    }
    assert!(cancelled > 0, "some waits were cancelled mid-decode");
    assert_eq!(read, offsets, "every record once, in order");
}

fn sequencer_config(config: &LogConfig, prefix: &str) -> chat_sequencer::SequencerConfig {
    chat_sequencer::SequencerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        group_id: format!("{prefix}sequencer"),
        transactional_prefix: format!("{prefix}seq"),
        log: config.clone(),
        ..Default::default()
    }
}

/// Reads `chat.events` (through the real registry) until `want` events of
/// `chat` arrived or `wait` passed; their seqs in log order.
async fn seqs_of(log: &TestLog, chat: Uuid, want: usize, wait: Duration) -> Vec<u64> {
    let tail = TopicTail::open(
        &log.config,
        log.registry.clone(),
        &log.topics.events,
        None,
        TailStart::Beginning,
    )
    .await
    .unwrap();
    let mut seqs = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while seqs.len() < want {
        match tokio::time::timeout_at(deadline, tail.next()).await {
            Ok(Ok(TailItem::Event(ev))) if ev.envelope.chat_id == Some(chat) => {
                if let Some(s) = ev.envelope.seq {
                    seqs.push(s);
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequencer_restarted_behind_a_slow_registry_goes_on_with_the_next_seq() {
    let log = TestLog::start("slowseq").await.unwrap();
    let proxy = SlowRegistry::start(&log.config, DELAY, 0).await;
    let slow = proxy.config(&log.config);
    let prefix = log.config.topic_prefix.clone();
    let chat = Uuid::new_v4();
    let send = |e: Envelope| {
        let p = log.producer.clone();
        let topic = log.topics.commands.clone();
        async move {
            p.send_with(
                &topic,
                None,
                &chat.to_string(),
                &e,
                &[(HEADER_GATEWAY_ID, b"gw-slow".as_slice())],
            )
            .await
            .unwrap();
        }
    };

    // A first sequencer (behind the slow registry) sequences a create and
    // five messages, then stops.
    let first = chat_runtime::Shutdown::new();
    let task = tokio::spawn(chat_sequencer::run(
        sequencer_config(&slow, &prefix),
        first.clone(),
    ));
    send(envelope(chat, "ann", "create", None, group(&["bob"]))).await;
    for i in 1..=5 {
        send(envelope(chat, "ann", &format!("a{i}"), None, text("x"))).await;
    }
    let before = seqs_of(&log, chat, 6, Duration::from_secs(60)).await;
    assert_eq!(before, (1..=6).collect::<Vec<_>>());
    first.trigger();
    task.await.unwrap().unwrap();

    // A new one (cold schema cache, slow registry) rebuilds the partition
    // and must go on at seq 7: a record dropped by the rebuild would make it
    // refuse the chat (ChatCreated lost) or hand out a seq that exists.
    let second = chat_runtime::Shutdown::new();
    let task = tokio::spawn(chat_sequencer::run(
        sequencer_config(&slow, &prefix),
        second.clone(),
    ));
    for i in 1..=5 {
        send(envelope(chat, "bob", &format!("b{i}"), None, text("y"))).await;
    }
    let all = seqs_of(&log, chat, 11, Duration::from_secs(60)).await;
    second.trigger();
    task.await.unwrap().unwrap();
    assert_eq!(
        all,
        (1..=11).collect::<Vec<_>>(),
        "gap-free, no seq reused after the restart"
    );
}
