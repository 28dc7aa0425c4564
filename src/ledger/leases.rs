//! Owner leases: one teardown per owner at a time across every replica. A
//! holder is one delivery being handled; its worker renews the lease while it
//! works, so a killed worker's leases run out after `lease_ttl`.

use std::time::Duration;

use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::{db, Ledger, LedgerError};

impl Ledger {
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// Takes the owner for `holder` unless another live holder has it.
    pub(super) async fn acquire_lease(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        owner: &str,
        holder: Uuid,
    ) -> Result<bool, LedgerError> {
        let got = sqlx::query(
            "INSERT INTO owner_leases (owner, holder, until) VALUES ($1, $2, now() + make_interval(secs => $3::double precision))
             ON CONFLICT (owner) DO UPDATE SET holder = EXCLUDED.holder, until = EXCLUDED.until
             WHERE owner_leases.until < now() OR owner_leases.holder = EXCLUDED.holder
             RETURNING holder",
        )
        .bind(owner)
        .bind(holder)
        .bind(self.lease_ttl.as_secs_f64())
        .fetch_optional(&mut **tx)
        .await
        .map_err(db("taking the owner's lease"))?;
        Ok(got.is_some())
    }

    /// Gives the owner back (a job going to the retry queue, or failing).
    pub async fn release(&self, owner: &str, holder: Uuid) -> Result<(), LedgerError> {
        sqlx::query("DELETE FROM owner_leases WHERE owner = $1 AND holder = $2")
            .bind(owner)
            .bind(holder)
            .execute(&self.pool)
            .await
            .map_err(db("releasing the owner's lease"))?;
        Ok(())
    }

    /// Extends every lease these holders have. One statement per worker per beat.
    pub async fn renew(&self, holders: &[Uuid]) -> Result<u64, LedgerError> {
        if holders.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query("UPDATE owner_leases SET until = now() + make_interval(secs => $2::double precision) WHERE holder = ANY($1)")
            .bind(holders)
            .bind(self.lease_ttl.as_secs_f64())
            .execute(&self.pool)
            .await
            .map_err(db("renewing leases"))?;
        Ok(done.rows_affected())
    }
}
