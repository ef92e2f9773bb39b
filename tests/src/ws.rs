//! A minimal WebSocket client of the chat protocol (JSON text frames), for
//! the end-to-end tests and the load generator. Built on fastwebsockets'
//! client handshake, like the gateway's server side.

use anyhow::Context;
use fastwebsockets::{handshake, FragmentCollectorRead, Frame, OpCode, WebSocketWrite};
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::header::{CONNECTION, HOST, ORIGIN, UPGRADE};
use hyper::upgrade::Upgraded;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{ReadHalf, WriteHalf};

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

type Io = TokioIo<Upgraded>;

/// The reading half: JSON frames in.
pub struct WsReader {
    read: FragmentCollectorRead<ReadHalf<Io>>,
}

/// The writing half: JSON frames out.
pub struct WsWriter {
    write: WebSocketWrite<WriteHalf<Io>>,
}

/// What came in.
#[derive(Debug)]
pub enum Incoming {
    Json(Value),
    /// The server closed with this code and reason.
    Closed(u16, String),
}

/// Opens `ws://addr{path_and_query}` (optionally with an Origin header).
/// Err carries the HTTP status and body when the server refused the upgrade.
pub async fn connect(
    addr: SocketAddr,
    path_and_query: &str,
    origin: Option<&str>,
) -> anyhow::Result<(WsReader, WsWriter)> {
    connect_from(addr, None, path_and_query, origin).await
}

/// Like [`connect`], from a chosen local address (the load generator spreads
/// clients over 127.0.0.x to get more source ports).
pub async fn connect_from(
    addr: SocketAddr,
    local: Option<std::net::IpAddr>,
    path_and_query: &str,
    origin: Option<&str>,
) -> anyhow::Result<(WsReader, WsWriter)> {
    let stream = match local {
        None => tokio::net::TcpStream::connect(addr).await?,
        Some(ip) => {
            let s = tokio::net::TcpSocket::new_v4()?;
            s.bind(SocketAddr::new(ip, 0))?;
            s.connect(addr).await?
        }
    };
    stream.set_nodelay(true)?;
    let mut req = Request::builder()
        .method("GET")
        .uri(format!("http://{addr}{path_and_query}"))
        .header(HOST, addr.to_string())
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "upgrade")
        .header("Sec-WebSocket-Key", handshake::generate_key())
        .header("Sec-WebSocket-Version", "13");
    if let Some(o) = origin {
        req = req.header(ORIGIN, o);
    }
    let req = req.body(Empty::<Bytes>::new())?;
    let (ws, _resp) = handshake::client(&SpawnExecutor, req, stream)
        .await
        .context("websocket handshake")?;
    let (read, write) = ws.split(tokio::io::split);
    Ok((
        WsReader {
            read: FragmentCollectorRead::new(read),
        },
        WsWriter { write },
    ))
}

impl WsWriter {
    pub async fn send(&mut self, v: &Value) -> anyhow::Result<()> {
        let text = serde_json::to_vec(v)?;
        self.write
            .write_frame(Frame::text(fastwebsockets::Payload::Owned(text)))
            .await?;
        Ok(())
    }

    /// Sends raw bytes as one text frame (for malformed-input tests).
    pub async fn send_raw_text(&mut self, bytes: Vec<u8>) -> anyhow::Result<()> {
        self.write
            .write_frame(Frame::text(fastwebsockets::Payload::Owned(bytes)))
            .await?;
        Ok(())
    }

    pub async fn close(&mut self) -> anyhow::Result<()> {
        self.write.write_frame(Frame::close(1000, b"bye")).await?;
        Ok(())
    }
}

impl WsReader {
    /// The next frame, or None after `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> anyhow::Result<Option<Incoming>> {
        let mut ignore = |_: Frame<'_>| async { Ok::<(), std::io::Error>(()) };
        loop {
            let frame = match tokio::time::timeout(timeout, self.read.read_frame(&mut ignore)).await
            {
                Err(_) => return Ok(None),
                Ok(f) => f?,
            };
            match frame.opcode {
                OpCode::Text => {
                    return Ok(Some(Incoming::Json(serde_json::from_slice(
                        &frame.payload,
                    )?)))
                }
                OpCode::Close => {
                    let p = &frame.payload;
                    let code = if p.len() >= 2 {
                        u16::from_be_bytes([p[0], p[1]])
                    } else {
                        1005
                    };
                    let reason =
                        String::from_utf8_lossy(p.get(2..).unwrap_or_default()).into_owned();
                    return Ok(Some(Incoming::Closed(code, reason)));
                }
                _ => continue,
            }
        }
    }

    /// Reads until a JSON frame satisfies `pred`, skipping others; None after `timeout`.
    pub async fn recv_until(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> anyhow::Result<Option<Value>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await? {
                Some(Incoming::Json(v)) if pred(&v) => return Ok(Some(v)),
                Some(Incoming::Json(_)) => continue,
                Some(Incoming::Closed(code, reason)) => anyhow::bail!("closed {code}: {reason}"),
                None => return Ok(None),
            }
        }
    }
}
