//! Declares exchanges and queues. Idempotent: run at every (re)connect.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use super::{amqp, BrokerError, Names};
use crate::config::{BrokerSettings, QueueType};
use crate::contract::{DELETION_REQUESTED, PROVISIONING_FAILED, RESOURCE_TRACKED};

pub async fn declare(
    ch: &Channel,
    names: &Names,
    s: &BrokerSettings,
    retry_delays: &[Duration],
) -> Result<(), BrokerError> {
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    for ex in [&names.events, &names.results] {
        ch.exchange_declare(ex.as_str().into(), ExchangeKind::Topic, durable, FieldTable::default())
            .await
            .map_err(amqp("declaring an exchange"))?;
    }

    let mut dead = base_args(s.queue_type);
    if s.queue_type == QueueType::Quorum {
        dead.insert("x-overflow".into(), long("reject-publish"));
    }
    declare_queue(ch, &names.dead, dead).await?;

    let mut work = base_args(s.queue_type);
    dead_letter_to(&mut work, &names.dead, s.queue_type);
    if s.queue_type == QueueType::Quorum {
        work.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(4 * i64::from(s.delivery_limit)));
    }
    declare_queue(ch, &names.work, work).await?;
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
        declare_queue(ch, &names.retry(*d), args).await?;
    }
    Ok(())
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
