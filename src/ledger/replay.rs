//! Replay of dead-lettered jobs. A replay reopens the job (same job, same
//! event_id, attempt budget reset, replays counted) and queues its original
//! event in the outbox, in one transaction; steps already done stay done. The
//! reopening is a conditional update, so two operators replaying at once
//! reopen each job once.

use chrono::{DateTime, Utc};
use sqlx::Row;
use uuid::Uuid;

use super::outbox::{self, OutboxRow};
use super::{db, Ledger, LedgerError};

/// Which dead-lettered jobs to pick. Every field narrows; all `None` is every one.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DeadFilter {
    pub job: Option<Uuid>,
    pub owner: Option<String>,
    /// A piece of the reason, case-insensitive.
    pub reason: Option<String>,
    pub since: Option<DateTime<Utc>>,
    /// permanent | exhausted | plan
    pub error_class: Option<String>,
    /// Jobs with a failed or blocked resource of this kind.
    pub kind: Option<String>,
    /// Dead-lettered at or before this time: a preview pins it, so the jobs
    /// a confirmation replays are those it showed, not one dead-lettered since.
    #[serde(default)]
    pub until: Option<DateTime<Utc>>,
    /// Only these jobs: what a preview listed, so a confirmation replays
    /// exactly that set (less any no longer dead).
    #[serde(default)]
    pub jobs: Option<Vec<Uuid>>,
}

/// A replay as the ledger knows it (`replays`): what it picked, how far it
/// got, and where the jobs it reopened are now.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplayRun {
    pub replay_id: Uuid,
    pub requested_by: String,
    pub filter: serde_json::Value,
    pub matched: i32,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Jobs reopened so far.
    pub reopened: usize,
    /// The first hundred of them.
    pub job_ids: Vec<Uuid>,
    /// The reopened jobs by their status now (running, completed, dead_lettered, cancelled).
    pub jobs: std::collections::BTreeMap<String, i64>,
    /// finished: every job was reopened (or held back, skipped) and none
    /// still runs; running; or interrupted: the replaying process stopped
    /// moving before it finished (what it reopened is in the outbox, which a
    /// worker drains).
    pub state: &'static str,
    pub summary: Option<serde_json::Value>,
}

/// A resource a replay would ask to delete again: claimed by the dead job and
/// not proven gone.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pending {
    pub kind: String,
    pub id: String,
}

impl DeadFilter {
    pub fn is_empty(&self) -> bool {
        self.job.is_none()
            && self.owner.is_none()
            && self.reason.is_none()
            && self.since.is_none()
            && self.error_class.is_none()
            && self.kind.is_none()
            && self.until.is_none()
            && self.jobs.is_none()
    }

