//! The worker loop: connect, declare, consume with manual acks; each delivery
//! runs as its own task (prefetch bounds how many); reconnect with backoff when
//! the connection dies; on shutdown stop consuming and let in-flight jobs finish
//! within the grace period. Whatever is not acked comes back from the broker.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::publisher::Publisher;
use super::{amqp, headers, topology, BrokerError};
use crate::app::App;
use crate::handler;
use crate::retry::Disposition;

/// Runs until `shutdown` is cancelled, reconnecting as needed.
pub async fn run(app: Arc<App>, shutdown: CancellationToken) {
    let mut pause = Duration::from_millis(500);
    while !shutdown.is_cancelled() {
        match session(&app, &shutdown).await {
            Ok(()) => break,
            Err(e) => {
                app.ready.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "worker not ready: broker session ended; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(30));
            }
        }
    }
    app.ready.store(false, Ordering::Relaxed);
}

pub async fn connect(app: &App) -> Result<Connection, BrokerError> {
    Connection::connect(
        app.settings.broker.url.expose(),
        ConnectionProperties::default(),
    )
    .await
    .map_err(amqp("connecting"))
}

/// Connects, declares the topology and returns a confirm-mode publisher.
pub async fn open(app: &App) -> Result<(Connection, Publisher), BrokerError> {
    let conn = connect(app).await?;
    let ch = conn
        .create_channel()
        .await
        .map_err(amqp("opening a channel"))?;
    topology::declare(
        &ch,
        &app.names,
        &app.settings.broker,
        &app.settings.worker.retry_delays(),
    )
    .await?;
    let pub_ch = conn
        .create_channel()
        .await
        .map_err(amqp("opening a channel"))?;
    pub_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(amqp("enabling confirms"))?;
    Ok((conn, Publisher::new(pub_ch)))
}

async fn session(app: &Arc<App>, shutdown: &CancellationToken) -> Result<(), BrokerError> {
    let (conn, publisher) = open(app).await?;
    let ch = conn
        .create_channel()
        .await
        .map_err(amqp("opening a channel"))?;
    ch.basic_qos(app.settings.broker.prefetch, BasicQosOptions::default())
        .await
        .map_err(amqp("setting prefetch"))?;
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
    app.ready.store(true, Ordering::Relaxed);
    tracing::info!(queue = %app.names.work, prefetch = app.settings.broker.prefetch, "worker ready: consuming");

    let tracker = TaskTracker::new();
    let ended = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let app = app.clone();
                    let publisher = publisher.clone();
                    tracker.spawn(async move { process(&app, &publisher, delivery).await });
                }
                Some(Err(e)) => break Err(amqp("consuming")(e)),
                None => break Err(BrokerError::ConsumerCancelled),
            }
        }
    };
    app.ready.store(false, Ordering::Relaxed);
    if ended.is_ok() {
        tracing::info!("shutting down: no new deliveries; waiting for jobs in flight");
        let _ = ch
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
    }
    tracker.close();
    let grace = Duration::from_secs(app.settings.worker.shutdown_grace_secs);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            "jobs still running after the grace period; they go back to the queue unacked"
        );
    }
    let _ = conn.close(200, "reaper shutting down".into()).await;
    ended
}

/// Handles one delivery and settles it. Nothing is acked before what it must
/// publish is confirmed; any failure leaves it unacked or nacked for redelivery.
async fn process(app: &App, publisher: &Publisher, delivery: Delivery) {
    let routing_key = original_routing_key(&delivery);
    let handled = AssertUnwindSafe(handler::handle(app, &routing_key, &delivery.data))
        .catch_unwind()
        .await;
    let disposition = match handled {
        Ok(d) => d,
        Err(_) => {
            tracing::error!(
                routing_key,
                "the handler panicked; handing the message back (the delivery limit stops a loop)"
            );
            Disposition::Requeue {
                pause: Duration::from_secs(1),
                why: "handler panicked".into(),
            }
        }
    };
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.to_string())
        .unwrap_or_default();
    let settled = settle(
        app,
        publisher,
        &delivery,
        &routing_key,
        &message_id,
        disposition,
    )
    .await;
    if let Err(e) = settled {
        tracing::warn!(error = %e, "could not settle a delivery; it will be redelivered");
        let _ = delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await;
    }
}

async fn settle(
    app: &App,
    publisher: &Publisher,
    delivery: &Delivery,
    routing_key: &str,
    message_id: &str,
    disposition: Disposition,
) -> Result<(), BrokerError> {
    match disposition {
        Disposition::Finished {
            event_id,
            result,
            routing_key: result_key,
            dead,
        } => {
            publisher
                .publish(&app.names.results, result_key, &result, &event_id, &[])
                .await?;
            if let Some(dead) = dead {
                let hs = [
                    (headers::ROUTING_KEY, routing_key),
                    (headers::REASON, dead.reason.as_str()),
                    (headers::JOB_ID, dead.job_id.as_str()),
                    (headers::ERROR_CLASS, "job_failed"),
                ];
                publisher
                    .publish("", &app.names.dead, &delivery.data, &event_id, &hs)
                    .await?;
            }
        }
        Disposition::Ack => {}
        Disposition::RetryAfter { delay, why: _ } => {
            let hs = [(headers::ROUTING_KEY, routing_key)];
            publisher
                .publish("", &app.names.retry(delay), &delivery.data, message_id, &hs)
                .await?;
        }
        Disposition::Reject { reason } => {
            let hs = [
                (headers::ROUTING_KEY, routing_key),
                (headers::REASON, reason.as_str()),
                (headers::ERROR_CLASS, "malformed"),
            ];
            publisher
                .publish("", &app.names.dead, &delivery.data, message_id, &hs)
                .await?;
        }
        Disposition::Requeue { pause, why } => {
            tracing::warn!(why, "handing the message back to the broker");
            tokio::time::sleep(pause).await;
            delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
                .map_err(amqp("nacking"))?;
            return Ok(());
        }
    }
    delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .map_err(amqp("acking"))?;
    Ok(())
}

/// Retry hops go through the default exchange and lose the routing key; it
/// travels in a header instead.
fn original_routing_key(d: &Delivery) -> String {
    let from_header = d.properties.headers().as_ref().and_then(|h: &FieldTable| {
        match h.inner().get(headers::ROUTING_KEY) {
            Some(AMQPValue::LongString(s)) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            _ => None,
        }
    });
    from_header.unwrap_or_else(|| d.routing_key.to_string())
}
