//! Settings: defaults (config/default.toml) → file → environment. Plain data
//! and the checks of their own values; `catalog.rs` turns the kinds into a
//! checked `Catalog`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;

pub mod reconcile;

const DEFAULTS: &str = include_str!("../config/default.toml");

/// The top-level sections; environment variables are read for these only.
const SECTIONS: &[&str] =
    &["broker", "database", "worker", "log", "admin", "providers", "kinds", "archive", "reconcile"];

/// A load error, with a hint where the key is unknown: the section it does
/// belong to, or the known key it is closest to.
fn explain(e: figment::Error) -> ConfigError {
    let figment::error::Kind::UnknownField(key, expected) = &e.kind else {
        return ConfigError::Load(Box::new(e));
    };
    let elsewhere: Vec<&str> =
        section_keys().into_iter().filter(|(_, keys)| keys.contains(&key.as_str())).map(|(name, _)| name).collect();
    let hint = if !elsewhere.is_empty() {
        format!(" (`{key}` is a key of {})", elsewhere.join(", "))
    } else {
        match expected.iter().filter(|k| edit_distance(k, key) <= 2).min_by_key(|k| edit_distance(k, key)) {
            Some(close) => format!(" (did you mean `{close}`?)"),
            None => String::new(),
        }
    };
    let path = match e.path.split_last() {
        Some((last, rest)) if last == key => rest,
        _ => &e.path[..],
    };
    let section = if path.is_empty() { "the top level".to_string() } else { format!("[{}]", path.join(".")) };
    let from = e.metadata.as_ref().map(|m| match &m.source {
        Some(source) => format!(" (in {source})"),
        None => format!(" (in the {})", m.name),
    });
    ConfigError::UnknownKey {
        message: format!(
            "unknown key `{key}` in {section}{hint}; expected one of {}{}",
            expected.join(", "),
            from.unwrap_or_default()
        ),
    }
}

/// Each section's keys, asked of its type (an unknown key's error lists them).
fn section_keys() -> Vec<(&'static str, &'static [&'static str])> {
    fn keys<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
        let probe = Figment::from(figment::providers::Serialized::defaults(
            [("\u{1}probe", 0)].into_iter().collect::<BTreeMap<&str, i32>>(),
        ));
        match probe.extract::<T>().map(|_| ()).map_err(|e| e.kind) {
            Err(figment::error::Kind::UnknownField(_, expected)) => expected,
            _ => &[],
        }
    }
    use reconcile::InventorySettings;
    use reconcile::{ActionSettings, ReconcileSettings, RuleSettings};
    vec![
        ("the top level", keys::<Settings>()),
        ("[broker]", keys::<BrokerSettings>()),
        ("[database]", keys::<DatabaseSettings>()),
        ("[worker]", keys::<WorkerSettings>()),
        ("[log]", keys::<LogSettings>()),
        ("[admin]", keys::<AdminSettings>()),
        ("[archive]", keys::<ArchiveSettings>()),
        ("[reconcile]", keys::<ReconcileSettings>()),
        ("[providers.NAME] of type \"http\"", keys::<HttpProviderSettings>()),
        ("[providers.NAME] of type \"postgres\"", keys::<PostgresProviderSettings>()),
        ("[providers.NAME] of type \"mongodb\"", keys::<MongoProviderSettings>()),
        ("a provider's auth", keys::<AuthSettings>()),
        ("a provider's auth.oauth2", keys::<OAuth2Settings>()),
        ("[kinds.NAME]", keys::<KindSettings>()),
        ("a kind's lookup", keys::<LookupSettings>()),
        ("a kind's guard", keys::<GuardSettings>()),
        ("[reconcile.rules.NAME]", keys::<RuleSettings>()),
        ("a rule's truth or copy", keys::<InventorySettings>()),
        ("a rule's action", keys::<ActionSettings>()),
    ]
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(row[j + 1] + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    /// A key no section knows: a typo (`aftr`) or a key in the wrong section.
    #[error("reading configuration: {message}")]
    UnknownKey { message: String },
    #[error("kind {kind:?}: {message}")]
    Kind { kind: String, message: String },
    #[error("provider {provider:?}: {message}")]
    Provider { provider: String, message: String },
    #[error("kinds form a cycle through `after`: {0}")]
    Cycle(String),
    #[error("{0}")]
    Invalid(String),
}

/// A string that must never reach a log line: it prints as `[redacted]`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Secret {
    /// Whether `given` is this secret, compared without an early exit, so
    /// timing does not reveal how much of it matched.
    pub fn matches(&self, given: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), given.as_bytes())
    }
}

