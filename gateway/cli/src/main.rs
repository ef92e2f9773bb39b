//! `chat`: a command-line client of the chat gateway.
//!
//! Owns: the subcommands (login, logout, chats, send, tail, history, create,
//! add-member, remove-member, leave, mute, unmute, devices, revoke-device,
//! presence), how they find the gateway and token
//! (flags, then `CHAT_GATEWAY` / `CHAT_TOKEN` / `CHAT_DEVICE`, then the
//! credentials `chat login` saved), and their output: text for people, or
//! with `--json` one JSON object per line on stdout (errors: one JSON object
//! on stderr). Exit codes are documented in [`error`].
//!
//! Modules: [`conn`] (the WebSocket connection), [`creds`] (stored
//! credentials and tail state), [`error`] (errors and exit codes).

mod conn;
mod creds;
mod error;

use clap::{Args, Parser, Subcommand};
use conn::{refusal, Conn, Target};
use creds::{Credentials, SyncState};
use error::{CliError, Result};
use serde_json::{json, Value};
use std::process::ExitCode;
use std::time::Duration;

const DEFAULT_GATEWAY: &str = "http://127.0.0.1:8080";
/// How long to wait for a command's answer (the gateway answers within its
/// `ack_timeout_ms`, 10 s by default).
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

#[derive(Debug, Parser)]
#[command(
    name = "chat",
    version,
    about = "Command-line client of the chat gateway (protocol v1)",
    after_help = "Exit codes: 0 ok, 1 gateway unreachable or no answer in time, 2 usage, \
                  3 authentication (sign in again), 4 refused by the server (the protocol \
                  error code is printed), 5 unexpected answer."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Global {
    /// Gateway address (default: the one `chat login` used, else http://127.0.0.1:8080).
    #[arg(long, global = true, env = "CHAT_GATEWAY")]
    gateway: Option<String>,
    /// A token to use instead of the stored one.
    #[arg(long, global = true, env = "CHAT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Device id (default: the token's `device` claim, else the stored one).
    #[arg(long, global = true, env = "CHAT_DEVICE")]
    device: Option<String>,
    /// Machine-readable output: one JSON object per line.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Sign in with the gateway's development login and store the token.
    Login { user: String },
    /// Forget the stored token.
    Logout,
    /// List your chats.
    Chats,
    /// Send a message.
    Send {
        chat: String,
        /// The text (several words are joined with spaces).
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
        /// Idempotence key: a retry with the same id is stored once (default: a new one).
        #[arg(long)]
        client_msg_id: Option<String>,
    },
    /// Print missed events (a sync since the last tail), then live ones.
    Tail {
        /// Only these chats (repeatable).
        #[arg(long = "chat")]
        chats: Vec<String>,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<usize>,
        /// Stop after this many seconds (exit 1 if --count was not reached).
        #[arg(long)]
        timeout: Option<u64>,
        /// Skip what the sync brings; print only live events.
        #[arg(long)]
        live: bool,
    },
    /// Page through a chat's history (oldest first).
    History {
        chat: String,
        /// Events before this seq (scroll back; default: the newest).
        #[arg(long)]
        before: Option<u64>,
        /// Events after this seq.
        #[arg(long)]
        after: Option<u64>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Create a chat.
    #[command(subcommand)]
    Create(Create),
    /// Add a member to a group (admins only).
    AddMember {
        chat: String,
        user: String,
        /// Make the new member an admin.
        #[arg(long)]
        admin: bool,
    },
    /// Remove a member from a group (admins only).
    RemoveMember { chat: String, user: String },
    /// Leave a chat.
    Leave { chat: String },
    /// Mute a chat on all your devices (it still counts as unread, but does not notify).
    Mute { chat: String },
    /// Unmute a chat.
    Unmute { chat: String },
    /// List your devices (with --json: one object per device).
    Devices,
    /// Revoke one of your devices: its connections close and its tokens are refused.
    RevokeDevice {
        /// The device id (see `chat devices`).
        // Its own argument id: `device` is the global --device (the device
        // to connect as), which would otherwise take this value.
        #[arg(id = "revoked_device", value_name = "DEVICE")]
        device: String,
    },
    /// Hide your presence (everyone sees you offline, no last seen) or show it again.
    Presence {
        /// Appear offline to everyone.
        #[arg(long, conflicts_with = "show", required_unless_present = "show")]
        hide: bool,
        /// Show your presence again.
        #[arg(long)]
        show: bool,
    },
}

#[derive(Debug, Subcommand)]
enum Create {
    /// A one-to-one chat with USER.
    Direct { user: String },
    /// A group with the given members (you are its admin).
    Group {
        #[arg(long)]
        title: Option<String>,
        #[arg(required = true, num_args = 1..)]
        members: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.global.json;
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return CliError::Protocol(format!("cannot start the runtime: {e}")).report(json),
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.report(json),
    }
}

/// One line of output: the JSON object, or the text.
fn out(json: bool, v: &Value, text: impl FnOnce() -> String) {
    if json {
        println!("{v}");
    } else {
        println!("{}", text());
    }
}

async fn run(cli: Cli) -> Result<()> {
    let g = cli.global;
    match cli.command {
        Command::Login { user } => login(&g, &user).await,
        Command::Logout => {
            let had = creds::remove_credentials()?;
            out(g.json, &json!({"logged_out": had}), || {
                if had {
                    "signed out"
                } else {
                    "was not signed in"
                }
                .into()
            });
            Ok(())
        }
        Command::Chats => chats(&g).await,
        Command::Send {
            chat,
            text,
            client_msg_id,
        } => send(&g, &chat, &text.join(" "), client_msg_id).await,
        Command::Tail {
            chats,
            count,
            timeout,
            live,
        } => tail(&g, &chats, count, timeout, live).await,
        Command::History {
            chat,
            before,
            after,
            limit,
        } => history(&g, &chat, before, after, limit).await,
        Command::Create(Create::Direct { user }) => {
            let ack = command(
                &g,
                json!({"type": "create_chat", "kind": "direct", "members": [user]}),
            )
            .await?;
            out(g.json, &ack, || {
                ack["chat"].as_str().unwrap_or("").to_string()
            });
            Ok(())
        }
        Command::Create(Create::Group { title, members }) => {
            let mut f = json!({"type": "create_chat", "kind": "group", "members": members});
            if let Some(t) = title {
                f["title"] = json!(t);
            }
            let ack = command(&g, f).await?;
            out(g.json, &ack, || {
                ack["chat"].as_str().unwrap_or("").to_string()
            });
            Ok(())
        }
        Command::AddMember { chat, user, admin } => {
            let role = if admin { "admin" } else { "member" };
            done(
                &g,
                json!({"type": "add_member", "chat": chat, "user": user, "role": role}),
            )
            .await
        }
        Command::RemoveMember { chat, user } => {
            done(
                &g,
                json!({"type": "remove_member", "chat": chat, "user": user}),
            )
            .await
        }
        Command::Leave { chat } => done(&g, json!({"type": "leave", "chat": chat})).await,
        Command::Mute { chat } => mute(&g, &chat, true).await,
        Command::Unmute { chat } => mute(&g, &chat, false).await,
        Command::Devices => devices(&g).await,
        Command::RevokeDevice { device } => {
            setting(&g, json!({"type": "revoke_device", "device": device})).await?;
            out(g.json, &json!({"type": "ok", "revoked": device}), || {
                format!("revoked {device}: its connections are closed and its tokens refused")
            });
            Ok(())
        }
        Command::Presence { hide, show: _ } => {
            setting(&g, json!({"type": "presence_settings", "hidden": hide})).await?;
            out(g.json, &json!({"type": "ok", "hidden": hide}), || {
                if hide {
                    "your presence is hidden: everyone sees you offline".into()
                } else {
                    "your presence is shown again".into()
                }
            });
            Ok(())
        }
    }
}

/// Who we are and where to: flags and environment first, then the stored login.
fn target(g: &Global) -> Result<(Target, String, String)> {
    let stored = creds::load_credentials()?;
    let gateway = g
        .gateway
        .clone()
        .or_else(|| stored.as_ref().map(|c| c.gateway.clone()))
        .unwrap_or_else(|| DEFAULT_GATEWAY.into());
    let (token, stored_device) = match (&g.token, &stored) {
        (Some(t), _) => (t.clone(), None),
        (None, Some(c)) => (c.token.clone(), Some(c.device.clone())),
        (None, None) => {
            return Err(CliError::Auth {
                code: "missing_token".into(),
                message: "not signed in: run `chat login USER`, or pass --token / CHAT_TOKEN"
                    .into(),
            })
        }
    };
    let claims = creds::claims(&token);
    if let Some(exp) = claims.exp {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if exp <= now {
            return Err(CliError::Auth {
                code: "token_expired".into(),
                message: "the token expired".into(),
            });
        }
    }
    let device = g.device.clone().or(claims.device.clone()).or(stored_device);
    let user = claims.sub.unwrap_or_default();
    let shown_device = device.clone().unwrap_or_default();
    Ok((
        Target {
            gateway,
            token,
            device,
        },
        user,
        shown_device,
    ))
}

async fn connect(g: &Global) -> Result<(Conn, String, String)> {
    let (t, user, device) = target(g)?;
    let conn = Conn::open(&t).await?;
    let user = conn.hello["user"]
        .as_str()
        .map(str::to_string)
        .unwrap_or(user);
    let device = conn.hello["device"]
        .as_str()
        .map(str::to_string)
        .unwrap_or(device);
    Ok((conn, user, device))
}

async fn login(g: &Global, user: &str) -> Result<()> {
    let gateway = g
        .gateway
        .clone()
        .or_else(|| creds::load_credentials().ok().flatten().map(|c| c.gateway))
        .unwrap_or_else(|| DEFAULT_GATEWAY.into());
    // Keep the device of an earlier login of the same user.
    let device = g.device.clone().unwrap_or_else(|| {
        creds::load_credentials()
            .ok()
            .flatten()
            .filter(|c| c.user == user)
            .map(|c| c.device)
            .unwrap_or_else(|| format!("cli-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]))
    });
    let url = format!("{}/dev/login", gateway.trim_end_matches('/'));
    let resp = reqwest::Client::new()
        .post(&url)
        .json(&json!({"user": user, "device": device}))
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .map_err(|e| CliError::unreachable(&gateway, e))?;
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    match status {
        200 => {}
        404 => {
            return Err(CliError::Auth {
                code: "no_dev_login".into(),
                message: format!("{gateway} has no development login; pass a token with --token"),
            })
        }
        400 => {
            return Err(CliError::Usage(format!(
                "{}: {}",
                body["error"].as_str().unwrap_or("bad_request"),
                body["message"].as_str().unwrap_or("")
            )))
        }
        s => {
            return Err(CliError::unreachable(
                &gateway,
                format!("login answered {s}: {body}"),
            ))
        }
    }
    let token = body["token"]
        .as_str()
        .ok_or_else(|| CliError::Protocol(format!("no token in {body}")))?;
    let c = Credentials {
        gateway: gateway.clone(),
        user: user.to_string(),
        device: device.clone(),
        token: token.to_string(),
        expires_at: body["expires_at"].as_u64(),
    };
    let path = creds::save_credentials(&c)?;
    out(
        g.json,
        &json!({"user": user, "device": device, "gateway": gateway,
                "expires_at": c.expires_at, "credentials": path}),
        || {
            format!(
                "signed in as {user} (device {device}) at {gateway}; token saved in {}",
                path.display()
            )
        },
    );
    Ok(())
}

/// Sends a command and waits for its `ack`; `error` becomes a refusal.
/// `unavailable` and `rate_limited` are retried with the same `client_msg_id`.
async fn command(g: &Global, mut frame: Value) -> Result<Value> {
    if frame.get("client_msg_id").is_none_or(Value::is_null) {
        frame["client_msg_id"] = json!(format!("cli-{}", uuid::Uuid::new_v4().simple()));
    }
    retrying(g, frame, "ack").await
}

/// Sends `frame` on a new connection until it is answered with a frame of
/// type `expect`; `error` becomes a refusal, except `unavailable` and
/// `rate_limited`, which are retried (with backoff) as they are: commands
/// carry their `client_msg_id`, settings are idempotent.
async fn retrying(g: &Global, frame: Value, expect: &str) -> Result<Value> {
    let (mut conn, _, _) = connect(g).await?;
    let mut delay = Duration::from_millis(300);
    let mut attempt = 1;
    let answer = loop {
        let answer = match conn.request(frame.clone(), ANSWER_WITHIN).await {
            Ok(a) => a,
            Err(e) => break Err(e),
        };
        let code = answer["code"].as_str().unwrap_or("");
        let transient = code == "unavailable" || code == "rate_limited";
        if answer["type"] == "error" && transient && attempt < 6 {
            tokio::time::sleep(delay).await;
            delay *= 2;
            attempt += 1;
            continue;
        }
        break Ok(answer);
    };
    conn.close().await;
    let answer = answer?;
    match answer["type"].as_str() {
        Some(t) if t == expect => Ok(answer),
        Some("error") => Err(refusal(&answer)),
        _ => Err(CliError::Protocol(format!(
            "expected {expect}, got {answer}"
        ))),
    }
}

/// Asks `frame` on a new connection and returns the answer with its array
/// `field` (`chats`, `devices`, `events`); `error` becomes a refusal.
async fn query(g: &Global, frame: Value, field: &str) -> Result<(Value, Vec<Value>)> {
    let (mut conn, _, _) = connect(g).await?;
    let answer = conn.request(frame, ANSWER_WITHIN).await;
    conn.close().await;
    let answer = answer?;
    if answer["type"] == "error" {
        return Err(refusal(&answer));
    }
    let list = answer[field]
        .as_array()
        .cloned()
        .ok_or_else(|| CliError::Protocol(format!("expected {field}, got {answer}")))?;
    Ok((answer, list))
}

/// A command whose text output is "ok".
async fn done(g: &Global, frame: Value) -> Result<()> {
    let ack = command(g, frame).await?;
    out(g.json, &ack, || {
        format!(
            "ok (seq {}{})",
            ack["seq"],
            if ack["duplicate"] == true {
                ", already done"
            } else {
                ""
            }
        )
    });
    Ok(())
}

/// A user setting (`revoke_device`, `presence_settings`), answered by `ok`.
async fn setting(g: &Global, frame: Value) -> Result<Value> {
    retrying(g, frame, "ok").await
}

async fn mute(g: &Global, chat: &str, muted: bool) -> Result<()> {
    let ack = command(g, json!({"type": "mute", "chat": chat, "muted": muted})).await?;
    out(g.json, &ack, || {
        format!("{} {chat}", if muted { "muted" } else { "unmuted" })
    });
    Ok(())
}

/// How long ago `ms` (milliseconds since the epoch) was, for people.
fn ago(ms: Option<i64>) -> String {
    let Some(ms) = ms else {
        return "-".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let s = (now - ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3_600 => format!("{}m ago", s / 60),
        3_600..86_400 => format!("{}h ago", s / 3_600),
        _ => format!("{}d ago", s / 86_400),
    }
}

async fn devices(g: &Global) -> Result<()> {
    let (_, list) = query(g, json!({"type": "devices"}), "devices").await?;
    if !g.json {
        println!(
            "{:<24}  {:<7}  {:<10}  {:<10}  REVOKED",
            "DEVICE", "ONLINE", "LAST SEEN", "FIRST SEEN"
        );
    }
    for d in &list {
        out(g.json, d, || {
            format!(
                "{:<24}  {:<7}  {:<10}  {:<10}  {}{}",
                d["device"].as_str().unwrap_or(""),
                if d["online"] == true { "yes" } else { "no" },
                ago(d["last_seen"].as_i64()),
                ago(d["first_seen"].as_i64()),
                d["revoked_at"]
                    .as_i64()
                    .map(|t| ago(Some(t)))
                    .unwrap_or_else(|| "-".into()),
                if d["current"] == true {
                    "  (this device)"
                } else {
                    ""
                }
            )
        });
    }
    Ok(())
}

async fn send(g: &Global, chat: &str, text: &str, client_msg_id: Option<String>) -> Result<()> {
    let mut f = json!({"type": "send", "chat": chat, "text": text});
    if let Some(id) = client_msg_id {
        f["client_msg_id"] = json!(id);
    }
    let ack = command(g, f).await?;
    out(g.json, &ack, || {
        format!(
            "sent: seq {} in {chat}{}",
            ack["seq"],
            if ack["duplicate"] == true {
                " (a retry: stored once)"
            } else {
                ""
            }
        )
    });
    Ok(())
}

async fn chats(g: &Global) -> Result<()> {
    let (_, list) = query(g, json!({"type": "chats"}), "chats").await?;
    if !g.json {
        println!(
            "{:<36}  {:<6}  {:>5}  {:>6}  TITLE",
            "CHAT", "KIND", "LAST", "UNREAD"
        );
    }
    for c in &list {
        out(g.json, c, || {
            let unread = c["unread"]
                .as_u64()
                .map(|u| u.to_string())
                .unwrap_or_else(|| {
                    let last = c["last_seq"].as_u64().unwrap_or(0);
                    let read = c["last_read_seq"].as_u64().unwrap_or(0);
                    format!("~{}", last.saturating_sub(read))
                });
            format!(
                "{:<36}  {:<6}  {:>5}  {:>6}  {}{}",
                c["chat"].as_str().unwrap_or(""),
                c["kind"].as_str().unwrap_or(""),
                c["last_seq"],
                unread,
                c["title"].as_str().unwrap_or(""),
                if c["left_seq"].is_null() {
                    ""
                } else {
                    " (left)"
                }
            )
        });
    }
    Ok(())
}

/// One event as a line of text.
fn event_text(e: &Value) -> String {
    let chat = e["chat"].as_str().unwrap_or("");
    let short = chat.get(..8).unwrap_or(chat);
    let sender = e["sender"].as_str().unwrap_or("?");
    let b = &e["body"];
    let what = match e["kind"].as_str().unwrap_or("") {
        "MessageSent" => format!("{sender}: {}", b["text"].as_str().unwrap_or("[media]")),
        "ChatCreated" => format!(
            "{sender} created a {} chat {}with {}",
            b["kind"].as_str().unwrap_or(""),
            b["title"]
                .as_str()
                .map(|t| format!("\"{t}\" "))
                .unwrap_or_default(),
            b["members"]
                .as_array()
                .map(|m| m
                    .iter()
                    .filter_map(|x| x["user_id"].as_str())
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        ),
        "MemberAdded" => format!("{sender} added {}", b["user_id"].as_str().unwrap_or("")),
        "MemberRemoved" => format!(
            "{} {}",
            b["user_id"].as_str().unwrap_or(""),
            if b["reason"] == "left" {
                "left".to_string()
            } else {
                format!("was removed by {sender}")
            }
        ),
        other => format!("{sender}: <{other}>"),
    };
    format!("[{short}] #{} {what}", e["seq"])
}

async fn history(
    g: &Global,
    chat: &str,
    before: Option<u64>,
    after: Option<u64>,
    limit: u32,
) -> Result<()> {
    let mut f = json!({"type": "history", "chat": chat, "limit": limit});
    if let Some(b) = before {
        f["before"] = json!(b);
    }
    if let Some(a) = after {
        f["after"] = json!(a);
    }
    let (page, events) = query(g, f, "events").await?;
    for e in &events {
        // The same shape as live `event` frames.
        let mut e = e.clone();
        e["type"] = json!("event");
        e["chat"] = json!(chat);
        out(g.json, &e, || event_text(&e));
    }
    let oldest = events.first().and_then(|e| e["seq"].as_u64());
    let has_more = page["has_more"] == true;
    if g.json {
        println!(
            "{}",
            json!({"type": "page", "chat": chat, "has_more": has_more, "oldest": oldest, "count": events.len()})
        );
    } else if has_more {
        if let Some(o) = oldest.filter(|_| after.is_none()) {
            eprintln!("(more: chat history {chat} --before {o})");
        } else {
            eprintln!("(more in this direction)");
        }
    }
    Ok(())
}

async fn tail(
    g: &Global,
    only: &[String],
    count: Option<usize>,
    timeout: Option<u64>,
    live_only: bool,
) -> Result<()> {
    let deadline = timeout.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let mut printed = 0usize;
    let mut backoff = Duration::from_millis(500);
    let mut connected = false;
    loop {
        match tail_once(
            g,
            only,
            count,
            deadline,
            live_only,
            &mut printed,
            &mut connected,
        )
        .await
        {
            Ok(()) => return Ok(()),
            // The connection dropped after it had worked: reconnect and sync.
            Err(CliError::Unreachable { gateway, reason })
                if connected && deadline.is_none_or(|d| tokio::time::Instant::now() < d) =>
            {
                eprintln!("chat: connection to {gateway} lost ({reason}); reconnecting");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Sends `sync` with the checkpoint and every chat's last seq. A frame
/// holds at most `sync_chats_per_frame` entries; the rest follow in further
/// `sync` frames marked `more` (PROTOCOL.md, Sync).
async fn send_sync(conn: &mut conn::Conn, state: &SyncState) -> Result<()> {
    let per = conn.hello["limits"]["sync_chats_per_frame"]
        .as_u64()
        .map_or(1000, |n| n.max(1) as usize);
    let known: Vec<(&String, &u64)> = state.chats.iter().collect();
    let mut parts = known.chunks(per).peekable();
    loop {
        let chats: serde_json::Map<String, Value> = parts
            .next()
            .unwrap_or_default()
            .iter()
            .map(|(k, v)| ((*k).clone(), json!(v)))
            .collect();
        let more = parts.peek().is_some();
        let mut frame = json!({"type": "sync", "since": state.checkpoint, "chats": chats});
        if more {
            frame["more"] = json!(true);
        } else {
            frame["id"] = json!("sync");
        }
        conn.send(&frame).await?;
        if !more {
            return Ok(());
        }
    }
}

/// The events of `chat` strictly between `after` and `before`, from
/// `history`, as `event` frames.
async fn missing_events(
    conn: &mut conn::Conn,
    chat: &str,
    mut after: u64,
    before: u64,
) -> Result<Vec<Value>> {
    let limit = conn.hello["limits"]["max_history_limit"]
        .as_u64()
        .unwrap_or(100);
    let mut out = Vec::new();
    while after + 1 < before {
        let page = conn
            .request(
                json!({"type": "history", "chat": chat, "after": after, "before": before, "limit": limit}),
                Duration::from_secs(30),
            )
            .await?;
        if page["type"] == "error" {
            return Err(refusal(&page));
        }
        let events = page["events"].as_array().cloned().unwrap_or_default();
        let Some(last) = events.last().and_then(|e| e["seq"].as_u64()) else {
            break;
        };
        for mut e in events {
            e["type"] = json!("event");
            out.push(e);
        }
        after = last;
    }
    Ok(out)
}

async fn tail_once(
    g: &Global,
    only: &[String],
    count: Option<usize>,
    deadline: Option<tokio::time::Instant>,
    live_only: bool,
    printed: &mut usize,
    connected: &mut bool,
) -> Result<()> {
    let (mut conn, user, device) = connect(g).await?;
    *connected = true;
    let gateway = conn.gateway().to_string();
    let mut state: SyncState = creds::load_state(&user, &device)?;
    send_sync(&mut conn, &state).await?;
    let mut synced = false;
    let mut last_ping = tokio::time::Instant::now();
    // Nothing received for idle_timeout_ms closes the connection: ping as the gateway asks.
    let ping_every = Duration::from_millis(
        conn.hello["limits"]["heartbeat_interval_ms"]
            .as_u64()
            .unwrap_or(15_000)
            .clamp(1_000, 30_000),
    );
    let wanted = |chat: &str| only.is_empty() || only.iter().any(|c| c == chat);
    loop {
        if count.is_some_and(|n| *printed >= n) {
            creds::save_state(&user, &device, &state)?;
            conn.close().await;
            return Ok(());
        }
        let now = tokio::time::Instant::now();
        if let Some(d) = deadline {
            if now >= d {
                creds::save_state(&user, &device, &state)?;
                conn.close().await;
                return match count {
                    Some(n) => Err(CliError::unreachable(
                        &gateway,
                        format!("tail timed out after {} of {n} messages", *printed),
                    )),
                    None => Ok(()),
                };
            }
        }
        if now.duration_since(last_ping) >= ping_every {
            conn.send(&json!({"type": "ping"})).await?;
            last_ping = now;
        }
        let wait = deadline
            .map(|d| d.saturating_duration_since(now))
            .unwrap_or(ping_every)
            .min(ping_every);
        let Some(f) = conn.next(wait).await? else {
            continue;
        };
        match f["type"].as_str() {
            Some("event") => {
                let chat = f["chat"].as_str().unwrap_or("").to_string();
                let seq = f["seq"].as_u64().unwrap_or(0);
                let seen = state.chats.get(&chat).copied().unwrap_or(0);
                if seq <= seen {
                    continue; // a repeat across reconnects
                }
                // Seqs are gap-free: a live event beyond seen + 1 means some
                // are missing; fetch them first, in order.
                let mut events = Vec::new();
                if synced && seen > 0 && seq > seen + 1 {
                    events = missing_events(&mut conn, &chat, seen, seq).await?;
                }
                events.push(f);
                state.chats.insert(chat.clone(), seq);
                if synced {
                    creds::save_state(&user, &device, &state)?;
                }
                if !wanted(&chat) || (live_only && !synced) {
                    continue;
                }
                for f in events {
                    out(g.json, &f, || event_text(&f));
                    if f["kind"] == "MessageSent" {
                        *printed += 1;
                    }
                }
            }
            Some("synced") => {
                synced = true;
                state.checkpoint = f["checkpoint"].as_i64();
                creds::save_state(&user, &device, &state)?;
                if g.json {
                    println!("{f}");
                } else {
                    eprintln!("-- synced; live from here (Ctrl-C stops) --");
                }
            }
            Some("error") if f["id"] == "sync" && f["code"] == "unavailable" && !synced => {
                // Nothing was skipped; the platform asks for the sync again.
                tokio::time::sleep(Duration::from_millis(500)).await;
                send_sync(&mut conn, &state).await?;
            }
            Some("error") if f["id"] == "sync" => return Err(refusal(&f)),
            Some("reconnect") => {
                return Err(CliError::unreachable(
                    "the gateway",
                    "the gateway is restarting",
                ))
            }
            _ => {}
        }
    }
}
