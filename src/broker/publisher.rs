//! Publishing with confirms. Each call waits for its own confirm, so concurrent
//! jobs' confirms are pipelined on one channel rather than serialized.

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation};

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

    pub async fn close(&self) {
        let _ = self.channel.close(200, "done".into()).await;
    }

    /// Publishes a persistent JSON message and waits until the broker has it.
    /// Publishing straight to a queue (the default exchange) is mandatory: a
    /// missing queue is an error, not a silent drop.
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
        let options = BasicPublishOptions { mandatory: exchange.is_empty(), ..Default::default() };
        let confirm = self
            .channel
            .basic_publish(exchange.into(), routing_key.into(), options, body, props)
            .await
            .map_err(amqp("publishing"))?
            .await
            .map_err(amqp("waiting for a publisher confirm"))?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => {
                Err(BrokerError::Unroutable { exchange: exchange.into(), routing_key: routing_key.into() })
            }
            Confirmation::Nack(_) | Confirmation::NotRequested => {
                Err(BrokerError::Nacked { exchange: exchange.into(), routing_key: routing_key.into() })
            }
        }
    }
}