/// Compares without an early exit, so timing does not reveal how much matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub broker: BrokerSettings,
    pub database: DatabaseSettings,
    pub worker: WorkerSettings,
    pub log: LogSettings,
    pub admin: AdminSettings,
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderSettings>,
    #[serde(default)]
    pub kinds: BTreeMap<String, KindSettings>,
    pub archive: ArchiveSettings,
    pub ledger: LedgerSettings,
    pub reconcile: reconcile::ReconcileSettings,
}

/// How long the ledger keeps what has ended.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerSettings {
    /// Completed and cancelled jobs, their steps and their resources proven
    /// gone are purged this long after they ended (dead-lettered jobs stay
    /// until replayed or cancelled). At least `archive.retention_days`:
    /// `reaper restore` needs the job.
    pub retention_days: f64,
}

/// Rows and documents deleted with `archive = true` are kept this long, so
/// `reaper restore JOB` can put them back.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveSettings {
    pub retention_days: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSettings {
    pub url: Secret,
    pub prefix: String,
    pub queue_type: QueueType,
    pub prefetch: u16,
    pub delivery_limit: u32,
    /// The dead queue is an archive: its copies expire after this many days
    /// (0: never). The ledger is the list of what is dead.
    pub dead_ttl_days: f64,
    /// For `amqps://` URLs: a private CA and a client certificate.
    #[serde(default)]
    pub tls: BrokerTls,
}

/// TLS to RabbitMQ beyond the system's roots. Files are read at each
/// connection, so certificates rotated on disk are used at the next one.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerTls {
    /// PEM CA certificates trusted besides the system's.
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate (chain) for mutual TLS; needs `key_file`.
    pub cert_file: Option<std::path::PathBuf>,
    pub key_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Quorum,
    Classic,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: Secret,
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    pub step_attempts: u32,
    /// Rate-limit waits of one step in one run must end within this of its
    /// start; a wait that would not ends the step unfinished (the job comes
    /// back through the broker).
    pub step_budget_secs: f64,
    pub step_min_backoff_ms: u64,
    pub step_max_backoff_ms: u64,
    pub retry_delays_secs: Vec<f64>,
    pub late_track_window_secs: u64,
    pub shutdown_grace_secs: u64,
    pub lease_ttl_secs: f64,
    pub owner_busy_delay_ms: u64,
    /// How often each replica reads the pause flag: a pause takes effect
    /// within this (and a delivery that finds reaper paused waits
    /// `owner_busy_delay_ms` in the retry queue).
    pub pause_poll_ms: u64,
    pub max_replays: u32,
    /// How far ahead of reaper's clock a producer's `occurred_at` may be.
    pub max_clock_skew_secs: u64,
    /// Most resources one `provisioning.failed` may list.
    pub max_resources_per_event: usize,
    /// A message whose handling the ledger refused this many times in a row
    /// is dead-lettered instead of retried again.
    pub max_ledger_refusals: u32,
}

impl WorkerSettings {
    /// The broker retry schedule for jobs that cannot finish yet.
    pub fn retry_delays(&self) -> Vec<Duration> {
        self.retry_delays_secs.iter().map(|s| Duration::from_secs_f64(*s)).collect()
    }

    /// How long a message waits when the ledger is unreachable or the handler crashed.
    pub fn infra_delay(&self) -> Duration {
        self.retry_delays().first().copied().unwrap_or(Duration::from_secs(10))
    }

    pub fn busy_delay(&self) -> Duration {
        Duration::from_millis(self.owner_busy_delay_ms)
    }

