//! Inventories: the items one side of a reconcile rule holds, read page by
//! page from an HTTP list, a SQL query, a MongoDB find or reaper's own ledger.
//! Each is read by a task of its own that hands over pages through a channel
//! of two, so memory stays bounded however long the list is.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use futures_util::TryStreamExt;
use tokio::sync::mpsc;

use crate::providers::{mongo, Provider, Providers};

/// Items per page handed to the sweep.
pub const PAGE: usize = 5_000;

/// One item of an inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub key: String,
    /// When the item was created, if the provider says (always UTC).
    pub created_at: Option<DateTime<Utc>>,
    pub attributes: BTreeMap<String, String>,
}

pub use crate::config::reconcile::InventorySettings;

pub const LEDGER: &str = "ledger";

impl InventorySettings {
    /// Checks the fields the provider's type needs. `providers` are the
    /// configured ones; "ledger" is always there.
    pub fn check(&self, providers: &BTreeMap<String, crate::config::ProviderSettings>) -> Result<(), String> {
        use crate::config::ProviderSettings as P;
        if self.provider == LEDGER {
            return self.kind.as_ref().map(|_| ()).ok_or_else(|| "a ledger inventory needs `kind`".into());
        }
        match providers.get(&self.provider) {
            None => Err(format!("provider {:?} is not configured", self.provider)),
            Some(P::Http(_)) => {
                let r = self.request.as_deref().ok_or("an HTTP inventory needs `request` (\"GET /path\")")?;
                let t = crate::providers::http::RequestTemplate::parse(r)?;
                if t.method() != reqwest::Method::GET || r.contains('{') {
                    return Err("an HTTP inventory's request is a GET without placeholders".into());
                }
                if self.key.is_none() {
                    return Err("an HTTP inventory needs `key` (a JSON pointer such as \"/name\")".into());
                }
                for p in [Some(&self.items), self.key.as_ref(), self.next.as_ref(), self.created_at.as_ref()]
                    .into_iter()
                    .flatten()
                    .chain(self.attributes.values())
                {
                    if !p.is_empty() && !p.starts_with('/') {
                        return Err(format!("{p:?} is not a JSON pointer (they start with '/')"));
                    }
                }
                Ok(())
            }
            Some(P::Postgres(_)) => match &self.sql {
                Some(sql) if crate::providers::postgres::placeholders(sql) == 0 => Ok(()),
                Some(_) => Err("an inventory's SQL takes no parameters".into()),
                None => Err("a postgres inventory needs `sql`".into()),
            },
            Some(P::Mongodb(_)) => {
                self.collection.as_ref().ok_or("a mongodb inventory needs `collection`")?;
                self.key.as_ref().ok_or("a mongodb inventory needs `key` (a field)")?;
                let f = self.filter.as_deref().unwrap_or("{}");
                mongo::MongoTemplate::parse("x", f, None, true).map(|_| ())
            }
        }
    }
}

/// What a reader hands the sweep: pages, then `End`, or `Failed`.
///
/// The end of a list is said, never inferred: a reader that panics or is
/// cancelled drops its sender without `End`, and a list that stops there must
/// not be taken for a whole one (its missing items would look orphaned).
#[derive(Debug)]
enum Chunk {
    Page(Vec<Item>),
    End,
    Failed(String),
}

/// One inventory being read by its own task.
pub struct Reader {
    rx: mpsc::Receiver<Chunk>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Reader {
    /// Runs `read` on a task of its own, handing it the page collector.
    fn spawn<F, Fut>(read: F) -> Reader
    where
        F: FnOnce(Pages) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(2);
        let task = tokio::spawn(read(Pages::new(tx)));
        Reader { rx, task: Some(task) }
    }

    fn failed(why: String) -> Reader {
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.try_send(Chunk::Failed(why));
        Reader { rx, task: None }
    }

    /// The next page; `Ok(None)` once the reader said the list ended. Any
    /// other way the reader stops is an error: the inventory did not load.
    pub async fn next(&mut self) -> Result<Option<Vec<Item>>, String> {
        match self.rx.recv().await {
            Some(Chunk::Page(items)) => Ok(Some(items)),
            Some(Chunk::End) => Ok(None),
            Some(Chunk::Failed(why)) => Err(why),
            None => Err(self.why_it_stopped().await),
        }
    }

