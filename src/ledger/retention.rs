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
            "WITH old AS (
                SELECT job_id FROM jobs
                WHERE started_at < now() - make_interval(secs => $1)
                  AND status IN ('completed', 'cancelled') AND finished_at < now() - make_interval(secs => $1)
                ORDER BY started_at LIMIT $2 FOR UPDATE SKIP LOCKED
             ), steps AS (
                DELETE FROM job_steps s USING old WHERE s.job_id = old.job_id
             ), gone AS (
                DELETE FROM tracked_resources r USING old WHERE r.job_id = old.job_id AND r.state <> 'live'
             ), archived AS (
                DELETE FROM archived_records a USING old WHERE a.job_id = old.job_id
             ), outbox AS (
                DELETE FROM outbox o USING old WHERE o.job_id = old.job_id
             ), jobs AS (
                DELETE FROM jobs j USING old WHERE j.job_id = old.job_id RETURNING 1
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
