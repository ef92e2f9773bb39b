//! `chat-admin dlq`: list, show, re-drive and drop dead letters (the
//! records of `chat.dlq`). The work is done by [`chat_log::dlq`] (the Kafka
//! boundary); this module parses options and prints, as text or `--json`.
//!
//!   chat-admin dlq list    [filters] [--all] [--json]
//!   chat-admin dlq show    <DLQ_OFFSET> [--json]
//!   chat-admin dlq redrive [DLQ_OFFSET...] [filters] [--json]
//!   chat-admin dlq drop    [DLQ_OFFSET...] [filters] [--json]
//!
//! Filters: `--topic <origin topic>`, `--error <substring>`,
//! `--since/--until <time>` (time: ms since the epoch, `YYYY-MM-DDTHH:MM:SSZ`,
//! or an age such as `30m`, `2h`, `7d`).

use anyhow::{bail, Context};
use chat_log::dlq::{self, DeadLetter, Filter, Outcome};
use chat_log::{LogConfig, SchemaRegistry, Topics};
use clap::{Args, Subcommand};

/// `chat-admin dlq ...`
#[derive(Args, Debug)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// List dead letters not yet re-driven or dropped (all with --all).
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Include records already re-driven or dropped.
        #[arg(long)]
        all: bool,
        /// One JSON array on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter: origin, error, headers, key, bytes and, if the
    /// registry can decode it now, the event.
    Show {
        /// Its offset in chat.dlq.
        offset: i64,
        #[arg(long)]
        json: bool,
    },
    /// Append dead letters to their original topic and partition (same key,
    /// original bytes) for the consumer group that refused them; once each,
    /// even if run twice or interrupted.
    Redrive {
        /// DLQ offsets; without them, every unhandled record matching the filters.
        offsets: Vec<i64>,
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long)]
        json: bool,
    },
    /// Mark dead letters handled without re-driving them (Kafka cannot
    /// delete one record): `list` hides them, `redrive` skips them.
    Drop {
        /// DLQ offsets; without them, every unhandled record matching the filters.
        offsets: Vec<i64>,
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug, Default)]
pub struct FilterArgs {
    /// Origin topic (`chat.events`, with or without the topic prefix).
    #[arg(long)]
    pub topic: Option<String>,
    /// Only records whose error contains this text.
    #[arg(long)]
    pub error: Option<String>,
    /// Dead-lettered at or after: ms since the epoch, YYYY-MM-DDTHH:MM:SSZ, or an age (30m, 2h, 7d).
    #[arg(long)]
    pub since: Option<String>,
    /// Dead-lettered before (same forms as --since).
    #[arg(long)]
    pub until: Option<String>,
}

impl FilterArgs {
    fn is_empty(&self) -> bool {
        self.topic.is_none() && self.error.is_none() && self.since.is_none() && self.until.is_none()
    }

    fn to_filter(&self, offsets: Vec<i64>, include_handled: bool) -> anyhow::Result<Filter> {
        let now = chat_runtime::now_ms();
        Ok(Filter {
            topic: self.topic.clone(),
            error: self.error.clone(),
            since_ms: self
                .since
                .as_deref()
                .map(|t| parse_time(t, now))
                .transpose()
                .context("--since")?,
            until_ms: self
                .until
                .as_deref()
                .map(|t| parse_time(t, now))
                .transpose()
                .context("--until")?,
            offsets,
            include_handled,
        })
    }
}