    /// Every delay a message may be parked for: one retry queue each.
    pub fn all_delays(&self) -> Vec<Duration> {
        let mut d = self.retry_delays();
        d.push(self.infra_delay());
        d.push(self.busy_delay());
        d.sort();
        d.dedup_by_key(|x| x.as_millis());
        d
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    pub listen: String,
    pub token_env: String,
    pub token_file: String,
    /// How long a console login lasts.
    pub session_hours: f64,
    /// Mark the console's cookie `Secure` on every response, not only when a
    /// TLS-terminating proxy says `X-Forwarded-Proto: https`.
    pub secure_cookies: bool,
}

impl AdminSettings {
    /// The configured token, if any. Read at start-up; never logged.
    pub fn token(&self) -> Result<Option<Secret>, ConfigError> {
        if !self.token_file.is_empty() {
            let t = std::fs::read_to_string(&self.token_file)
                .map_err(|e| ConfigError::Invalid(format!("admin.token_file {}: {e}", self.token_file)))?;
            return Ok(Some(Secret::new(t.trim())).filter(|s| !s.expose().is_empty()));
        }
        if self.token_env.is_empty() {
            return Ok(None);
        }
        Ok(std::env::var(&self.token_env).ok().filter(|t| !t.is_empty()).map(Secret::new))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub filter: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ProviderSettings {
    Http(HttpProviderSettings),
    Postgres(PostgresProviderSettings),
    Mongodb(MongoProviderSettings),
}

impl Settings {
    /// Every URL can be read before anything connects: one that cannot is a
    /// configuration error naming its setting (never echoing it: it may hold
    /// a password).
    fn check_urls(&self) -> Result<(), ConfigError> {
        let uri: lapin::uri::AMQPUri = self.broker.url.expose().parse().map_err(|e| {
            ConfigError::Invalid(format!(
                "broker.url cannot be read as a URL ({e}); it looks like amqps://user:password@host:5671/vhost"
            ))
        })?;
        if uri.vhost.is_empty() {
            return Err(ConfigError::Invalid(
                "broker.url names the empty vhost: a URL ending in \"/\" means the vhost \"\"; \
                 leave the path out (or write %2f) for the default vhost \"/\", or name yours"
                    .into(),
            ));
        }
        let pg = |setting: &str, url: &str| pg_options(setting, url).map(|_| ());
        pg("database.url", self.database.url.expose())?;
        for (name, p) in &self.providers {
            match p {
                ProviderSettings::Postgres(p) => pg(&format!("providers.{name}.url"), p.url.expose())?,
                ProviderSettings::Http(h) => {
                    if let Some(ca) = &h.ca_file {
                        crate::tls::read_certs(&format!("providers.{name}.ca_file"), ca)
                            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
                    }
                }
                ProviderSettings::Mongodb(_) => {}
            }
        }
        self.broker.tls.check(uri.scheme == lapin::uri::AMQPScheme::AMQPS)
    }
}

impl BrokerTls {
    fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }

    fn check(&self, amqps: bool) -> Result<(), ConfigError> {
        if self.is_set() && !amqps {
            return Err(ConfigError::Invalid(
                "broker.tls is set but broker.url is amqp:// (plain TCP): TLS needs amqps:// (port 5671 by default)"
                    .into(),
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(ConfigError::Invalid(
                "broker.tls.cert_file and broker.tls.key_file go together: a client certificate needs its key".into(),
            ));
        }
        self.read().map(|_| ()).map_err(|e| ConfigError::Invalid(e.to_string()))
    }

    /// What lapin takes: the CA's PEM text and the client identity.
    pub fn read(&self) -> Result<lapin::tcp::OwnedTLSConfig, crate::tls::FileError> {
        use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
        let cert_chain = self.ca_file.as_ref().map(|f| crate::tls::read_certs("broker.tls.ca_file", f)).transpose()?;
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
                pem: crate::tls::read_certs("broker.tls.cert_file", cert)?.into_bytes(),
                key: crate::tls::read_key("broker.tls.key_file", key)?.into_bytes(),
            }),
            _ => None,
        };
        Ok(OwnedTLSConfig { identity, cert_chain })
    }
}

impl ProviderSettings {
    /// What `GET /v1/status` shows of a provider: its type, where it is (the
    /// URL's credentials redacted) and its limits; never a secret.
    pub fn summary(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            ProviderSettings::Http(h) => {
                json!({ "type": "http", "base_url": redact_url(&h.base_url), "max_concurrency": h.max_concurrency, "rate_per_sec": h.rate_per_sec, "auth": h.auth.is_some() })
            }
            ProviderSettings::Postgres(pg) => {
                json!({ "type": "postgres", "url": redact_url(pg.url.expose()), "max_connections": pg.max_connections })
            }
            ProviderSettings::Mongodb(m) => {
                json!({ "type": "mongodb", "url": redact_url(m.url.expose()), "database": m.database, "batch_size": m.batch_size })
            }
        }
    }

    /// Where the provider is (credentials redacted) and how many calls it
    /// takes at once, for `reaper check-config`.
    pub fn endpoint(&self) -> (String, usize) {
        let (url, max) = match self {
            ProviderSettings::Http(h) => (h.base_url.as_str(), h.max_concurrency),
            ProviderSettings::Postgres(pg) => (pg.url.expose(), pg.max_connections as usize),
            ProviderSettings::Mongodb(m) => (m.url.expose(), m.batch_size as usize),
        };
        (redact_url(url), max)
    }
}

/// An application's MongoDB database, where some kinds live as documents.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoProviderSettings {
    pub url: Secret,
    pub database: String,
    /// Documents read, archived and deleted per round trip.
    #[serde(default = "default_mongo_batch")]
    pub batch_size: u32,
    /// Longest one operation (a find, a batch's delete) may take; then it is
    /// a transient step error.
    #[serde(default = "default_call_timeout_ms")]
    pub timeout_ms: u64,
}

