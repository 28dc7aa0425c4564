//! Providers delete one resource and say whether it still exists. Every provider
//! is idempotent: a resource that is already gone counts as done.

pub mod http;
pub mod mongo;
pub mod postgres;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::ProviderSettings;
use crate::domain::Resource;
use futures_util::future::BoxFuture;

/// How one provider call failed, in the terms the retry policy needs.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StepError {
    /// 409/423: something that must go first still exists. Retry later.
    #[error("{status} from the API: a dependency still exists ({detail})")]
    NotYet { status: u16, detail: String },
    /// 429: the whole provider slows down for `retry_after`.
    #[error("429 rate limited ({})", retry_after.map_or("no Retry-After".to_string(), |d| format!("retry after {}", crate::domain::human(d))))]
    RateLimited { retry_after: Option<Duration> },
    /// 5xx, timeouts, refused connections.
    #[error("transient: {0}")]
    Transient(String),
    /// The delete was accepted but the check still finds the resource.
    #[error("still exists after its delete was accepted")]
    StillThere,
    /// Other 4xx, or a request that cannot be built: retrying will not help.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl StepError {
    pub fn is_retryable(&self) -> bool {
        !matches!(self, StepError::Permanent(_))
    }
}

/// What a successful delete call found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    Now,
    AlreadyGone,
}

pub enum Provider {
    Http(Box<http::HttpProvider>),
    Postgres(postgres::PostgresProvider),
    Mongo(mongo::MongoProvider),
}

/// How a kind deletes (or checks, or guards) one resource, in its provider's terms.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Http(http::RequestTemplate),
    Sql(postgres::SqlTemplate),
    Mongo(mongo::MongoTemplate),
}

impl Action {
    /// `text` in the provider's language: "METHOD /path", SQL, or a filter.
    pub fn parse(
        provider: &ProviderSettings,
        text: &str,
        params: &[String],
        exact: bool,
        collection: Option<&str>,
        soft_delete_field: Option<&str>,
    ) -> Result<Action, String> {
        match provider {
            ProviderSettings::Http(_) => http::RequestTemplate::parse(text).map(Action::Http),
            ProviderSettings::Postgres(_) => postgres::SqlTemplate::parse(text, params, exact).map(Action::Sql),
            ProviderSettings::Mongodb(_) => {
                let c = collection.ok_or("a mongodb kind needs `collection`")?;
                mongo::MongoTemplate::parse(c, text, soft_delete_field, false).map(Action::Mongo)
            }
        }
    }

    pub fn http(&self) -> Option<&http::RequestTemplate> {
        match self {
            Action::Http(t) => Some(t),
            _ => None,
        }
    }

    /// Whether the action names one resource by its id. One that does not
    /// acts on the same thing for every resource of its kind.
    pub fn uses_id(&self) -> bool {
        match self {
            Action::Http(t) => t.uses_id(),
            Action::Sql(t) => t.uses_id(),
            Action::Mongo(t) => t.uses_id(),
        }
    }

    /// Attributes a resource must carry for this action.
    pub fn attributes(&self) -> Vec<String> {
        match self {
            Action::Http(t) => t.attributes().collect(),
            Action::Sql(t) => t.attributes().collect(),
            Action::Mongo(t) => t.attributes(),
        }
    }
}

/// Where a provider keeps what it is about to delete, before it deletes it.
/// The executor hands one in for an archived kind (the job's archive in the
/// ledger); providers only know this much of it.
pub trait Archive: Sync {
    fn keep<'a>(&'a self, records: &'a [serde_json::Value]) -> BoxFuture<'a, Result<(), StepError>>;
}

impl Provider {
    /// Runs a kind's delete for one resource.
    pub async fn delete(
        &self,
        delete: &Action,
        r: &Resource,
        archive: Option<&dyn Archive>,
    ) -> Result<Deleted, StepError> {
        match (self, delete) {
            (Provider::Http(p), Action::Http(t)) => p.delete(t, r).await,
            (Provider::Postgres(p), Action::Sql(t)) => {
                within(p.deadline(), "the delete", p.delete(t, r, archive)).await
            }
            (Provider::Mongo(p), Action::Mongo(t)) => p.delete(t, r, archive).await,
            _ => Err(StepError::Permanent(format!("kind {}: its delete does not fit its provider", r.kind))),
        }
    }

    /// Whether the resource still exists; `None` when nothing can tell (an
    /// HTTP or SQL kind without a check). A MongoDB kind's filter is its check.
    pub async fn exists(
        &self,
        check: Option<&Action>,
        delete: &Action,
        r: &Resource,
    ) -> Result<Option<bool>, StepError> {
        match (check, delete) {
            (Some(c), _) => self.probe(c, r).await.map(Some),
            (None, a @ Action::Mongo(_)) => self.probe(a, r).await.map(Some),
            (None, _) => Ok(None),
        }
    }

    /// Runs a check or guard: true when the thing exists (is in use).
    pub async fn probe(&self, action: &Action, r: &Resource) -> Result<bool, StepError> {
        match (self, action) {
            (Provider::Http(p), Action::Http(t)) => p.probe(t, r).await,
            (Provider::Postgres(p), Action::Sql(t)) => within(p.deadline(), "the check", p.probe(t, r)).await,
            (Provider::Mongo(p), Action::Mongo(t)) => p.probe(t, r).await,
            _ => Err(StepError::Permanent("a check does not fit its provider".into())),
        }
    }
}

/// A call bounded by the provider's deadline. Every call has one: HTTP's is
/// the client's request timeout, MongoDB's each operation's `timeout_ms`, and
/// PostgreSQL's the server's statement and lock timeouts with this as the
/// backstop for a server that stopped answering.
pub async fn within<T>(
    deadline: Duration,
    what: &str,
    call: impl std::future::Future<Output = Result<T, StepError>>,
) -> Result<T, StepError> {
    tokio::time::timeout(deadline, call).await.unwrap_or_else(|_| {
        Err(StepError::Transient(format!("{what} got no answer within {}", crate::domain::human(deadline))))
    })
}

/// One client per configured provider, built once at start-up.
#[derive(Clone, Default)]
pub struct Providers {
    by_name: HashMap<String, Arc<Provider>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("provider {provider:?}: {message}")]
    Build { provider: String, message: String },
}

impl Providers {
    /// Builds every client; nothing connects yet.
    pub async fn build(
        settings: &std::collections::BTreeMap<String, ProviderSettings>,
    ) -> Result<Providers, ProviderError> {
        let mut by_name = HashMap::new();
        for (name, s) in settings {
            let p = match s {
                ProviderSettings::Http(h) => Provider::Http(Box::new(http::HttpProvider::build(name, h)?)),
                ProviderSettings::Postgres(pg) => Provider::Postgres(postgres::PostgresProvider::build(name, pg)?),
                ProviderSettings::Mongodb(m) => Provider::Mongo(mongo::MongoProvider::build(name, m).await?),
            };
            by_name.insert(name.clone(), Arc::new(p));
        }
        Ok(Providers { by_name })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Provider>> {
        self.by_name.get(name)
    }
}
