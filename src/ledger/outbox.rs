//! The outbox table: messages a committed job still owes the broker. `finish`
//! writes them in the statement that makes the job terminal, `reopen` (replay)
//! with the job it reopens; `src/outbox.rs` publishes, drains and clears them.

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

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Result => "result",
            Target::Dead => "dead",
            Target::Event => "event",
        }
    }

    fn parse(s: &str) -> Option<Target> {
        [Target::Result, Target::Dead, Target::Event].into_iter().find(|t| t.as_str() == s)
    }
}

/// A message to write to the outbox with the change that owes it.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    pub target: Target,
    /// The results exchange's routing key, the dead queue's name, or the
    /// events exchange's routing key.
    pub routing_key: String,
    pub body: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

impl OutboxMessage {
    /// The headers as the table's `jsonb` column holds them.
    pub(super) fn headers_json(&self) -> serde_json::Value {
        let m = self.headers.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(v.as_str())));
        serde_json::Value::Object(m.collect())
    }
}

/// A message read back from the outbox.
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
    let target =
        Target::parse(&target).ok_or_else(|| LedgerError::Corrupt(job_id, format!("outbox target {target:?}")))?;
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