/// A provider call that takes longer than this has hung (a row lock, a
/// server that stopped answering): the step fails as transient.
fn default_call_timeout_ms() -> u64 {
    30_000
}

fn default_mongo_batch() -> u32 {
    1000
}

/// An application's own PostgreSQL database, where some kinds live as rows.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresProviderSettings {
    pub url: Secret,
    #[serde(default = "default_pg_connections")]
    pub max_connections: u32,
    #[serde(default = "default_pg_acquire_ms")]
    pub acquire_timeout_ms: u64,
    /// The server's statement_timeout for every statement reaper runs here
    /// (deletes, checks, guards, lookups); inventories are not bounded by it.
    #[serde(default = "default_call_timeout_ms")]
    pub timeout_ms: u64,
    /// The server's lock_timeout: how long a delete waits for a row another
    /// transaction holds before it fails (transient) and is retried later.
    #[serde(default = "default_pg_lock_timeout_ms")]
    pub lock_timeout_ms: u64,
}

fn default_pg_lock_timeout_ms() -> u64 {
    10_000
}

fn default_pg_connections() -> u32 {
    4
}
fn default_pg_acquire_ms() -> u64 {
    5_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProviderSettings {
    pub base_url: String,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// Requests per second against this API; none means unlimited.
    #[serde(default)]
    pub rate_per_sec: Option<f64>,
    #[serde(default)]
    pub auth: Option<AuthSettings>,
    /// PEM CA certificates trusted besides the system's, for an API behind a
    /// private CA.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

fn default_timeout_ms() -> u64 {
    10_000
}
fn default_connect_timeout_ms() -> u64 {
    2_000
}
fn default_max_concurrency() -> usize {
    16
}

/// Where the API token comes from. The token itself never sits in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    #[serde(default = "default_auth_header")]
    pub header: String,
    /// Put before the token, e.g. "Bearer"; empty for none.
    #[serde(default = "default_auth_scheme")]
    pub scheme: String,
    /// A token that does not change while reaper runs.
    #[serde(default)]
    pub token_env: Option<String>,
    /// Read again whenever the file changes (Kubernetes rotates projected tokens).
    #[serde(default)]
    pub token_file: Option<String>,
    /// A token from an OAuth2 token endpoint, refreshed before it expires.
    #[serde(default)]
    pub oauth2: Option<Box<OAuth2Settings>>,
    /// A command that prints a token (a kubectl credential plugin, `gcloud
    /// auth print-access-token`), run again after `token_ttl_secs`.
    #[serde(default)]
    pub token_command: Option<Vec<String>>,
    #[serde(default = "default_token_ttl_secs")]
    pub token_ttl_secs: f64,
    #[serde(default = "default_command_timeout_secs")]
    pub command_timeout_secs: f64,
}

/// A client-credentials grant, or (through `form` and `secret_field`) an
/// API-key exchange of the IAM kind. The secret comes from the environment
/// or a file, never the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Settings {
    pub token_url: String,
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub client_secret_env: Option<String>,
    #[serde(default)]
    pub client_secret_file: Option<String>,
    /// The form field the secret is sent in: `client_secret`, or `apikey` for an IAM exchange.
    #[serde(default = "default_secret_field")]
    pub secret_field: String,
    #[serde(default)]
    pub scope: Option<String>,
    /// More form fields; `grant_type` defaults to `client_credentials`.
    #[serde(default)]
    pub form: BTreeMap<String, String>,
}

fn default_token_ttl_secs() -> f64 {
    300.0
}
fn default_command_timeout_secs() -> f64 {
    10.0
}
fn default_secret_field() -> String {
    "client_secret".into()
}

