//! Settings: defaults (config/default.toml) → file → environment, then validated
//! into a [`Catalog`] of resource kinds whose order is known to be acyclic.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;

use crate::providers::http::RequestTemplate;
use crate::providers::postgres::SqlTemplate;
use crate::providers::Action;

const DEFAULTS: &str = include_str!("../config/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading configuration: {0}")]
    Load(#[from] Box<figment::Error>),
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

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Debug, Clone, Deserialize)]
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
}

#[derive(Debug, Clone, Deserialize)]
pub struct BrokerSettings {
    pub url: Secret,
    pub prefix: String,
    pub queue_type: QueueType,
    pub prefetch: u16,
    pub delivery_limit: u32,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Quorum,
    Classic,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    pub url: Secret,
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WorkerSettings {
    pub step_attempts: u32,
    pub step_min_backoff_ms: u64,
    pub step_max_backoff_ms: u64,
    pub retry_delays_secs: Vec<f64>,
    pub late_track_window_secs: u64,
    pub shutdown_grace_secs: u64,
    pub lease_ttl_secs: f64,
    pub owner_busy_delay_ms: u64,
    pub max_replays: u32,
}

impl Settings {
    /// Connects to the ledger with the worker's late-track window and lease time.
    pub async fn ledger(&self) -> Result<crate::ledger::Ledger, crate::ledger::LedgerError> {
        crate::ledger::Ledger::connect(
            &self.database,
            Duration::from_secs(self.worker.late_track_window_secs),
            Duration::from_secs_f64(self.worker.lease_ttl_secs),
        )
        .await
    }
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
pub struct AdminSettings {
    pub listen: String,
    pub token_env: String,
    pub token_file: String,
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
}

/// An application's own PostgreSQL database, where some kinds live as rows.
#[derive(Debug, Clone, Deserialize)]
pub struct PostgresProviderSettings {
    pub url: Secret,
    #[serde(default = "default_pg_connections")]
    pub max_connections: u32,
    #[serde(default = "default_pg_acquire_ms")]
    pub acquire_timeout_ms: u64,
}

fn default_pg_connections() -> u32 {
    4
}
fn default_pg_acquire_ms() -> u64 {
    5_000
}

#[derive(Debug, Clone, Deserialize)]
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
pub struct AuthSettings {
    #[serde(default = "default_auth_header")]
    pub header: String,
    /// Put before the token, e.g. "Bearer"; empty for none.
    #[serde(default = "default_auth_scheme")]
    pub scheme: String,
    #[serde(default)]
    pub token_env: Option<String>,
    #[serde(default)]
    pub token_file: Option<String>,
}

fn default_auth_header() -> String {
    "Authorization".into()
}
fn default_auth_scheme() -> String {
    "Bearer".into()
}

#[derive(Debug, Clone, Deserialize)]
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
}

/// `SELECT … AS id, other_columns FROM … WHERE node_name = $1`: $1 is the
/// owner's id (the part after "type/"), $2 the whole owner. Every other column
/// becomes an attribute; cast non-text columns (`::text`).
#[derive(Debug, Clone, Deserialize)]
pub struct LookupSettings {
    pub provider: String,
    pub sql: String,
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
        fig = fig.merge(Env::prefixed("REAPER_").split("__").ignore(&["config"]));
        fig.extract().map_err(|e| ConfigError::Load(Box::new(e)))
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
        fig.extract().map_err(|e| ConfigError::Load(Box::new(e)))
    }

