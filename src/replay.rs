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
use crate::ledger::replay::{DeadFilter, DeadJob, Pending, Reopen};
use crate::ledger::Ledger;
use uuid::Uuid;

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// These jobs, by job_id (repeat it, or separate ids with commas: what a
    /// dry run listed).
    #[arg(long, value_delimiter = ',')]
    pub job: Vec<uuid::Uuid>,
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
    /// Jobs dead-lettered at or before this time (RFC 3339, or an age): what a
    /// dry run listed, without those dead-lettered since.
    #[arg(long, value_parser = parse_since)]
    pub until: Option<DateTime<Utc>>,
    /// Replay every dead-lettered job (needed when no other filter is given).
    #[arg(long)]
    pub all: bool,
    /// List what would be replayed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// How far a replay got (its id is printed when it starts; the API's too).
    #[arg(long, value_name = "REPLAY_ID", conflicts_with_all = ["job", "owner", "reason", "since", "until", "error_class", "kind", "all", "dry_run"])]
    pub status: Option<Uuid>,
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
    if let Some(id) = args.status {
        return status(&settings, id, args.json).await;
    }
    let filter = DeadFilter {
        job: (args.job.len() == 1).then(|| args.job[0]),
        jobs: (args.job.len() > 1).then(|| args.job.clone()),
        owner: args.owner.clone(),
        reason: args.reason.clone(),
        since: args.since,
        error_class: args.error_class.clone(),
        kind: args.kind.clone(),
        until: args.until,
    };
    if filter.is_every_job() && !args.all {
        eprintln!("error: give a filter (--job, --owner, --reason, --since, --until, --error-class, --kind) or --all");
        return ExitCode::from(2);
    }
    match replay_from_cli(&settings, &filter, args.dry_run, !args.json).await {
        Ok(summary) => summary.print(args.json, args.dry_run),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(3)
        }
    }
}

/// `reaper replay --status ID`: how far a replay (from anywhere) got.
async fn status(settings: &Settings, id: Uuid, json: bool) -> ExitCode {
    let run = match crate::ledger::Ledger::from_settings(settings).await {
        Ok(ledger) => ledger.replay_run(id).await,
        Err(e) => Err(e),
    };
    match run {
        Ok(Some(r)) if json => {
            println!("{}", serde_json::to_string_pretty(&r).expect("serializable"));
            ExitCode::SUCCESS
        }
        Ok(Some(r)) => {
            println!("replay {} ({}), started {} by {}", r.replay_id, r.state, r.started_at, r.requested_by);
            println!("  {} matched, {} reopened; their status now: {:?}", r.matched, r.reopened, r.jobs);
            ExitCode::SUCCESS
        }
        Ok(None) => {
            eprintln!("error: no replay {id}");
            ExitCode::from(2)
        }
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
        let mut summary = replay_jobs(&ledger, None, &names, max, filter, progress, "cli").await?;
        if summary.preview.iter().any(|p| p.lookups_pending) {
            // The lookups need the providers: the app of a one-shot command.
            let mut one_shot = settings.clone();
            one_shot.admin.listen.clear();
            let app = crate::app::App::build(one_shot).await?;
            look_up_pending(&app, &mut summary).await?;
        }
        return Ok(summary);
    }
    let (conn, publisher) = broker::link::open(settings, &names).await?;
    let summary = replay_jobs(&ledger, Some(&publisher), &names, max, filter, progress, "cli").await;
    publisher.close().await;
    let _ = conn.close(200, "replay done".into()).await;
    summary
}

/// What a replay did (or, dry, would do), job by job.
#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    /// The replay's record in the ledger (none for a dry run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_id: Option<Uuid>,
    pub matched: usize,
    pub replayed: Vec<String>,
    pub held_back: Vec<String>,
    pub skipped: Vec<String>,
    pub failed: Vec<String>,
    /// A dry run's preview: per job it would replay, what it would ask to delete again.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub preview: Vec<JobPreview>,
}

