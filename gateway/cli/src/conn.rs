//! One WebSocket connection to the gateway (PROTOCOL.md, protocol v1).
//!
//! Owns: the handshake (token in the query, device parameter), reading
//! `hello`, a reader task that turns WebSocket messages into JSON frames on
//! a channel (so waiting for a frame can time out without losing one),
//! request/answer matching by `id`, and explaining a refused upgrade (the
//! gateway's JSON `{"error","message"}` body) as a [`CliError`].

use crate::error::{CliError, Result};
use bytes::Bytes;
use fastwebsockets::{handshake, FragmentCollectorRead, Frame, OpCode, WebSocketWrite};
use http_body_util::Empty;
use hyper::header::{CONNECTION, HOST, UPGRADE};
use hyper::upgrade::Upgraded;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;
use tokio::io::WriteHalf;
use tokio::sync::mpsc;

/// Where and as whom to connect.
#[derive(Clone, Debug)]
pub struct Target {
    /// `http://host:port` of the gateway.
    pub gateway: String,
    pub token: String,
    /// Sent as `?device=` when set (else the token's `device` claim is used).
    pub device: Option<String>,
}

/// What the reader task hands over.
#[derive(Debug)]
pub enum Incoming {
    Frame(Value),
    Closed { code: u16, reason: String },
}

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

/// An open, greeted connection.
pub struct Conn {
    write: WebSocketWrite<WriteHalf<TokioIo<Upgraded>>>,
    rx: mpsc::Receiver<Incoming>,
    /// Frames that arrived while [`Conn::request`] waited for its answer.
    held: VecDeque<Value>,
    next_id: u64,
    gateway: String,
    /// The `hello` frame.
    pub hello: Value,
}

/// `host:port` of an `http://` gateway address.
fn host_port(gateway: &str) -> Result<String> {
    let url = reqwest::Url::parse(gateway)
        .map_err(|e| CliError::Usage(format!("bad gateway address {gateway:?}: {e}")))?;
    if url.scheme() != "http" {
        return Err(CliError::Usage(format!(
            "the gateway address must be http://host:port (got {gateway}); TLS is not supported by this CLI"
        )));
    }
    let host = url
        .host_str()
        .ok_or_else(|| CliError::Usage(format!("no host in {gateway}")))?;
    let port = url.port_or_known_default().unwrap_or(80);
    Ok(format!("{host}:{port}"))
}

fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Target {
    fn path_and_query(&self) -> String {
        let mut q = format!("/ws?token={}", query_escape(&self.token));
        if let Some(d) = &self.device {
            q.push_str("&device=");
            q.push_str(&query_escape(d));
        }
        q
    }

    /// Why an upgrade failed: asks `GET /ws` without the upgrade headers,
    /// which the gateway answers with its JSON error (or 426 when the token
    /// and device are fine).
    async fn explain_refusal(&self, handshake_error: String) -> CliError {
        let url = format!(
            "{}{}",
            self.gateway.trim_end_matches('/'),
            self.path_and_query()
        );
        let resp = match reqwest::Client::new()
            .get(&url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => return CliError::unreachable(&self.gateway, e),
        };
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let code = body["error"].as_str().unwrap_or("").to_string();
        let message = body["message"].as_str().unwrap_or("").to_string();
        match (status, code.as_str()) {
            (401, _) => CliError::Auth { code, message },
            (400, "invalid_device") => CliError::Usage(format!("device refused: {message}")),
            (503, _) | (426, _) => CliError::unreachable(
                &self.gateway,
                format!("{handshake_error} ({code} {message})"),
            ),
            _ => CliError::Refused {
                code: if code.is_empty() {
                    format!("http_{status}")
                } else {
                    code
                },
                message,
            },
        }
    }
}