fn default_auth_header() -> String {
    "Authorization".into()
}
fn default_auth_scheme() -> String {
    "Bearer".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindSettings {
    pub provider: String,
    /// "METHOD /path/{id}/{attr.NAME}": the request that deletes one resource.
    pub delete: String,
    /// "GET /path/{id}": answers 404/410 once the resource is gone.
    #[serde(default)]
    pub check: Option<String>,
    /// Kinds whose resources must all be gone before one of this kind is deleted.
    #[serde(default)]
    pub after: Vec<String>,
    /// SQL kinds: what binds to $1, $2, …: "id" or "attr.NAME" (default ["id"]).
    #[serde(default)]
    pub params: Option<Vec<String>>,
    /// Find this kind's resources in an application's own database when the
    /// owner goes, as well as (or instead of) what was tracked.
    #[serde(default)]
    pub lookup: Option<LookupSettings>,
    /// MongoDB kinds: the collection `delete` (a filter) applies to.
    #[serde(default)]
    pub collection: Option<String>,
    /// MongoDB kinds: set this field to the time instead of deleting the documents.
    #[serde(default)]
    pub soft_delete_field: Option<String>,
    /// Keep what is deleted (rows, documents) in the ledger for `reaper restore`.
    #[serde(default)]
    pub archive: bool,
    /// SQL kinds with `archive`: the table a restore inserts the rows back into.
    #[serde(default)]
    pub archive_table: Option<String>,
    /// A check that blocks the teardown while the resource is in use.
    #[serde(default)]
    pub guard: Option<GuardSettings>,
    /// The kind's ids are names that come back (a node's own row keyed by the
    /// node name): its lookup returns `created_at`, and its delete and check
    /// use `{attr.created_at}`, so one life's row is never taken for the next's.
    #[serde(default)]
    pub reused_ids: bool,
    /// "resource" (the default): the delete names one resource by its id.
    /// "whole": the delete is meant to act on more than the resource (a
    /// template without `{id}`); refused unless said.
    #[serde(default)]
    pub scope: Option<String>,
}

/// Where to find a kind's resources in an application's own store when the
/// owner goes. SQL: `SELECT … AS id, other_columns FROM … WHERE node_name = $1`
/// ($1 the owner's id, the part after "type/"; $2 the whole owner; every other
/// column an attribute; cast non-text columns with `::text`). MongoDB:
/// `collection` and `filter` (JSON whose string values "{owner_id}" or
/// "{owner}" are replaced whole), `id_field` the field that is the resource id.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupSettings {
    pub provider: String,
    /// The owners the query is about: "node" runs it for "node/n1" only.
    /// Required: without it, any owner whose id matched would be torn down.
    #[serde(default)]
    pub owner_type: Option<String>,
    #[serde(default)]
    pub sql: Option<String>,
    #[serde(default)]
    pub collection: Option<String>,
    #[serde(default)]
    pub filter: Option<String>,
    #[serde(default)]
    pub id_field: Option<String>,
    /// MongoDB: fields copied into the resource's attributes.
    #[serde(default)]
    pub attributes: Vec<String>,
}

/// "In use" check: SQL returning a row, a MongoDB filter matching a document,
/// or an HTTP GET answering 2xx means the resource must not go yet.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardSettings {
    pub provider: String,
    /// SQL, "GET /path/{id}", or a MongoDB filter (with `collection`).
    pub query: String,
    #[serde(default)]
    pub params: Option<Vec<String>>,
    #[serde(default)]
    pub collection: Option<String>,
    /// Said in the blocked outcome, e.g. "an active deployment uses this model".
    #[serde(default)]
    pub reason: Option<String>,
}