/// One job of a replay's preview.
#[derive(Debug, serde::Serialize)]
pub struct JobPreview {
    pub job_id: Uuid,
    pub owner: String,
    pub error_class: Option<String>,
    pub reason: Option<String>,
    /// Claimed by the job and not proven gone.
    pub resources: Vec<Pending>,
    /// Its kinds' lookups have not run yet (they failed before it was
    /// dead-lettered): a replay runs them and claims what they find.
    pub lookups_pending: bool,
    /// What those lookups find now that a replay would claim, and delete.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub found_by_lookups: Vec<Pending>,
    /// What they find that a replay would not claim: not dated to the life
    /// this job ends, or another job's. It stays tracked for the owner.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub found_not_claimed: Vec<Pending>,
    /// The lookups could not be asked now (or a replay would fail on what
    /// they return): the preview cannot say what a replay would delete.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lookup_error: Option<String>,
}

impl Summary {
    fn print(&self, json: bool, dry_run: bool) -> ExitCode {
        if json {
            println!("{}", serde_json::to_string_pretty(self).expect("serializable"));
        } else {
            for p in &self.preview {
                println!(
                    "{}  {}  {}: {}",
                    p.job_id,
                    p.owner,
                    p.error_class.as_deref().unwrap_or("-"),
                    p.reason.as_deref().unwrap_or("").chars().take(100).collect::<String>()
                );
                if p.resources.is_empty() {
                    println!("    nothing it claimed is left");
                }
                for r in &p.resources {
                    println!("    would delete again: {}/{}", r.kind, r.id);
                }
                if p.lookups_pending {
                    println!("    its lookups have not run yet: a replay runs them and claims what they find");
                }
                for r in &p.found_by_lookups {
                    println!("    its lookups find now, and it would delete: {}/{}", r.kind, r.id);
                }
                for r in &p.found_not_claimed {
                    println!("    its lookups find, but it would leave (not of this life): {}/{}", r.kind, r.id);
                }
                if let Some(e) = &p.lookup_error {
                    println!("    its lookups cannot be asked now, so what it would delete is unknown: {e}");
                }
            }
            let verb = if dry_run { "would replay" } else { "replayed" };
            let jobs = if self.matched == 1 { "job" } else { "jobs" };
            println!("{} dead-lettered {jobs} matched; {verb} {}", self.matched, self.replayed.len());
            if let Some(id) = self.replay_id {
                println!("replay {id} (reaper replay --status {id})");
            }
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

/// Reopens and re-publishes the dead-lettered jobs `filter` picks, recording
/// the replay and its progress in the ledger (`replay_started` gives its id);
/// without a publisher (a dry run), only says which it would, and what each
/// would ask to delete again. The CLI, the API and the console all replay
/// through here.
pub async fn replay_jobs(
    ledger: &Ledger,
    publisher: Option<&Publisher>,
    names: &Names,
    max_replays: u32,
    filter: &DeadFilter,
    progress: bool,
    requested_by: &str,
) -> Result<Summary, Box<dyn std::error::Error + Send + Sync>> {
    let jobs = ledger.dead_jobs(filter).await?;
    let Some(publisher) = publisher else { return preview(ledger, jobs, max_replays).await };
    let replay_id = ledger.replay_started(filter, requested_by, jobs.len()).await?;
    run_replay(ledger, publisher, names, max_replays, jobs, progress, replay_id).await
}

/// Starts a replay and returns its id at once; the replay goes on in a task of
/// its own (its progress: `Ledger::replay_run`). For the API and the console,
/// whose callers should not wait for a thousand jobs.
pub async fn start_replay(
    ledger: Ledger,
    publisher: Publisher,
    names: Names,
    max_replays: u32,
    filter: DeadFilter,
    requested_by: &str,
) -> Result<(Uuid, usize), crate::ledger::LedgerError> {
    let jobs = ledger.dead_jobs(&filter).await?;
    let matched = jobs.len();
    let replay_id = ledger.replay_started(&filter, requested_by, matched).await?;
    tokio::spawn(async move {
        if let Err(e) = run_replay(&ledger, &publisher, &names, max_replays, jobs, false, replay_id).await {
            tracing::warn!(%replay_id, error = %e, "a replay stopped before its end");
        }
    });
    Ok((replay_id, matched))
}

async fn run_replay(
    ledger: &Ledger,
    publisher: &Publisher,
    names: &Names,
    max_replays: u32,
    jobs: Vec<DeadJob>,
    progress: bool,
    replay_id: Uuid,
) -> Result<Summary, Box<dyn std::error::Error + Send + Sync>> {
    let mut summary = Summary { replay_id: Some(replay_id), matched: jobs.len(), ..Default::default() };
    let bar = if progress { indicatif::ProgressBar::new(jobs.len() as u64) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template("  {bar:40} {pos}/{len} jobs replayed").expect("a valid template"),
    );
    for j in &jobs {
        match ledger.reopen(j.job_id, max_replays, Some(replay_id)).await? {
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
            Reopen::HeldBack { replays } => {
                summary.held_back.push(format!(
                    "{} ({} replays; owner {}; {})",
                    j.job_id,
                    replays,
                    j.owner,
                    j.reason.as_deref().unwrap_or("")
                ));
                ledger.replay_moved(replay_id).await?;
            }
            Reopen::NotDead => {
                summary.skipped.push(j.job_id.to_string());
                ledger.replay_moved(replay_id).await?;
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let json = serde_json::to_value(&summary).expect("a summary serializes");
    ledger.replay_finished(replay_id, &json).await?;
    Ok(summary)
}

/// For each previewed job whose lookups have not run (they will when it is
/// replayed), what they find now: those a replay would claim and delete
/// (`Ledger::would_adopt`, the rule the replay applies), and the rest, which it
/// would leave tracked for the owner's next teardown. A job whose lookups
/// cannot be asked now says so (`lookup_error`) and is not replayable from a
/// preview: half an answer would understate what it deletes. Each owner is
/// asked once.
pub async fn look_up_pending(app: &crate::app::App, summary: &mut Summary) -> Result<(), String> {
    let mut asked: std::collections::HashMap<String, Result<Vec<crate::domain::Resource>, String>> =
        std::collections::HashMap::new();
    for p in summary.preview.iter_mut().filter(|p| p.lookups_pending) {
        if !asked.contains_key(&p.owner) {
            let found = crate::handler::find_by_lookups(app, &p.owner).await.map(Option::unwrap_or_default);
            asked.insert(p.owner.clone(), found);
        }
        let found = match &asked[&p.owner] {
            Ok(found) => found.clone(),
            Err(e) => {
                p.lookup_error = Some(e.clone());
                continue;
            }
        };
        let found: Vec<_> =
            found.into_iter().filter(|r| !p.resources.iter().any(|c| c.kind == r.kind && c.id == r.id)).collect();
        let dated = found.into_iter().map(|r| crate::handler::with_created_at(app, r)).collect::<Result<Vec<_>, _>>();
        let dated = match dated {
            Ok(d) => d,
            Err(e) => {
                p.lookup_error = Some(format!("a replay would fail: {e}"));
                continue;
            }
        };
        let claimed = app.ledger.would_adopt(p.job_id, &dated).await.map_err(|e| e.to_string())?;
        for t in dated {
            let item = Pending { kind: t.resource.kind, id: t.resource.id };
            if claimed.iter().any(|(k, i)| *k == item.kind && *i == item.id) {
                p.found_by_lookups.push(item);
            } else {
                p.found_not_claimed.push(item);
            }
        }
    }
    Ok(())
}

/// A dry run: which jobs would be replayed, and per job what it would ask to
/// delete again.
async fn preview(
    ledger: &Ledger,
    jobs: Vec<DeadJob>,
    max_replays: u32,
) -> Result<Summary, Box<dyn std::error::Error + Send + Sync>> {
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.job_id).collect();
    let mut pending = ledger.pending_of(&ids).await?;
    let (go, held): (Vec<_>, Vec<_>) = jobs.into_iter().partition(|j| j.replays < max_replays);
    Ok(Summary {
        matched: ids.len(),
        replayed: go.iter().map(|j| j.job_id.to_string()).collect(),
        held_back: held.iter().map(|j| j.job_id.to_string()).collect(),
        preview: go
            .iter()
            .map(|j| JobPreview {
                job_id: j.job_id,
                owner: j.owner.clone(),
                error_class: j.error_class.clone(),
                reason: j.reason.clone(),
                resources: pending.remove(&j.job_id).unwrap_or_default(),
                lookups_pending: !j.looked_up,
                found_by_lookups: Vec::new(),
                found_not_claimed: Vec::new(),
                lookup_error: None,
            })
            .collect(),
        ..Default::default()
    })
}
