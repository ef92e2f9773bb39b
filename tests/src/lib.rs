//! Support for the end-to-end tests and benchmarks that run against the real
//! local stack (`make infra-up`): per-test topic prefixes so tests run in
//! parallel on one broker, sample events of every type, and helpers to find
//! the repository's scripts.
//!
//! Addresses come from the same `CHAT_LOG__*` / `CHAT_STORE__*` environment
//! overrides the services read, with the `make infra-up` defaults.

pub mod admin;
pub mod checker;
pub mod envelopes;
pub mod platform;
pub mod push;
pub mod ws;

use chat_log::{EventProducer, LogConfig, SchemaRegistry, Topics};
use chat_schemas::*;
use std::path::PathBuf;
use std::sync::Arc;
use uuid::Uuid;

/// The log config for tests: defaults, `CHAT_LOG__*` overrides, and a unique
/// topic prefix.
pub fn log_config(test: &str) -> LogConfig {
    let mut cfg = LogConfig::default();
    if let Ok(b) = std::env::var("CHAT_LOG__BROKERS") {
        cfg.brokers = b;
    }
    if let Ok(r) = std::env::var("CHAT_LOG__REGISTRY_URL") {
        cfg.registry_url = r;
    }
    cfg.topic_prefix = format!("t.{test}.{}.", &Uuid::new_v4().simple().to_string()[..8]);
    cfg.chat_partitions = 3;
    cfg
}

/// A connected log for one test: topics created, schema registered.
pub struct TestLog {
    pub config: LogConfig,
    pub topics: Topics,
    pub registry: Arc<SchemaRegistry>,
    pub producer: EventProducer,
}

impl TestLog {
    pub async fn start(test: &str) -> anyhow::Result<Self> {
        Self::start_config(log_config(test)).await
    }

    /// Like [`start`](Self::start) with a config of the caller's (e.g. the
    /// 3-broker cluster, replication 3, min ISR 2).
    pub async fn start_config(config: LogConfig) -> anyhow::Result<Self> {
        let topics = Topics::new(&config);
        chat_log::topics::ensure_topics(&config, &topics.specs()).await?;
        let registry = Arc::new(SchemaRegistry::new(&config)?);
        for t in topics.envelope_topics() {
            registry.register_envelope(&t).await?;
        }
        let producer = EventProducer::connect(&config, registry.clone()).await?;
        Ok(Self {
            config,
            topics,
            registry,
            producer,
        })
    }
}

/// The repository root (this crate lives in `<root>/tests`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

fn envelope(chat: Option<Uuid>, seq: Option<u64>, body: Body) -> Envelope {
    Envelope {
        event_id: Uuid::new_v4(),
        chat_id: chat,
        seq,
        sender_user: "alice".into(),
        sender_device: "alice-phone".into(),
        client_msg_id: Some(format!("c-{}", Uuid::new_v4().simple())),
        client_ts: Some(1_767_225_600_000),
        server_ts: 1_767_225_600_123,
        sequenced_ts: seq.map(|_| 1_767_225_600_125),
        trace_id: Uuid::new_v4().simple().to_string(),
        body,
    }
}

