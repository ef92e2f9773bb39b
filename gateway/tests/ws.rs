//! The gateway in-process against the real Kafka and registry (`make
//! infra-up`), with history from a [`MemoryHistory`]. Each test uses its own
//! topic prefix and gateway id, so they run in parallel.
//!
//! The sequencer and the router are played by the test: it reads what the
//! gateway produced (`chat.commands`, `chat.sessions`) and writes what they
//! would write to the gateway's `chat.deliveries` partition.

use bytes::Bytes;
use chat_gateway::history::text_row;
use chat_gateway::{Gateway, GatewayConfig, GatewayHandle, MemoryHistory};
use chat_log::{
    deliveries_partition, EventProducer, LogConfig, OutRecord, Outgoing, SchemaRegistry, TailItem,
    TailStart, TopicTail, Topics, TxnProducer, HEADER_GATEWAY_ID, HEADER_RECIPIENTS,
};
use chat_runtime::Secret;
use chat_schemas::{
    Body, CommandOutcome, CommandResult, Envelope, MessageKind, MessageSent, SessionRouted,
};
use fastwebsockets::{Frame, OpCode, Payload, WebSocket};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

const SECRET: &str = "integration-test-secret-0123456789";
const WAIT: Duration = Duration::from_secs(20);

type Ws = WebSocket<TokioIo<Upgraded>>;

struct SpawnExecutor;

impl<Fut> hyper::rt::Executor<Fut> for SpawnExecutor
where
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    fn execute(&self, fut: Fut) {
        tokio::spawn(fut);
    }
}

struct Env {
    log: LogConfig,
    topics: Topics,
    registry: Arc<SchemaRegistry>,
    producer: EventProducer,
    history: Arc<MemoryHistory>,
    addr: SocketAddr,
    gw: Option<GatewayHandle>,
    gateway_id: String,
}

fn log_config(test: &str) -> LogConfig {
    let mut cfg = LogConfig::default();
    if let Ok(b) = std::env::var("CHAT_LOG__BROKERS") {
        cfg.brokers = b;
    }
    if let Ok(r) = std::env::var("CHAT_LOG__REGISTRY_URL") {
        cfg.registry_url = r;
    }
    cfg.topic_prefix = format!("t.gw-{test}.{}.", &Uuid::new_v4().simple().to_string()[..8]);
    cfg.chat_partitions = 3;
    cfg
}

async fn env(test: &str, tweak: impl FnOnce(&mut GatewayConfig)) -> Env {
    chat_runtime::telemetry::init(chat_runtime::telemetry::LogFormat::Pretty);
    let log = log_config(test);
    let topics = Topics::new(&log);
    chat_log::topics::ensure_topics(&log, &topics.specs())
        .await
        .unwrap();
    let registry = Arc::new(SchemaRegistry::new(&log).unwrap());
    for t in topics.envelope_topics() {
        registry.register_envelope(&t).await.unwrap();
    }
    let producer = EventProducer::connect(&log, registry.clone())
        .await
        .unwrap();
    let history = Arc::new(MemoryHistory::new());
    let gateway_id = format!("gw-{test}-{}", &Uuid::new_v4().simple().to_string()[..6]);
    let mut config = GatewayConfig {
        gateway_id: gateway_id.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        log: log.clone(),
        dev_login: true,
        ..GatewayConfig::default()
    };
    config.auth.hs256_secret = Some(Secret::new(SECRET));
    config.timeouts.session_routed_ms = 10_000;
    config.timeouts.sync_progress_ms = 300;
    config.allowed_origins = vec!["https://app.example".into()];
    tweak(&mut config);
    let (addr, gw) = Gateway::start_with_history(config, history.clone())
        .await
        .unwrap();
    Env {
        log,
        topics,
        registry,
        producer,
        history,
        addr,
        gw: Some(gw),
        gateway_id,
    }
}

