//! Listing everything a provider holds, for reconcile: items handed over a
//! page at a time through a channel of two, so memory stays bounded however
//! long the list is. Each provider file reads its own list (`list`); this
//! file holds what they share.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

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

/// What a lister hands the sweep: pages, then `End`, or `Failed`.
///
/// The end of a list is said, never inferred: a lister that panics or is
/// cancelled drops its sender without `End`, and a list that stops there must
/// not be taken for a whole one (its missing items would look orphaned).
#[derive(Debug)]
pub enum Chunk {
    Page(Vec<Item>),
    End,
    Failed(String),
}

/// Collects items and hands them over a full page at a time.
pub struct Pages {
    page: Vec<Item>,
    tx: mpsc::Sender<Chunk>,
}

impl Pages {
    pub fn new(tx: mpsc::Sender<Chunk>) -> Pages {
        Pages { page: Vec::with_capacity(PAGE), tx }
    }

    /// False once the sweep stopped listening: the lister should stop too.
    pub async fn push(&mut self, item: Item) -> bool {
        self.page.push(item);
        if self.page.len() < PAGE {
            return true;
        }
        let full = std::mem::replace(&mut self.page, Vec::with_capacity(PAGE));
        self.tx.send(Chunk::Page(full)).await.is_ok()
    }

    /// Hands over a page as the API gave it (an HTTP list is paged already).
    pub async fn push_page(&mut self, items: Vec<Item>) -> bool {
        items.is_empty() || self.tx.send(Chunk::Page(items)).await.is_ok()
    }

    pub async fn fail(self, why: String) {
        let _ = self.tx.send(Chunk::Failed(why)).await;
    }

    /// The list ended: what is collected, then the marker that says so.
    pub async fn finish(self) {
        if !self.page.is_empty() && self.tx.send(Chunk::Page(self.page)).await.is_err() {
            return;
        }
        let _ = self.tx.send(Chunk::End).await;
    }
}

/// A JSON or document value as the text it is matched by.
pub fn json_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}
