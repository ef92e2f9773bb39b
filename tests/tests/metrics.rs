//! The operator's dashboard and alert rules name only metrics the services
//! export: every metric name in the PromQL of
//! `infra/grafana/chat-dashboard.json` and `infra/prometheus/alerts.yml` is
//! found in the `/metrics` of some service of a running platform after some
//! traffic and undecodable records: on `chat.events` (which the history
//! projector and the router dead-letter, and the router routes on after)
//! and on `chat.sessions` (which the presence service dead-letters and the
//! router's group-less session tail counts as skipped).
//! The check itself is tested with a dashboard naming a metric nobody exports.

use chat_tests::platform::{Options, Platform, Role};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(90);

/// Names that are not ours to export: `up` is made by Prometheus per scrape
/// target; the replay metrics are served by `chat-admin replay
/// --metrics-listen` while a replay runs, not by a service.
const NOT_EXPORTED_BY_SERVICES: &[&str] =
    &["up", "chat_replay_events_total", "chat_replay_lag_records"];

/// The metric names in one PromQL expression: identifiers outside strings,
/// label matchers `{...}`, ranges `[...]` and grouping clauses, that are not
/// function names or keywords. Every metric of the platform starts with
/// `chat_`; `up` is the one other name the rules use.
fn promql_names(expr: &str) -> BTreeSet<String> {
    // Drop strings and the insides of {...} and [...].
    let mut plain = String::new();
    let (mut quote, mut depth_brace, mut depth_bracket) = (None, 0, 0);
    for c in expr.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'' | '`') => quote = Some(c),
            (None, '{') => depth_brace += 1,
            (None, '}') => depth_brace -= 1,
            (None, '[') => depth_bracket += 1,
            (None, ']') => depth_bracket -= 1,
            (None, c) if depth_brace == 0 && depth_bracket == 0 => plain.push(c),
            _ => plain.push(' '),
        }
    }
    // Identifiers, with what follows them.
    let chars: Vec<char> = plain.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut after_grouping = false;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            let grouping = matches!(
                word.as_str(),
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            );
            if grouping {
                after_grouping = true;
                continue;
            }
            let is_call = next == Some(&'(');
            if !is_call && !after_grouping && (word.starts_with("chat_") || word == "up") {
                names.insert(word);
            }
        } else if c == ')' {
            after_grouping = false;
            i += 1;
        } else {
            i += 1;
        }
    }
    names
}

/// Every `expr` string anywhere in a Grafana dashboard.
fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// Every `expr:` of a Prometheus rule file (inline, or a `|`/`>` block).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("expr:") {
            let rest = rest.trim();
            if rest.starts_with('|') || rest.starts_with('>') {
                let indent = line.len() - trimmed.len();
                let mut block = Vec::new();
                i += 1;
                while i < lines.len() {
                    let l = lines[i];
                    let ind = l.len() - l.trim_start().len();
                    if !l.trim().is_empty() && ind <= indent {
                        break;
                    }
                    block.push(l.trim());
                    i += 1;
                }
                out.push(block.join(" "));
                continue;
            }
            out.push(rest.trim_matches(|c| c == '"' || c == '\'').to_string());
        }
        i += 1;
    }
    out
}

/// The metric names the dashboard and the alert rules use.
fn names_used(dashboard: &Value, rules: &str) -> BTreeSet<String> {
    let mut exprs = Vec::new();
    dashboard_exprs(dashboard, &mut exprs);
    exprs.extend(rule_exprs(rules));
    exprs.iter().flat_map(|e| promql_names(e)).collect()
}

/// The sample names in Prometheus/OpenMetrics text, and for each `# TYPE`
/// the names its samples take (`_total`, `_bucket`, `_sum`, `_count`).
fn exported(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                let suffixes: &[&str] = match kind {
                    "counter" => &["_total"],
                    "histogram" => &["_bucket", "_sum", "_count"],
                    "summary" => &["_sum", "_count", ""],
                    "info" => &["_info"],
                    _ => &[""],
                };
                out.extend(suffixes.iter().map(|s| format!("{name}{s}")));
            }
        } else if !line.starts_with('#') {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            if !name.is_empty() {
                out.insert(name.to_string());
            }
        }
    }
    out
}