impl Conn {
    /// Connects, upgrades and reads `hello`.
    pub async fn open(target: &Target) -> Result<Conn> {
        let addr = host_port(&target.gateway)?;
        let gw = target.gateway.clone();
        let stream = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(&addr),
        )
        .await
        .map_err(|_| CliError::unreachable(&gw, "connect timed out"))?
        .map_err(|e| CliError::unreachable(&gw, e))?;
        let _ = stream.set_nodelay(true);
        let req = Request::builder()
            .method("GET")
            .uri(format!("http://{addr}{}", target.path_and_query()))
            .header(HOST, addr.as_str())
            .header(UPGRADE, "websocket")
            .header(CONNECTION, "upgrade")
            .header("Sec-WebSocket-Key", handshake::generate_key())
            .header("Sec-WebSocket-Version", "13")
            .body(Empty::<Bytes>::new())
            .map_err(|e| CliError::Usage(format!("cannot build the request: {e}")))?;
        let ws = match tokio::time::timeout(
            Duration::from_secs(15),
            handshake::client(&SpawnExecutor, req, stream),
        )
        .await
        {
            Err(_) => return Err(CliError::unreachable(&gw, "the upgrade timed out")),
            Ok(Err(e)) => return Err(target.explain_refusal(e.to_string()).await),
            Ok(Ok((ws, _))) => ws,
        };
        let (read, write) = ws.split(tokio::io::split);
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(read_loop(FragmentCollectorRead::new(read), tx));
        let mut conn = Conn {
            write,
            rx,
            held: VecDeque::new(),
            next_id: 0,
            gateway: gw,
            hello: Value::Null,
        };
        match conn.next(Duration::from_secs(15)).await? {
            Some(v) if v["type"] == "hello" => conn.hello = v,
            Some(v) if v["type"] == "error" => return Err(refusal(&v)),
            Some(v) => return Err(CliError::Protocol(format!("expected hello, got {v}"))),
            None => return Err(CliError::unreachable(&conn.gateway, "no hello in time")),
        }
        Ok(conn)
    }

    /// The gateway address this connection went to.
    pub fn gateway(&self) -> &str {
        &self.gateway
    }

    /// Sends one frame as it is.
    pub async fn send(&mut self, frame: &Value) -> Result<()> {
        let text = serde_json::to_vec(frame).map_err(|e| CliError::Protocol(e.to_string()))?;
        self.write
            .write_frame(Frame::text(fastwebsockets::Payload::Owned(text)))
            .await
            .map_err(|e| CliError::unreachable(&self.gateway, format!("send failed: {e}")))
    }

    /// The next frame (held ones first); None after `timeout`. A close is an error.
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<Value>> {
        if let Some(v) = self.held.pop_front() {
            return Ok(Some(v));
        }
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Err(_) => Ok(None),
            Ok(None) => Err(CliError::unreachable(&self.gateway, "connection lost")),
            Ok(Some(Incoming::Frame(v))) => Ok(Some(v)),
            Ok(Some(Incoming::Closed { code, reason })) => Err(closed(&self.gateway, code, reason)),
        }
    }

    /// Sends `frame` with a fresh `id` and returns the frame answering it.
    /// An `error` answer is returned as is (the caller decides).
    pub async fn request(&mut self, mut frame: Value, timeout: Duration) -> Result<Value> {
        self.next_id += 1;
        let id = format!("cli{}", self.next_id);
        frame["id"] = json!(id);
        self.send(&frame).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let got = match tokio::time::timeout(left, self.rx.recv()).await {
                Err(_) => {
                    return Err(CliError::unreachable(
                        &self.gateway,
                        format!("no answer to {} in time", frame["type"]),
                    ))
                }
                Ok(None) => return Err(CliError::unreachable(&self.gateway, "connection lost")),
                Ok(Some(Incoming::Closed { code, reason })) => {
                    return Err(closed(&self.gateway, code, reason))
                }
                Ok(Some(Incoming::Frame(v))) => v,
            };
            if got["id"] == id.as_str() && got["type"] != "event" {
                return Ok(got);
            }
            self.held.push_back(got);
        }
    }

    /// Says goodbye (close 1000); errors are ignored.
    pub async fn close(mut self) {
        let _ = self.write.write_frame(Frame::close(1000, b"bye")).await;
    }
}

/// An `error` frame as a refusal.
pub fn refusal(v: &Value) -> CliError {
    let code = v["code"].as_str().unwrap_or("error").to_string();
    let mut message = v["message"].as_str().unwrap_or("").to_string();
    let meaning = crate::error::explain(&code);
    if !meaning.is_empty() {
        message = format!("{meaning} ({message})");
    }
    CliError::Refused { code, message }
}

fn closed(gateway: &str, code: u16, reason: String) -> CliError {
    match code {
        4001 => CliError::Auth {
            code: "token_expired".into(),
            message: "the token expired while connected".into(),
        },
        4003 => CliError::Auth {
            code: "device_revoked".into(),
            message: "this device was revoked from another of your devices".into(),
        },
        4009 | 1002 | 1007 | 1009 => CliError::Protocol(format!(
            "the gateway closed the connection ({code} {reason})"
        )),
        _ => CliError::unreachable(gateway, format!("connection closed ({code} {reason})")),
    }
}

async fn read_loop(
    mut read: FragmentCollectorRead<tokio::io::ReadHalf<TokioIo<Upgraded>>>,
    tx: mpsc::Sender<Incoming>,
) {
    let mut ignore = |_: Frame<'_>| async { Ok::<(), std::io::Error>(()) };
    loop {
        let frame = match read.read_frame(&mut ignore).await {
            Ok(f) => f,
            Err(e) => {
                let _ = tx
                    .send(Incoming::Closed {
                        code: 1006,
                        reason: e.to_string(),
                    })
                    .await;
                return;
            }
        };
        match frame.opcode {
            OpCode::Text => {
                if let Ok(v) = serde_json::from_slice::<Value>(&frame.payload) {
                    if tx.send(Incoming::Frame(v)).await.is_err() {
                        return;
                    }
                }
            }
            OpCode::Close => {
                let p = &frame.payload;
                let code = if p.len() >= 2 {
                    u16::from_be_bytes([p[0], p[1]])
                } else {
                    1005
                };
                let reason = String::from_utf8_lossy(p.get(2..).unwrap_or_default()).into_owned();
                let _ = tx.send(Incoming::Closed { code, reason }).await;
                return;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_addresses() {
        assert_eq!(
            host_port("http://127.0.0.1:8080").unwrap(),
            "127.0.0.1:8080"
        );
        assert_eq!(host_port("http://localhost").unwrap(), "localhost:80");
        assert!(matches!(
            host_port("https://x.example"),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(host_port("nonsense"), Err(CliError::Usage(_))));
    }

    #[test]
    fn query_values_are_escaped() {
        assert_eq!(query_escape("a.b_c-d~"), "a.b_c-d~");
        assert_eq!(query_escape("a+b/c="), "a%2Bb%2Fc%3D");
    }

    #[test]
    fn closes_map_to_exit_codes() {
        assert_eq!(closed("g", 4001, String::new()).exit_code(), 3);
        let revoked = closed("g", 4003, String::new());
        assert_eq!((revoked.exit_code(), revoked.code()), (3, "device_revoked"));
        assert_eq!(closed("g", 1001, String::new()).exit_code(), 1);
        assert_eq!(closed("g", 4009, String::new()).exit_code(), 5);
    }
}