impl Settings {
    /// Defaults, then `file` if given, then `REAPER_*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let mut fig = Figment::from(Toml::string(DEFAULTS));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Invalid(format!("config file {} does not exist", file.display())));
            }
            fig = fig.merge(Toml::file(file));
        }
        // Only variables that name a known section: REAPER_ADMIN_TOKEN, a
        // provider's token variable or a test's REAPER_TEST_* share the prefix
        // and are not settings. Within a section, an unknown key is an error.
        let env = Env::prefixed("REAPER_").filter(|k| {
            let k = k.as_str().to_ascii_lowercase();
            k.split_once("__").is_some_and(|(section, _)| SECTIONS.contains(&section))
        });
        fig = fig.merge(env.split("__"));
        fig.extract().map_err(explain)
    }

    /// Defaults with `toml` merged over them; no environment. For tests and the demo.
    pub fn from_toml(toml: &str) -> Result<Settings, ConfigError> {
        Settings::from_toml_layers(&[toml])
    }

    /// Defaults with each layer merged over the one before; no environment.
    pub fn from_toml_layers(layers: &[&str]) -> Result<Settings, ConfigError> {
        let mut fig = Figment::from(Toml::string(DEFAULTS));
        for l in layers {
            fig = fig.merge(Toml::string(l));
        }
        fig.extract().map_err(explain)
    }

    /// Checks the settings' own values (the kinds and reconcile rules are
    /// checked by `catalog::validate`, which calls this first).
    pub fn check_values(&self) -> Result<(), ConfigError> {
        self.check_urls()?;
        let prefix_ok = !self.broker.prefix.is_empty()
            && self.broker.prefix.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !prefix_ok {
            return Err(ConfigError::Invalid(format!(
                "broker.prefix {:?} must be non-empty ASCII letters, digits, '-', '_' or '.'",
                self.broker.prefix
            )));
        }
        if self.broker.prefix.len() > 200 {
            return Err(ConfigError::Invalid("broker.prefix must be at most 200 bytes (AMQP names hold 255)".into()));
        }
        if !(self.worker.lease_ttl_secs.is_finite() && self.worker.lease_ttl_secs > 0.0) {
            return Err(ConfigError::Invalid("worker.lease_ttl_secs must be a positive number".into()));
        }
        if self.worker.max_clock_skew_secs > 366 * 24 * 3600 {
            return Err(ConfigError::Invalid("worker.max_clock_skew_secs must be at most a year".into()));
        }
        if self.worker.max_resources_per_event == 0 || self.worker.max_ledger_refusals == 0 {
            return Err(ConfigError::Invalid(
                "worker.max_resources_per_event and worker.max_ledger_refusals must be at least 1".into(),
            ));
        }
        if self.broker.prefetch == 0 {
            return Err(ConfigError::Invalid("broker.prefetch must be at least 1".into()));
        }
        if self.worker.step_attempts == 0 {
            return Err(ConfigError::Invalid("worker.step_attempts must be at least 1".into()));
        }
        let budget = self.worker.step_budget_secs;
        if !(budget.is_finite() && budget > 0.0 && budget <= 86_400.0) {
            return Err(ConfigError::Invalid(
                "worker.step_budget_secs must be more than 0 and at most 86400 (a day)".into(),
            ));
        }
        if self.worker.retry_delays_secs.iter().any(|d| !d.is_finite() || *d < 0.0 || *d > 366.0 * 24.0 * 3600.0) {
            return Err(ConfigError::Invalid(
                "worker.retry_delays_secs must be non-negative numbers of seconds, at most a year".into(),
            ));
        }
        for (name, p) in &self.providers {
            let ProviderSettings::Http(h) = p else { continue };
            if !(h.base_url.starts_with("http://") || h.base_url.starts_with("https://")) {
                return Err(ConfigError::Provider {
                    provider: name.clone(),
                    message: format!("base_url {:?} must start with http:// or https://", h.base_url),
                });
            }
            if h.max_concurrency == 0 {
                return Err(ConfigError::Provider {
                    provider: name.clone(),
                    message: "max_concurrency must be at least 1".into(),
                });
            }
            if matches!(h.rate_per_sec, Some(r) if !(r > 0.0 && r.is_finite())) {
                return Err(ConfigError::Provider {
                    provider: name.clone(),
                    message: "rate_per_sec must be a positive number".into(),
                });
            }
        }
        let hours = self.admin.session_hours;
        if !(hours.is_finite() && hours > 0.0 && hours <= 24.0 * 7.0) {
            return Err(ConfigError::Invalid(format!(
                "admin.session_hours must be more than 0 and at most 168 (a week), not {hours}"
            )));
        }
        if self.archive.retention_days.is_nan() || self.archive.retention_days <= 0.0 {
            return Err(ConfigError::Invalid("archive.retention_days must be positive".into()));
        }
        // RabbitMQ's x-message-ttl is at most 2^32 - 1 ms, 49.7 days.
        if !(0.0..=49.0).contains(&self.broker.dead_ttl_days) {
            return Err(ConfigError::Invalid(format!(
                "broker.dead_ttl_days ({}) must be between 0 (copies kept forever) and 49 (RabbitMQ's longest message TTL)",
                self.broker.dead_ttl_days
            )));
        }
        if self.ledger.retention_days.is_nan() || self.ledger.retention_days < self.archive.retention_days {
            return Err(ConfigError::Invalid(format!(
                "ledger.retention_days ({}) must be at least archive.retention_days ({}): restoring an archived record needs its job",
                self.ledger.retention_days, self.archive.retention_days
            )));
        }
        Ok(())
    }
}

