//! Read-only views for operators: status counts, one owner, one job.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;
use uuid::Uuid;

use super::{db, Ledger, LedgerError};
use crate::domain::Resource;

#[derive(Debug, Serialize)]
pub struct StatusCounts {
    pub owners_tracked: i64,
    /// Tracked resources by state (live, deleted, already_gone).
    pub resources: BTreeMap<String, i64>,
    /// Jobs by status (running, completed, dead_lettered).
    pub jobs: BTreeMap<String, i64>,
    pub outbox_backlog: i64,
    /// Reconcile rules that have run: sweeps so far, last scheduled start, last executed report.
    pub reconcile: BTreeMap<String, serde_json::Value>,
    /// Set while an operator has paused reaper (`reaper pause`).
    pub paused: Option<super::control::Pause>,
}

#[derive(Debug, Serialize)]
pub struct OwnerResource {
    pub kind: String,
    pub id: String,
    pub state: String,
    pub job_id: Option<Uuid>,
    pub tracked_at: DateTime<Utc>,
}

#[derive(Debug, Serialize)]
pub struct OwnerJob {
    pub job_id: Uuid,
    pub event_id: String,
    pub trigger: String,
    pub status: String,
    pub dry_run: bool,
    /// Deliveries of the job.
    pub attempts: i32,
    /// Runs that ended unfinished: what the retry schedule counts.
    pub failed_runs: i32,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Why it was dead-lettered, and its class.
    pub reason: Option<String>,
    pub error_class: Option<String>,
    /// What the event said about why (the request's own reason, not the
    /// dead-letter reason above).
    pub request: crate::domain::Asked,
}

#[derive(Debug, Serialize)]
pub struct JobView {
    #[serde(flatten)]
    pub job: OwnerJob,
    pub owner: String,
    /// The published result, once the job is terminal.
    pub result: Option<serde_json::Value>,
    /// Steps recorded so far (for a running job).
    pub steps: Vec<serde_json::Value>,
    /// The producer's W3C trace context, stored when the job ended.
    pub traceparent: Option<String>,
    /// The event as received (JSON), for the job page.
    pub event: Option<serde_json::Value>,
}

/// One step as the ledger recorded it: written when the step finished, or
/// when it failed or was blocked (with its attempts and its last error).
#[derive(Debug, Clone, Serialize)]
pub struct StepView {
    pub kind: String,
    pub id: String,
    pub outcome: String,
    pub attempts: i32,
    pub error: Option<String>,
    pub at: DateTime<Utc>,
}

impl StepView {
    /// "failed at 10:02:11 after 3 attempts: 503 ...", for people.
    pub fn describe(&self) -> String {
        let err =
            self.error.as_deref().map(|e| format!(": {}", e.chars().take(160).collect::<String>())).unwrap_or_default();
        format!(
            "{} at {} after {} attempt{}{err}",
            self.outcome,
            self.at.format("%Y-%m-%d %H:%M:%S UTC"),
            self.attempts,
            if self.attempts == 1 { "" } else { "s" }
        )
    }
}

/// What happened lately, for the console's overview.
#[derive(Debug, Serialize)]
pub struct RecentActivity {
    /// Teardown jobs opened in the last five minutes.
    pub jobs_5m: i64,
    /// Dead letters by class, in the last hour and the last day.
    pub dead_hour: BTreeMap<String, i64>,
    pub dead_day: BTreeMap<String, i64>,
}

impl Ledger {
    /// Steps recorded for these jobs, by job.
    pub async fn steps_of(
        &self,
        job_ids: &[Uuid],
    ) -> Result<std::collections::HashMap<Uuid, Vec<StepView>>, LedgerError> {
        let rows = sqlx::query(
            "SELECT job_id, kind, resource_id, outcome, attempts, error, finished_at FROM job_steps
             WHERE job_id = ANY($1) ORDER BY finished_at",
        )
        .bind(job_ids)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading jobs' steps"))?;
        let mut out: std::collections::HashMap<Uuid, Vec<StepView>> = std::collections::HashMap::new();
        for r in rows {
            out.entry(r.get("job_id")).or_default().push(StepView {
                kind: r.get("kind"),
                id: r.get("resource_id"),
                outcome: r.get("outcome"),
                attempts: r.get("attempts"),
                error: r.get("error"),
                at: r.get("finished_at"),
            });
        }
        Ok(out)
    }

