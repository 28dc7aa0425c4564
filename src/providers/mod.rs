//! Providers delete one resource and say whether it still exists. Every provider
//! is idempotent: a resource that is already gone counts as done.

pub mod credentials;
pub mod http;
pub mod listing;
pub mod mongo;
pub mod postgres;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::reconcile::InventorySettings;
use crate::config::{LookupSettings, ProviderSettings};
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
    Postgres(Box<postgres::PostgresProvider>),
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

    /// The request a plan shows for `r`: the HTTP call with the provider's
    /// base URL (credentials redacted), the SQL with the values it will be
    /// bound to, or the MongoDB call with its filter.
    pub fn describe(&self, provider: Option<&ProviderSettings>, r: &Resource) -> Result<String, String> {
        match self {
            Action::Http(t) => {
                let base = match provider {
                    Some(ProviderSettings::Http(h)) => Some(h),
                    _ => None,
                };
                t.describe(base, r)
            }
            Action::Sql(t) => t.describe(r),
            Action::Mongo(t) => t.describe(r),
        }
    }

    /// Where what this action deletes can be kept, to be put back by
    /// `reaper restore`; an error says why it cannot be.
    pub fn archive_target(&self, archive_table: Option<&str>) -> Result<ArchiveSpec, String> {
        match self {
            Action::Http(_) => Err("archive: a cloud deletion cannot be undone, so it cannot be archived; \
                                    archive is for database rows and documents"
                .into()),
            Action::Sql(t) => t.archive_target(archive_table).map(ArchiveSpec::Table),
            Action::Mongo(t) => t.archive_target().map(ArchiveSpec::Collection),
        }
    }

    /// Whether what this action deleted is gone for good whatever reaper
    /// keeps: a call to an API, which nothing can undo.
    pub fn cannot_be_undone(&self) -> bool {
        matches!(self, Action::Http(_))
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

/// Where a restore puts archived records back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchiveSpec {
    /// Rows: `INSERT INTO table SELECT * FROM json_populate_record(...)`.
    Table(String),
    /// Documents: inserted back into the collection.
    Collection(String),
}

/// A kind's lookup, in its provider's language: what finds an owner's
/// resources that were never tracked.
#[derive(Debug, Clone)]
pub enum LookupQuery {
    Sql(String),
    Mongo(mongo::MongoLookup),
}

impl LookupQuery {
    pub fn parse(provider: &ProviderSettings, l: &LookupSettings) -> Result<LookupQuery, String> {
        match provider {
            ProviderSettings::Postgres(_) => postgres::parse_lookup(l).map(LookupQuery::Sql),
            ProviderSettings::Mongodb(_) => mongo::MongoLookup::parse(l).map(LookupQuery::Mongo),
            ProviderSettings::Http(_) => Err("is not a postgres or mongodb provider".into()),
        }
    }
}

/// Checks the fields an inventory needs on its provider's type.
pub fn check_inventory(provider: &ProviderSettings, inv: &InventorySettings) -> Result<(), String> {
    match provider {
        ProviderSettings::Http(_) => http::check_inventory(inv),
        ProviderSettings::Postgres(_) => postgres::check_inventory(inv),
        ProviderSettings::Mongodb(_) => mongo::check_inventory(inv),
    }
}

/// Where a provider keeps what it is about to delete, before it deletes it.
/// The executor hands one in for an archived kind (the job's archive in the
/// ledger); providers only know this much of it.
pub trait Archive: Sync {
    fn keep<'a>(&'a self, records: &'a [serde_json::Value]) -> BoxFuture<'a, Result<(), StepError>>;
}

impl Provider {
    /// Whether the service answers, said for an operator (`reaper
    /// check-config --connect`); deletes nothing.
    pub async fn reach(&self) -> Result<String, StepError> {
        match self {
            Provider::Http(p) => p.reach().await,
            Provider::Postgres(p) => p.reach().await,
            Provider::Mongo(p) => p.reach().await,
        }
    }

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

impl Provider {
    /// The resources of `kind` an owner ("type/id") has, by the kind's lookup.
    pub async fn lookup(&self, kind: &str, query: &LookupQuery, owner: &str) -> Result<Vec<Resource>, StepError> {
        match (self, query) {
            (Provider::Postgres(p), LookupQuery::Sql(sql)) => {
                within(p.deadline(), "the lookup", p.lookup(kind, sql, owner)).await
            }
            (Provider::Mongo(p), LookupQuery::Mongo(l)) => p.lookup(kind, l, owner).await,
            _ => Err(StepError::Permanent(format!("lookup for {kind}: its provider cannot run it"))),
        }
    }

    /// Puts an archived record back. `Ok(false)` when it is there already.
    pub async fn restore(&self, target: &ArchiveSpec, record: &serde_json::Value) -> Result<bool, StepError> {
        match (self, target) {
            (Provider::Postgres(p), ArchiveSpec::Table(t)) => p.restore(t, record).await,
            (Provider::Mongo(m), ArchiveSpec::Collection(c)) => m.restore(c, record).await,
            _ => Err(StepError::Permanent("this provider cannot restore what was archived".into())),
        }
    }

    /// Reads an inventory into `pages`, ending with `End` or `Failed`.
    /// `strict`: an item without a key fails the list instead of being left out.
    pub async fn list(&self, inv: &InventorySettings, strict: bool, pages: listing::Pages) {
        match self {
            Provider::Postgres(p) => p.list(inv, strict, pages).await,
            Provider::Mongo(m) => m.list(inv, strict, pages).await,
            Provider::Http(h) => h.list(inv, strict, pages).await,
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
                ProviderSettings::Postgres(pg) => {
                    Provider::Postgres(Box::new(postgres::PostgresProvider::build(name, pg)?))
                }
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
