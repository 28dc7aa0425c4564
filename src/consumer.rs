//! The worker loop: connect, declare, consume with manual acks; each delivery
//! runs as its own task (prefetch bounds how many); reconnect with backoff when
//! the connection dies; on shutdown stop consuming, let in-flight jobs finish
//! within the grace period, and flush the outbox. Whatever is not acked comes
//! back from the broker.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::app::App;
use crate::broker::publisher::Publisher;
use crate::broker::{amqp, headers, BrokerError, Names};
use crate::contract::{self, Envelope};
use crate::disposition::Disposition;
use crate::handler;
use chrono::{DateTime, Utc};

/// Runs until `shutdown` is cancelled, reconnecting as needed.
pub async fn run(app: Arc<App>, shutdown: CancellationToken) {
    let mut pause = Duration::from_millis(500);
    while !shutdown.is_cancelled() {
        match session(&app, &shutdown).await {
            Ok(()) => break,
            Err(e) => {
                app.set_ready(false);
                tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "worker not ready: broker session ended; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(30));
            }
        }
    }
    app.set_ready(false);
}

async fn session(app: &Arc<App>, shutdown: &CancellationToken) -> Result<(), BrokerError> {
    let (conn, publisher) = crate::broker::link::open(&app.settings, &app.names).await?;
    let ch = conn.create_channel().await.map_err(amqp("opening a channel"))?;
    ch.basic_qos(app.settings.broker.prefetch, BasicQosOptions::default()).await.map_err(amqp("setting prefetch"))?;
    let tag = format!("reaper-{}", uuid::Uuid::new_v4());
    let mut consumer = ch
        .basic_consume(
            app.names.work.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp("starting the consumer"))?;
    app.set_ready(true);
    tracing::info!(queue = %app.names.work, prefetch = app.settings.broker.prefetch, "worker ready: consuming");

    let session_over = CancellationToken::new();
    let drainer = tokio::spawn(crate::outbox::drain_forever(
        app.ledger.clone(),
        publisher.clone(),
        app.names.clone(),
        session_over.clone(),
        Some(app.metrics.outbox_backlog.clone()),
    ));
    let tracker = TaskTracker::new();
    // Cancelled when the grace is over: a job still running then is dropped
    // where it stands (its delivery, unacked, goes back to the queue), so
    // nothing of this session acts after it ended.
    let abandon = CancellationToken::new();
    let ended = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let app = app.clone();
                    let publisher = publisher.clone();
                    let abandon = abandon.clone();
                    tracker.spawn(async move {
                        tokio::select! {
                            _ = process(&app, &publisher, delivery) => {}
                            _ = abandon.cancelled() => {}
                        }
                    });
                }
                Some(Err(e)) => break Err(amqp("consuming")(e)),
                None => break Err(BrokerError::ConsumerCancelled),
            }
        }
    };
    app.set_ready(false);
    if ended.is_ok() {
        tracing::info!("shutting down: no new deliveries; waiting for jobs in flight");
        let _ = ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
    }
    tracker.close();
    let grace = Duration::from_secs(app.settings.worker.shutdown_grace_secs);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("jobs still running after the grace period; they go back to the queue unacked");
        abandon.cancel();
        tracker.wait().await;
    }
    session_over.cancel();
    let _ = drainer.await;
    if ended.is_ok() {
        match crate::outbox::drain(&app.ledger, &publisher, &app.names, Duration::ZERO).await {
            Ok(n) if n > 0 => tracing::info!(published = n, "outbox flushed"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not flush the outbox; the next worker will"),
        }
    }
    // Channels first: closing the connection under open channels makes lapin
    // log a spurious connection error.
    let _ = ch.close(200, "reaper shutting down".into()).await;
    publisher.close().await;
    let _ = conn.close(200, "reaper shutting down".into()).await;
    ended
}

/// Handles one delivery and settles it. Nothing is acked before what it must
/// publish is confirmed; any failure leaves it nacked for redelivery.
async fn process(app: &App, publisher: &Publisher, delivery: Delivery) {
    /// Counts the delivery out however it ends (a job abandoned after the grace included).
    struct InFlight<'a>(&'a prometheus::IntGauge);
    impl Drop for InFlight<'_> {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    app.metrics.in_flight.inc();
    let _counted = InFlight(&app.metrics.in_flight);
    process_one(app, publisher, delivery).await;
}

