//! Publishing with confirms. Each call waits for its own confirm, so concurrent
//! jobs' confirms are pipelined on one channel rather than serialized.

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel};

use super::{amqp, BrokerError};

#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    /// `channel` must already be in confirm mode.
    pub fn new(channel: Channel) -> Publisher {
        Publisher { channel }
    }

    /// Publishes a persistent JSON message and waits until the broker has it.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        message_id: &str,
        headers: &[(&str, &str)],
    ) -> Result<(), BrokerError> {
        let mut table = FieldTable::default();
        for (k, v) in headers {
            table.insert((*k).into(), AMQPValue::LongString(LongString::from(*v)));
        }
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(message_id.into())
            .with_headers(table);
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .map_err(amqp("publishing"))?
            .await
            .map_err(amqp("waiting for a publisher confirm"))?;
        match confirm {
            Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
            Confirmation::Nack(_) => Err(BrokerError::Nacked {
                exchange: exchange.into(),
                routing_key: routing_key.into(),
            }),
        }
    }
}