/// One envelope of every event type, with optional fields both set and unset.
pub fn one_of_every_kind() -> Vec<Envelope> {
    let chat = Some(Uuid::new_v4());
    let media = MediaRef {
        object_key: "media/ab/cd.jpg".into(),
        mime_type: "image/jpeg".into(),
        size_bytes: 123_456,
        width: Some(640),
        height: None,
        sha256: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".into(),
    };
    let bodies = vec![
        Body::MessageSent(MessageSent {
            kind: MessageKind::Media,
            text: Some("look ✓ ünïcode".into()),
            media: Some(media),
            reply_to_seq: Some(3),
        }),
        Body::MessageEdited(MessageEdited {
            target_seq: 4,
            text: "edited".into(),
        }),
        Body::MessageDeleted(MessageDeleted {
            target_seq: 4,
            for_everyone: true,
        }),
        Body::ReactionChanged(ReactionChanged {
            target_seq: 2,
            emoji: "👍".into(),
            added: true,
        }),
        Body::DeliveryReceipt(DeliveryReceipt {
            up_to_seq: 9,
            device: "bob-laptop".into(),
        }),
        Body::ReadReceipt(ReadReceipt { up_to_seq: 8 }),
        Body::ChatCreated(ChatCreated {
            kind: ChatKind::Group,
            title: Some("team".into()),
            members: vec![
                ChatMember {
                    user_id: "alice".into(),
                    role: Role::Admin,
                },
                ChatMember {
                    user_id: "bob".into(),
                    role: Role::Member,
                },
            ],
            max_members: 256,
        }),
        Body::MemberAdded(MemberAdded {
            user_id: "carol".into(),
            role: Role::Member,
        }),
        Body::MemberRemoved(MemberRemoved {
            user_id: "carol".into(),
            reason: RemovalReason::Removed,
        }),
        Body::MemberRoleChanged(MemberRoleChanged {
            user_id: "bob".into(),
            role: Role::Admin,
        }),
        Body::PresenceChanged(PresenceChanged {
            user_id: "alice".into(),
            status: PresenceStatus::Offline,
            last_seen: Some(1_767_225_000_000),
        }),
        Body::Typing(Typing {
            active: true,
            expires_at: 1_767_225_605_000,
        }),
        Body::SessionOpened(SessionOpened {
            gateway_id: "gw-1".into(),
            device_id: "alice-phone".into(),
            session_id: Uuid::new_v4(),
            opened_at: 1_767_225_600_000,
        }),
        Body::SessionClosed(SessionClosed {
            gateway_id: "gw-1".into(),
            device_id: "alice-phone".into(),
            session_id: Uuid::new_v4(),
            reason: "client closed".into(),
        }),
        Body::PushTask(PushTask {
            user_id: "bob".into(),
            chat_id: Uuid::new_v4(),
            seq: 10,
            title: "alice".into(),
            body_preview: None,
            attempt: 0,
            not_before: 1_767_225_600_000,
            device_id: Some("bob-phone".into()),
            provider: Some("apns".into()),
            token: Some("00fc13adff785122b4ad28809a3420982341241421348097878e577c991de8f0".into()),
            locale: Some("en-GB".into()),
            count: Some(5),
            badge: Some(7),
            collapse_key: None,
            dedupe_key: None,
            sender_id: Some("alice".into()),
            kind: Some("message".into()),
            created_ts: Some(1_767_225_600_001),
        }),
        Body::CommandResult(CommandResult {
            command_event_id: Uuid::new_v4(),
            outcome: CommandOutcome::Rejected,
            seq: None,
            code: Some("not_member".into()),
            reason: Some("you are not a member of this chat".into()),
            event_partition: None,
            event_offset: None,
        }),
        Body::SessionRouted(SessionRouted {
            session_id: Uuid::new_v4(),
            router_offsets: vec![0, 17, 4],
        }),
        Body::GatewayHeartbeat(chat_schemas::GatewayHeartbeat {
            gateway_id: "gw-1".into(),
            instance_id: Uuid::new_v4(),
            interval_ms: 3_000,
        }),
        Body::PresenceSettingChanged(chat_schemas::PresenceSettingChanged { hidden: true }),
        Body::DeviceRevoked(chat_schemas::DeviceRevoked {
            device_id: "phone".into(),
            revoked_at: 1_767_225_600_000,
        }),
        Body::MuteChanged(chat_schemas::MuteChanged { muted: true }),
        Body::PushRegistrationChanged(chat_schemas::PushRegistrationChanged {
            device_id: "phone".into(),
            provider: "webpush".into(),
            token: Some(
                r#"{"endpoint":"https://push.example/x","keys":{"p256dh":"BNc","auth":"tBH"}}"#
                    .into(),
            ),
            locale: Some("fr-FR".into()),
            reason: Some("client".into()),
            provider_detail: None,
        }),
        Body::PushSettingsChanged(chat_schemas::PushSettingsChanged {
            time_zone: "Europe/Paris".into(),
            dnd_start_minute: Some(22 * 60),
            dnd_end_minute: Some(7 * 60),
            allowed_chats: vec![Uuid::new_v4()],
        }),
    ];
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            let user_scoped = matches!(
                b,
                Body::PresenceChanged(_)
                    | Body::SessionOpened(_)
                    | Body::SessionClosed(_)
                    | Body::GatewayHeartbeat(_)
                    | Body::PresenceSettingChanged(_)
                    | Body::DeviceRevoked(_)
                    | Body::PushRegistrationChanged(_)
                    | Body::PushSettingsChanged(_)
            );
            if user_scoped {
                envelope(None, None, b)
            } else {
                envelope(chat, Some(i as u64 + 1), b)
            }
        })
        .collect()
}

