//! The operators' brake: `reaper pause` / `POST /v1/pause` set one row that
//! every replica reads every `worker.pause_poll_ms` (see `runner.rs`). A flag
//! in the ledger rather than a broker message: every replica, and the CLI
//! with no worker running, sees the same answer, and it survives restarts.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;

use super::{db, Ledger, LedgerError};

/// Who paused, when and why.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Pause {
    pub reason: String,
    pub by: String,
    pub since: DateTime<Utc>,
}

impl Ledger {
    /// Pauses every replica. Pausing again keeps the first `since` and takes the new reason.
    pub async fn pause(&self, reason: &str, by: &str) -> Result<Pause, LedgerError> {
        let r = sqlx::query(
            "UPDATE control SET paused = true, reason = $1, paused_by = $2, \
                    since = CASE WHEN paused THEN since ELSE now() END \
             WHERE id RETURNING reason, paused_by, since",
        )
        .bind(reason)
        .bind(by)
        .fetch_one(&self.pool)
        .await
        .map_err(db("pausing"))?;
        Ok(Pause { reason: r.get("reason"), by: r.get("paused_by"), since: r.get("since") })
    }

    /// Resumes; the pause it ended, if there was one.
    pub async fn resume(&self) -> Result<Option<Pause>, LedgerError> {
        let before = self.paused().await?;
        sqlx::query("UPDATE control SET paused = false WHERE id").execute(&self.pool).await.map_err(db("resuming"))?;
        Ok(before)
    }

    pub async fn paused(&self) -> Result<Option<Pause>, LedgerError> {
        let r = sqlx::query("SELECT paused, reason, paused_by, since FROM control WHERE id")
            .fetch_optional(&self.pool)
            .await
            .map_err(db("reading the pause flag"))?;
        Ok(r.filter(|r| r.get::<bool, _>("paused")).map(|r| Pause {
            reason: r.get::<Option<String>, _>("reason").unwrap_or_default(),
            by: r.get::<Option<String>, _>("paused_by").unwrap_or_default(),
            since: r.get::<Option<DateTime<Utc>>, _>("since").unwrap_or_else(Utc::now),
        }))
    }
}
