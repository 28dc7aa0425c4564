//! A private, auto-deleted queue bound to the results exchange: how the demo
//! and the tests watch results arrive.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, Consumer};

use super::{amqp, BrokerError, Names};
use crate::contract::TeardownResult;

pub struct ResultTap {
    consumer: Consumer,
}

/// A result as it arrived, with its routing key.
#[derive(Debug, Clone)]
pub struct Observed {
    pub routing_key: String,
    pub body: Vec<u8>,
    pub result: TeardownResult,
    /// The trace context reaper set on it (the producer's `traceparent`).
    pub traceparent: Option<String>,
}

impl ResultTap {
    pub async fn open(conn: &Connection, names: &Names) -> Result<ResultTap, BrokerError> {
        let ch = conn.create_channel().await.map_err(amqp("opening a channel"))?;
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map_err(amqp("declaring a results tap"))?;
        ch.queue_bind(
            q.name().clone(),
            names.results.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp("binding a results tap"))?;
        let consumer = ch
            .basic_consume(q.name().clone(), "tap".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(amqp("consuming a results tap"))?;
        Ok(ResultTap { consumer })
    }

    /// The next result, or `None` when none came within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Observed> {
        let d = tokio::time::timeout(wait, self.consumer.next()).await.ok()??.ok()?;
        let _ = d.acker.ack(BasicAckOptions::default()).await;
        let result = serde_json::from_slice(&d.data).ok()?;
        let traceparent =
            d.properties.headers().as_ref().and_then(|h| match h.inner().get(super::headers::TRACEPARENT) {
                Some(lapin::types::AMQPValue::LongString(s)) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                _ => None,
            });
        Some(Observed { routing_key: d.routing_key.to_string(), body: d.data, result, traceparent })
    }
}