/// The names used but exported by no service (besides the allowed ones).
fn missing(used: &BTreeSet<String>, exported: &BTreeSet<String>) -> Vec<String> {
    used.iter()
        .filter(|n| !NOT_EXPORTED_BY_SERVICES.contains(&n.as_str()) && !exported.contains(*n))
        .cloned()
        .collect()
}

fn committed_files() -> (Value, String) {
    let root = chat_tests::repo_root();
    let dashboard =
        std::fs::read_to_string(root.join("infra/grafana/chat-dashboard.json")).unwrap();
    let rules = std::fs::read_to_string(root.join("infra/prometheus/alerts.yml")).unwrap();
    (serde_json::from_str(&dashboard).unwrap(), rules)
}

#[test]
fn metric_names_are_read_out_of_promql() {
    let n = promql_names(
        r#"histogram_quantile(0.99, sum by (le, chat_label) (rate(chat_a_bucket{job="chat_not_a_metric"}[5m]))) > on (instance) group_left(x) chat_b and up{job=~"chat-.*"} == 0"#,
    );
    assert_eq!(
        n,
        ["chat_a_bucket", "chat_b", "up"]
            .into_iter()
            .map(String::from)
            .collect()
    );
    let rules = "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: chat_x > 1\n      - alert: B\n        expr: |\n          sum(chat_y)\n            > 2\n        for: 1m\n";
    assert_eq!(rule_exprs(rules), ["chat_x > 1", "sum(chat_y) > 2"]);
    let text = "# TYPE chat_c counter\nchat_c_total 1\n# TYPE chat_h histogram\n# TYPE chat_g gauge\nchat_g{a=\"1\"} 2\n# EOF\n";
    let e = exported(text);
    for n in ["chat_c_total", "chat_h_bucket", "chat_h_count", "chat_g"] {
        assert!(e.contains(n), "{n} in {e:?}");
    }
}

#[test]
fn a_dashboard_naming_a_metric_nobody_exports_fails_the_check() {
    let (mut dashboard, rules) = committed_files();
    let used = names_used(&dashboard, &rules);
    assert!(used.len() > 10, "the files name metrics: {used:?}");
    // Everything they name, exported: nothing missing.
    assert!(missing(&used, &used).is_empty());
    dashboard["panels"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "timeseries", "targets": [{"expr": "rate(chat_nobody_exports_this_total[1m])"}]}));
    let used = names_used(&dashboard, &rules);
    let exported_before: BTreeSet<String> = names_used(&committed_files().0, &rules);
    assert_eq!(
        missing(&used, &exported_before),
        ["chat_nobody_exports_this_total"]
    );
    let rules = format!("{rules}\n      - alert: Fake\n        expr: chat_fake_gauge > 1\n");
    assert_eq!(
        missing(&names_used(&committed_files().0, &rules), &exported_before),
        ["chat_fake_gauge"]
    );
}

async fn scrape_all(p: &Platform) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for role in [
        Role::Sequencer,
        Role::Router,
        Role::History,
        Role::Presence,
        Role::Gateway,
    ] {
        let url = format!("http://{}/metrics", p.admin(role, 0));
        if let Ok(r) = reqwest::get(&url).await {
            all.extend(exported(&r.text().await.unwrap_or_default()));
        }
    }
    all
}

