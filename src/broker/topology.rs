//! Declares exchanges and queues. Idempotent: run at every (re)connect.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ExchangeKind};

use super::{amqp, BrokerError, Names};
use crate::config::{BrokerSettings, QueueType};
use crate::contract::{DELETION_REQUESTED, PROVISIONING_FAILED, RESOURCE_TRACKED};

pub async fn declare(
    conn: &Connection,
    names: &Names,
    s: &BrokerSettings,
    retry_delays: &[Duration],
) -> Result<(), BrokerError> {
    let ch = conn.create_channel().await.map_err(amqp("opening a channel"))?;
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    for ex in [&names.events, &names.results] {
        ch.exchange_declare(ex.as_str().into(), ExchangeKind::Topic, durable, FieldTable::default())
            .await
            .map_err(amqp("declaring an exchange"))?;
    }

    let ch = declare_dead(conn, ch, names, s).await?;

    let mut work = base_args(s.queue_type);
    dead_letter_to(&mut work, &names.dead, s.queue_type);
    if s.queue_type == QueueType::Quorum {
        work.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(4 * i64::from(s.delivery_limit)));
    }
    declare_queue(&ch, &names.work, work).await?;
    // The three event keys, and `#` so that a key nobody knows (a typo such as
    // `deletion.requestd`) reaches the handler and is dead-lettered with its
    // reason instead of being dropped by the exchange without a trace. A
    // message matching several bindings is still delivered once.
    for key in [DELETION_REQUESTED, PROVISIONING_FAILED, RESOURCE_TRACKED, "#"] {
        ch.queue_bind(
            names.work.as_str().into(),
            names.events.as_str().into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp("binding the work queue"))?;
    }

    for d in retry_delays {
        let mut args = base_args(s.queue_type);
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(d.as_millis() as i64));
        dead_letter_to(&mut args, &names.work, s.queue_type);
        declare_queue(&ch, &names.retry(*d), args).await?;
    }
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

/// The dead queue, an archive whose copies expire after `dead_ttl_days`. A
/// queue declared before that setting existed keeps its arguments (RabbitMQ
/// refuses to change them): reaper goes on with it as it is and says how to
/// give it the limit with a policy. Returns a channel that is open.
async fn declare_dead(
    conn: &Connection,
    ch: Channel,
    names: &Names,
    s: &BrokerSettings,
) -> Result<Channel, BrokerError> {
    let args = || {
        let mut a = base_args(s.queue_type);
        if s.queue_type == QueueType::Quorum {
            a.insert("x-overflow".into(), long("reject-publish"));
        }
        if s.dead_ttl_days > 0.0 {
            a.insert("x-message-ttl".into(), AMQPValue::LongLongInt((s.dead_ttl_days * 86_400_000.0) as i64));
        }
        a
    };
    let opts = QueueDeclareOptions { durable: true, ..Default::default() };
    match ch.queue_declare(names.dead.as_str().into(), opts, args()).await {
        Ok(_) => Ok(ch),
        Err(e) if is_precondition_failed(&e) => {
            tracing::warn!(
                queue = %names.dead,
                "the dead queue exists with other arguments than broker.dead_ttl_days asks (it was declared before \
                 the setting, or with another value); it is used as it is. Set its age limit with a policy: \
                 rabbitmqctl set_policy {name}-ttl '^{name}$' '{{\"message-ttl\": {ms}}}' --apply-to queues",
                name = names.dead.replace('.', "\\."),
                ms = (s.dead_ttl_days * 86_400_000.0) as i64
            );
            // The refusal closed the channel; the queue is taken as it is.
            let ch = conn.create_channel().await.map_err(amqp("opening a channel"))?;
            let passive = QueueDeclareOptions { passive: true, durable: true, ..Default::default() };
            ch.queue_declare(names.dead.as_str().into(), passive, FieldTable::default())
                .await
                .map_err(amqp("declaring a queue"))?;
            Ok(ch)
        }
        Err(e) => Err(amqp("declaring a queue")(e)),
    }
}

/// RabbitMQ's answer to a declaration whose arguments differ from the queue's (406).
fn is_precondition_failed(e: &lapin::Error) -> bool {
    let text = e.to_string().to_uppercase();
    text.contains("PRECONDITION_FAILED") || text.contains("PRECONDITION-FAILED") || text.contains("PRECONDITIONFAILED")
}

fn base_args(t: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if t == QueueType::Quorum {
        args.insert("x-queue-type".into(), long("quorum"));
    }
    args
}

/// Messages leaving `args`' queue (expired, over the delivery limit) go to `queue`,
/// at least once on quorum queues.
fn dead_letter_to(args: &mut FieldTable, queue: &str, t: QueueType) {
    args.insert("x-dead-letter-exchange".into(), long(""));
    args.insert("x-dead-letter-routing-key".into(), long(queue));
    if t == QueueType::Quorum {
        args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
        args.insert("x-overflow".into(), long("reject-publish"));
    }
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

async fn declare_queue(ch: &Channel, name: &str, args: FieldTable) -> Result<(), BrokerError> {
    ch.queue_declare(name.into(), QueueDeclareOptions { durable: true, ..Default::default() }, args)
        .await
        .map_err(amqp("declaring a queue"))?;
    Ok(())
}