    pub async fn recent_activity(&self) -> Result<RecentActivity, LedgerError> {
        let jobs_5m: i64 =
            sqlx::query_scalar("SELECT count(*) FROM jobs WHERE started_at > now() - interval '5 minutes'")
                .fetch_one(&self.pool)
                .await
                .map_err(db("counting recent jobs"))?;
        let mut dead_hour = BTreeMap::new();
        let mut dead_day = BTreeMap::new();
        // Dead-lettered in the last day and not replayed or cancelled since.
        for r in sqlx::query(
            "SELECT coalesce(error_class, '-') AS class, count(*) AS day,
                    count(*) FILTER (WHERE finished_at > now() - interval '1 hour') AS hour
             FROM jobs WHERE status = 'dead_lettered' AND finished_at > now() - interval '1 day' GROUP BY 1",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("counting recent dead letters"))?
        {
            let class: String = r.get("class");
            dead_hour.insert(class.clone(), r.get("hour"));
            dead_day.insert(class, r.get("day"));
        }
        Ok(RecentActivity { jobs_5m, dead_hour, dead_day })
    }

    pub async fn status_counts(&self) -> Result<StatusCounts, LedgerError> {
        let owners: i64 = sqlx::query("SELECT count(DISTINCT owner) AS n FROM tracked_resources")
            .fetch_one(&self.pool)
            .await
            .map_err(db("counting owners"))?
            .get("n");
        let mut resources = BTreeMap::new();
        for r in sqlx::query("SELECT state, count(*) AS n FROM tracked_resources GROUP BY state")
            .fetch_all(&self.pool)
            .await
            .map_err(db("counting resources"))?
        {
            resources.insert(r.get("state"), r.get("n"));
        }
        let mut jobs = BTreeMap::new();
        for r in sqlx::query("SELECT status, count(*) AS n FROM jobs GROUP BY status")
            .fetch_all(&self.pool)
            .await
            .map_err(db("counting jobs"))?
        {
            jobs.insert(r.get("status"), r.get("n"));
        }
        let mut reconcile = BTreeMap::new();
        for r in sqlx::query("SELECT rule, sweeps, last_started_at, last_report FROM reconcile_rules ORDER BY rule")
            .fetch_all(&self.pool)
            .await
            .map_err(db("reading reconcile rules"))?
        {
            let last: Option<serde_json::Value> = r.get("last_report");
            let started: Option<DateTime<Utc>> = r.get("last_started_at");
            reconcile.insert(
                r.get("rule"),
                serde_json::json!({ "sweeps": r.get::<i64, _>("sweeps"), "last_scheduled_start": started, "last_report": last }),
            );
        }
        Ok(StatusCounts {
            owners_tracked: owners,
            resources,
            jobs,
            outbox_backlog: self.outbox_len().await?,
            reconcile,
            paused: self.paused().await?,
        })
    }

    pub async fn owner_view(&self, owner: &str) -> Result<(Vec<OwnerResource>, Vec<OwnerJob>), LedgerError> {
        let resources = sqlx::query(
            "SELECT kind, resource_id, state, job_id, tracked_at FROM tracked_resources WHERE owner = $1 ORDER BY kind, resource_id",
        )
        .bind(owner)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading an owner"))?
        .iter()
        .map(|r| OwnerResource { kind: r.get("kind"), id: r.get("resource_id"), state: r.get("state"), job_id: r.get("job_id"), tracked_at: r.get("tracked_at") })
        .collect();
        let jobs = sqlx::query(
            "SELECT job_id, event_id, trigger, status, dry_run, attempts, failed_runs, started_at, finished_at, reason,
                    error_class, event_body
             FROM jobs WHERE owner = $1 ORDER BY started_at",
        )
        .bind(owner)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading an owner's jobs"))?
        .iter()
        .map(owner_job)
        .collect();
        Ok((resources, jobs))
    }

    pub async fn job_view(&self, job_id: Uuid) -> Result<Option<JobView>, LedgerError> {
        let Some(r) = sqlx::query(
            "SELECT job_id, event_id, owner, trigger, status, dry_run, attempts, failed_runs, started_at, finished_at, reason,
                    error_class, result, event_body, traceparent
             FROM jobs WHERE job_id = $1",
        )
        .bind(job_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading a job"))?
        else {
            return Ok(None);
        };
        let result: Option<Vec<u8>> = r.get("result");

        let steps = sqlx::query(
            "SELECT kind, resource_id, outcome, attempts, error FROM job_steps WHERE job_id = $1 ORDER BY finished_at",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading a job's steps"))?
        .iter()
        .map(|s| {
            serde_json::json!({
                "kind": s.get::<String, _>("kind"), "id": s.get::<String, _>("resource_id"),
                "outcome": s.get::<String, _>("outcome"), "attempts": s.get::<i32, _>("attempts"),
                "error": s.get::<Option<String>, _>("error"),
            })
        })
        .collect();
        Ok(Some(JobView {
            job: owner_job(&r),
            owner: r.get("owner"),
            result: result.and_then(|b| serde_json::from_slice(&b).ok()),
            steps,
            traceparent: r.get("traceparent"),
            event: serde_json::from_slice(&r.get::<Vec<u8>, _>("event_body")).ok(),
        }))
    }

    /// An owner's resources not yet proven gone: what a teardown would still have to do.
    pub async fn remaining(&self, owner: &str) -> Result<Vec<Resource>, LedgerError> {
        let rows = sqlx::query(
            "SELECT kind, resource_id, attributes, parent_kind, parent_id FROM tracked_resources WHERE owner = $1 AND state = 'live' ORDER BY kind, resource_id",
        )
        .bind(owner)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading an owner's remaining resources"))?;
        Ok(rows.iter().map(super::resource_row).collect())
    }

    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }
}

fn owner_job(r: &sqlx::postgres::PgRow) -> OwnerJob {
    OwnerJob {
        job_id: r.get("job_id"),
        event_id: r.get("event_id"),
        trigger: r.get("trigger"),
        status: r.get("status"),
        dry_run: r.get("dry_run"),
        attempts: r.get("attempts"),
        failed_runs: r.get("failed_runs"),
        started_at: r.get("started_at"),
        finished_at: r.get("finished_at"),
        reason: r.get("reason"),
        error_class: r.get("error_class"),
        // The stored event was decoded at the door, so this reads; a row
        // that does not shows nothing rather than failing the view.
        request: serde_json::from_slice(&r.get::<Vec<u8>, _>("event_body")).unwrap_or_default(),
    }
}

impl Ledger {
    /// Every tracked resource of an owner, with its attributes and its state.
    pub async fn resources_with_state(&self, owner: &str) -> Result<Vec<(Resource, String)>, LedgerError> {
        let rows = sqlx::query(
            "SELECT kind, resource_id, attributes, parent_kind, parent_id, state FROM tracked_resources WHERE owner = $1 ORDER BY kind, resource_id",
        )
        .bind(owner)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading an owner's resources"))?;
        Ok(rows.iter().map(|r| (super::resource_row(r), r.get("state"))).collect())
    }
}