/// Runs one `dlq` command against the log of `config`.
pub async fn run(args: DlqArgs, config: &LogConfig) -> anyhow::Result<()> {
    let topics = Topics::new(config);
    let reach = || format!("reading {} at Kafka {}", topics.dlq, config.brokers);
    match args.command {
        DlqCommand::List { filter, all, json } => {
            let f = filter.to_filter(Vec::new(), all)?;
            let found = dlq::list(config, &topics, &f).await.with_context(reach)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&found)?);
            } else {
                print_table(&found);
            }
        }
        DlqCommand::Show { offset, json } => {
            let f = Filter {
                offsets: vec![offset],
                include_handled: true,
                ..Filter::default()
            };
            let found = dlq::list(config, &topics, &f).await.with_context(reach)?;
            let Some(d) = found.into_iter().next() else {
                bail!("no record at offset {offset} of {}", topics.dlq);
            };
            show(config, &d, json).await?;
        }
        DlqCommand::Redrive {
            offsets,
            filter,
            json,
        } => {
            let f = selection(&offsets, &filter)?;
            let done = dlq::redrive(config, &topics, &f).await.with_context(|| {
                format!("re-driving from {} at Kafka {}", topics.dlq, config.brokers)
            })?;
            print_outcomes(&done, json)?;
        }
        DlqCommand::Drop {
            offsets,
            filter,
            json,
        } => {
            let f = selection(&offsets, &filter)?;
            let done = dlq::drop(config, &topics, &f).await.with_context(|| {
                format!("dropping from {} at Kafka {}", topics.dlq, config.brokers)
            })?;
            print_outcomes(&done, json)?;
        }
    }
    Ok(())
}

/// Redrive and drop act on named offsets or on a filter, never on
/// everything by accident.
fn selection(offsets: &[i64], filter: &FilterArgs) -> anyhow::Result<Filter> {
    if offsets.is_empty() && filter.is_empty() {
        bail!("name DLQ offsets or a filter (--topic, --error, --since, --until); `chat-admin dlq list` shows them");
    }
    filter.to_filter(offsets.to_vec(), false)
}

fn print_table(found: &[DeadLetter]) {
    if found.is_empty() {
        println!("no dead letters");
        return;
    }
    println!(
        "{:>8}  {:<24}  {:<36}  {:<10}  {:<9}  error",
        "offset", "at", "origin", "group", "handled"
    );
    for d in found {
        let origin = format!(
            "{}[{}]@{}",
            d.topic.as_deref().unwrap_or("?"),
            d.partition.map_or("?".into(), |p| p.to_string()),
            d.offset.map_or("?".into(), |o| o.to_string())
        );
        let handled = d.handled.as_ref().map_or("-", |h| h.action.as_str());
        println!(
            "{:>8}  {:<24}  {:<36}  {:<10}  {:<9}  {}",
            d.dlq_offset,
            d.timestamp_ms.map_or("?".into(), format_time),
            origin,
            d.group.as_deref().unwrap_or("?"),
            handled,
            d.error
        );
    }
}

fn print_outcomes(done: &[Outcome], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(done)?);
        return Ok(());
    }
    if done.is_empty() {
        println!("nothing to do: no unhandled dead letter matches");
    }
    for o in done {
        let to =
            o.to.as_deref()
                .map(|t| format!(" -> {t}"))
                .unwrap_or_default();
        let why = o
            .why
            .as_deref()
            .map(|w| format!(" ({w})"))
            .unwrap_or_default();
        println!("{} {}{to}{why}", o.action, o.dlq_offset);
    }
    Ok(())
}