/// A PostgreSQL URL as the ledger and `postgres` providers connect with it.
/// libpq's rule is kept where sqlx differs: `sslrootcert` with
/// `sslmode=require` verifies the server's certificate against that CA
/// (sqlx alone would accept any). The certificate and key files the URL names
/// must be readable PEM: a configuration error naming `setting` otherwise.
pub fn pg_options(setting: &str, url: &str) -> Result<sqlx::postgres::PgConnectOptions, ConfigError> {
    use sqlx::postgres::{PgConnectOptions, PgSslMode};
    let opts: PgConnectOptions = url.parse().map_err(|e| {
        ConfigError::Invalid(format!(
            "{setting} cannot be read as a PostgreSQL URL ({e}); it looks like postgres://user:password@host:5432/database"
        ))
    })?;
    let query: BTreeMap<String, String> = url
        .split_once('?')
        .map(|(_, q)| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), percent_encoding::percent_decode_str(v).decode_utf8_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    let param = |k: &str| query.get(k).or_else(|| query.get(&k.replace("ssl", "ssl-")));
    let file_error = |e: crate::tls::FileError| ConfigError::Invalid(format!("{setting}: {e}"));
    if let Some(ca) = param("sslrootcert") {
        crate::tls::read_certs("sslrootcert", std::path::Path::new(ca)).map_err(file_error)?;
    }
    if let Some(cert) = param("sslcert") {
        crate::tls::read_certs("sslcert", std::path::Path::new(cert)).map_err(file_error)?;
    }
    if let Some(key) = param("sslkey") {
        crate::tls::read_key("sslkey", std::path::Path::new(key)).map_err(file_error)?;
    }
    let require = param("sslmode").is_some_and(|m| m == "require");
    Ok(if require && param("sslrootcert").is_some() { opts.ssl_mode(PgSslMode::VerifyCa) } else { opts })
}

