//! The one place that opens connections to RabbitMQ. The consumer opens its
//! own per session; one-shot commands (`reaper teardown`, `reaper replay`,
//! reconcile, the benchmarks) open one and close it; the admin API shares a
//! [`SharedLink`] instead of opening a connection per request.

use lapin::options::ConfirmSelectOptions;
use lapin::{Connection, ConnectionProperties};

use super::publisher::Publisher;
use super::{amqp, topology, BrokerError, Names};
use crate::config::Settings;

/// Connects, declares the topology and returns a confirm-mode publisher.
pub async fn open(settings: &Settings, names: &Names) -> Result<(Connection, Publisher), BrokerError> {
    let conn = connect(settings).await?;
    topology::declare(&conn, names, &settings.broker, &settings.worker.all_delays()).await?;
    let pub_ch = conn.create_channel().await.map_err(amqp("opening a channel"))?;
    pub_ch.confirm_select(ConfirmSelectOptions::default()).await.map_err(amqp("enabling confirms"))?;
    Ok((conn, Publisher::new(pub_ch)))
}

/// A connection to the configured broker, over TLS for `amqps://` URLs.
async fn connect(settings: &Settings) -> Result<Connection, BrokerError> {
    let url = settings.broker.url.expose();
    let tls = settings.broker.tls.read().map_err(|e| super::connect_error_of(url, e.to_string()))?;
    let client_cert = tls.identity.is_some();
    let runtime = lapin::runtime::default_runtime().map_err(|e| super::connect_error(url, client_cert, e))?;
    Connection::connect_with_config(url, ConnectionProperties::default(), tls, runtime)
        .await
        .map_err(|e| super::connect_error(url, client_cert, e))
}

/// Connects and closes, declaring nothing: whether the broker lets reaper in.
pub async fn reach(settings: &Settings) -> Result<(), BrokerError> {
    let conn = tokio::time::timeout(std::time::Duration::from_secs(10), connect(settings))
        .await
        .map_err(|_| BrokerError::Timeout { op: "connecting" })??;
    let _ = conn.close(200, "reaper check-config".into()).await;
    Ok(())
}

/// One connection and confirm-mode publisher shared by a process for what it
/// publishes outside the consumer: opened on first use, opened again when it
/// broke (a broker restart), closed at shutdown.
#[derive(Default)]
pub struct SharedLink {
    link: tokio::sync::Mutex<Option<(Connection, Publisher)>>,
}

impl SharedLink {
    /// The shared publisher, opened (within 10 s) when there is none or it broke.
    pub async fn publisher(&self, settings: &Settings, names: &Names) -> Result<Publisher, BrokerError> {
        let mut link = self.link.lock().await;
        if let Some((conn, publisher)) = link.as_ref() {
            if conn.status().connected() && publisher.is_open() {
                return Ok(publisher.clone());
            }
        }
        let opened = tokio::time::timeout(std::time::Duration::from_secs(10), open(settings, names)).await;
        let (conn, publisher) = opened.map_err(|_| BrokerError::Timeout { op: "connecting" })??;
        *link = Some((conn, publisher.clone()));
        Ok(publisher)
    }

    /// Drops the link after a failed publish, so the next caller opens a new one.
    pub async fn forget(&self) {
        if let Some((conn, _)) = self.link.lock().await.take() {
            let _ = conn.close(200, "reopening".into()).await;
        }
    }

    pub async fn close(&self) {
        if let Some((conn, publisher)) = self.link.lock().await.take() {
            publisher.close().await;
            let _ = conn.close(200, "reaper shutting down".into()).await;
        }
    }
}
