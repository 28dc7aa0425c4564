//! `reaper cancel`: a job ends `cancelled`, with a result saying why. A job
//! no worker holds (waiting for a broker retry, or dead-lettered) ends at
//! once; one a worker is running is asked to stop (`cancel_requested`),
//! which the worker reads with its lease heartbeat. Either way the resources
//! it claimed and did not delete are released, so a later teardown of the
//! owner can take them.

use sqlx::Row;
use uuid::Uuid;

use super::outbox::{self, OutboxRow};
use super::{db, job_row, load_start, JobStart, Ledger, LedgerError};
use crate::domain::JobStatus;

#[derive(Debug)]
pub enum Cancel {
    /// Ended cancelled; publish this outbox row (its result), then delete it.
    Cancelled(Box<OutboxRow>),
    /// A worker runs it now: it starts no further deletes and ends cancelled.
    Requested,
    /// It had ended already (completed, or cancelled before).
    Ended(JobStatus),
    NoSuchJob,
}

impl Ledger {
    /// Cancels one job. `result` writes the job's result (its status
    /// `cancelled`, what its steps did) and names its routing key; it is
    /// stored and queued in the outbox in the same transaction.
    pub async fn cancel(
        &self,
        job_id: Uuid,
        reason: &str,
        result: impl FnOnce(&JobStart) -> (Vec<u8>, &'static str),
    ) -> Result<Cancel, LedgerError> {
        let mut tx = self.pool.begin().await.map_err(db("begin"))?;
        // The row lock orders this with a worker opening the job's next delivery.
        let row = sqlx::query(
            "SELECT job_id, event_id, owner, trigger, dry_run, status, attempts, started_at, reason, result, replays,
                    routing_key, looked_up, error_class, failed_runs, cancel_requested
             FROM jobs WHERE job_id = $1 FOR UPDATE",
        )
        .bind(job_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("reading a job to cancel"))?;
        let Some(row) = row else { return Ok(Cancel::NoSuchJob) };
        let mut job = job_row(&row)?;
        match job.status {
            JobStatus::Completed | JobStatus::Cancelled => return Ok(Cancel::Ended(job.status)),
            JobStatus::Running | JobStatus::DeadLettered => {}
        }
        // A lease row on the owner, even one run out: a worker may be running
        // this job now (one whose heartbeat stalled goes on deleting). A run
        // that ended released it; a crashed worker's is taken over by the
        // next delivery, which reads the request.
        let held: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM owner_leases WHERE owner = $1)")
            .bind(&job.owner)
            .fetch_one(&mut *tx)
            .await
            .map_err(db("reading the owner's lease"))?;
        if job.status == JobStatus::Running && held {
            sqlx::query("UPDATE jobs SET cancel_requested = $2 WHERE job_id = $1")
                .bind(job_id)
                .bind(reason)
                .execute(&mut *tx)
                .await
                .map_err(db("asking a running job to stop"))?;
            tx.commit().await.map_err(db("commit"))?;
            return Ok(Cancel::Requested);
        }
        // What it owns and what it did, read as a run would.
        job.status = JobStatus::Running;
        let start = load_start(&mut tx, job, None).await?;
        let (body, routing_key) = result(&start);
        let out = sqlx::query(
            "WITH j AS (
                UPDATE jobs SET status = 'cancelled', reason = $2, cancel_requested = $2, error_class = NULL,
                                result = $3, finished_at = now()
                WHERE job_id = $1
                RETURNING job_id, event_id
             )
             INSERT INTO outbox (job_id, event_id, target, routing_key, body)
             SELECT job_id, event_id, 'result', $4, $3 FROM j
             RETURNING id, job_id, event_id, target, routing_key, body, headers",
        )
        .bind(job_id)
        .bind(reason)
        .bind(&body)
        .bind(routing_key)
        .fetch_one(&mut *tx)
        .await
        .map_err(db("cancelling a job"))?;
        let out = outbox::row(&out)?;
        release_claims(&mut tx, job_id).await?;
        tx.commit().await.map_err(db("commit"))?;
        Ok(Cancel::Cancelled(Box::new(out)))
    }

    /// Gives back the attempt a delivery counted when it opened the job: a
    /// late track's job held back by a pause ran nothing.
    pub async fn uncount_attempt(&self, job_id: Uuid) -> Result<(), LedgerError> {
        sqlx::query("UPDATE jobs SET attempts = greatest(attempts - 1, 0) WHERE job_id = $1 AND status = 'running'")
            .bind(job_id)
            .execute(&self.pool)
            .await
            .map_err(db("giving back an attempt"))?;
        Ok(())
    }

    /// A cancelled job's live resources go back to the owner, for its next teardown.
    pub async fn release_claims(&self, job_id: Uuid) -> Result<(), LedgerError> {
        let mut tx = self.pool.begin().await.map_err(db("begin"))?;
        release_claims(&mut tx, job_id).await?;
        tx.commit().await.map_err(db("commit"))
    }

    /// Cancels asked of these running jobs, by job.
    pub async fn cancels_requested(&self, jobs: &[Uuid]) -> Result<Vec<(Uuid, String)>, LedgerError> {
        let rows = sqlx::query(
            "SELECT job_id, cancel_requested FROM jobs
             WHERE job_id = ANY($1) AND status = 'running' AND cancel_requested IS NOT NULL",
        )
        .bind(jobs)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading cancel requests"))?;
        Ok(rows.iter().map(|r| (r.get("job_id"), r.get("cancel_requested"))).collect())
    }

    /// The jobs of an owner that have not ended: what `reaper cancel --owner` cancels.
    pub async fn open_jobs(&self, owner: &str) -> Result<Vec<Uuid>, LedgerError> {
        sqlx::query_scalar(
            "SELECT job_id FROM jobs WHERE owner = $1 AND status IN ('running', 'dead_lettered') ORDER BY started_at",
        )
        .bind(owner)
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing an owner's open jobs"))
    }
}

async fn release_claims(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, job_id: Uuid) -> Result<(), LedgerError> {
    sqlx::query(
        "UPDATE tracked_resources SET job_id = NULL
         WHERE job_id = $1 AND state = 'live' AND EXISTS (SELECT 1 FROM jobs WHERE job_id = $1 AND status = 'cancelled')",
    )
    .bind(job_id)
    .execute(&mut **tx)
    .await
    .map_err(db("releasing a cancelled job's resources"))?;
    Ok(())
}
