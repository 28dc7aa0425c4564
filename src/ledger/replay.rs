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
#[derive(Debug, Clone, Default)]
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
}

impl DeadFilter {
    pub fn is_empty(&self) -> bool {
        self.job.is_none()
            && self.owner.is_none()
            && self.reason.is_none()
            && self.since.is_none()
            && self.error_class.is_none()
            && self.kind.is_none()
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
            "SELECT j.job_id, j.event_id, j.owner, j.reason, j.error_class, j.finished_at, j.replays FROM jobs j
             WHERE j.status = 'dead_lettered'
               AND ($1::uuid IS NULL OR j.job_id = $1)
               AND ($2::text IS NULL OR j.owner = $2)
               AND ($3::text IS NULL OR strpos(lower(coalesce(j.reason, '')), lower($3)) > 0)
               AND ($4::timestamptz IS NULL OR j.finished_at >= $4)
               AND ($5::text IS NULL OR j.error_class = $5)
               AND ($6::text IS NULL OR EXISTS (SELECT 1 FROM job_steps s WHERE s.job_id = j.job_id AND s.kind = $6
                                                 AND s.outcome IN ('failed', 'blocked')))
             ORDER BY j.finished_at, j.job_id",
        )
        .bind(f.job)
        .bind(&f.owner)
        .bind(&f.reason)
        .bind(f.since)
        .bind(&f.error_class)
        .bind(&f.kind)
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

    pub async fn reopen(&self, job_id: Uuid, max_replays: u32) -> Result<Reopen, LedgerError> {
        let mut tx = self.pool.begin().await.map_err(db("begin"))?;
        let row = sqlx::query(
            "WITH j AS (
                UPDATE jobs SET status = 'running', attempts = 0, failed_runs = 0, replays = replays + 1,
                                result = NULL, reason = NULL, error_class = NULL, finished_at = NULL,
                                cancel_requested = NULL
                WHERE job_id = $1 AND status = 'dead_lettered' AND replays < $2
                RETURNING job_id, event_id, routing_key, event_body
             )
             INSERT INTO outbox (job_id, event_id, target, routing_key, body)
             SELECT job_id, event_id, 'event', routing_key, event_body FROM j
             RETURNING id, job_id, event_id, target, routing_key, body, headers",
        )
        .bind(job_id)
        .bind(max_replays as i32)
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