    async fn why_it_stopped(&mut self) -> String {
        let what = match self.task.take() {
            Some(task) => match task.await {
                Err(e) if e.is_panic() => {
                    let p = e.into_panic();
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    format!("the reader panicked ({msg})")
                }
                Err(_) => "the reader was cancelled".to_string(),
                Ok(()) => "the reader stopped".to_string(),
            },
            None => "the reader stopped".to_string(),
        };
        format!("{what} before the end of the list; a partial list is not a list")
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Starts reading an inventory.
///
/// `strict` is for the truth: an item without a key there fails the read,
/// because skipping it would make its counterpart in the copy look orphaned.
/// A copy item without a key is only left out.
pub fn read(inv: &InventorySettings, providers: &Providers, ledger: &crate::ledger::Ledger, strict: bool) -> Reader {
    let inv = inv.clone();
    if inv.provider == LEDGER {
        let pool = ledger.pool().clone();
        let sql = "SELECT DISTINCT resource_id AS key FROM tracked_resources WHERE kind = $1 AND state = 'live'";
        let kind = inv.kind.clone().unwrap_or_default();
        return Reader::spawn(move |pages| async move {
            let rows = sqlx::query(sql).bind(kind).fetch(&pool);
            pump_sql(rows, &inv, strict, pages).await
        });
    }
    let Some(provider) = providers.get(&inv.provider).cloned() else {
        return Reader::failed(format!("provider {} is not configured", inv.provider));
    };
    Reader::spawn(move |pages| async move {
        match provider.as_ref() {
            Provider::Postgres(p) => pump_postgres(p, &inv, strict, pages).await,
            Provider::Mongo(m) => pump_mongo(m, &inv, strict, pages).await,
            Provider::Http(h) => pump_http(h, &inv, strict, pages).await,
        }
    })
}

/// Collects items and hands them over a full page at a time.
struct Pages {
    page: Vec<Item>,
    tx: mpsc::Sender<Chunk>,
}

impl Pages {
    fn new(tx: mpsc::Sender<Chunk>) -> Pages {
        Pages { page: Vec::with_capacity(PAGE), tx }
    }

    /// False once the sweep stopped listening: the reader should stop too.
    async fn push(&mut self, item: Item) -> bool {
        self.page.push(item);
        if self.page.len() < PAGE {
            return true;
        }
        let full = std::mem::replace(&mut self.page, Vec::with_capacity(PAGE));
        self.tx.send(Chunk::Page(full)).await.is_ok()
    }

    async fn fail(self, why: String) {
        let _ = self.tx.send(Chunk::Failed(why)).await;
    }

    /// The list ended: what is collected, then the marker that says so.
    async fn finish(self) {
        if !self.page.is_empty() && self.tx.send(Chunk::Page(self.page)).await.is_err() {
            return;
        }
        let _ = self.tx.send(Chunk::End).await;
    }
}

/// An application database's inventory query. It runs in a transaction of
/// its own with a statement timeout of an hour instead of the provider's
/// (which bounds a step, not a list of a million rows read as fast as the
/// ledger takes them); a load that takes longer fails, touching nothing.
async fn pump_postgres(
    p: &crate::providers::postgres::PostgresProvider,
    inv: &InventorySettings,
    strict: bool,
    pages: Pages,
) {
    let mut tx = match p.pool().begin().await {
        Ok(tx) => tx,
        Err(e) => return pages.fail(format!("query failed: {e}")).await,
    };
    if let Err(e) = sqlx::query("SET LOCAL statement_timeout = '1h'").execute(&mut *tx).await {
        return pages.fail(format!("query failed: {e}")).await;
    }
    let sql = inv.sql.clone().unwrap_or_default();
    let rows = sqlx::query(&sql).fetch(&mut *tx);
    pump_sql(rows, inv, strict, pages).await
}

async fn pump_sql<'a>(
    mut rows: futures_util::stream::BoxStream<'a, Result<sqlx::postgres::PgRow, sqlx::Error>>,
    inv: &InventorySettings,
    strict: bool,
    mut pages: Pages,
) {
    let key_col = inv.key.clone().unwrap_or_else(|| "key".into());
    loop {
        let row = match rows.try_next().await {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => return pages.fail(format!("query failed: {e}")).await,
        };
        let item = match sql_item(&row, &key_col, inv.created_at.as_deref()) {
            Ok(Some(item)) => item,
            Ok(None) if strict => {
                return pages.fail(format!("a row has no {key_col:?} (NULL or empty): it could not be matched")).await
            }
            Ok(None) => continue,
            Err(e) => return pages.fail(e).await,
        };
        if !pages.push(item).await {
            return;
        }
    }
    pages.finish().await
}

fn sql_item(row: &sqlx::postgres::PgRow, key_col: &str, created_col: Option<&str>) -> Result<Option<Item>, String> {
    use sqlx::{Column, Row};
    let mut item = Item { key: String::new(), created_at: None, attributes: BTreeMap::new() };
    for (i, col) in row.columns().iter().enumerate() {
        let name = col.name();
        if Some(name) == created_col {
            item.created_at = match row.try_get::<Option<DateTime<Utc>>, _>(i) {
                Ok(t) => t,
                Err(_) => row
                    .try_get::<Option<NaiveDateTime>, _>(i)
                    .map_err(|e| format!("column {name:?} is not a timestamp: {e}"))?
                    .map(|n| n.and_utc()),
            };
            continue;
        }
        let v: Option<String> =
            row.try_get(i).map_err(|e| format!("column {name:?} is not text (cast it with ::text): {e}"))?;
        match (name == key_col, v) {
            (true, Some(k)) => item.key = k,
            (true, None) => return Ok(None),
            (false, Some(v)) => {
                item.attributes.insert(name.to_string(), v);
            }
            (false, None) => {}
        }
    }
    if item.key.is_empty() {
        if row.columns().iter().all(|c| c.name() != key_col) {
            return Err(format!("the query returns no column named {key_col:?}"));
        }
        return Ok(None);
    }
    Ok(Some(item))
}

async fn pump_mongo(m: &mongo::MongoProvider, inv: &InventorySettings, strict: bool, mut pages: Pages) {
    use mongodb::bson::{Bson, Document};
    let key = inv.key.clone().unwrap_or_default();
    let filter: Document = match serde_json::from_str::<serde_json::Value>(inv.filter.as_deref().unwrap_or("{}"))
        .map_err(|e| e.to_string())
        .and_then(|v| Bson::try_from(v).map_err(|e| e.to_string()))
    {
        Ok(Bson::Document(d)) => d,
        Ok(_) => Document::new(),
        Err(e) => return pages.fail(format!("filter: {e}")).await,
    };
    let mut projection = mongodb::bson::doc! { key.as_str(): 1 };
    for f in inv.created_at.iter().chain(inv.attributes.values()) {
        projection.insert(f.clone(), 1);
    }
    let coll = m.database().collection::<Document>(inv.collection.as_deref().unwrap_or_default());
    let mut cursor = match coll.find(filter).projection(projection).batch_size(PAGE as u32).await {
        Ok(c) => c,
        Err(e) => return pages.fail(mongo::classify(e).to_string()).await,
    };
    loop {
        let d = match cursor.try_next().await {
            Ok(Some(d)) => d,
            Ok(None) => break,
            Err(e) => return pages.fail(mongo::classify(e).to_string()).await,
        };
        let Some(k) = mongo::get_path(&d, &key).and_then(mongo::as_text) else {
            if strict {
                let id = d.get("_id").cloned().unwrap_or(Bson::Null);
                return pages.fail(format!("document {id} has no {key:?}: it could not be matched")).await;
            }
            continue;
        };
        let created_at = inv.created_at.as_deref().and_then(|f| mongo::get_path(&d, f)).and_then(|v| match v {
            Bson::DateTime(t) => DateTime::from_timestamp_millis(t.timestamp_millis()),
            other => mongo::as_text(other).and_then(|s| parse_time(&s)),
        });
        let attributes = inv
            .attributes
            .iter()
            .filter_map(|(name, f)| mongo::get_path(&d, f).and_then(mongo::as_text).map(|v| (name.clone(), v)))
            .collect();
        if !pages.push(Item { key: k, created_at, attributes }).await {
            return;
        }
    }
    pages.finish().await
}

async fn pump_http(h: &crate::providers::http::HttpProvider, inv: &InventorySettings, strict: bool, pages: Pages) {
    let request = inv.request.clone().unwrap_or_default();
    let path = request.split_once(' ').map(|(_, p)| p.trim().to_string()).unwrap_or_default();
    let key = inv.key.clone().unwrap_or_default();
    let mut token: Option<String> = None;
    let mut seen_tokens = std::collections::HashSet::new();
    loop {
        let url = match &token {
            None => path.clone(),
            Some(t) => {
                let sep = if path.contains('?') { '&' } else { '?' };
                let t = percent_encoding::utf8_percent_encode(t, percent_encoding::NON_ALPHANUMERIC);
                format!("{path}{sep}{}={t}", inv.next_param)
            }
        };
        let page = match h.get_json(&url).await {
            Ok(p) => p,
            Err(e) => return pages.fail(format!("GET {url}: {e}")).await,
        };
        let Some(items) = page.pointer(&inv.items).and_then(|v| v.as_array()) else {
            return pages.fail(format!("GET {url}: no array at {:?} in the answer", inv.items)).await;
        };
        let mut out = Vec::with_capacity(items.len());
        for it in items {
            let Some(k) = it.pointer(&key).and_then(json_text) else {
                if strict {
                    return pages
                        .fail(format!("GET {url}: an item has nothing at {key:?}: it could not be matched"))
                        .await;
                }
                continue;
            };
            let created_at = inv.created_at.as_deref().and_then(|p| it.pointer(p)).and_then(|v| match v {
                serde_json::Value::Number(n) => n.as_f64().and_then(|s| DateTime::from_timestamp(s as i64, 0)),
                other => json_text(other).and_then(|s| parse_time(&s)),
            });
            let attributes = inv
                .attributes
                .iter()
                .filter_map(|(name, p)| it.pointer(p).and_then(json_text).map(|v| (name.clone(), v)))
                .collect();
            out.push(Item { key: k, created_at, attributes });
        }
        if !out.is_empty() && pages.tx.send(Chunk::Page(out)).await.is_err() {
            return;
        }
        token = inv.next.as_deref().and_then(|p| page.pointer(p)).and_then(json_text).filter(|t| !t.is_empty());
        match &token {
            None => return pages.finish().await,
            Some(t) if !seen_tokens.insert(t.clone()) => {
                return pages.fail(format!("GET {url}: the API sent page token {t:?} twice")).await;
            }
            Some(_) => {}
        }
    }
}

fn json_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

pub use crate::domain::parse_time;

#[cfg(test)]
mod tests {
    use super::*;