/// The partition key an envelope is produced with in the tests.
pub fn key_of(e: &Envelope) -> String {
    e.chat_id
        .map(|c| c.to_string())
        .unwrap_or_else(|| e.sender_user.clone())
}

/// Consumes from `topics` in consumer group `group` until `n` events were
/// handled or `timeout` passed; returns what was handled, in order.
pub async fn consume_n(
    log: &TestLog,
    group: &str,
    topics: &[&str],
    n: usize,
    timeout: std::time::Duration,
) -> anyhow::Result<Vec<chat_log::ConsumedEvent>> {
    let consumer = chat_log::EventConsumer::connect(
        &log.config,
        group,
        topics,
        log.producer.clone(),
        &log.topics.dlq,
    )
    .await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let seen = std::sync::Mutex::new(Vec::new());
    let run = consumer.run(
        |ev| {
            let mut seen = seen.lock().unwrap();
            seen.push(ev);
            if seen.len() >= n {
                stop.cancel();
            }
            async { Ok(()) }
        },
        stop.clone(),
    );
    match tokio::time::timeout(timeout, run).await {
        Ok(r) => r?,
        Err(_) => {
            // Timed out: stop and still commit, then report what was seen.
            stop.cancel();
            consumer.commit().await;
        }
    }
    Ok(seen.into_inner().unwrap())
}

/// The JSON a generic Avro reader yields for an envelope: the Avro value we
/// encode, with unions unwrapped, enums as symbols, uuids as strings and
/// timestamps as epoch milliseconds. Used to compare third-party decoding
/// field by field.
pub fn avro_json(value: &apache_avro::types::Value) -> serde_json::Value {
    use apache_avro::types::Value as V;
    use serde_json::json;
    match value {
        V::Null => serde_json::Value::Null,
        V::Boolean(b) => json!(b),
        V::Int(i) => json!(i),
        V::Long(l) | V::TimestampMillis(l) => json!(l),
        V::String(s) | V::Enum(_, s) => json!(s),
        V::Uuid(u) => json!(u.to_string()),
        V::Union(_, inner) => avro_json(inner),
        V::Array(items) => serde_json::Value::Array(items.iter().map(avro_json).collect()),
        V::Record(fields) => serde_json::Value::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), avro_json(v)))
                .collect(),
        ),
        other => json!(format!("unsupported in test: {other:?}")),
    }
}

/// Removes the `__type` markers the Python reader adds for union branches.
pub fn strip_type_markers(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove("__type");
            m.values_mut().for_each(strip_type_markers);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_type_markers),
        _ => {}
    }
}

/// The Python interpreter that has the third-party client installed
/// (`CHAT_PYTHON`, set by `make test` to the project's venv).
pub fn third_party_python() -> anyhow::Result<PathBuf> {
    let default = repo_root().join("tests/py/.venv/bin/python");
    let p = std::env::var("CHAT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or(default);
    anyhow::ensure!(
        p.exists(),
        "no Python with confluent-kafka at {}: run `make py-deps` (make test does) or set CHAT_PYTHON",
        p.display()
    );
    Ok(p)
}

pub use chat_runtime::now_ms;

/// A loopback address with a port free now (for an in-process service's
/// admin endpoint, whose `/metrics` a test reads).
pub fn free_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr")
}

/// The sum of the samples of `name` (with `{labels}` when given, e.g.
/// `source="local"`) in the Prometheus text at `http://<admin>/metrics`.
pub async fn metric(admin: std::net::SocketAddr, name: &str, labels: Option<&str>) -> f64 {
    let text = match reqwest::get(format!("http://{admin}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return 0.0,
    };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, l) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let wanted = n == name && labels.is_none_or(|want| l.split(',').any(|x| x == want));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .fold(0.0, |a, b| a + b)
}
