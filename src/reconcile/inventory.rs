//! Inventories: the items one side of a reconcile rule holds, read page by
//! page from a provider's list (`Provider::list`) or reaper's own ledger.
//! Each is read by a task of its own that hands over pages through a channel
//! of two, so memory stays bounded however long the list is.

use std::collections::BTreeMap;

use tokio::sync::mpsc;

use crate::providers::listing::{Chunk, Pages};
pub use crate::providers::listing::{Item, PAGE};
use crate::providers::Providers;

pub use crate::config::reconcile::InventorySettings;

pub const LEDGER: &str = "ledger";

impl InventorySettings {
    /// Checks the fields the provider's type needs. `providers` are the
    /// configured ones; "ledger" is always there.
    pub fn check(&self, providers: &BTreeMap<String, crate::config::ProviderSettings>) -> Result<(), String> {
        if self.provider == LEDGER {
            return self.kind.as_ref().map(|_| ()).ok_or_else(|| "a ledger inventory needs `kind`".into());
        }
        match providers.get(&self.provider) {
            None => Err(format!("provider {:?} is not configured", self.provider)),
            Some(p) => crate::providers::check_inventory(p, self),
        }
    }
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
            crate::providers::postgres::list_rows(rows, &inv, strict, pages).await
        });
    }
    let Some(provider) = providers.get(&inv.provider).cloned() else {
        return Reader::failed(format!("provider {} is not configured", inv.provider));
    };
    Reader::spawn(move |pages| async move { provider.list(&inv, strict, pages).await })
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
