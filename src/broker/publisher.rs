//! Publishing with confirms. Each call waits for its own confirm, so concurrent
//! jobs' confirms are pipelined on one channel rather than serialized.

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
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

    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
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
            table.insert(short("a header name", k)?, AMQPValue::LongString(LongString::from(*v)));
        }
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(short("the message id", message_id)?)
            .with_headers(table);
        let options = BasicPublishOptions { mandatory: exchange.is_empty(), ..Default::default() };
        let confirm = self
            .channel
            .basic_publish(
                short("the exchange", exchange)?,
                short("the routing key", routing_key)?,
                options,
                body,
                props,
            )
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

/// AMQP short strings hold 255 bytes; lapin's `From` panics beyond that, so
/// every value that reaches one goes through here and fails as an error.
fn short(what: &'static str, s: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(s).map_err(|e| BrokerError::TooLong { what, message: e.to_string() })
}
