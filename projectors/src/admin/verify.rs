//! `chat-admin verify`: compares a rebuilt projection with the live one,
//! table by table: rows and an order-independent checksum per table and per
//! partition key, differing partitions listed. Exit code 3 on a difference.
//!
//! Compared: every column of the projection's tables (`SELECT JSON *`; the
//! tables have no wall-clock column: every value comes from the log).
//! Not compared: `projector_progress` (where each writer stopped, not
//! content), `schema_migrations` (`applied_at` is wall-clock), and write
//! times and TTLs (a replay writes later; `user_changes` rows expire 30
//! days after they were written either way).

use std::collections::BTreeSet;
use std::process::ExitCode;

use super::replay::ProjectionKind;
use super::AdminConfig;
use crate::store::{Digest, TableDigest};

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Exit codes: 0 no difference; 3 differences (listed); 1 could not compare.
Example: chat-admin verify --projection history --keyspace chat_r1 --against chat --json")]
pub struct VerifyArgs {
    /// The projection whose tables are compared.
    #[arg(long, value_enum)]
    pub projection: ProjectionKind,
    /// The rebuilt keyspace.
    #[arg(long)]
    pub keyspace: String,
    /// The live keyspace to compare with.
    #[arg(long)]
    pub against: String,
    /// Differing partitions listed per table at most.
    #[arg(long, default_value_t = 20)]
    pub max_listed: usize,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// The tables of a projection.
pub fn tables(kind: ProjectionKind) -> &'static [&'static str] {
    match kind {
        ProjectionKind::History => &[
            "messages",
            "chats",
            "chat_members",
            "user_chats",
            "direct_chats",
            "user_changes",
            "chat_receipts",
        ],
        ProjectionKind::Presence => &["presence"],
        ProjectionKind::DailyStats => &["chat_daily_stats"],
    }
}

/// A partition key whose rows differ.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PartitionDifference {
    pub key: String,
    /// None: the partition is missing on that side.
    pub rebuilt: Option<Digest>,
    pub live: Option<Digest>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct TableReport {
    pub table: String,
    pub rebuilt: Digest,
    pub live: Digest,
    pub rebuilt_partitions: usize,
    pub live_partitions: usize,
    /// Partition keys that differ (missing, extra, or other rows).
    pub differences: usize,
    pub listed: Vec<PartitionDifference>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct VerifyReport {
    pub projection: String,
    pub keyspace: String,
    pub against: String,
    pub equal: bool,
    pub differences: usize,
    pub tables: Vec<TableReport>,
}

/// Compares two digests of one table.
pub fn compare(table: &str, rebuilt: &TableDigest, live: &TableDigest, max: usize) -> TableReport {
    let keys: BTreeSet<&String> = rebuilt
        .partitions
        .keys()
        .chain(live.partitions.keys())
        .collect();
    let mut differences = 0;
    let mut listed = Vec::new();
    for k in keys {
        let (r, l) = (rebuilt.partitions.get(k), live.partitions.get(k));
        if r != l {
            differences += 1;
            if listed.len() < max {
                listed.push(PartitionDifference {
                    key: k.clone(),
                    rebuilt: r.copied(),
                    live: l.copied(),
                });
            }
        }
    }
    TableReport {
        table: table.to_string(),
        rebuilt: rebuilt.total,
        live: live.total,
        rebuilt_partitions: rebuilt.partitions.len(),
        live_partitions: live.partitions.len(),
        differences,
        listed,
    }
}

pub async fn run(args: VerifyArgs, config: &AdminConfig) -> anyhow::Result<ExitCode> {
    super::check_keyspace(&args.keyspace)?;
    super::check_keyspace(&args.against)?;
    let rebuilt = super::connect(&config.store, &args.keyspace).await?;
    let live = rebuilt.with_keyspace(&args.against);
    for s in [&rebuilt, &live] {
        anyhow::ensure!(
            rebuilt.keyspace_exists(s.keyspace()).await?,
            "keyspace {} does not exist",
            s.keyspace()
        );
    }
    let mut report = VerifyReport {
        projection: format!("{:?}", args.projection).to_lowercase(),
        keyspace: args.keyspace.clone(),
        against: args.against.clone(),
        equal: true,
        differences: 0,
        tables: Vec::new(),
    };
    for table in tables(args.projection) {
        let (r, l) = tokio::join!(
            rebuilt.digest_table(table, &[]),
            live.digest_table(table, &[])
        );
        let (r, l) = (r?, l?);
        let t = compare(table, &r, &l, args.max_listed);
        report.differences += t.differences;
        if !args.json {
            println!(
                "{:<14} rebuilt {:>9} rows in {:>7} partitions, checksum {:016x} | live {:>9} rows in {:>7} partitions, checksum {:016x} | {}",
                t.table,
                t.rebuilt.rows,
                t.rebuilt_partitions,
                t.rebuilt.checksum,
                t.live.rows,
                t.live_partitions,
                t.live.checksum,
                if t.differences == 0 {
                    "same".to_string()
                } else {
                    format!("{} partitions differ", t.differences)
                }
            );
            for d in &t.listed {
                let show = |x: &Option<Digest>| {
                    x.map_or("missing".to_string(), |d| {
                        format!("{} rows {:016x}", d.rows, d.checksum)
                    })
                };
                println!(
                    "    {}: rebuilt {}, live {}",
                    d.key,
                    show(&d.rebuilt),
                    show(&d.live)
                );
            }
        }
        report.tables.push(t);
    }
    report.equal = report.differences == 0;
    if args.json {
        super::print_json(&report)?;
    } else if report.equal {
        println!("no difference: {} equals {}", args.keyspace, args.against);
    } else {
        println!(
            "{} partitions differ between {} and {}",
            report.differences, args.keyspace, args.against
        );
    }
    Ok(if report.equal {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}
