//! The `chat` CLI end to end: real CLI processes (one config directory per
//! user) against the whole platform as real processes. Two users on two
//! gateways exchange messages (one `tail`s live while the other `send`s),
//! page through history, retry idempotently, mute chats, hide presence,
//! list and revoke devices, and get the documented exit codes for
//! refusals, bad tokens, a revoked device and an unreachable gateway. Every
//! `--json` line is parsed.

use chat_tests::platform::{binary, Options, Platform};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// One CLI user: a config directory and a default gateway.
struct User {
    home: PathBuf,
    gateway: String,
}

/// What one CLI run gave.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: Vec<Value>,
    stderr: String,
}

impl Run {
    fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "expected success: {self:?}");
        self
    }

    fn one(&self) -> &Value {
        assert_eq!(self.stdout.len(), 1, "expected one JSON line: {self:?}");
        &self.stdout[0]
    }

    /// The JSON error object on stderr.
    fn error(&self) -> Value {
        serde_json::from_str(self.stderr.trim())
            .unwrap_or_else(|e| panic!("stderr is not one JSON object ({e}): {self:?}"))
    }
}

fn parse_lines(out: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(out)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

impl User {
    fn new(gateway: String) -> Self {
        let home = chat_tests::repo_root()
            .join("target")
            .join("cli-test")
            .join(uuid::Uuid::new_v4().simple().to_string());
        std::fs::create_dir_all(&home).unwrap();
        Self { home, gateway }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(binary("chat", "debug").unwrap());
        c.env("XDG_CONFIG_HOME", &self.home)
            .env_remove("CHAT_TOKEN")
            .env_remove("CHAT_DEVICE")
            .env("CHAT_GATEWAY", &self.gateway)
            .arg("--json")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    async fn run(&self, args: &[&str]) -> Run {
        let out = tokio::time::timeout(Duration::from_secs(90), self.command(args).output())
            .await
            .expect("chat did not finish in 90 s")
            .unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: parse_lines(&out.stdout),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

fn texts(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "event" && e["kind"] == "MessageSent")
        .map(|e| e["body"]["text"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cli_users_chat_through_the_platform_with_documented_exit_codes() {
    let p = Platform::start_with(
        "cli",
        Options {
            gateways: 2,
            workers: 1,
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let gw0 = format!("http://{}", p.gateway(0));
    let gw1 = format!("http://{}", p.gateway(1));
    let ann = User::new(gw0.clone());
    let bob = User::new(gw1.clone());
    let cat = User::new(gw0.clone());

    // Not signed in: exit 3 with the code.
    let r = ann.run(&["chats"]).await;
    assert_eq!(r.code, 3, "{r:?}");
    assert_eq!(r.error()["error"], "missing_token");

    // Login stores the token; a second login of the same user keeps the device.
    let login = ann.run(&["login", "ann"]).await;
    let l = login.ok().one();
    assert_eq!(l["user"], "ann");
    assert_eq!(l["gateway"], gw0.as_str());
    let device = l["device"].as_str().unwrap().to_string();
    let again = ann.run(&["login", "ann"]).await;
    assert_eq!(again.ok().one()["device"], device.as_str());
    bob.run(&["login", "bob"]).await.ok();
    cat.run(&["login", "cat"]).await.ok();

    // A direct chat, created from either side, is the same chat.
    let created = ann.run(&["create", "direct", "bob"]).await;
    let ack = created.ok().one();
    assert_eq!(ack["type"], "ack");
    let chat = ack["chat"].as_str().unwrap().to_string();

    // bob tails on gateway 1 while ann sends on gateway 0.
    let mut tail = bob
        .command(&["tail", "--count", "3", "--timeout", "90"])
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(tail.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("tail printed no synced line")
            .unwrap()
            .expect("tail ended before synced");
        let v: Value = serde_json::from_str(&line).unwrap();
        let is_synced = v["type"] == "synced";
        seen.push(v);
        if is_synced {
            break;
        }
    }
    let mut seqs = Vec::new();
    for i in 1..=3 {
        let r = ann
            .run(&["send", &chat, "hello", &format!("bob #{i}")])
            .await;
        let a = r.ok().one();
        assert_eq!(a["type"], "ack", "{a}");
        assert_eq!(a["chat"], chat.as_str());
        seqs.push(a["seq"].as_u64().unwrap());
    }
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let mut live = Vec::new();
    while let Some(line) = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("tail stalled")
        .unwrap()
    {
        live.push(serde_json::from_str::<Value>(&line).unwrap());
    }
    // The new chat's first event came with the sync or just after it.
    assert!(
        seen.iter()
            .chain(&live)
            .any(|e| e["kind"] == "ChatCreated" && e["chat"] == chat.as_str()),
        "tail shows the new chat: {seen:?} {live:?}"
    );
    let status = tail.wait().await.unwrap();
    assert!(status.success(), "tail --count 3 exits 0: {status:?}");
    assert_eq!(
        texts(&live),
        ["hello bob #1", "hello bob #2", "hello bob #3"]
    );
    assert!(live.iter().all(|e| e["sender"] == "ann"));
    assert_eq!(
        live.iter()
            .filter(|e| e["kind"] == "MessageSent")
            .map(|e| e["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        seqs
    );

    // bob answers; a second tail resumes after what the first saw.
    bob.run(&["send", &chat, "hi ann"]).await.ok();
    let r = bob.run(&["tail", "--count", "1", "--timeout", "60"]).await;
    r.ok();
    assert_eq!(
        texts(&r.stdout),
        ["hi ann"],
        "only what is new since the last tail: {r:?}"
    );

    // ann's chat list.
    let r = ann.run(&["chats"]).await;
    let c = r.ok().one();
    assert_eq!(c["chat"], chat.as_str());
    assert_eq!(c["kind"], "direct");
    assert_eq!(c["last_seq"].as_u64(), Some(seqs[2] + 1));

    // History pages back with --before.
    let r = ann.run(&["history", &chat, "--limit", "2"]).await;
    r.ok();
    assert_eq!(texts(&r.stdout), ["hello bob #3", "hi ann"]);
    let page = r.stdout.last().unwrap();
    assert_eq!(page["type"], "page");
    assert_eq!(page["has_more"], true);
    let oldest = page["oldest"].as_u64().unwrap().to_string();
    let r = ann
        .run(&["history", &chat, "--limit", "2", "--before", &oldest])
        .await;
    r.ok();
    assert_eq!(texts(&r.stdout), ["hello bob #1", "hello bob #2"]);

    // A retry with the same client_msg_id is stored once.
    let first = ann
        .run(&["send", &chat, "once", "--client-msg-id", "cli-retry-1"])
        .await;
    let second = ann
        .run(&["send", &chat, "once", "--client-msg-id", "cli-retry-1"])
        .await;
    assert_eq!(first.ok().one()["seq"], second.ok().one()["seq"]);
    assert_eq!(second.one()["duplicate"], true);

    // Refusals: exit 4 with the protocol's code.
    let r = cat.run(&["send", &chat, "let me in"]).await;
    assert_eq!(r.code, 4, "{r:?}");
    assert_eq!(r.error()["error"], "not_member");
    let big = "x".repeat(5000);
    let r = ann.run(&["send", &chat, &big]).await;
    assert_eq!(r.code, 4, "{r:?}");
    assert_eq!(r.error()["error"], "too_large");

    // Groups: create, add, remove, leave.
    let r = ann
        .run(&["create", "group", "--title", "trio", "bob"])
        .await;
    let group = r.ok().one()["chat"].as_str().unwrap().to_string();
    ann.run(&["add-member", &group, "cat"]).await.ok();
    // The chat list is a projection: it shows the group a moment later.
    let mut listed = false;
    for _ in 0..50 {
        let r = cat.run(&["chats"]).await;
        if r.ok()
            .stdout
            .iter()
            .any(|c| c["chat"] == group.as_str() && c["title"] == "trio")
        {
            listed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(listed, "cat's chat list shows the group");
    cat.run(&["send", &group, "hi all"]).await.ok();
    let r = bob.run(&["add-member", &group, "dan"]).await;
    assert_eq!(r.code, 4, "only admins add: {r:?}");
    assert_eq!(r.error()["error"], "forbidden");
    ann.run(&["remove-member", &group, "cat"]).await.ok();
    let r = cat.run(&["send", &group, "still here?"]).await;
    assert_eq!(r.error()["error"], "not_member", "{r:?}");
    bob.run(&["leave", &group]).await.ok();
    let r = bob.run(&["history", &group, "--limit", "10"]).await;
    assert_eq!(texts(&r.ok().stdout), ["hi all"]);

    // Settings: mute and unmute a chat, hide and show presence.
    let r = ann.run(&["mute", &chat]).await;
    assert_eq!(r.ok().one()["type"], "ack", "{r:?}");
    let r = ann.run(&["unmute", &chat]).await;
    assert_eq!(r.ok().one()["type"], "ack", "{r:?}");
    let r = ann.run(&["presence", "--hide"]).await;
    assert_eq!(r.ok().one()["hidden"], true, "{r:?}");
    let r = ann.run(&["presence", "--show"]).await;
    assert_eq!(r.ok().one()["hidden"], false, "{r:?}");
    assert_eq!(ann.run(&["presence"]).await.code, 2, "--hide or --show");

    // Devices: ann signs in on a second device (another config directory).
    let laptop = User::new(gw1.clone());
    let l = laptop.run(&["login", "ann"]).await;
    let laptop_device = l.ok().one()["device"].as_str().unwrap().to_string();
    assert_ne!(laptop_device, device);
    laptop.run(&["chats"]).await.ok();
    // The list is a projection: the new device shows up a moment later.
    let mut listed = Vec::new();
    for _ in 0..50 {
        let r = ann.run(&["devices"]).await;
        listed = r.ok().stdout.clone();
        if listed.iter().any(|d| d["device"] == laptop_device.as_str()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let row = |name: &str| {
        listed
            .iter()
            .find(|d| d["device"] == name)
            .unwrap_or_else(|| panic!("{name} not in {listed:?}"))
            .clone()
    };
    let mine = row(&device);
    assert_eq!(mine["current"], true, "{listed:?}");
    assert!(mine["revoked_at"].is_null(), "{listed:?}");
    let other = row(&laptop_device);
    assert_eq!(other["current"], false, "{listed:?}");
    assert!(other["last_seen"].as_i64().is_some(), "{listed:?}");

    // Revoking it: from then on (once projected) its commands fail with exit 3.
    let r = ann.run(&["revoke-device", &laptop_device]).await;
    assert_eq!(r.ok().one()["revoked"], laptop_device.as_str());
    let mut r = laptop.run(&["chats"]).await;
    for _ in 0..50 {
        if r.code == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        r = laptop.run(&["chats"]).await;
    }
    assert_eq!(r.code, 3, "{r:?}");
    assert_eq!(r.error()["error"], "device_revoked", "{r:?}");
    assert!(
        r.error()["message"]
            .as_str()
            .unwrap()
            .contains("device_revoked"),
        "{r:?}"
    );
    // The revoking device is untouched, and lists the revocation.
    let r = ann.run(&["devices"]).await;
    let revoked = r
        .ok()
        .stdout
        .iter()
        .find(|d| d["device"] == laptop_device.as_str())
        .cloned()
        .unwrap();
    assert!(revoked["revoked_at"].as_i64().is_some(), "{r:?}");

    // Tokens: a bad one is an authentication error; so is an expired one.
    let r = ann.run(&["--token", "not.a.token", "chats"]).await;
    assert_eq!(r.code, 3, "{r:?}");
    assert_eq!(r.error()["error"], "invalid_token");

    // An unreachable gateway: exit 1.
    let dead = format!(
        "http://{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    );
    let r = ann.run(&["--gateway", &dead, "chats"]).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(r.error()["error"], "unreachable");

    // Usage errors: exit 2.
    let r = ann.run(&["send"]).await;
    assert_eq!(r.code, 2, "{r:?}");

    p.stop().await;
}