    /// Checks everything that can be checked without I/O.
    pub fn validate(&self) -> Result<Catalog, ConfigError> {
        let prefix_ok = !self.broker.prefix.is_empty()
            && self.broker.prefix.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !prefix_ok {
            return Err(ConfigError::Invalid(format!(
                "broker.prefix {:?} must be non-empty ASCII letters, digits, '-', '_' or '.'",
                self.broker.prefix
            )));
        }
        if self.broker.prefetch == 0 {
            return Err(ConfigError::Invalid("broker.prefetch must be at least 1".into()));
        }
        if self.worker.step_attempts == 0 {
            return Err(ConfigError::Invalid("worker.step_attempts must be at least 1".into()));
        }
        if self.worker.retry_delays_secs.iter().any(|d| !d.is_finite() || *d < 0.0) {
            return Err(ConfigError::Invalid("worker.retry_delays_secs must be non-negative numbers".into()));
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
        Catalog::build(&self.kinds, &self.providers)
    }
}

/// The configured kinds, checked: every provider exists, every template parses,
/// every `after` names a kind, and `after` has no cycle.
#[derive(Debug, Clone)]
pub struct Catalog {
    kinds: BTreeMap<String, KindSpec>,
}

#[derive(Debug, Clone)]
pub struct KindSpec {
    pub name: String,
    pub provider: String,
    pub delete: Action,
    pub check: Option<Action>,
    pub after: Vec<String>,
    /// Attributes the templates use: a tracked resource without them is refused.
    pub required_attributes: BTreeSet<String>,
    pub lookup: Option<LookupSettings>,
}

impl KindSpec {
    pub fn missing_attribute(&self, attrs: &BTreeMap<String, String>) -> Option<&str> {
        self.required_attributes.iter().find(|a| !attrs.contains_key(*a)).map(|s| s.as_str())
    }
}

impl Catalog {
    pub fn build(
        kinds: &BTreeMap<String, KindSettings>,
        providers: &BTreeMap<String, ProviderSettings>,
    ) -> Result<Catalog, ConfigError> {
        let mut out = BTreeMap::new();
        for (name, k) in kinds {
            let err = |message: String| ConfigError::Kind { kind: name.clone(), message };
            if !providers.contains_key(&k.provider) {
                return Err(err(format!("provider {:?} is not configured", k.provider)));
            }
            let parse = |what: &str, text: &str| -> Result<Action, ConfigError> {
                match &providers[&k.provider] {
                    ProviderSettings::Http(_) => RequestTemplate::parse(text).map(Action::Http),
                    ProviderSettings::Postgres(_) => {
                        SqlTemplate::parse(text, k.params.as_deref().unwrap_or(&["id".to_string()]), what == "delete")
                            .map(Action::Sql)
                    }
                }
                .map_err(|e| err(format!("{what}: {e}")))
            };
            let delete = parse("delete", &k.delete)?;
            let check = k.check.as_deref().map(|c| parse("check", c)).transpose()?;
            if let Some(l) = &k.lookup {
                if !matches!(providers.get(&l.provider), Some(ProviderSettings::Postgres(_))) {
                    return Err(err(format!("lookup.provider {:?} is not a configured postgres provider", l.provider)));
                }
                if crate::providers::postgres::placeholders(&l.sql) > 2 {
                    return Err(err("lookup.sql may use $1 (the owner's id) and $2 (the whole owner), no more".into()));
                }
            }
            for a in &k.after {
                if !kinds.contains_key(a) {
                    return Err(err(format!("after names {a:?}, which is not a configured kind")));
                }
            }
            let mut required_attributes: BTreeSet<String> = delete.attributes().into_iter().collect();
            if let Some(c) = &check {
                required_attributes.extend(c.attributes());
            }
            out.insert(
                name.clone(),
                KindSpec {
                    name: name.clone(),
                    provider: k.provider.clone(),
                    delete,
                    check,
                    after: k.after.clone(),
                    required_attributes,
                    lookup: k.lookup.clone(),
                },
            );
        }
        let catalog = Catalog { kinds: out };
        if let Some(cycle) = catalog.find_cycle() {
            return Err(ConfigError::Cycle(cycle.join(" -> ")));
        }
        Ok(catalog)
    }

    pub fn kind(&self, name: &str) -> Option<&KindSpec> {
        self.kinds.get(name)
    }

    pub fn kind_names(&self) -> Vec<&str> {
        self.kinds.keys().map(|s| s.as_str()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }

    /// Kinds that look their resources up in an application's database.
    pub fn lookups(&self) -> impl Iterator<Item = &KindSpec> {
        self.kinds.values().filter(|k| k.lookup.is_some())
    }

    /// A cycle in `after`, as the list of kinds around it (first repeated last).
    fn find_cycle(&self) -> Option<Vec<String>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            Open,
            Done,
        }
        fn visit<'a>(
            c: &'a Catalog,
            k: &'a str,
            marks: &mut BTreeMap<&'a str, Mark>,
            path: &mut Vec<&'a str>,
        ) -> Option<Vec<String>> {
            match marks.get(k).copied().unwrap_or(Mark::New) {
                Mark::Done => return None,
                Mark::Open => {
                    let start = path.iter().position(|p| *p == k).unwrap_or(0);
                    let mut cycle: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
                    cycle.push(k.to_string());
                    return Some(cycle);
                }
                Mark::New => {}
            }
            marks.insert(k, Mark::Open);
            path.push(k);
            for a in &c.kinds[k].after {
                if let Some(cycle) = visit(c, a, marks, path) {
                    return Some(cycle);
                }
            }
            path.pop();
            marks.insert(k, Mark::Done);
            None
        }
        let mut marks = BTreeMap::new();
        for k in self.kinds.keys() {
            if let Some(cycle) = visit(self, k, &mut marks, &mut Vec::new()) {
                return Some(cycle);
            }
        }
        None
    }
}

/// `scheme://user:password@host/...` → `scheme://host/...`, for log lines.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_once('/').map(|(a, p)| (a, Some(p))).unwrap_or((rest, None));
            let host = authority.rsplit_once('@').map(|(_, h)| h).unwrap_or(authority);
            match path {
                Some(p) => format!("{scheme}://{host}/{}", p.split('?').next().unwrap_or("")),
                None => format!("{scheme}://{host}"),
            }
        }
        None => "[unparseable url]".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(toml: &str) -> Result<Catalog, ConfigError> {
        Settings::from_toml(toml).unwrap().validate()
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
    fn secrets_do_not_print() {
        let s = Settings::from_toml("[database]\nurl = \"postgres://u:hunter2@h/db\"\n").unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(redact_url("amqp://guest:pw@127.0.0.1:5672/%2f"), "amqp://127.0.0.1:5672/%2f");
    }
}
