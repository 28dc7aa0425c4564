//! The outbox, end to end. A job's finish (and an operator's replay) writes
//! the messages it owes the broker in the same transaction that changes the
//! job (`ledger::outbox`: the typed `OutboxMessage` and the table); the worker
//! publishes them at once and, once confirmed, hands the job to [`clear`],
//! which deletes the rows of many jobs per statement; [`drain_forever`]
//! publishes what a crash left behind. A message may so go out twice, always
//! the same bytes; never zero times.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::broker::publisher::Publisher;
use crate::broker::{BrokerError, Names};
use crate::ledger::{Ledger, OutboxRow, Target};

/// Outbox rows younger than this are the worker's own to publish.
pub const GRACE: Duration = Duration::from_secs(5);

/// Publishes one outbox row where its target says.
pub async fn publish(publisher: &Publisher, names: &Names, row: &OutboxRow) -> Result<(), BrokerError> {
    let hs: Vec<(&str, &str)> = row.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let exchange = match row.target {
        Target::Result => names.results.as_str(),
        Target::Dead => "",
        Target::Event => names.events.as_str(),
    };
    match publisher.publish(exchange, &row.routing_key, &row.body, &row.event_id, &hs).await {
        // Rows written before event ids were limited to 255 bytes: the
        // body still carries the event id; the property cannot.
        Err(BrokerError::TooLong { what, .. }) => {
            tracing::warn!(event_id = %row.event_id, what, "an outbox row does not fit AMQP; publishing it without a message id");
            publisher.publish(exchange, &row.routing_key, &row.body, "", &hs).await
        }
        other => other,
    }
}

/// Every second until `stop`: publishes rows older than [`GRACE`] and
/// reports the backlog.
pub async fn drain_forever(
    ledger: Ledger,
    publisher: Publisher,
    names: Names,
    stop: CancellationToken,
    backlog: Option<prometheus::IntGauge>,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if let Err(e) = drain(&ledger, &publisher, &names, GRACE).await {
            tracing::debug!(error = %e, "outbox drain failed; trying again");
        }
        if let (Ok(n), Some(g)) = (ledger.outbox_len().await, &backlog) {
            g.set(n);
        }
    }
}

/// Publishes outbox rows older than `age` and deletes them once confirmed.
pub async fn drain(
    ledger: &Ledger,
    publisher: &Publisher,
    names: &Names,
    age: Duration,
) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
    let mut total = 0;
    loop {
        let rows = ledger.outbox_due(age, 100).await?;
        if rows.is_empty() {
            return Ok(total);
        }
        let mut done = Vec::with_capacity(rows.len());
        for row in &rows {
            publish(publisher, names, row).await?;
            done.push(row.id);
        }
        ledger.outbox_delete(&done).await?;
        total += done.len();
    }
}

/// Deletes the rows of jobs whose messages are confirmed, many jobs per
/// statement, until `shutdown`. What it misses (a crash, a failed delete) the
/// drainer publishes again: a duplicate, never a loss.
pub async fn clear(ledger: Ledger, mut rx: tokio::sync::mpsc::UnboundedReceiver<Uuid>, shutdown: CancellationToken) {
    loop {
        let first = tokio::select! {
            id = rx.recv() => id,
            _ = shutdown.cancelled() => None,
        };
        let mut batch: Vec<Uuid> = first.into_iter().collect();
        while batch.len() < 1000 {
            match rx.try_recv() {
                Ok(id) => batch.push(id),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            return;
        }
        if let Err(e) = ledger.outbox_done(&batch).await {
            tracing::debug!(error = %e, jobs = batch.len(), "outbox not cleared; the drainer will publish those results again");
        }
    }
}