async fn show(config: &LogConfig, d: &DeadLetter, json: bool) -> anyhow::Result<()> {
    // The event as the registry decodes it now (after a fix, it may).
    let decoded = match SchemaRegistry::new(config) {
        Ok(registry) => match registry.decode(&d.payload).await {
            Ok((id, env)) => Ok(format!("schema id {id}: {env:?}")),
            Err(chat_log::registry::DecodeFailure::Permanent(why)) => Err(why),
            Err(chat_log::registry::DecodeFailure::Transient(e)) => Err(e.to_string()),
        },
        Err(e) => Err(e.to_string()),
    };
    let headers: Vec<(String, String)> = d
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
        .collect();
    let key = d
        .key
        .as_ref()
        .map(|k| String::from_utf8_lossy(k).into_owned());
    if json {
        let mut v = serde_json::to_value(d)?;
        v["headers"] = serde_json::json!(headers);
        v["key"] = serde_json::json!(key);
        v["payload_hex"] = serde_json::json!(hex(&d.payload));
        match decoded {
            Ok(text) => v["decoded"] = serde_json::json!(text),
            Err(why) => v["decode_error"] = serde_json::json!(why),
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "dlq offset   {} (partition {})",
        d.dlq_offset, d.dlq_partition
    );
    println!(
        "at           {}",
        d.timestamp_ms.map_or("?".into(), format_time)
    );
    println!(
        "origin       {}[{}]@{}",
        d.topic.as_deref().unwrap_or("?"),
        d.partition.map_or("?".into(), |p| p.to_string()),
        d.offset.map_or("?".into(), |o| o.to_string())
    );
    println!("group        {}", d.group.as_deref().unwrap_or("?"));
    println!("error        {}", d.error);
    println!(
        "handled      {}",
        d.handled.as_ref().map_or("no".into(), |h| format!(
            "{} at {}{}",
            h.action,
            format_time(h.at_ms),
            h.to.as_deref()
                .map(|t| format!(" -> {t}"))
                .unwrap_or_default()
        ))
    );
    println!("key          {}", key.as_deref().unwrap_or("(none)"));
    for (k, v) in &headers {
        println!("header       {k} = {v}");
    }
    println!(
        "bytes        {} ({} bytes)",
        hex(&d.payload),
        d.payload.len()
    );
    match decoded {
        Ok(text) => println!("decodes now  {text}"),
        Err(why) => println!("decodes now  no: {why}"),
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    const MAX: usize = 256;
    let mut s: String = bytes.iter().take(MAX).map(|b| format!("{b:02x}")).collect();
    if bytes.len() > MAX {
        s.push('…');
    }
    s
}

/// `ms since the epoch`, `YYYY-MM-DDTHH:MM:SS[.fff]Z`, or an age before `now_ms` (`90s`, `30m`, `2h`, `7d`).
pub fn parse_time(text: &str, now_ms: i64) -> anyhow::Result<i64> {
    let t = text.trim();
    if let Ok(ms) = t.parse::<i64>() {
        return Ok(ms);
    }
    if let Some(unit) = t.chars().last().filter(|c| "smhd".contains(*c)) {
        if let Ok(n) = t[..t.len() - 1].parse::<i64>() {
            let ms = match unit {
                's' => 1_000,
                'm' => 60_000,
                'h' => 3_600_000,
                _ => 86_400_000,
            };
            return Ok(now_ms - n * ms);
        }
    }
    parse_rfc3339_utc(t).with_context(|| {
        format!("cannot read time {t:?}: give ms since the epoch, YYYY-MM-DDTHH:MM:SSZ, or an age like 30m, 2h, 7d")
    })
}

fn parse_rfc3339_utc(t: &str) -> anyhow::Result<i64> {
    let t = t
        .strip_suffix('Z')
        .context("only UTC (a trailing Z) is understood")?;
    let (date, time) = t.split_once('T').context("no T between date and time")?;
    let d: Vec<i64> = date.split('-').map(str::parse).collect::<Result<_, _>>()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let h: Vec<i64> = hms.split(':').map(str::parse).collect::<Result<_, _>>()?;
    if d.len() != 3 || h.len() != 3 {
        bail!("expected YYYY-MM-DDTHH:MM:SSZ");
    }
    let ms_frac: i64 = format!("{frac:0<3}")[..3].parse()?;
    let days = days_from_civil(d[0], d[1], d[2]);
    Ok(((days * 24 + h[0]) * 60 + h[1]) * 60_000 + h[2] * 1000 + ms_frac)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DDTHH:MM:SS.fffZ` of ms since the epoch.
pub fn format_time(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    // Inverse of days_from_civil.
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_read_in_every_form() {
        let now = 1_800_000_000_000;
        assert_eq!(parse_time("1700000000000", now).unwrap(), 1_700_000_000_000);
        assert_eq!(parse_time("30m", now).unwrap(), now - 1_800_000);
        assert_eq!(parse_time("2h", now).unwrap(), now - 7_200_000);
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z", now).unwrap(),
            1_700_000_000_000
        );
        assert_eq!(
            parse_time("2023-11-14T22:13:20.5Z", now).unwrap(),
            1_700_000_000_500
        );
        assert!(parse_time("yesterday", now).is_err());
        assert_eq!(format_time(1_700_000_000_500), "2023-11-14T22:13:20.500Z");
    }
}
