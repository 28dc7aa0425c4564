//! `reaper replay`: re-run dead-lettered jobs once their cause is fixed.
//! Each job is reopened in the ledger with its original event queued in the
//! outbox (one transaction), then the event is published and the outbox row
//! cleared. If this process dies in between, a running worker's outbox drainer
//! publishes the event. Safe to run twice or from two terminals: a job is
//! reopened by exactly one of them.

use std::process::ExitCode;

use chrono::{DateTime, Utc};

use crate::broker::publisher::Publisher;
use crate::broker::{self, Names};
use crate::config::Settings;
use crate::ledger::replay::{DeadFilter, Reopen};
use crate::ledger::Ledger;

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// One job, by its job_id.
    #[arg(long)]
    pub job: Option<uuid::Uuid>,
    /// Jobs of this owner ("type/id").
    #[arg(long)]
    pub owner: Option<String>,
    /// Jobs whose reason contains this text (case-insensitive).
    #[arg(long)]
    pub reason: Option<String>,
    /// Jobs dead-lettered since this time: RFC 3339, or an age like 30m, 6h, 2d.
    #[arg(long, value_parser = parse_since)]
    pub since: Option<DateTime<Utc>>,
    /// permanent (an API refused), exhausted (ran out of retries), plan (a parent cycle),
    /// blocked (a guard found the resource in use) or poison.
    #[arg(long)]
    pub error_class: Option<String>,
    /// Jobs with a failed or blocked resource of this kind.
    #[arg(long)]
    pub kind: Option<String>,
    /// Replay every dead-lettered job (needed when no other filter is given).
    #[arg(long)]
    pub all: bool,
    /// List what would be replayed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = n.parse().map_err(|_| format!("{s:?} is neither RFC 3339 nor an age like 30m, 6h, 2d"))?;
    let d = match unit {
        "s" => chrono::Duration::seconds(n),
        "m" => chrono::Duration::minutes(n),
        "h" => chrono::Duration::hours(n),
        "d" => chrono::Duration::days(n),
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    Ok(Utc::now() - d)
}

pub async fn run(settings: Settings, args: ReplayArgs) -> ExitCode {
    let filter = DeadFilter {
        job: args.job,
        owner: args.owner.clone(),
        reason: args.reason.clone(),
        since: args.since,
        error_class: args.error_class.clone(),
        kind: args.kind.clone(),
    };
    if filter.is_empty() && !args.all {
        eprintln!("error: give a filter (--job, --owner, --reason, --since, --error-class, --kind) or --all");
        return ExitCode::from(2);
    }
    if args.dry_run && !args.json {
        if let Err(e) = list(&settings, &filter).await {
            eprintln!("error: {e}");
            return ExitCode::from(3);
        }
    }
    match replay_from_cli(&settings, &filter, args.dry_run, !args.json).await {
        Ok(summary) => summary.print(args.json, args.dry_run),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(3)
        }
    }
}

/// `reaper replay`'s own ledger and broker link, for this one command.
async fn replay_from_cli(
    settings: &Settings,
    filter: &DeadFilter,
    dry_run: bool,
    progress: bool,
) -> Result<Summary, Box<dyn std::error::Error + Send + Sync>> {
    let ledger = crate::ledger::Ledger::from_settings(settings).await?;
    ledger.migrate().await?;
    let names = Names::new(&settings.broker.prefix);
    let max = settings.worker.max_replays;
    if dry_run {
        return replay_jobs(&ledger, None, &names, max, filter, progress).await;
    }
    let (conn, publisher) = broker::link::open(settings, &names).await?;
    let summary = replay_jobs(&ledger, Some(&publisher), &names, max, filter, progress).await;
    publisher.close().await;
    let _ = conn.close(200, "replay done".into()).await;
    summary
}

/// What a replay did (or, dry, would do), job by job.
#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    pub matched: usize,
    pub replayed: Vec<String>,
    pub held_back: Vec<String>,
    pub skipped: Vec<String>,
    pub failed: Vec<String>,
}

impl Summary {
    fn print(&self, json: bool, dry_run: bool) -> ExitCode {
        if json {
            println!("{}", serde_json::to_string_pretty(self).expect("serializable"));
        } else {
            let verb = if dry_run { "would replay" } else { "replayed" };
            let jobs = if self.matched == 1 { "job" } else { "jobs" };
            println!("{} dead-lettered {jobs} matched; {verb} {}", self.matched, self.replayed.len());
            if !self.held_back.is_empty() {
                println!("held back (replayed too often; look at them by hand): {}", self.held_back.len());
                for j in &self.held_back {
                    println!("  {j}");
                }
            }
            if !self.skipped.is_empty() {
                println!(
                    "skipped (no longer dead-lettered, e.g. replayed from another terminal): {}",
                    self.skipped.len()
                );
            }
            for f in &self.failed {
                println!("failed: {f}");
            }
        }
        if self.failed.is_empty() && self.held_back.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

async fn list(settings: &Settings, filter: &DeadFilter) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let ledger = crate::ledger::Ledger::from_settings(settings).await?;
    let jobs = ledger.dead_jobs(filter).await?;
    println!("{:<38} {:<28} {:<10} {:>7}  reason", "job", "owner", "class", "replays");
    for j in &jobs {
        let reason: String = j.reason.as_deref().unwrap_or("").chars().take(80).collect();
        println!(
            "{:<38} {:<28} {:<10} {:>7}  {reason}",
            j.job_id,
            j.owner,
            j.error_class.as_deref().unwrap_or("-"),
            j.replays
        );
    }
    Ok(())
}

/// Reopens and re-publishes the dead-lettered jobs `filter` picks; without a
/// publisher (a dry run), only says which it would.
pub async fn replay_jobs(
    ledger: &Ledger,
    publisher: Option<&Publisher>,
    names: &Names,
    max_replays: u32,
    filter: &DeadFilter,
    progress: bool,
) -> Result<Summary, Box<dyn std::error::Error + Send + Sync>> {
    let jobs = ledger.dead_jobs(filter).await?;
    let mut summary = Summary { matched: jobs.len(), ..Default::default() };
    let Some(publisher) = publisher else {
        summary.replayed = jobs.iter().filter(|j| j.replays < max_replays).map(|j| j.job_id.to_string()).collect();
        summary.held_back = jobs.iter().filter(|j| j.replays >= max_replays).map(|j| j.job_id.to_string()).collect();
        return Ok(summary);
    };
    let bar = if progress { indicatif::ProgressBar::new(jobs.len() as u64) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template("  {bar:40} {pos}/{len} jobs replayed").expect("a valid template"),
    );
    for j in &jobs {
        match ledger.reopen(j.job_id, max_replays).await? {
            Reopen::Reopened(row) => {
                match crate::outbox::publish(publisher, names, &row).await {
                    Ok(()) => {
                        let _ = ledger.outbox_delete(&[row.id]).await;
                        summary.replayed.push(j.job_id.to_string());
                    }
                    // Reopened and queued in the outbox: a worker's drainer sends it.
                    Err(e) => summary
                        .failed
                        .push(format!("{}: {e} (queued in the outbox; a running worker will send it)", j.job_id)),
                }
            }
            Reopen::HeldBack { replays } => summary.held_back.push(format!(
                "{} ({} replays; owner {}; {})",
                j.job_id,
                replays,
                j.owner,
                j.reason.as_deref().unwrap_or("")
            )),
            Reopen::NotDead => summary.skipped.push(j.job_id.to_string()),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(summary)
}
