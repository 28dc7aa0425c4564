//! The outbox: messages a committed job still owes the broker. `finish` writes
//! them in the statement that makes the job terminal; the worker publishes them
//! at once and deletes them after the confirm; the drainer publishes what a
//! crash left behind (so a result may arrive twice, always the same bytes).

use std::time::Duration;

use sqlx::Row;
use uuid::Uuid;

use super::{db, Ledger, LedgerError};

/// Where an outbox message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The results exchange, with `routing_key`.
    Result,
    /// The dead queue (`routing_key` is the queue name).
    Dead,
    /// Back on the events exchange with `routing_key`: a replayed event.
    Event,
}

#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub job_id: Uuid,
    pub event_id: String,
    pub target: Target,
    pub routing_key: String,
    pub body: Vec<u8>,
    /// String headers.
    pub headers: Vec<(String, String)>,
}

impl Ledger {
    /// Rows older than `age` (the worker had its chance), claimed for a while
    /// by bumping their time so another replica's drainer skips them.
    pub async fn outbox_due(&self, age: Duration, limit: i64) -> Result<Vec<OutboxRow>, LedgerError> {
        let rows = sqlx::query(
            "UPDATE outbox SET created_at = now()
             WHERE id IN (SELECT id FROM outbox WHERE created_at < now() - make_interval(secs => $1::double precision)
                          ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
             RETURNING id, job_id, event_id, target, routing_key, body, headers",
        )
        .bind(age.as_secs_f64())
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading the outbox"))?;
        rows.iter().map(row).collect()
    }

    pub async fn outbox_delete(&self, ids: &[i64]) -> Result<(), LedgerError> {
        sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await
            .map_err(db("clearing the outbox"))?;
        Ok(())
    }

    /// These jobs' results and dead-letter copies are confirmed: forget them.
    pub async fn outbox_done(&self, job_ids: &[Uuid]) -> Result<(), LedgerError> {
        sqlx::query("DELETE FROM outbox WHERE job_id = ANY($1) AND target IN ('result', 'dead')")
            .bind(job_ids)
            .execute(&self.pool)
            .await
            .map_err(db("clearing the outbox"))?;
        Ok(())
    }

    pub async fn outbox_len(&self) -> Result<i64, LedgerError> {
        let r = sqlx::query("SELECT count(*) AS n FROM outbox")
            .fetch_one(&self.pool)
            .await
            .map_err(db("counting the outbox"))?;
        Ok(r.get("n"))
    }
}

pub(super) fn row(r: &sqlx::postgres::PgRow) -> Result<OutboxRow, LedgerError> {
    let job_id: Uuid = r.get("job_id");
    let target: String = r.get("target");
    let target = match target.as_str() {
        "result" => Target::Result,
        "dead" => Target::Dead,
        "event" => Target::Event,
        other => return Err(LedgerError::Corrupt(job_id, format!("outbox target {other:?}"))),
    };
    let headers: serde_json::Value = r.get("headers");
    let headers = headers
        .as_object()
        .map(|m| m.iter().filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string()))).collect())
        .unwrap_or_default();
    Ok(OutboxRow {
        id: r.get("id"),
        job_id,
        event_id: r.get("event_id"),
        target,
        routing_key: r.get("routing_key"),
        body: r.get("body"),
        headers,
    })
}