/// `scheme://user:password@host/...?query` → `scheme://host/...`, for log
/// lines. The credentials end at the *last* `@` (a password may hold `/`,
/// `?` or `@` unencoded, as drivers accept), and the query goes too (it may
/// carry a password or a key).
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let rest = match rest.rsplit_once('@') {
                Some((_, after)) => after,
                None => rest,
            };
            let rest = rest.split(['?', '#']).next().unwrap_or("");
            format!("{scheme}://{rest}")
        }
        None => "[unparseable url]".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_urls_never_hold_any_part_of_a_password() {
        for (url, shown) in [
            ("mongodb://u:pa/ss@h:27017/db?tls=true", "mongodb://h:27017/db"),
            (
                "postgres://u:p@ss?w/rd@db.internal:5432/reaper?sslmode=verify-full",
                "postgres://db.internal:5432/reaper",
            ),
            ("amqps://u:p%2Fw@mq:5671/%2f", "amqps://mq:5671/%2f"),
            ("https://api.example.com/v1?apikey=k", "https://api.example.com/v1"),
            ("http://127.0.0.1:8089", "http://127.0.0.1:8089"),
            ("https://iam.example.com?apikey=K", "https://iam.example.com"),
            ("postgres://h?password=p", "postgres://h"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn the_ledger_keeps_jobs_at_least_as_long_as_the_archive_needs_them() {
        let s = Settings::from_toml("[archive]\nretention_days = 60\n").unwrap();
        let e = s.check_values().unwrap_err().to_string();
        assert!(e.contains("ledger.retention_days (30) must be at least archive.retention_days (60)"), "{e}");
        let s = Settings::from_toml("[archive]\nretention_days = 60\n[ledger]\nretention_days = 90\n").unwrap();
        assert!(s.check_values().is_ok());
    }

    fn kinds(toml: &str) -> Result<crate::catalog::Catalog, ConfigError> {
        crate::catalog::validate(&Settings::from_toml(toml).unwrap())
    }

    const PROVIDER: &str = "[providers.p]\ntype = \"http\"\nbase_url = \"http://x\"\n";

    #[test]
    fn a_cycle_is_named_kind_by_kind() {
        let err = kinds(&format!(
            "{PROVIDER}[kinds.a]\nprovider=\"p\"\ndelete=\"DELETE /a/{{id}}\"\nafter=[\"b\"]\n\
             [kinds.b]\nprovider=\"p\"\ndelete=\"DELETE /b/{{id}}\"\nafter=[\"c\"]\n\
             [kinds.c]\nprovider=\"p\"\ndelete=\"DELETE /c/{{id}}\"\nafter=[\"a\"]\n"
        ))
        .unwrap_err();
        assert_eq!(err.to_string(), "kinds form a cycle through `after`: a -> b -> c -> a");
    }

    #[test]
    fn unknown_provider_and_after_are_refused() {
        let e = kinds("[kinds.a]\nprovider=\"nope\"\ndelete=\"DELETE /a/{id}\"\n").unwrap_err();
        assert!(e.to_string().contains("provider \"nope\" is not configured"), "{e}");
        let e = kinds(&format!("{PROVIDER}[kinds.a]\nprovider=\"p\"\ndelete=\"DELETE /a/{{id}}\"\nafter=[\"zz\"]\n"))
            .unwrap_err();
        assert!(e.to_string().contains("after names \"zz\""), "{e}");
    }

    #[test]
    fn the_vpc_example_config_is_valid() {
        let c = kinds(include_str!("../config/vpc-node.toml")).unwrap();
        assert_eq!(c.kind_names(), ["bare_metal_server", "dns_record", "ip_reservation", "vni"]);
        let ip = c.kind("ip_reservation").unwrap();
        assert_eq!(ip.required_attributes.iter().collect::<Vec<_>>(), ["subnet_id"]);
    }

    #[test]
    fn new_features_refuse_what_cannot_work_with_a_reason() {
        let http_archive = format!("{PROVIDER}[kinds.a]\nprovider=\"p\"\ndelete=\"DELETE /a/{{id}}\"\narchive=true\n");
        let e = kinds(&http_archive).unwrap_err().to_string();
        assert!(e.contains("a cloud deletion cannot be undone"), "{e}");
        let mongo = "[providers.m]\ntype=\"mongodb\"\nurl=\"mongodb://h\"\ndatabase=\"d\"\n";
        let e =
            kinds(&format!("{mongo}[kinds.a]\nprovider=\"m\"\ncollection=\"c\"\ndelete='{{\"a\": \"x-{{id}}\"}}'\n"))
                .unwrap_err()
                .to_string();
        assert!(e.contains("a placeholder must be the whole string value"), "{e}");
        let e = kinds(&format!("{mongo}[kinds.a]\nprovider=\"m\"\ndelete='{{\"a\": \"{{id}}\"}}'\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs `collection`"), "{e}");
        let rule = |extra: &str| {
            format!(
                "{PROVIDER}[kinds.a]\nprovider=\"p\"\ndelete=\"DELETE /a/{{id}}\"\n\
                 [reconcile.rules.r]\ncopy = {{ provider = \"ledger\", kind = \"a\" }}\n{extra}"
            )
        };
        let e = kinds(&rule("action = { kind = \"nope\" }")).unwrap_err().to_string();
        assert!(e.contains("action.kind \"nope\" is not a configured kind"), "{e}");
        let e = kinds(&rule("action = { kind = \"a\" }\nevery_secs = 5")).unwrap_err().to_string();
        assert!(e.contains("below reconcile.min_interval_secs 60"), "{e}");
        let e = kinds(&rule("action = { kind = \"a\" }\nmax_fraction = 2.0")).unwrap_err().to_string();
        assert!(e.contains("max_fraction must be in (0, 1]"), "{e}");
        assert!(kinds(&rule("action = { kind = \"a\" }")).is_ok());
        let e = kinds(&rule("action = { kind = \"a\" }\nschedule = \"0 4 * *\"")).unwrap_err().to_string();
        assert!(e.contains("is not a cron pattern"), "{e}");
        let e = kinds(&rule("action = { kind = \"a\" }\nschedule = \"*/10 * * * * *\"")).unwrap_err().to_string();
        assert!(e.contains("runs 10s apart, below reconcile.min_interval_secs 60"), "{e}");
        let e = kinds(&rule("action = { kind = \"a\" }\nschedule = \"0 4 * * *\"\nevery_secs = 3600"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("give every_secs or schedule, not both"), "{e}");
        assert!(kinds(&rule("action = { kind = \"a\" }\nschedule = \"0 4 * * *\"\nenabled = false")).is_ok());
        let pg = "[providers.db]\ntype=\"postgres\"\nurl=\"postgres://h/d\"\n";
        let lookup = |extra: &str| {
            format!("{PROVIDER}{pg}[kinds.a]\nprovider=\"p\"\ndelete=\"DELETE /a/{{id}}\"\nlookup = {{ provider = \"db\", sql = \"SELECT x AS id FROM t WHERE n = $1\"{extra} }}\n")
        };
        let e = kinds(&lookup("")).unwrap_err().to_string();
        assert!(e.contains("lookup needs owner_type"), "{e}");
        assert!(kinds(&lookup(", owner_type = \"node\"")).is_ok());
    }

    #[test]
    fn every_example_config_is_valid() {
        for (name, text) in [
            ("model-registry-sync", include_str!("../examples/model-registry-sync/reaper.toml")),
            ("ml-model-registry", include_str!("../examples/ml-model-registry/reaper.toml")),
            ("cross-db-mongodb", include_str!("../examples/cross-db-mongodb/reaper.toml")),
            ("ghost-containers", include_str!("../examples/ghost-containers/reaper.toml")),
            ("vpc-node", include_str!("../examples/vpc-node/reaper.toml")),
        ] {
            let s = Settings::from_toml(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            crate::catalog::validate(&s).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!s.reconcile.rules.is_empty(), "{name} has a reconcile rule");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Settings::from_toml("[database]\nurl = \"postgres://u:hunter2@h/db\"\n").unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(redact_url("amqp://guest:pw@127.0.0.1:5672/%2f"), "amqp://127.0.0.1:5672/%2f");
    }
}
