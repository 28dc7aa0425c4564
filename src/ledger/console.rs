//! What console sessions keep in the ledger: the secret their signing key is
//! derived from (with the admin token), made once and shared by every
//! replica, and the sessions ended by logging out until they would have
//! expired anyway.

use chrono::{DateTime, Utc};

use super::{db, Ledger, LedgerError};

impl Ledger {
    /// The console's secret: made by the first replica that asks, read by the rest.
    pub async fn console_secret(&self) -> Result<Vec<u8>, LedgerError> {
        let fresh: Vec<u8> = [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()].iter().flat_map(|u| *u.as_bytes()).collect();
        sqlx::query("INSERT INTO console_key (secret) VALUES ($1) ON CONFLICT (id) DO NOTHING")
            .bind(&fresh)
            .execute(&self.pool)
            .await
            .map_err(db("making the console's secret"))?;
        sqlx::query_scalar("SELECT secret FROM console_key WHERE id")
            .fetch_one(&self.pool)
            .await
            .map_err(db("reading the console's secret"))
    }

    /// Ends a session (logging out): refused from now on, on every replica.
    pub async fn end_session(&self, session: &str, expires_at: DateTime<Utc>) -> Result<(), LedgerError> {
        sqlx::query("DELETE FROM console_logouts WHERE expires_at < now()")
            .execute(&self.pool)
            .await
            .map_err(db("forgetting expired logouts"))?;
        sqlx::query("INSERT INTO console_logouts (session, expires_at) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(session)
            .bind(expires_at)
            .execute(&self.pool)
            .await
            .map_err(db("ending a console session"))?;
        Ok(())
    }

    pub async fn session_ended(&self, session: &str) -> Result<bool, LedgerError> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM console_logouts WHERE session = $1)")
            .bind(session)
            .fetch_one(&self.pool)
            .await
            .map_err(db("reading console logouts"))
    }
}