async fn process_one(app: &App, publisher: &Publisher, delivery: Delivery) {
    let incoming = Incoming::read(&delivery, &app.names);
    let env = Envelope {
        routing_key: &incoming.routing_key,
        body: &delivery.data,
        received_at: incoming.received_at,
        sent_at: incoming.sent_at.and_then(|t| DateTime::from_timestamp(t, 0)),
        traceparent: incoming.traceparent.as_deref(),
    };
    let span = tracing::info_span!("event", traceparent = incoming.traceparent.as_deref().unwrap_or(""));
    let handled =
        AssertUnwindSafe(handler::handle(app, &env, incoming.ledger_refusals).instrument(span)).catch_unwind().await;
    let disposition = match handled {
        Ok(d) => d,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let panics = incoming.panics + 1;
            tracing::error!(routing_key = incoming.routing_key, panics, what, "the handler panicked");
            if panics >= app.settings.broker.delivery_limit {
                Disposition::Reject {
                    reason: format!("poison: handling panicked {panics} times: {what}"),
                    class: crate::disposition::ErrorClass::Poison,
                }
            } else {
                app.metrics.events.with_label_values(&[metric_key(&incoming.routing_key), "panic"]).inc();
                app.metrics.broker_retries.with_label_values(&[crate::disposition::RetryReason::Panic.as_str()]).inc();
                let _ = settle_panic(app, publisher, &delivery, &incoming, panics)
                    .await
                    .map_err(|e| tracing::warn!(error = %e, "could not park a panicking message"));
                return;
            }
        }
    };
    count(app, &incoming.routing_key, &disposition);
    if let Err(e) = settle(app, publisher, &delivery, &incoming, disposition).await {
        tracing::warn!(error = %e, "could not settle a delivery; it will be redelivered");
        let _ = delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
    }
}

/// One delivery's facts, with what reaper's own retry hop wrote on it.
///
/// The hop's headers are believed only on a message that came back from one
/// of reaper's retry queues: the broker dead-letters an expired message
/// through the default exchange with the work queue's name as routing key and
/// adds `x-death`. A producer publishes to the events exchange, so a header it
/// sets is ignored, and the routing key it used decides how the body is read
/// (docs/contract.md says which permission a producer must not have for this
/// to hold: write on the default exchange).
struct Incoming {
    routing_key: String,
    received_at: DateTime<Utc>,
    /// The producer's AMQP timestamp (seconds; a retry hop carries it in a header).
    sent_at: Option<i64>,
    panics: u32,
    ledger_refusals: u32,
    message_id: String,
    /// The producer's trace context (a retry hop carries it on).
    traceparent: Option<String>,
}

impl Incoming {
    fn read(d: &Delivery, names: &Names) -> Incoming {
        let from_retry = d.exchange.as_str().is_empty()
            && d.routing_key.as_str() == names.work
            && header_value(d, headers::X_DEATH).is_some();
        let hop = |name: &str| if from_retry { header(d, name) } else { None };
        let count = |name: &str| hop(name).and_then(|v| v.parse().ok()).unwrap_or(0);
        let known = |k: &String| metric_key(k) != "other";
        let sent_at = match hop(headers::SENT_AT) {
            Some(t) => t.parse().ok(),
            None if from_retry => None,
            None => d.properties.timestamp().and_then(|t| i64::try_from(t).ok()),
        };
        Incoming {
            // A hop that lost its key (or carries one reaper never writes)
            // keeps the work queue's name: an unknown key, refused.
            routing_key: hop(headers::ROUTING_KEY).filter(known).unwrap_or_else(|| d.routing_key.to_string()),
            // Zero (or less) is an unset clock, not 1970.
            sent_at: sent_at.filter(|t| *t > 0),
            received_at: hop(headers::RECEIVED_AT)
                .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or_else(Utc::now),
            panics: count(headers::PANICS),
            ledger_refusals: count(headers::LEDGER_REFUSALS),
            message_id: d.properties.message_id().as_ref().map(|m| m.to_string()).unwrap_or_default(),
            traceparent: header(d, headers::TRACEPARENT).and_then(|t| contract::traceparent(&t)),
        }
    }

    /// Headers for a trip through a retry queue: what the next delivery must know.
    fn hop_headers(&self, panics: u32, ledger_refusals: u32) -> Vec<(&'static str, String)> {
        let mut hs = vec![
            (headers::ROUTING_KEY, self.routing_key.clone()),
            (headers::RECEIVED_AT, contract::rfc3339::format(&self.received_at)),
            (headers::PANICS, panics.to_string()),
            (headers::LEDGER_REFUSALS, ledger_refusals.to_string()),
        ];
        if let Some(t) = self.sent_at {
            hs.push((headers::SENT_AT, t.to_string()));
        }
        if let Some(t) = &self.traceparent {
            hs.push((headers::TRACEPARENT, t.clone()));
        }
        hs
    }

    /// The trace context, for what reaper publishes about this event.
    fn trace_headers(&self) -> Vec<(&str, &str)> {
        self.traceparent.as_deref().map(|t| (headers::TRACEPARENT, t)).into_iter().collect()
    }
}

