//! Archived records: what a job deleted from a database, kept for restore.

use uuid::Uuid;

use super::{db, Ledger, LedgerError};

/// One archived row or document.
#[derive(Debug, Clone)]
pub struct Archived {
    pub id: i64,
    pub kind: String,
    pub resource_id: String,
    pub record: serde_json::Value,
    pub restored: bool,
}

impl Ledger {
    /// Keeps records a provider is about to delete. Committed before the delete is.
    pub async fn archive_keep(
        &self,
        job_id: Uuid,
        kind: &str,
        resource_id: &str,
        records: &[serde_json::Value],
    ) -> Result<(), LedgerError> {
        // As text into a json column: jsonb would reorder the fields.
        let texts: Vec<String> = records.iter().map(|r| r.to_string()).collect();
        sqlx::query(
            "INSERT INTO archived_records (job_id, kind, resource_id, record) \
             SELECT $1, $2, $3, r::json FROM unnest($4::text[]) AS r",
        )
        .bind(job_id)
        .bind(kind)
        .bind(resource_id)
        .bind(texts)
        .execute(&self.pool)
        .await
        .map_err(db("archiving records"))?;
        Ok(())
    }

    pub async fn archived(&self, job_id: Uuid) -> Result<Vec<Archived>, LedgerError> {
        let rows: Vec<(i64, String, String, String, bool)> = sqlx::query_as(
            "SELECT id, kind, resource_id, record::text, restored_at IS NOT NULL FROM archived_records \
             WHERE job_id = $1 ORDER BY id",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading the archive"))?;
        rows.into_iter()
            .map(|(id, kind, resource_id, text, restored)| {
                let record = serde_json::from_str(&text)
                    .map_err(|e| LedgerError::Corrupt(job_id, format!("archived record {id}: {e}")))?;
                Ok(Archived { id, kind, resource_id, record, restored })
            })
            .collect()
    }

    pub async fn mark_restored(&self, ids: &[i64]) -> Result<(), LedgerError> {
        sqlx::query("UPDATE archived_records SET restored_at = now() WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await
            .map_err(db("marking restored records"))?;
        Ok(())
    }

    /// Drops archives older than the retention; returns how many went.
    pub async fn purge_archive(&self, retention_days: f64) -> Result<u64, LedgerError> {
        let done = sqlx::query("DELETE FROM archived_records WHERE archived_at < now() - make_interval(secs => $1)")
            .bind(retention_days * 86_400.0)
            .execute(&self.pool)
            .await
            .map_err(db("purging old archives"))?;
        Ok(done.rows_affected())
    }
}
