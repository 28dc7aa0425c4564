//! The benchmark's ceiling: what the broker alone can move for this job's
//! message pattern. Consume persistent messages, publish one persistent result
//! each with a confirm, ack; same queue type and prefetch as the worker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ConnectionProperties};

use crate::broker::publisher::Publisher;
use crate::broker::{amqp, BrokerError};
use crate::config::QueueType;

/// Preloads `n` copies of `body` on a queue of its own, then times the loop.
/// Returns the seconds from the first delivery to the last ack.
pub async fn measure(
    url: &str,
    prefix: &str,
    queue_type: QueueType,
    prefetch: u16,
    n: usize,
    body: &[u8],
) -> Result<f64, BrokerError> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await.map_err(amqp("connecting"))?;
    let ch = conn.create_channel().await.map_err(amqp("opening a channel"))?;
    let input = format!("{prefix}.ceiling-in");
    let output = format!("{prefix}.ceiling-out");
    let results = format!("{prefix}.results");
    let mut args = FieldTable::default();
    if queue_type == QueueType::Quorum {
        args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
    }
    for q in [&input, &output] {
        ch.queue_declare(q.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, args.clone())
            .await
            .map_err(amqp("declaring a queue"))?;
    }
    ch.queue_bind(
        output.as_str().into(),
        results.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(amqp("binding"))?;
    let pch = conn.create_channel().await.map_err(amqp("opening a channel"))?;
    pch.confirm_select(ConfirmSelectOptions::default()).await.map_err(amqp("confirms"))?;
    let publisher = Publisher::new(pch);
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let sends = chunk.iter().map(|i| {
            let id = format!("c-{i}");
            let p = publisher.clone();
            let input = input.clone();
            async move { p.publish("", &input, body, &id, &[]).await }
        });
        for r in join_all(sends).await {
            r?;
        }
    }

    let cch = conn.create_channel().await.map_err(amqp("opening a channel"))?;
    cch.basic_qos(prefetch, BasicQosOptions::default()).await.map_err(amqp("qos"))?;
    let mut consumer = cch
        .basic_consume(input.as_str().into(), "ceiling".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .map_err(amqp("consuming"))?;
    let done = Arc::new(AtomicUsize::new(0));
    let (finished_tx, mut finished_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut first: Option<Instant> = None;
    let tracker = tokio_util::task::TaskTracker::new();
    let result_body = vec![b'x'; body.len()];
    let result_body = Arc::new(result_body);
    loop {
        tokio::select! {
            _ = finished_rx.recv() => break,
            d = consumer.next() => {
                let Some(Ok(d)) = d else { break };
                first.get_or_insert_with(Instant::now);
                let p = publisher.clone();
                let done = done.clone();
                let tx = finished_tx.clone();
                let rb = result_body.clone();
                let results = results.clone();
                tracker.spawn(async move {
                    if p.publish(&results, "teardown.completed", &rb, "r", &[]).await.is_ok() && d.acker.ack(BasicAckOptions::default()).await.is_ok() && done.fetch_add(1, Ordering::Relaxed) + 1 == n {
                        let _ = tx.send(()).await;
                    }
                });
            }
        }
    }
    let secs = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(0.0);
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    for q in [&input, &output] {
        let _ = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
    }
    let _ = conn.close(200, "ceiling measured".into()).await;
    Ok(secs)
}