    /// Nothing picks jobs out but a time they were dead-lettered by: every
    /// dead-lettered job up to then.
    pub fn is_every_job(&self) -> bool {
        DeadFilter { until: None, ..self.clone() }.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct DeadJob {
    pub job_id: Uuid,
    pub event_id: String,
    pub owner: String,
    pub reason: Option<String>,
    pub error_class: Option<String>,
    pub finished_at: Option<DateTime<Utc>>,
    pub replays: u32,
    /// Whether its kinds' lookups already ran; if not, a replay runs them
    /// and may find (and delete) more than it has claimed.
    pub looked_up: bool,
}

#[derive(Debug)]
pub enum Reopen {
    /// Reopened; publish this outbox row (then delete it) to run the job again.
    Reopened(Box<OutboxRow>),
    /// Replayed `replays` times already: held back for a person to look at.
    HeldBack { replays: u32 },
    /// Not dead-lettered (any more): someone else replayed it, or it never was.
    NotDead,
}

impl Ledger {
    pub async fn dead_jobs(&self, f: &DeadFilter) -> Result<Vec<DeadJob>, LedgerError> {
        let rows = sqlx::query(
            "SELECT j.job_id, j.event_id, j.owner, j.reason, j.error_class, j.finished_at, j.replays, j.looked_up FROM jobs j
             WHERE j.status = 'dead_lettered'
               AND ($1::uuid IS NULL OR j.job_id = $1)
               AND ($2::text IS NULL OR j.owner = $2)
               AND ($3::text IS NULL OR strpos(lower(coalesce(j.reason, '')), lower($3)) > 0)
               AND ($4::timestamptz IS NULL OR j.finished_at >= $4)
               AND ($5::text IS NULL OR j.error_class = $5)
               AND ($6::text IS NULL OR EXISTS (SELECT 1 FROM job_steps s WHERE s.job_id = j.job_id AND s.kind = $6
                                                 AND s.outcome IN ('failed', 'blocked')))
               AND ($7::timestamptz IS NULL OR j.finished_at <= $7)
               AND ($8::uuid[] IS NULL OR j.job_id = ANY($8))
             ORDER BY j.finished_at, j.job_id",
        )
        .bind(f.job)
        .bind(&f.owner)
        .bind(&f.reason)
        .bind(f.since)
        .bind(&f.error_class)
        .bind(&f.kind)
        .bind(f.until)
        .bind(&f.jobs)
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing dead-lettered jobs"))?;
        Ok(rows
            .iter()
            .map(|r| {
                let replays: i32 = r.get("replays");
                DeadJob {
                    job_id: r.get("job_id"),
                    event_id: r.get("event_id"),
                    owner: r.get("owner"),
                    reason: r.get("reason"),
                    error_class: r.get("error_class"),
                    finished_at: r.get("finished_at"),
                    replays: replays.max(0) as u32,
                    looked_up: r.get("looked_up"),
                }
            })
            .collect())
    }

    /// Jobs dead-lettered and neither replayed nor cancelled since: what is dead.
    pub async fn dead_count(&self) -> Result<i64, LedgerError> {
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'dead_lettered'")
            .fetch_one(&self.pool)
            .await
            .map_err(db("counting dead-lettered jobs"))
    }

    /// Reopens one dead job; a replay's record (`replay`) gains it in the
    /// same transaction. The event goes out again with the producer's
    /// traceparent, so the new run's result carries it too.
    pub async fn reopen(&self, job_id: Uuid, max_replays: u32, replay: Option<Uuid>) -> Result<Reopen, LedgerError> {
        let mut tx = self.pool.begin().await.map_err(db("begin"))?;
        let row = sqlx::query(
            "WITH j AS (
                UPDATE jobs SET status = 'running', attempts = 0, failed_runs = 0, replays = replays + 1,
                                result = NULL, reason = NULL, error_class = NULL, finished_at = NULL,
                                cancel_requested = NULL
                WHERE job_id = $1 AND status = 'dead_lettered' AND replays < $2
                RETURNING job_id, event_id, routing_key, event_body, traceparent
             ), r AS (
                INSERT INTO replay_jobs (replay_id, job_id) SELECT $3, job_id FROM j WHERE $3::uuid IS NOT NULL
             ), u AS (
                UPDATE replays SET updated_at = now() WHERE replay_id = $3 AND EXISTS (SELECT 1 FROM j)
             )
             INSERT INTO outbox (job_id, event_id, target, routing_key, body, headers)
             SELECT job_id, event_id, 'event', routing_key, event_body,
                    CASE WHEN traceparent IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('traceparent', traceparent) END
             FROM j
             RETURNING id, job_id, event_id, target, routing_key, body, headers",
        )
        .bind(job_id)
        .bind(max_replays as i32)
        .bind(replay)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("reopening a job"))?;
        if let Some(r) = row {
            let out = outbox::row(&r)?;
            tx.commit().await.map_err(db("commit"))?;
            return Ok(Reopen::Reopened(Box::new(out)));
        }
        let state = sqlx::query("SELECT status, replays FROM jobs WHERE job_id = $1")
            .bind(job_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db("reading a job"))?;
        tx.commit().await.map_err(db("commit"))?;
        Ok(match state {
            Some(s) if s.get::<String, _>("status") == "dead_lettered" => {
                Reopen::HeldBack { replays: s.get::<i32, _>("replays").max(0) as u32 }
            }
            _ => Reopen::NotDead,
        })
    }
}

/// A replay that has not moved for this long, and has not finished, was interrupted.
const REPLAY_STALL_SECS: f64 = 120.0;

impl Ledger {
    /// Per dead job, what its replay would ask to delete again: the
    /// resources it claimed that are not proven gone. (A job whose lookups
    /// never ran runs them when replayed: `replay::look_up_pending`.)
    pub async fn pending_of(
        &self,
        job_ids: &[Uuid],
    ) -> Result<std::collections::HashMap<Uuid, Vec<Pending>>, LedgerError> {
        // Joined through the job's owner: tracked_resources is keyed by
        // owner and has no index on job_id.
        let rows = sqlx::query(
            "SELECT t.job_id, t.kind, t.resource_id FROM jobs j
             JOIN tracked_resources t ON t.owner = j.owner AND t.job_id = j.job_id
             WHERE j.job_id = ANY($1) AND t.state = 'live'
             ORDER BY t.kind, t.resource_id",
        )
        .bind(job_ids)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading what dead jobs still hold"))?;
        let mut out: std::collections::HashMap<Uuid, Vec<Pending>> = std::collections::HashMap::new();
        for r in rows {
            out.entry(r.get("job_id")).or_default().push(Pending { kind: r.get("kind"), id: r.get("resource_id") });
        }
        Ok(out)
    }