#[tokio::test]
async fn every_metric_of_the_dashboard_and_the_alerts_is_exported() {
    let (dashboard, rules) = committed_files();
    let used = names_used(&dashboard, &rules);
    let p = Platform::start_with(
        "metrics",
        Options {
            gateways: 1,
            workers: 1,
            ..Options::default()
        },
    )
    .await
    .unwrap();

    let mut alice = p.connect(0, "alice", "a1").await.unwrap();
    alice.sync(Value::Null, json!({})).await.unwrap();
    let ack = alice
        .request(json!({"type": "create_chat", "kind": "group", "title": "m", "members": ["bob"]}))
        .await
        .unwrap();
    assert_eq!(ack["type"], "ack", "{ack}");
    let chat = ack["chat"].as_str().unwrap().to_string();

    // An undecodable record in every partition of chat.events.
    let raw: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &p.log.config.brokers)
        .create()
        .unwrap();
    let partitions = p.log.config.chat_partitions;
    for partition in 0..partitions {
        raw.send(
            FutureRecord::to(&p.log.topics.events)
                .partition(partition)
                .key(&chat)
                .payload("not an envelope"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    }

    raw.send(
        FutureRecord::to(&p.log.topics.sessions)
            .partition(0)
            .key("alice")
            .payload("not a session event"),
        Duration::from_secs(10),
    )
    .await
    .unwrap();

    // The router dead-letters them and goes on routing: a message sent
    // after them reaches its live connection.
    let a = alice
        .request(json!({"type": "send", "chat": chat, "client_msg_id": "m1", "text": "after the poison"}))
        .await
        .unwrap();
    assert_eq!(a["type"], "ack", "{a}");
    let seq = a["seq"].as_u64().unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match alice.next(left).await.unwrap() {
            Some(chat_tests::ws::Incoming::Json(v))
                if v["type"] == "event" && v["seq"].as_u64() == Some(seq) =>
            {
                break
            }
            Some(_) => {}
            None => panic!("the event after the poison was not delivered live"),
        }
    }

    // Both consumer groups of chat.events dead-lettered every poison, with origin headers.
    let prefix = &p.log.config.topic_prefix;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let dead = chat_log::dlq::list(&p.log.config, &p.log.topics, &Default::default())
            .await
            .unwrap();
        let of = |group: String| {
            dead.iter()
                .filter(|d| d.group.as_deref() == Some(group.as_str()))
                .filter(|d| d.topic.as_deref() == Some(p.log.topics.events.as_str()))
                .map(|d| d.partition.unwrap())
                .collect::<BTreeSet<i32>>()
        };
        let all: BTreeSet<i32> = (0..partitions).collect();
        let presence = dead.iter().any(|d| {
            d.group.as_deref() == Some(format!("{prefix}presence").as_str())
                && d.topic.as_deref() == Some(p.log.topics.sessions.as_str())
                && d.partition == Some(0)
        });
        if of(format!("{prefix}router")) == all && of(format!("{prefix}history")) == all && presence
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every poison dead-lettered by router and history: {dead:#?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Every name the dashboard and the rules use is exported (lag gauges
    // come with librdkafka's statistics, every 5 s).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let exported = scrape_all(&p).await;
        let gone = missing(&used, &exported);
        if gone.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "named by infra/grafana/chat-dashboard.json or infra/prometheus/alerts.yml but exported by no service: {gone:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let router = p.admin(Role::Router, 0);
    assert!(
        chat_tests::metric(router, "chat_dlq_records_total", None).await >= f64::from(partitions)
    );
    // The history projector's lag on every chat.events partition is
    // reported, and is 0 once it has read everything.
    let history = p.admin(Role::History, 0);
    let series = format!(
        "chat_kafka_consumer_lag_records{{group=\"{prefix}history\",topic=\"{}\",partition=",
        p.log.topics.events
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = reqwest::get(format!("http://{history}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let lags: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(&series))
            .filter_map(|l| l.rsplit(' ').next())
            .collect();
        if lags.len() == partitions as usize && lags.iter().all(|v| *v == "0") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "history lag per partition not reported as 0: {lags:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The router's session tail skipped the bad session record (counted).
    let deadline = tokio::time::Instant::now() + WAIT;
    let skipped = Some("component=\"router-sessions\"");
    while chat_tests::metric(router, "chat_log_records_skipped_total", skipped).await != 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "router-sessions skipped count is not 1"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(alice);
    p.stop().await;
}
