//! Retention: what has ended leaves the ledger `ledger.retention_days` after
//! it ended, a small batch per statement, so no purge holds a lock for long
//! or competes with the worker's writes for more than a moment.
//! docs/contract.md says what still holds after a purge.

use super::{db, Ledger, LedgerError};

impl Ledger {
    /// Whether a job of this event is in the ledger (see the handler's check
    /// of events older than the retention).
    pub async fn job_exists(&self, event_id: &str) -> Result<bool, LedgerError> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM jobs WHERE event_id = $1)")
            .bind(event_id)
            .fetch_one(&self.pool)
            .await
            .map_err(db("looking a job up by its event"))
    }

    /// Purges up to `batch` jobs that ended `completed` or `cancelled` more
    /// than `days` ago, with their steps, their resources proven gone and
    /// their archived records; returns how many jobs went. Dead-lettered and
    /// running jobs stay, and so do a job whose result is still in the outbox
    /// and a cancelled reconcile teardown. Replicas purging at once skip
    /// each other's rows.
    pub async fn purge_jobs(&self, days: f64, batch: i64) -> Result<u64, LedgerError> {
        let n: i64 = sqlx::query_scalar(
            // Arrays rather than joins on the CTE: each delete is then an
            // index probe per job (tracked_resources by its owner, the first
            // column of its key; it has no index on job_id), where a join let
            // the planner hash a whole table: 300 ms a batch instead of 70.
            "WITH old AS (
                SELECT job_id, owner FROM jobs
                WHERE started_at < now() - make_interval(secs => $1)
                  AND status IN ('completed', 'cancelled') AND finished_at < now() - make_interval(secs => $1)
                  -- A result still in the outbox is not published yet.
                  AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = jobs.job_id)
                  -- An operator's cancel of a reconcile teardown is what keeps
                  -- the sweep from asking again (its event id is the orphan's).
                  AND NOT (status = 'cancelled' AND event_id LIKE 'reconcile:%')
                ORDER BY started_at LIMIT $2 FOR UPDATE SKIP LOCKED
             ), ids AS (
                SELECT array_agg(job_id) AS jobs, array_agg(DISTINCT owner) AS owners FROM old
             ), steps AS (
                DELETE FROM job_steps WHERE job_id = ANY((SELECT jobs FROM ids)::uuid[])
             ), gone AS (
                DELETE FROM tracked_resources
                WHERE owner = ANY((SELECT owners FROM ids)::text[]) AND job_id = ANY((SELECT jobs FROM ids)::uuid[])
                  AND state <> 'live'
             ), released AS (
                -- Live rows still claimed (a cancel whose release failed) go
                -- back to their owner, or nothing would ever take them.
                UPDATE tracked_resources SET job_id = NULL
                WHERE owner = ANY((SELECT owners FROM ids)::text[]) AND job_id = ANY((SELECT jobs FROM ids)::uuid[])
                  AND state = 'live'
             ), archived AS (
                DELETE FROM archived_records WHERE job_id = ANY((SELECT jobs FROM ids)::uuid[])
             ), jobs AS (
                DELETE FROM jobs WHERE job_id = ANY((SELECT jobs FROM ids)::uuid[]) RETURNING 1
             )
             SELECT count(*) FROM jobs",
        )
        .bind(days * 86_400.0)
        .bind(batch)
        .fetch_one(&self.pool)
        .await
        .map_err(db("purging finished jobs past their retention"))?;
        Ok(n.max(0) as u64)
    }

    /// Forgets replays (and their job lists) started more than `days` ago,
    /// and console logouts past their sessions' expiry.
    pub async fn purge_replays(&self, days: f64) -> Result<u64, LedgerError> {
        let n: i64 = sqlx::query_scalar(
            "WITH old AS (
                DELETE FROM replays WHERE started_at < now() - make_interval(secs => $1) RETURNING replay_id
             ), jobs AS (
                DELETE FROM replay_jobs WHERE replay_id IN (SELECT replay_id FROM old)
             ), logouts AS (
                DELETE FROM console_logouts WHERE expires_at < now()
             )
             SELECT count(*) FROM old",
        )
        .bind(days * 86_400.0)
        .fetch_one(&self.pool)
        .await
        .map_err(db("purging old replays"))?;
        Ok(n.max(0) as u64)
    }
}
