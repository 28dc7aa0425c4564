//! RabbitMQ below the worker: opening connections (`link`), declaring the
//! topology, publishing with confirms, watching results, and what a dead copy
//! says. The consumer loop that turns deliveries into handler calls sits
//! above the app, in `src/consumer.rs`.

pub mod link;
pub mod publisher;
pub mod tap;
pub mod topology;

use std::time::Duration;

/// Exchange and queue names, all under one configured prefix.
#[derive(Debug, Clone)]
pub struct Names {
    pub events: String,
    pub results: String,
    pub work: String,
    pub dead: String,
    prefix: String,
}

impl Names {
    pub fn new(prefix: &str) -> Names {
        Names {
            events: format!("{prefix}.events"),
            results: format!("{prefix}.results"),
            work: format!("{prefix}.work"),
            dead: format!("{prefix}.dead"),
            prefix: prefix.to_string(),
        }
    }

    /// Retry queues are named by their delay, so changing the schedule declares
    /// new queues instead of clashing with the arguments of old ones.
    pub fn retry(&self, delay: Duration) -> String {
        format!("{}.retry.{}ms", self.prefix, delay.as_millis())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker could not be reached or turned us away: where, and why in
    /// plain words (see `connect_error`).
    #[error("broker: RabbitMQ at {at} {why}")]
    Connect { at: String, why: String },
    #[error("broker: {op}: {source}")]
    Amqp {
        op: &'static str,
        #[source]
        source: lapin::Error,
    },
    #[error("broker: publish to {exchange:?} with key {routing_key:?} was nacked")]
    Nacked { exchange: String, routing_key: String },
    #[error("broker: nothing to route {routing_key:?} to on {exchange:?}")]
    Unroutable { exchange: String, routing_key: String },
    #[error("broker: {op} took too long")]
    Timeout { op: &'static str },
    #[error("broker: the consumer was cancelled by the server")]
    ConsumerCancelled,
    #[error("broker: {what} is too long for AMQP: {message}")]
    TooLong { what: &'static str, message: String },
}

/// Why a connection to `url` failed, said for an operator: which broker, and
/// what to look at. The URL's credentials are never part of it.
/// `client_cert`: whether reaper offered one (broker.tls.cert_file).
pub(crate) fn connect_error(url: &str, client_cert: bool, e: lapin::Error) -> BrokerError {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    let uri: Option<lapin::uri::AMQPUri> = url.parse().ok();
    let host = uri.as_ref().map(|u| u.authority.host.clone()).unwrap_or_default();
    let user = uri.as_ref().map(|u| u.authority.userinfo.username.clone()).unwrap_or_default();
    let vhost = uri.as_ref().map(|u| u.vhost.clone()).unwrap_or_default();
    if let Some(tls) = crate::tls::explain(&e, &host, "broker.tls.ca_file") {
        return connect_error_of(url, tls);
    }
    let amqps = uri.as_ref().is_some_and(|u| u.scheme == lapin::uri::AMQPScheme::AMQPS);
    let why = match e.kind() {
        // TLS 1.3 ends the client's part of the handshake before the server
        // checks the client certificate: its refusal often arrives as a reset.
        lapin::ErrorKind::IOError(io)
            if amqps
                && !client_cert
                && matches!(io.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof) =>
        {
            format!(
                "closed the TLS connection ({io}): a broker that wants a client certificate does this; \
                 set broker.tls.cert_file and broker.tls.key_file"
            )
        }
        lapin::ErrorKind::IOError(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "refused the connection: is RabbitMQ running there, and are broker.url's host and port right?".to_string()
        }
        lapin::ErrorKind::IOError(io) => format!("could not be reached ({io}): check broker.url's host and port"),
        lapin::ErrorKind::ProtocolError(p) if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)) => {
            format!("refused user {user:?} (ACCESS_REFUSED): check the user and password in broker.url")
        }
        lapin::ErrorKind::ProtocolError(p) if p.get_message().as_str().contains("vhost") => format!(
            "has no vhost {vhost:?} ({}): broker.url's path names the vhost; the default one is written %2f",
            p.get_message().as_str()
        ),
        _ => format!("could not be connected to ({e}): check broker.url"),
    };
    connect_error_of(url, why)
}

/// A connection failure at `url`'s host and port (never its credentials).
pub(crate) fn connect_error_of(url: &str, why: String) -> BrokerError {
    let uri: Option<lapin::uri::AMQPUri> = url.parse().ok();
    let at = uri.as_ref().map(|u| format!("{}:{}", u.authority.host, u.authority.port)).unwrap_or_default();
    BrokerError::Connect { at, why }
}

pub(crate) fn amqp(op: &'static str) -> impl FnOnce(lapin::Error) -> BrokerError {
    move |source| BrokerError::Amqp { op, source }
}

/// The headers of a dead copy, the one place they are put together: on the
/// normal path (`consumer::settle`) and in the outbox row a job's finish
/// writes for the crash path, so both copies of one event say the same.
pub fn dead_letter_headers(
    routing_key: &str,
    reason: &str,
    class: crate::disposition::ErrorClass,
    job_id: Option<&str>,
    traceparent: Option<&str>,
) -> Vec<(&'static str, String)> {
    let mut hs = vec![
        (headers::ROUTING_KEY, routing_key.to_string()),
        (headers::REASON, reason.to_string()),
        (headers::ERROR_CLASS, class.as_str().to_string()),
    ];
    if let Some(id) = job_id {
        hs.push((headers::JOB_ID, id.to_string()));
    }
    if let Some(t) = traceparent {
        hs.push((headers::TRACEPARENT, t.to_string()));
    }
    hs
}

/// Header names reaper sets.
pub mod headers {
    /// The routing key an event was first published with (retry hops lose it).
    pub const ROUTING_KEY: &str = "x-reaper-routing-key";
    pub const REASON: &str = "x-reaper-reason";
    pub const JOB_ID: &str = "x-reaper-job-id";
    pub const ERROR_CLASS: &str = "x-reaper-error-class";
    /// How often handling this message panicked so far.
    pub const PANICS: &str = "x-reaper-panics";
    /// When reaper first received the message (RFC 3339), kept across retry hops.
    pub const RECEIVED_AT: &str = "x-reaper-received-at";
    /// The AMQP timestamp the producer set (seconds), kept across retry hops.
    pub const SENT_AT: &str = "x-reaper-sent-at";
    /// How many times in a row the ledger answered this message with an error.
    pub const LEDGER_REFUSALS: &str = "x-reaper-ledger-refusals";
    /// Set by the broker when it dead-letters (here: a retry queue's TTL ran out).
    pub const X_DEATH: &str = "x-death";
    /// The producer's W3C trace context: read from its event, kept across
    /// retry hops, and set on the result and the dead copy.
    pub const TRACEPARENT: &str = "traceparent";
}

/// Deletes every exchange and queue under `names` (and the retry queues for
/// `retry_delays`). For tests and the demo, which use a prefix of their own.
pub async fn delete_topology(
    conn: &lapin::Connection,
    names: &Names,
    retry_delays: &[Duration],
) -> Result<(), BrokerError> {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let ch = conn.create_channel().await.map_err(amqp("opening a channel"))?;
    let mut queues = vec![names.work.clone(), names.dead.clone()];
    queues.extend(retry_delays.iter().map(|d| names.retry(*d)));
    for q in queues {
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await.map_err(amqp("deleting a queue"))?;
    }
    for ex in [&names.events, &names.results] {
        ch.exchange_delete(ex.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .map_err(amqp("deleting an exchange"))?;
    }
    Ok(())
}