    /// Records that a replay starts; its progress is written as it goes.
    pub async fn replay_started(
        &self,
        filter: &DeadFilter,
        requested_by: &str,
        matched: usize,
    ) -> Result<Uuid, LedgerError> {
        let id = Uuid::new_v4();
        sqlx::query("INSERT INTO replays (replay_id, requested_by, filter, matched) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(requested_by.replace('\0', ""))
            .bind(serde_json::to_value(filter).expect("a filter serializes"))
            .bind(matched.min(i32::MAX as usize) as i32)
            .execute(&self.pool)
            .await
            .map_err(db("recording a replay"))?;
        Ok(id)
    }

    /// The replay is still going: it moved past a job it did not reopen.
    pub async fn replay_moved(&self, replay_id: Uuid) -> Result<(), LedgerError> {
        sqlx::query("UPDATE replays SET updated_at = now() WHERE replay_id = $1")
            .bind(replay_id)
            .execute(&self.pool)
            .await
            .map_err(db("recording a replay's progress"))?;
        Ok(())
    }

    /// The replay went through every job it matched.
    pub async fn replay_finished(&self, replay_id: Uuid, summary: &serde_json::Value) -> Result<(), LedgerError> {
        sqlx::query("UPDATE replays SET summary = $2, finished_at = now(), updated_at = now() WHERE replay_id = $1")
            .bind(replay_id)
            .bind(summary)
            .execute(&self.pool)
            .await
            .map_err(db("recording a replay's end"))?;
        Ok(())
    }

    pub async fn replay_run(&self, replay_id: Uuid) -> Result<Option<ReplayRun>, LedgerError> {
        Ok(self.replay_runs(Some(replay_id), 1).await?.pop())
    }

    /// The latest replays, newest first (or the one asked for).
    pub async fn replay_runs(&self, one: Option<Uuid>, limit: i64) -> Result<Vec<ReplayRun>, LedgerError> {
        let rows = sqlx::query(
            "SELECT r.replay_id, r.requested_by, r.filter, r.matched, r.started_at, r.finished_at, r.summary,
                    (SELECT count(*) FROM replay_jobs rj WHERE rj.replay_id = r.replay_id) AS reopened,
                    ARRAY(SELECT rj.job_id FROM replay_jobs rj WHERE rj.replay_id = r.replay_id
                          ORDER BY rj.job_id LIMIT 100) AS job_ids,
                    extract(epoch FROM now() - r.updated_at)::float8 AS idle_secs,
                    (SELECT coalesce(jsonb_object_agg(s.status, s.n), '{}'::jsonb) FROM
                        (SELECT j.status, count(*) AS n FROM replay_jobs rj JOIN jobs j ON j.job_id = rj.job_id
                         WHERE rj.replay_id = r.replay_id GROUP BY j.status) s) AS jobs
             FROM replays r WHERE ($1::uuid IS NULL OR r.replay_id = $1)
             ORDER BY r.started_at DESC LIMIT $2",
        )
        .bind(one)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading replays"))?;
        Ok(rows
            .iter()
            .map(|r| {
                let jobs: std::collections::BTreeMap<String, i64> =
                    serde_json::from_value(r.get("jobs")).unwrap_or_default();
                let finished_at: Option<DateTime<Utc>> = r.get("finished_at");
                let idle: f64 = r.get("idle_secs");
                let state = match (finished_at, jobs.get("running").copied().unwrap_or(0)) {
                    (Some(_), 0) => "finished",
                    (None, _) if idle > REPLAY_STALL_SECS => "interrupted",
                    _ => "running",
                };
                ReplayRun {
                    replay_id: r.get("replay_id"),
                    requested_by: r.get("requested_by"),
                    filter: r.get("filter"),
                    matched: r.get("matched"),
                    started_at: r.get("started_at"),
                    finished_at,
                    reopened: r.get::<i64, _>("reopened").max(0) as usize,
                    job_ids: r.get("job_ids"),
                    jobs,
                    state,
                    summary: r.get("summary"),
                }
            })
            .collect())
    }
}