    fn item(key: &str) -> Item {
        Item { key: key.into(), created_at: None, attributes: BTreeMap::new() }
    }

    #[tokio::test]
    async fn a_reader_that_panics_is_a_failed_load_not_a_short_list() {
        let mut r = Reader::spawn(|mut pages| async move {
            for i in 0..PAGE {
                pages.push(item(&format!("k{i}"))).await;
            }
            panic!("page two went wrong");
        });
        assert_eq!(r.next().await.unwrap().map(|p| p.len()), Some(PAGE), "the first page arrives");
        let err = r.next().await.unwrap_err();
        assert!(err.contains("panicked (page two went wrong) before the end of the list"), "{err}");
    }

    #[tokio::test]
    async fn a_reader_that_stops_without_the_end_marker_is_a_failed_load() {
        let mut r = Reader::spawn(|mut pages| async move {
            pages.push(item("a")).await;
            drop(pages);
        });
        let err = r.next().await.unwrap_err();
        assert!(err.contains("stopped before the end of the list"), "{err}");
        let mut r = Reader::spawn(|mut pages| async move {
            pages.push(item("a")).await;
            pages.finish().await;
        });
        assert_eq!(r.next().await.unwrap().map(|p| p.len()), Some(1));
        assert_eq!(r.next().await.unwrap(), None, "a list that says it ended, ended");
    }

    #[test]
    fn times_are_utc() {
        let t = parse_time("2026-11-20T10:00:00+02:00").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-20T08:00:00+00:00");
        assert_eq!(parse_time("2026-11-20 08:00:00").unwrap(), t);
        assert_eq!(parse_time("1795075200").unwrap().timestamp(), 1_795_075_200);
        assert!(parse_time("yesterday").is_none());
    }
}