impl Env {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn login(&self, user: &str, device: &str) -> String {
        let resp = reqwest::Client::new()
            .post(self.url("/dev/login"))
            .json(&json!({"user": user, "device": device}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        body["token"].as_str().unwrap().to_string()
    }

    async fn connect(&self, user: &str, device: &str) -> Ws {
        let token = self.login(user, device).await;
        self.connect_with(&format!("/ws?token={token}&device={device}"), None)
            .await
            .unwrap()
    }

    async fn connect_with(&self, path_and_query: &str, origin: Option<&str>) -> Result<Ws, String> {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let mut req = hyper::Request::builder()
            .method("GET")
            .uri(format!("http://{}{path_and_query}", self.addr))
            .header("Host", self.addr.to_string())
            .header(hyper::header::UPGRADE, "websocket")
            .header(hyper::header::CONNECTION, "upgrade")
            .header(
                "Sec-WebSocket-Key",
                fastwebsockets::handshake::generate_key(),
            )
            .header("Sec-WebSocket-Version", "13");
        if let Some(o) = origin {
            req = req.header("Origin", o);
        }
        let req = req.body(Empty::<Bytes>::new()).unwrap();
        let (ws, _) = fastwebsockets::handshake::client(&SpawnExecutor, req, stream)
            .await
            .map_err(|e| e.to_string())?;
        Ok(ws)
    }

    /// Plays the router/sequencer: writes `envelope` to the gateway's
    /// partition of `chat.results` (a `CommandResult`) or `chat.deliveries`.
    async fn deliver(&self, envelope: &Envelope, recipients: Option<&str>) {
        let topic = if matches!(envelope.body, Body::CommandResult(_)) {
            &self.topics.results
        } else {
            &self.topics.deliveries
        };
        let partition = deliveries_partition(&self.gateway_id, self.log.chat_partitions);
        let mut headers: Vec<(&str, &[u8])> = Vec::new();
        if let Some(r) = recipients {
            headers.push((HEADER_RECIPIENTS, r.as_bytes()));
        }
        self.producer
            .send_with(topic, Some(partition), &self.gateway_id, envelope, &headers)
            .await
            .unwrap();
    }

    /// Plays every router instance answering the session of `hello`: live
    /// events of every partition are routed to it from offset 0 on.
    async fn route_session(&self, hello: &Value) {
        let session = Uuid::parse_str(hello["session"].as_str().unwrap()).unwrap();
        let partitions = usize::try_from(self.log.chat_partitions).unwrap();
        let answer = Body::SessionRouted(SessionRouted {
            session_id: session,
            router_offsets: vec![0; partitions],
        });
        self.deliver(&envelope(None, None, "router", answer), None)
            .await;
    }

    /// The next record of `topic` (all partitions, from the beginning) matching `pred`.
    async fn find(
        &self,
        topic: &str,
        mut pred: impl FnMut(&chat_log::ConsumedEvent) -> bool,
    ) -> chat_log::ConsumedEvent {
        let tail = TopicTail::open(
            &self.log,
            self.registry.clone(),
            topic,
            None,
            TailStart::Beginning,
        )
        .await
        .unwrap();
        let found = tokio::time::timeout(WAIT, async {
            loop {
                if let TailItem::Event(e) = tail.next().await.unwrap() {
                    if pred(&e) {
                        return *e;
                    }
                }
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no matching record in {topic}"))
    }

    async fn stop(&mut self) {
        if let Some(gw) = self.gw.take() {
            gw.stop().await.unwrap();
        }
    }
}

fn envelope(chat: Option<Uuid>, seq: Option<u64>, sender: &str, body: Body) -> Envelope {
    Envelope {
        event_id: Uuid::new_v4(),
        chat_id: chat,
        seq,
        sender_user: sender.into(),
        sender_device: "d0".into(),
        client_msg_id: seq.map(|s| format!("m{s}")),
        client_ts: None,
        server_ts: 1_000,
        sequenced_ts: seq.map(|s| 1_000 + s as i64),
        trace_id: Uuid::new_v4().simple().to_string(),
        body,
    }
}

fn text(t: &str) -> Body {
    Body::MessageSent(MessageSent {
        kind: MessageKind::Text,
        text: Some(t.into()),
        media: None,
        reply_to_seq: None,
    })
}

async fn send(ws: &mut Ws, v: Value) {
    ws.write_frame(Frame::text(Payload::Owned(v.to_string().into_bytes())))
        .await
        .unwrap();
}

/// The next text frame as JSON (pongs skipped); panics on close or timeout.
async fn recv(ws: &mut Ws) -> Value {
    let frame = tokio::time::timeout(WAIT, async {
        loop {
            let f = ws.read_frame().await.unwrap();
            match f.opcode {
                OpCode::Text => return serde_json::from_slice::<Value>(&f.payload).unwrap(),
                OpCode::Close => panic!("closed: {:?}", close_code(&f.payload)),
                _ => {}
            }
        }
    })
    .await;
    frame.expect("a frame in time")
}

/// Reads until the close frame; returns its code.
async fn closed(ws: &mut Ws) -> Option<u16> {
    tokio::time::timeout(WAIT, async {
        loop {
            match ws.read_frame().await {
                Ok(f) if f.opcode == OpCode::Close => return close_code(&f.payload),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    })
    .await
    .expect("closed in time")
}

fn close_code(payload: &[u8]) -> Option<u16> {
    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
}

async fn hello(ws: &mut Ws) -> Value {
    let h = recv(ws).await;
    assert_eq!(h["type"], "hello", "{h}");
    h
}

#[tokio::test]
async fn upgrades_without_a_valid_token_get_401_json() {
    let mut e = env("auth", |_| {}).await;
    let http = reqwest::Client::new();
    let get = |q: &str| http.get(e.url(&format!("/ws{q}"))).send();

    let r = get("?device=d1").await.unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "missing_token");

    let r = get("?token=not.a.jwt&device=d1").await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_token");

    // alg=none, signed by nobody.
    use base64::Engine;
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let exp = jsonwebtoken::get_current_timestamp() + 600;
    let none = format!(
        "{}.{}.",
        b64(json!({"alg":"none"})),
        b64(json!({"sub":"alice","exp":exp}))
    );
    let r = get(&format!("?token={none}&device=d1")).await.unwrap();
    assert_eq!(r.status(), 401);

    // Expired and wrongly signed tokens.
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    let expired =
        jsonwebtoken::encode(&header, &json!({"sub":"alice","exp": exp - 7200}), &key).unwrap();
    let r = get(&format!("?token={expired}&device=d1")).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "token_expired");
    let other = jsonwebtoken::EncodingKey::from_secret(b"some-other-secret-0123456789");
    let forged = jsonwebtoken::encode(&header, &json!({"sub":"alice","exp": exp}), &other).unwrap();
    let r = get(&format!("?token={forged}&device=d1")).await.unwrap();
    assert_eq!(r.status(), 401);

    // A valid token in the Authorization header, but no device: 400.
    let token = e.login("alice", "d1").await;
    let no_device =
        jsonwebtoken::encode(&header, &json!({"sub":"alice","exp": exp}), &key).unwrap();
    let r = http
        .get(e.url("/ws"))
        .bearer_auth(&no_device)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_device");
    // A valid token whose `device` claim is malformed: the device is bad,
    // not the token (PROTOCOL.md: 400 invalid_device).
    for bad in ["", "a b", "a/b", &"x".repeat(65)] {
        let claim = jsonwebtoken::encode(
            &header,
            &json!({"sub":"alice","exp": exp, "device": bad}),
            &key,
        )
        .unwrap();
        let r = get(&format!("?token={claim}")).await.unwrap();
        assert_eq!(r.status(), 400, "device claim {bad:?}");
        assert_eq!(
            r.json::<Value>().await.unwrap()["error"],
            "invalid_device",
            "device claim {bad:?}"
        );
    }
    // Valid, but not a WebSocket request: 426.
    let r = get(&format!("?token={token}")).await.unwrap();
    assert_eq!(r.status(), 426);

    // Origins: a listed one upgrades, another is refused with 403.
    let path = format!("/ws?token={token}");
    let mut ws = e
        .connect_with(&path, Some("https://app.example"))
        .await
        .unwrap();
    hello(&mut ws).await;
    let err = e
        .connect_with(&path, Some("https://evil.example"))
        .await
        .err()
        .unwrap();
    assert!(
        err.contains("403") || err.to_lowercase().contains("status"),
        "{err}"
    );
    e.stop().await;
}

#[tokio::test]
async fn dev_login_round_trip_hello_and_malformed_frames() {
    let mut e = env("hello", |c| c.limits.max_bad_frames = 4).await;
    let mut ws = e.connect("alice", "phone-1").await;
    let h = hello(&mut ws).await;
    assert_eq!(h["v"], 1);
    assert_eq!(h["user"], "alice");
    assert_eq!(h["device"], "phone-1");
    assert_eq!(h["gateway"], e.gateway_id.as_str());
    assert!(Uuid::parse_str(h["session"].as_str().unwrap()).is_ok());
    assert_eq!(h["limits"]["max_frame_bytes"], 65536);

    // SessionOpened went to chat.sessions, keyed by user.
    let session = Uuid::parse_str(h["session"].as_str().unwrap()).unwrap();
    let opened = e
        .find(
            &e.topics.sessions.clone(),
            |r| matches!(&r.envelope.body, Body::SessionOpened(o) if o.session_id == session),
        )
        .await;
    assert_eq!(opened.key.as_deref(), Some(&b"alice"[..]));

    send(&mut ws, json!({"type":"ping","id":1})).await;
    let pong = recv(&mut ws).await;
    assert_eq!(
        (pong["type"].as_str(), pong["id"].as_i64()),
        (Some("pong"), Some(1))
    );

    ws.write_frame(Frame::text(Payload::Owned(b"{not json".to_vec())))
        .await
        .unwrap();
    let err = recv(&mut ws).await;
    assert_eq!(
        (err["type"].as_str(), err["code"].as_str()),
        (Some("error"), Some("bad_frame"))
    );
    send(&mut ws, json!({"type":"teleport","id":"x"})).await;
    let err = recv(&mut ws).await;
    assert_eq!(
        (err["code"].as_str(), err["id"].as_str()),
        (Some("unknown_type"), Some("x"))
    );
    send(&mut ws, json!({"type":"send","id":"s","chat":"nope"})).await;
    assert_eq!(recv(&mut ws).await["code"], "invalid");
    // The connection survives: a good frame resets the count.
    send(&mut ws, json!({"type":"heartbeat","id":2})).await;
    assert_eq!(recv(&mut ws).await["type"], "pong");

    // Four bad frames in a row: 4009.
    for _ in 0..4 {
        send(&mut ws, json!({"type":"nope"})).await;
    }
    for _ in 0..4 {
        let f = tokio::time::timeout(WAIT, ws.read_frame())
            .await
            .unwrap()
            .unwrap();
        if f.opcode == OpCode::Close {
            assert_eq!(close_code(&f.payload), Some(4009));
            break;
        }
    }
    e.stop().await;
}

#[tokio::test]
async fn oversize_invalid_utf8_and_fragment_floods_close_the_connection() {
    let mut e = env("limits", |_| {}).await;
    let mut ws = e.connect("alice", "d1").await;
    hello(&mut ws).await;
    let big = vec![b'a'; 64 * 1024 + 1];
    ws.write_frame(Frame::text(Payload::Owned(big)))
        .await
        .unwrap();
    assert_eq!(closed(&mut ws).await, Some(1009));

    let mut ws = e.connect("alice", "d2").await;
    hello(&mut ws).await;
    ws.write_frame(Frame::text(Payload::Owned(vec![0xff, 0xfe, 0x22])))
        .await
        .unwrap();
    assert_eq!(closed(&mut ws).await, Some(1007));

    // Fragments each under the limit, together over it.
    let mut ws = e.connect("alice", "d3").await;
    hello(&mut ws).await;
    ws.write_frame(Frame::new(
        false,
        OpCode::Text,
        None,
        Payload::Owned(vec![b' '; 20_000]),
    ))
    .await
    .unwrap();
    for _ in 0..4 {
        let f = Frame::new(
            false,
            OpCode::Continuation,
            None,
            Payload::Owned(vec![b' '; 20_000]),
        );
        if ws.write_frame(f).await.is_err() {
            break;
        }
    }
    assert_eq!(closed(&mut ws).await, Some(1009));

    // A message exactly at the limit is fine (a bad frame, answered).
    let mut ws = e.connect("alice", "d4").await;
    hello(&mut ws).await;
    let mut at_limit = vec![b' '; 64 * 1024];
    at_limit[0] = b'x';
    ws.write_frame(Frame::text(Payload::Owned(at_limit)))
        .await
        .unwrap();
    assert_eq!(recv(&mut ws).await["code"], "bad_frame");

    // RFC 6455 5.1: a client frame without a mask closes the connection with
    // 1002, after masked frames were fine; tried many times, with frames of
    // each length form.
    for (i, len) in [0usize, 15, 125, 126, 3000, 65_535].iter().enumerate() {
        let mut ws = e.connect("alice", &format!("m{i}")).await;
        hello(&mut ws).await;
        send(&mut ws, json!({"type": "ping", "id": 1})).await;
        assert_eq!(recv(&mut ws).await["type"], "pong");
        ws.set_auto_apply_mask(false);
        let mut text = br#"{"type":"ping","id":2}"#.to_vec();
        text.resize(text.len().max(*len), b' ');
        ws.write_frame(Frame::text(Payload::Owned(text)))
            .await
            .unwrap();
        assert_eq!(
            closed(&mut ws).await,
            Some(1002),
            "unmasked frame of {len} bytes"
        );
    }
    e.stop().await;
}

#[tokio::test]
async fn commands_are_produced_and_answered_from_the_deliveries_partition() {
    let mut e = env("cmd", |c| c.timeouts.ack_ms = 5_000).await;
    let mut ws = e.connect("alice", "d1").await;
    hello(&mut ws).await;
    let chat = Uuid::new_v4();
    send(
        &mut ws,
        json!({"type":"send","id":"a1","chat":chat,"client_msg_id":"c-1","text":"hello"}),
    )
    .await;

    let cmd = e
        .find(&e.topics.commands.clone(), |r| {
            r.envelope.client_msg_id.as_deref() == Some("c-1")
        })
        .await;
    assert_eq!(cmd.key.as_deref(), Some(chat.to_string().as_bytes()));
    assert_eq!(
        cmd.header(HEADER_GATEWAY_ID).as_deref(),
        Some(e.gateway_id.as_str())
    );
    let env_ = &cmd.envelope;
    assert_eq!((env_.seq, env_.chat_id), (None, Some(chat)));
    assert_eq!(
        (env_.sender_user.as_str(), env_.sender_device.as_str()),
        ("alice", "d1")
    );
    assert!(matches!(&env_.body, Body::MessageSent(m) if m.text.as_deref() == Some("hello")));

    // The sequencer's answer goes to this gateway's partition.
    let result = |outcome, seq, code: Option<&str>| {
        envelope(
            Some(chat),
            None,
            "sequencer",
            Body::CommandResult(CommandResult {
                command_event_id: env_.event_id,
                outcome,
                seq,
                code: code.map(str::to_string),
                reason: code.map(|_| "you are not in this chat".to_string()),
                event_partition: None,
                event_offset: None,
            }),
        )
    };
    e.deliver(&result(CommandOutcome::Accepted, Some(1), None), None)
        .await;
    let ack = recv(&mut ws).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(
        (ack["id"].as_str(), ack["seq"].as_u64()),
        (Some("a1"), Some(1))
    );
    assert_eq!(ack["client_msg_id"], "c-1");
    assert_eq!(ack["chat"], chat.to_string());

    // A rejection: error with the sequencer's code.
    send(
        &mut ws,
        json!({"type":"send","id":"a2","chat":chat,"client_msg_id":"c-2","text":"again"}),
    )
    .await;
    let cmd2 = e
        .find(&e.topics.commands.clone(), |r| {
            r.envelope.client_msg_id.as_deref() == Some("c-2")
        })
        .await;
    let mut rejected = result(CommandOutcome::Rejected, None, Some("not_member"));
    if let Body::CommandResult(r) = &mut rejected.body {
        r.command_event_id = cmd2.envelope.event_id;
    }
    e.deliver(&rejected, None).await;
    let err = recv(&mut ws).await;
    assert_eq!(
        (
            err["type"].as_str(),
            err["code"].as_str(),
            err["id"].as_str()
        ),
        (Some("error"), Some("not_member"), Some("a2"))
    );

    // No answer at all: unavailable after ack_ms.
    send(
        &mut ws,
        json!({"type":"send","id":"a3","chat":chat,"client_msg_id":"c-3","text":"lost"}),
    )
    .await;
    let err = recv(&mut ws).await;
    assert_eq!(
        (err["code"].as_str(), err["id"].as_str()),
        (Some("unavailable"), Some("a3"))
    );

    // A direct chat's id is derived from the pair.
    send(
        &mut ws,
        json!({"type":"create_chat","id":"d","kind":"direct","members":["bob"]}),
    )
    .await;
    let direct = chat_schemas::direct_chat_id("alice", "bob");
    let created = e
        .find(&e.topics.commands.clone(), |r| {
            matches!(r.envelope.body, Body::ChatCreated(_))
        })
        .await;
    assert_eq!(created.envelope.chat_id, Some(direct));
    // Sent without a client_msg_id, it entered the log with one the gateway
    // assigned (the sequencer's dedupe key), so a re-read is not appended
    // twice; so does a membership command. The ack echoes the client's null.
    let assigned = created.envelope.client_msg_id.clone().unwrap_or_default();
    assert!(
        assigned.starts_with('~') && assigned.len() == 33,
        "{assigned}"
    );
    send(&mut ws, json!({"type":"leave","id":"l","chat":chat})).await;
    let left = e
        .find(&e.topics.commands.clone(), |r| {
            matches!(r.envelope.body, Body::MemberRemoved(_))
        })
        .await;
    let assigned = left.envelope.client_msg_id.clone().unwrap_or_default();
    assert!(assigned.starts_with('~'), "{assigned}");
    let mut accepted = result(CommandOutcome::Accepted, Some(2), None);
    if let Body::CommandResult(r) = &mut accepted.body {
        r.command_event_id = left.envelope.event_id;
    }
    e.deliver(&accepted, None).await;
    let ack = loop {
        let f = recv(&mut ws).await;
        if f["id"] == "l" {
            break f;
        }
    };
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["client_msg_id"], Value::Null, "{ack}");
    e.stop().await;
}

#[tokio::test]
async fn sync_then_live_without_gap_or_duplicate() {
    let mut e = env("sync", |c| {
        c.timeouts.session_routed_ms = 10_000;
        c.timeouts.sync_progress_ms = 10_000;
    })
    .await;
    let chat = Uuid::new_v4();
    e.history.join("alice", chat, 1, 1_000);
    for seq in 1..=5 {
        e.history
            .put(text_row(chat, seq, "bob", &format!("m{seq}")));
    }
    let mut ws = e.connect("alice", "d1").await;
    let h = hello(&mut ws).await;
    let session = Uuid::parse_str(h["session"].as_str().unwrap()).unwrap();

    // Live events routed before the sync answer: 5 (also in history), 6, and
    // 8 (7 is only in history: the gap is filled from there).
    for seq in [5, 6, 8] {
        e.deliver(
            &envelope(Some(chat), Some(seq), "bob", text(&format!("m{seq}"))),
            Some("alice"),
        )
        .await;
    }
    e.history.put(text_row(chat, 6, "bob", "m6"));
    e.history.put(text_row(chat, 7, "bob", "m7"));
    send(&mut ws, json!({"type":"sync","id":"s","since":null})).await;
    // The router's answer to SessionOpened, after the projector got there.
    e.history.set_progress("history", 0, 4);
    e.deliver(
        &envelope(
            None,
            None,
            "router",
            Body::SessionRouted(SessionRouted {
                session_id: session,
                router_offsets: vec![4, 0, 0],
            }),
        ),
        None,
    )
    .await;

    let mut seqs = Vec::new();
    loop {
        let f = recv(&mut ws).await;
        match f["type"].as_str() {
            Some("event") => {
                assert_eq!(f["chat"], chat.to_string());
                assert_eq!(f["kind"], "MessageSent");
                seqs.push(f["seq"].as_u64().unwrap());
            }
            Some("synced") => {
                assert_eq!(f["id"], "s");
                assert!(f["checkpoint"].as_i64().unwrap() > 0);
            }
            other => panic!("unexpected {other:?}: {f}"),
        }
        if seqs.last() == Some(&8) {
            break;
        }
    }
    // Sync read 1..=7 or 1..=5 (depending on timing), then live 6 (unless
    // synced), 7 from history, 8 live: every seq once, in order.
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>());

    // History paging.
    send(
        &mut ws,
        json!({"type":"history","id":"h","chat":chat,"before":4,"limit":2}),
    )
    .await;
    let page = recv(&mut ws).await;
    assert_eq!(page["type"], "history");
    let got: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(got, [2, 3]);
    assert_eq!(page["has_more"], true);
    send(
        &mut ws,
        json!({"type":"history","id":"h2","chat":Uuid::new_v4()}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["code"], "unknown_chat");
    send(&mut ws, json!({"type":"chats","id":"c"})).await;
    let chats = recv(&mut ws).await;
    assert_eq!(chats["chats"][0]["chat"], chat.to_string());
    e.stop().await;
}

#[tokio::test]
async fn shutdown_tells_clients_to_reconnect_and_closes_sessions() {
    let mut e = env("drain", |c| c.shutdown_grace_ms = 5_000).await;
    let mut ws = e.connect("alice", "d1").await;
    let h = hello(&mut ws).await;
    let session = Uuid::parse_str(h["session"].as_str().unwrap()).unwrap();
    let started = std::time::Instant::now();
    let gw = e.gw.take().unwrap();
    let stopping = tokio::spawn(gw.stop());
    assert_eq!(
        recv(&mut ws).await,
        json!({"type":"reconnect","reason":"draining"})
    );
    assert_eq!(closed(&mut ws).await, Some(1001));
    stopping.await.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    let closed = e
        .find(
            &e.topics.sessions.clone(),
            |r| matches!(&r.envelope.body, Body::SessionClosed(c) if c.session_id == session),
        )
        .await;
    assert!(
        matches!(&closed.envelope.body, Body::SessionClosed(c) if c.reason.starts_with("shutdown"))
    );
}

#[tokio::test]
async fn a_client_that_does_not_keep_up_is_closed_alone() {
    let mut e = env("slow", |c| c.limits.outbound_queue = 16).await;
    let chat = Uuid::new_v4();
    let mut slow = e.connect("alice", "d1").await;
    let h = hello(&mut slow).await;
    let session = Uuid::parse_str(h["session"].as_str().unwrap()).unwrap();
    let mut other = e.connect("bob", "d1").await;
    let h = hello(&mut other).await;
    e.route_session(&h).await;
    send(&mut other, json!({"type":"sync","since":null})).await;
    let synced = recv(&mut other).await;
    assert_eq!(synced["type"], "synced", "{synced}");
    // alice never syncs (nor reads): her held events overflow the queue.
    // bob reads; the events come a few at a time, as a live chat's do, so a
    // busy machine cannot hand him 40 in one burst before his session runs
    // (his queue holds 16 too).
    for seq in 1..=40 {
        e.deliver(
            &envelope(Some(chat), Some(seq), "carol", text("x")),
            Some("alice,bob"),
        )
        .await;
        if seq % 4 == 0 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    assert_eq!(closed(&mut slow).await, Some(4008));
    let mut got = 0;
    while got < 40 {
        let f = recv(&mut other).await;
        assert_eq!(f["type"], "event");
        got += 1;
    }
    let closed = e
        .find(
            &e.topics.sessions.clone(),
            |r| matches!(&r.envelope.body, Body::SessionClosed(c) if c.session_id == session),
        )
        .await;
    assert!(
        matches!(&closed.envelope.body, Body::SessionClosed(c) if c.reason.starts_with("slow_consumer"))
    );
    e.stop().await;
}

#[tokio::test]
async fn rate_limits_idle_and_token_expiry() {
    let mut e = env("rate", |c| {
        c.limits.send_burst = 2.0;
        c.limits.send_rate_per_s = 0.1;
        c.timeouts.idle_ms = 1_500;
        c.auth.leeway_s = 0;
    })
    .await;
    let mut a = e.connect("alice", "d1").await;
    hello(&mut a).await;
    let chat = Uuid::new_v4();
    for i in 0..3 {
        send(
            &mut a,
            json!({"type":"send","id":i,"chat":chat,"client_msg_id":format!("c{i}"),"text":"x"}),
        )
        .await;
    }
    let err = recv(&mut a).await;
    assert_eq!(
        (err["code"].as_str(), err["id"].as_i64()),
        (Some("rate_limited"), Some(2))
    );
    // The bucket is per user: a second connection of alice is limited too.
    let mut a2 = e.connect("alice", "d2").await;
    hello(&mut a2).await;
    send(
        &mut a2,
        json!({"type":"send","id":"x","chat":chat,"client_msg_id":"c9","text":"x"}),
    )
    .await;
    assert_eq!(recv(&mut a2).await["code"], "rate_limited");
    // Silence closes with 4002.
    assert_eq!(closed(&mut a2).await, Some(4002));

    // A token that expires while connected: 4001.
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    let exp = jsonwebtoken::get_current_timestamp() + 1;
    let token = jsonwebtoken::encode(
        &header,
        &json!({"sub":"dave","exp":exp,"device":"d1"}),
        &key,
    )
    .unwrap();
    let mut d = e
        .connect_with(&format!("/ws?token={token}"), None)
        .await
        .unwrap();
    hello(&mut d).await;
    assert_eq!(closed(&mut d).await, Some(4001));
    e.stop().await;
}

#[tokio::test]
async fn a_handshake_that_never_completes_is_dropped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut e = env("slowloris", |c| c.timeouts.header_read_ms = 500).await;
    let mut tcp = tokio::net::TcpStream::connect(e.addr).await.unwrap();
    tcp.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 512];
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the server hung up");
    assert!(started.elapsed() < Duration::from_secs(3));
    e.stop().await;
}

/// The production history path: the gateway reading the real Cassandra
/// store (`Gateway::start`), in a fresh keyspace.
/// The next text frame within `wait`, or `Err` (timed out).
async fn next_text(ws: &mut Ws, wait: Duration) -> Result<Value, tokio::time::error::Elapsed> {
    tokio::time::timeout(wait, async {
        loop {
            let f = ws.read_frame().await.unwrap();
            if f.opcode == OpCode::Text {
                return serde_json::from_slice::<Value>(&f.payload).unwrap();
            }
        }
    })
    .await
}

/// A sequencer killed in the middle of a batch leaves its transaction open
/// until a new owner fences it (up to the transaction timeout). Its
/// `CommandResult`s go to `chat.results`, so the open transaction holds back
/// nothing on `chat.deliveries`: live events keep flowing.
#[tokio::test]
async fn an_open_sequencer_transaction_does_not_hold_back_live_events() {
    let mut e = env("txn", |_| {}).await;
    let chat = Uuid::new_v4();
    e.history.join("alice", chat, 1, 1_000);
    let mut ws = e.connect("alice", "d1").await;
    let h = hello(&mut ws).await;
    e.route_session(&h).await;
    send(&mut ws, json!({"type":"sync","id":"s","since":null})).await;
    assert_eq!(recv(&mut ws).await["type"], "synced");
    let partition = deliveries_partition(&e.gateway_id, e.log.chat_partitions);
    let stuck_record = |topic: &str| {
        OutRecord::Envelope(Box::new(Outgoing {
            topic: topic.to_string(),
            partition: Some(partition),
            key: e.gateway_id.clone(),
            envelope: envelope(
                Some(chat),
                None,
                "sequencer",
                Body::CommandResult(CommandResult {
                    command_event_id: Uuid::new_v4(),
                    outcome: CommandOutcome::Accepted,
                    seq: Some(9),
                    code: None,
                    reason: None,
                    event_partition: None,
                    event_offset: None,
                }),
            ),
            headers: Vec::new(),
        }))
    };

    // A transaction left open on this gateway's partition of chat.results.
    let results = TxnProducer::init(&e.log, e.registry.clone(), "stuck-a", &e.topics.commands, 0)
        .await
        .unwrap();
    results
        .append_uncommitted(vec![stuck_record(&e.topics.results)])
        .await
        .unwrap();
    for seq in 1..=3 {
        e.deliver(
            &envelope(Some(chat), Some(seq), "bob", text(&format!("m{seq}"))),
            Some("alice"),
        )
        .await;
        let f = next_text(&mut ws, Duration::from_secs(5))
            .await
            .expect("a live event arrives while a sequencer transaction is open");
        assert_eq!(f["seq"], seq, "{f}");
    }

    // Why results have their own topic: the same open transaction on
    // chat.deliveries holds back the live event behind it until it ends.
    let deliveries =
        TxnProducer::init(&e.log, e.registry.clone(), "stuck-b", &e.topics.commands, 0)
            .await
            .unwrap();
    deliveries
        .append_uncommitted(vec![stuck_record(&e.topics.deliveries)])
        .await
        .unwrap();
    e.deliver(
        &envelope(Some(chat), Some(4), "bob", text("m4")),
        Some("alice"),
    )
    .await;
    assert!(
        next_text(&mut ws, Duration::from_secs(3)).await.is_err(),
        "an open transaction on chat.deliveries holds back what follows it"
    );
    deliveries.abort().await.unwrap();
    let f = next_text(&mut ws, Duration::from_secs(10))
        .await
        .expect("released by the abort");
    assert_eq!(f["seq"], 4, "{f}");
    results.abort().await.unwrap();
    e.stop().await;
}

#[tokio::test]
async fn sync_and_history_from_the_real_store() {
    use chat_projectors::store::{self, ChatRow, StoreConfig};
    let mut store_cfg = StoreConfig {
        keyspace: format!("t_gw_{}", Uuid::new_v4().simple()),
        ..StoreConfig::default()
    };
    if let Ok(nodes) = std::env::var("CHAT_STORE__NODES") {
        store_cfg.nodes = nodes.split(',').map(|n| n.trim().to_string()).collect();
    }
    let st = store::connect(&store_cfg).await.unwrap();
    st.migrate(&store_cfg.replication).await.unwrap();
    let chat = Uuid::new_v4();
    let row = ChatRow {
        chat_id: chat,
        kind: "group".into(),
        title: Some("team".into()),
        created_by: "bob".into(),
        created_at_ms: 1_700_000_000_000,
        max_members: 10,
        last_seq: 0,
    };
    st.put_chat(&row, 1).await.unwrap();
    st.put_member(chat, "alice", "member", 1, false)
        .await
        .unwrap();
    for seq in 1..=3 {
        st.put_message(&text_row(chat, seq, "bob", &format!("m{seq}")))
            .await
            .unwrap();
    }
    st.mark_changed("alice", chat, 1_700_000_000_000)
        .await
        .unwrap();

    chat_runtime::telemetry::init(chat_runtime::telemetry::LogFormat::Pretty);
    let log = log_config("store");
    let topics = Topics::new(&log);
    chat_log::topics::ensure_topics(&log, &topics.specs())
        .await
        .unwrap();
    let registry = Arc::new(SchemaRegistry::new(&log).unwrap());
    for t in topics.envelope_topics() {
        registry.register_envelope(&t).await.unwrap();
    }
    let mut config = GatewayConfig {
        gateway_id: format!("gw-store-{}", &Uuid::new_v4().simple().to_string()[..6]),
        listen: "127.0.0.1:0".parse().unwrap(),
        log,
        store: store_cfg,
        dev_login: true,
        ..GatewayConfig::default()
    };
    config.timeouts.session_routed_ms = 5_000;
    let gateway_id = config.gateway_id.clone();
    let log = config.log.clone();
    let (addr, gw) = Gateway::start(config).await.unwrap();
    let e = Env {
        producer: EventProducer::connect(&log, registry.clone())
            .await
            .unwrap(),
        log,
        topics,
        registry,
        history: Arc::new(MemoryHistory::new()),
        addr,
        gw: Some(gw),
        gateway_id,
    };
    let mut ws = e.connect("alice", "d1").await;
    let h = hello(&mut ws).await;
    e.route_session(&h).await;
    send(
        &mut ws,
        json!({"type":"sync","id":1,"since":1_699_999_000_000_i64}),
    )
    .await;
    let mut seqs = Vec::new();
    loop {
        let f = recv(&mut ws).await;
        if f["type"] == "synced" {
            break;
        }
        assert_eq!(f["type"], "event", "{f}");
        assert_eq!(f["body"]["text"], format!("m{}", f["seq"]));
        seqs.push(f["seq"].as_u64().unwrap());
    }
    assert_eq!(seqs, [1, 2, 3]);
    send(
        &mut ws,
        json!({"type":"history","id":2,"chat":chat,"before":3,"limit":1}),
    )
    .await;
    let page = recv(&mut ws).await;
    assert_eq!(page["events"][0]["seq"], 2);
    assert_eq!(page["has_more"], true);
    send(&mut ws, json!({"type":"chats","id":3})).await;
    let chats = recv(&mut ws).await;
    assert_eq!(chats["chats"][0]["title"], "team");
    assert_eq!(chats["chats"][0]["last_seq"], 3);
    let mut e = e;
    e.stop().await;
    st.drop_keyspace().await.unwrap();
}

impl Env {
    /// Every record of `topic` (all partitions, from the beginning) matching
    /// `pred` that arrives within `within`.
    async fn all(
        &self,
        topic: &str,
        within: Duration,
        mut pred: impl FnMut(&chat_log::ConsumedEvent) -> bool,
    ) -> Vec<chat_log::ConsumedEvent> {
        let tail = TopicTail::open(
            &self.log,
            self.registry.clone(),
            topic,
            None,
            TailStart::Beginning,
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(within, async {
            loop {
                if let TailItem::Event(e) = tail.next().await.unwrap() {
                    if pred(&e) {
                        out.push(*e);
                    }
                }
            }
        })
        .await;
        out
    }

    /// A connection of `user` past its first sync (its events skipped).
    async fn synced(&self, user: &str, device: &str) -> Ws {
        let mut ws = self.connect(user, device).await;
        let h = hello(&mut ws).await;
        self.route_session(&h).await;
        send(&mut ws, json!({"type":"sync","id":"s0","since":null})).await;
        loop {
            let f = recv(&mut ws).await;
            match f["type"].as_str() {
                Some("event") => {}
                Some("synced") => break,
                _ => panic!("{f}"),
            }
        }
        ws
    }
}

/// A read waiting on a slow store does not hold back the live events of the
/// same connection: the event sent after the `history` frame arrives first.
#[tokio::test]
async fn a_slow_read_does_not_delay_live_events() {
    let mut e = env("slowread", |_| {}).await;
    let chat = Uuid::new_v4();
    e.history.join("alice", chat, 1, 1_000);
    e.history.put(text_row(chat, 1, "bob", "m1"));
    let mut ws = e.synced("alice", "d1").await;
    let slow = Duration::from_secs(4);
    e.history.set_page_delay(slow);
    let asked = std::time::Instant::now();
    send(
        &mut ws,
        json!({"type":"history","id":"h","chat":chat,"limit":10}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    e.deliver(
        &envelope(Some(chat), Some(2), "bob", text("m2")),
        Some("alice"),
    )
    .await;
    let first = recv(&mut ws).await;
    assert_eq!(
        (first["type"].as_str(), first["seq"].as_u64()),
        (Some("event"), Some(2)),
        "{first}"
    );
    assert!(
        asked.elapsed() < slow,
        "the event waited for the read: {:?}",
        asked.elapsed()
    );
    let page = recv(&mut ws).await;
    assert_eq!(
        (page["type"].as_str(), page["id"].as_str()),
        (Some("history"), Some("h")),
        "{page}"
    );
    assert!(asked.elapsed() >= slow);
    e.stop().await;
}

/// At most `max_concurrent_reads` reads run per connection; one more is
/// answered `rate_limited` at once (with its chat), the others normally.
#[tokio::test]
async fn reads_beyond_the_per_connection_bound_are_refused() {
    let mut e = env("readbound", |c| c.limits.max_concurrent_reads = 2).await;
    let chat = Uuid::new_v4();
    e.history.join("alice", chat, 1, 1_000);
    e.history.put(text_row(chat, 1, "bob", "m1"));
    let mut ws = e.synced("alice", "d1").await;
    e.history.set_page_delay(Duration::from_secs(2));
    for id in ["h1", "h2", "h3"] {
        send(&mut ws, json!({"type":"history","id":id,"chat":chat})).await;
    }
    let refused = recv(&mut ws).await;
    assert_eq!(
        (
            refused["type"].as_str(),
            refused["id"].as_str(),
            refused["code"].as_str()
        ),
        (Some("error"), Some("h3"), Some("rate_limited")),
        "{refused}"
    );
    assert_eq!(refused["chat"], chat.to_string());
    let mut answered: Vec<String> = Vec::new();
    for _ in 0..2 {
        let f = recv(&mut ws).await;
        assert_eq!(f["type"], "history", "{f}");
        answered.push(f["id"].as_str().unwrap().into());
    }
    answered.sort();
    assert_eq!(answered, ["h1", "h2"]);
    // Answered: room again.
    e.history.set_page_delay(Duration::ZERO);
    send(&mut ws, json!({"type":"history","id":"h4","chat":chat})).await;
    assert_eq!(recv(&mut ws).await["type"], "history");
    e.stop().await;
}

/// `delivered` frames of a chat within the coalescing window become one
/// receipt in the log (the highest `up_to_seq`); each frame is answered
/// with that command's ack.
#[tokio::test]
async fn delivered_frames_are_coalesced_into_one_receipt() {
    let mut e = env("coalesce", |c| c.timeouts.delivered_coalesce_ms = 300).await;
    let chat = Uuid::new_v4();
    let other = Uuid::new_v4();
    let mut ws = e.synced("alice", "d1").await;
    for (id, up_to) in [("r1", 1), ("r2", 3), ("r3", 2)] {
        send(
            &mut ws,
            json!({"type":"delivered","id":id,"chat":chat,"up_to_seq":up_to,"client_msg_id":id}),
        )
        .await;
    }
    send(
        &mut ws,
        json!({"type":"delivered","id":"o1","chat":other,"up_to_seq":7}),
    )
    .await;
    let receipts = e
        .all(&e.topics.commands.clone(), Duration::from_secs(3), |r| {
            matches!(r.envelope.body, Body::DeliveryReceipt(_))
        })
        .await;
    let of = |c: Uuid| -> Vec<u64> {
        receipts
            .iter()
            .filter(|r| r.envelope.chat_id == Some(c))
            .map(|r| match &r.envelope.body {
                Body::DeliveryReceipt(d) => d.up_to_seq,
                _ => unreachable!(),
            })
            .collect()
    };
    assert_eq!(
        of(chat),
        [3],
        "one receipt per chat and window, the highest"
    );
    assert_eq!(of(other), [7]);
    let cmd = receipts
        .iter()
        .find(|r| r.envelope.chat_id == Some(chat))
        .unwrap();
    assert_eq!(cmd.envelope.client_msg_id.as_deref(), Some("r2"));
    e.deliver(
        &envelope(
            Some(chat),
            None,
            "sequencer",
            Body::CommandResult(CommandResult {
                command_event_id: cmd.envelope.event_id,
                outcome: CommandOutcome::Accepted,
                seq: Some(3),
                code: None,
                reason: None,
                event_partition: None,
                event_offset: None,
            }),
        ),
        None,
    )
    .await;
    let mut acks = Vec::new();
    for _ in 0..3 {
        let a = recv(&mut ws).await;
        assert_eq!(
            (a["type"].as_str(), a["seq"].as_u64()),
            (Some("ack"), Some(3)),
            "{a}"
        );
        assert_eq!(
            a["id"], a["client_msg_id"],
            "each frame keeps its own ids: {a}"
        );
        acks.push(a["id"].as_str().unwrap().to_string());
    }
    acks.sort();
    assert_eq!(acks, ["r1", "r2", "r3"]);
    e.stop().await;
}

/// A sync answer larger than the outbound queue is written as the client
/// reads it; a second `sync` sent meanwhile is answered after the first's
/// `synced`, and nothing is sent twice.
#[tokio::test]
async fn a_second_sync_waits_for_the_first_answer_to_be_written() {
    let mut e = env("twosyncs", |c| c.limits.outbound_queue = 16).await;
    // 1,000 events of 3 KB: more than the socket buffers hold, so the
    // answer is still being written while the second sync could run.
    let chats: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    let long = "x".repeat(3000);
    for chat in &chats {
        e.history.join("alice", *chat, 1, 1_000);
        for seq in 1..=50 {
            e.history.put(text_row(*chat, seq, "bob", &long));
        }
    }
    let mut ws = e.connect("alice", "d1").await;
    let h = hello(&mut ws).await;
    e.route_session(&h).await;
    send(&mut ws, json!({"type":"sync","id":"s1","since":null})).await;
    send(&mut ws, json!({"type":"sync","id":"s2","since":null})).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut events = std::collections::HashSet::new();
    let mut synced = Vec::new();
    loop {
        let f = recv(&mut ws).await;
        match f["type"].as_str() {
            Some("event") => {
                assert!(synced.is_empty(), "an event after synced: {f}");
                let key = (f["chat"].to_string(), f["seq"].as_u64().unwrap());
                assert!(events.insert(key), "sent twice: {f}");
            }
            Some("synced") => synced.push(f["id"].as_str().unwrap().to_string()),
            _ => panic!("{f}"),
        }
        if synced.len() == 2 {
            break;
        }
    }
    assert_eq!(events.len(), 1000);
    assert_eq!(synced, ["s1", "s2"]);
    e.stop().await;
}