async fn settle(
    app: &App,
    publisher: &Publisher,
    delivery: &Delivery,
    incoming: &Incoming,
    d: Disposition,
) -> Result<(), BrokerError> {
    let routing_key = incoming.routing_key.as_str();
    let message_id = incoming.message_id.as_str();
    let mut clear_outbox = None;
    let to_retry = |delay: Duration, refusals: u32| async move {
        let hs = incoming.hop_headers(incoming.panics, refusals);
        let hs: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        publisher.publish("", &app.names.retry(delay), &delivery.data, message_id, &hs).await
    };
    match d {
        Disposition::Finished { event_id, job_id, result, routing_key: result_key, dead, outbox_written } => {
            publisher.publish(&app.names.results, result_key, &result, &event_id, &incoming.trace_headers()).await?;
            if let Some(dead) = dead {
                let hs = crate::broker::dead_letter_headers(
                    routing_key,
                    &dead.reason,
                    dead.class,
                    Some(&dead.job_id),
                    incoming.traceparent.as_deref(),
                );
                let hs: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (*k, v.as_str())).collect();
                publisher.publish("", &app.names.dead, &delivery.data, &event_id, &hs).await?;
            }
            if outbox_written {
                clear_outbox = Some(job_id);
            }
        }
        Disposition::Ack => {}
        // Waiting for a busy owner neither adds to nor clears the refusals.
        Disposition::RetryAfter { delay, .. } => to_retry(delay, incoming.ledger_refusals).await?,
        Disposition::InfraRetry { why: _, refused } => {
            let refusals = if refused { incoming.ledger_refusals + 1 } else { incoming.ledger_refusals };
            to_retry(app.settings.worker.infra_delay(), refusals).await?
        }
        Disposition::Reject { reason, class } => {
            let hs =
                crate::broker::dead_letter_headers(routing_key, &reason, class, None, incoming.traceparent.as_deref());
            let hs: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            publisher.publish("", &app.names.dead, &delivery.data, message_id, &hs).await?;
        }
    }
    delivery.acker.ack(BasicAckOptions::default()).await.map_err(amqp("acking"))?;
    if let Some(job_id) = clear_outbox {
        app.outbox_confirmed(job_id);
    }
    Ok(())
}

/// A delivery whose handling panicked goes to the retry queue with its panic
/// count; at the delivery limit it is dead-lettered as poison instead.
async fn settle_panic(
    app: &App,
    publisher: &Publisher,
    delivery: &Delivery,
    incoming: &Incoming,
    panics: u32,
) -> Result<(), BrokerError> {
    let hs = incoming.hop_headers(panics, incoming.ledger_refusals);
    let hs: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let queue = app.names.retry(app.settings.worker.infra_delay());
    publisher.publish("", &queue, &delivery.data, &incoming.message_id, &hs).await?;
    delivery.acker.ack(BasicAckOptions::default()).await.map_err(amqp("acking"))?;
    Ok(())
}

/// The routing key as a metric label: a producer's typo must not become a
/// new time series each.
fn metric_key(routing_key: &str) -> &'static str {
    match routing_key {
        contract::DELETION_REQUESTED => contract::DELETION_REQUESTED,
        contract::PROVISIONING_FAILED => contract::PROVISIONING_FAILED,
        contract::RESOURCE_TRACKED => contract::RESOURCE_TRACKED,
        _ => "other",
    }
}

/// The consumer's metrics: one verdict per delivery.
fn count(app: &App, routing_key: &str, d: &Disposition) {
    let m = &app.metrics;
    let verdict = match d {
        Disposition::Finished { dead: Some(dead), .. } => {
            m.dead_letters.with_label_values(&[dead.class.as_str()]).inc();
            "dead_lettered"
        }
        Disposition::Finished { .. } => "completed",
        Disposition::Ack => "recorded",
        Disposition::RetryAfter { reason, .. } => {
            m.broker_retries.with_label_values(&[reason.as_str()]).inc();
            "retry"
        }
        Disposition::InfraRetry { .. } => {
            m.broker_retries.with_label_values(&[crate::disposition::RetryReason::Infrastructure.as_str()]).inc();
            "infra_retry"
        }
        Disposition::Reject { class, .. } => {
            m.dead_letters.with_label_values(&[class.as_str()]).inc();
            class.as_str()
        }
    };
    m.events.with_label_values(&[metric_key(routing_key), verdict]).inc();
}

fn header_value<'d>(d: &'d Delivery, name: &str) -> Option<&'d AMQPValue> {
    d.properties.headers().as_ref().and_then(|h: &FieldTable| h.inner().get(name))
}

fn header(d: &Delivery, name: &str) -> Option<String> {
    match header_value(d, name) {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}
