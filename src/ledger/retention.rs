//! Retention: what has ended leaves the ledger `ledger.retention_days` after
//! it ended, a small batch per statement, so no purge holds a lock for long
//! or competes with the worker's writes for more than a moment.
//! docs/contract.md says what still holds after a purge.

use super::{db, Ledger, LedgerError};

impl Ledger {
    /// Purges up to `batch` jobs that ended `completed` or `cancelled` more
    /// than `days` ago, with their steps, their resources proven gone, their
    /// archived records and outbox rows; returns how many jobs went.
    /// Dead-lettered and running jobs stay. Replicas purging at once skip
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
                ORDER BY started_at LIMIT $2 FOR UPDATE SKIP LOCKED
             ), ids AS (
                SELECT array_agg(job_id) AS jobs, array_agg(DISTINCT owner) AS owners FROM old
             ), steps AS (
                DELETE FROM job_steps WHERE job_id = ANY((SELECT jobs FROM ids)::uuid[])
             ), gone AS (
                DELETE FROM tracked_resources
                WHERE owner = ANY((SELECT owners FROM ids)::text[]) AND job_id = ANY((SELECT jobs FROM ids)::uuid[])
                  AND state <> 'live'
             ), archived AS (
                DELETE FROM archived_records WHERE job_id = ANY((SELECT jobs FROM ids)::uuid[])
             ), outbox AS (
                DELETE FROM outbox WHERE job_id = ANY((SELECT jobs FROM ids)::uuid[])
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
}
