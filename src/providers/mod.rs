//! Providers delete one resource and say whether it still exists. Every provider
//! is idempotent: a resource that is already gone counts as done.

pub mod http;
pub mod postgres;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{KindSpec, ProviderSettings};
use crate::domain::Resource;

/// How one provider call failed, in the terms the retry policy needs.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StepError {
    /// 409/423: something that must go first still exists. Retry later.
    #[error("{status} from the API: a dependency still exists ({detail})")]
    NotYet { status: u16, detail: String },
    /// 429: the whole provider slows down for `retry_after`.
    #[error("429 rate limited (retry after {retry_after:?})")]
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
}

/// How a kind deletes (or checks) one resource, in its provider's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Http(http::RequestTemplate),
    Sql(postgres::SqlTemplate),
}

impl Action {
    pub fn http(&self) -> Option<&http::RequestTemplate> {
        match self {
            Action::Http(t) => Some(t),
            Action::Sql(_) => None,
        }
    }

    pub fn sql(&self) -> Option<&postgres::SqlTemplate> {
        match self {
            Action::Sql(t) => Some(t),
            Action::Http(_) => None,
        }
    }

    /// Attributes a resource must carry for this action.
    pub fn attributes(&self) -> Vec<String> {
        match self {
            Action::Http(t) => t.attributes().collect(),
            Action::Sql(t) => t.attributes().collect(),
        }
    }
}

impl Provider {
    pub async fn delete(&self, kind: &KindSpec, r: &Resource) -> Result<Deleted, StepError> {
        match self {
            Provider::Http(p) => p.delete(kind, r).await,
            Provider::Postgres(p) => p.delete(kind, r).await,
        }
    }

    /// `None` when the kind has no check configured.
    pub async fn exists(&self, kind: &KindSpec, r: &Resource) -> Result<Option<bool>, StepError> {
        match self {
            Provider::Http(p) => p.exists(kind, r).await,
            Provider::Postgres(p) => p.exists(kind, r).await,
        }
    }
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
    pub fn build(settings: &std::collections::BTreeMap<String, ProviderSettings>) -> Result<Providers, ProviderError> {
        let mut by_name = HashMap::new();
        for (name, s) in settings {
            let p = match s {
                ProviderSettings::Http(h) => Provider::Http(Box::new(http::HttpProvider::build(name, h)?)),
                ProviderSettings::Postgres(pg) => Provider::Postgres(postgres::PostgresProvider::build(name, pg)?),
            };
            by_name.insert(name.clone(), Arc::new(p));
        }
        Ok(Providers { by_name })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Provider>> {
        self.by_name.get(name)
    }
}
