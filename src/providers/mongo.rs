//! The MongoDB provider: documents in an application's own database, deleted
//! (or soft-deleted by setting a field) by a configured filter. A filter is
//! JSON (MongoDB extended JSON, so `{"$oid": "{id}"}` is an ObjectId) whose
//! string values may be a placeholder — `"{id}"`, `"{attr.NAME}"`, and in
//! lookups `"{owner_id}"` and `"{owner}"` — replaced whole by the value. A
//! placeholder inside a longer string is refused: values are never pasted into
//! anything. One resource's filter may match many documents; they are read,
//! archived and deleted `batch_size` at a time.

use std::collections::BTreeMap;
use std::future::IntoFuture;

use mongodb::bson::{self, doc, Bson, Document};
use mongodb::options::ClientOptions;
use mongodb::{Client, Collection, Database};

use super::listing::{Item, Pages, PAGE};
use super::{Archive, Deleted, ProviderError, StepError};
use crate::config::reconcile::InventorySettings;
use crate::config::MongoProviderSettings;
use crate::domain::parse_time;
use crate::domain::Resource;
use chrono::DateTime;
use futures_util::TryStreamExt;

/// A lookup on MongoDB: one resource per distinct `id_field` value among the
/// documents its filter (over `owner` and `owner_id`) matches.
#[derive(Debug, Clone)]
pub struct MongoLookup {
    pub filter: MongoTemplate,
    pub id_field: String,
    pub attributes: Vec<String>,
}

impl MongoLookup {
    pub fn parse(l: &crate::config::LookupSettings) -> Result<MongoLookup, String> {
        let collection = l.collection.as_deref().ok_or("lookup: a mongodb lookup needs `collection`")?;
        let filter = l.filter.as_deref().ok_or("lookup: a mongodb lookup needs `filter`")?;
        let filter = MongoTemplate::parse(collection, filter, None, true).map_err(|e| format!("lookup.filter: {e}"))?;
        Ok(MongoLookup {
            filter,
            id_field: l.id_field.clone().unwrap_or_else(|| "_id".into()),
            attributes: l.attributes.clone(),
        })
    }
}

/// A collection and a filter with placeholders, checked at start-up.
#[derive(Debug, Clone, PartialEq)]
pub struct MongoTemplate {
    pub collection: String,
    filter: serde_json::Value,
    /// Set the field to the time instead of deleting (deletes only).
    pub soft_delete_field: Option<String>,
}

/// Which names a filter may use.
const RESOURCE_VARS: &[&str] = &["id"];
const OWNER_VARS: &[&str] = &["owner", "owner_id"];

impl MongoTemplate {
    /// `for_owner`: a lookup filter, whose placeholders are the owner's.
    pub fn parse(
        collection: &str,
        filter: &str,
        soft_delete_field: Option<&str>,
        for_owner: bool,
    ) -> Result<MongoTemplate, String> {
        if collection.is_empty() {
            return Err("a mongodb kind needs `collection`".into());
        }
        let filter: serde_json::Value =
            serde_json::from_str(filter).map_err(|e| format!("the filter is not JSON: {e}"))?;
        if !filter.is_object() {
            return Err("the filter must be a JSON object".into());
        }
        let allowed = if for_owner { OWNER_VARS } else { RESOURCE_VARS };
        let mut problems = Vec::new();
        walk_strings(&filter, &mut |s| {
            if let Err(e) = placeholder(s, allowed) {
                problems.push(e);
            }
        });
        if let Some(p) = problems.into_iter().next() {
            return Err(p);
        }
        if let Some(f) = soft_delete_field {
            if f.is_empty() || f.starts_with('$') {
                return Err(format!("soft_delete_field {f:?} is not a field name"));
            }
        }
        Ok(MongoTemplate {
            collection: collection.to_string(),
            filter,
            soft_delete_field: soft_delete_field.map(str::to_string),
        })
    }

    /// Whether the filter uses the resource's id (`"{id}"` somewhere).
    pub fn uses_id(&self) -> bool {
        let mut found = false;
        walk_strings(&self.filter, &mut |s| found |= matches!(placeholder(s, RESOURCE_VARS), Ok(Some("id"))));
        found
    }

    pub fn attributes(&self) -> Vec<String> {
        let mut out = Vec::new();
        walk_strings(&self.filter, &mut |s| {
            if let Ok(Some(v)) = placeholder(s, RESOURCE_VARS) {
                if let Some(a) = v.strip_prefix("attr.") {
                    out.push(a.to_string());
                }
            }
        });
        out
    }

    /// The call and its filter, for a plan.
    pub fn describe(&self, r: &Resource) -> Result<String, String> {
        let filter = self.for_resource(r)?;
        let verb = match &self.soft_delete_field {
            Some(f) => format!("updateMany (set {f} = now)"),
            None => "deleteMany".into(),
        };
        Ok(format!("MONGO db.{}.{verb} {}", self.collection, filter))
    }

    /// The collection a hard delete's documents are put back into.
    pub fn archive_target(&self) -> Result<String, String> {
        match self.soft_delete_field {
            Some(_) => Err("archive: a soft delete keeps the documents; archive is for hard deletes".into()),
            None => Ok(self.collection.clone()),
        }
    }

    /// The filter with each placeholder replaced by `value(name)`.
    pub fn render(&self, value: &dyn Fn(&str) -> Option<String>) -> Result<Document, String> {
        let filled = fill(&self.filter, value)?;
        match Bson::try_from(filled).map_err(|e| format!("the filter is not valid extended JSON: {e}"))? {
            Bson::Document(d) => Ok(d),
            _ => Err("the filter must be a document".into()),
        }
    }

    pub fn for_resource(&self, r: &Resource) -> Result<Document, String> {
        self.render(&|name| match name {
            "id" => Some(r.id.clone()),
            other => other.strip_prefix("attr.").and_then(|a| r.attributes.get(a).cloned()),
        })
    }
}

/// `Ok(Some(name))` for a whole-value placeholder, `Ok(None)` for plain text.
fn placeholder<'a>(s: &'a str, allowed: &[&str]) -> Result<Option<&'a str>, String> {
    if !s.contains('{') && !s.contains('}') {
        return Ok(None);
    }
    let name = s
        .strip_prefix('{')
        .and_then(|x| x.strip_suffix('}'))
        .filter(|n| !n.contains(['{', '}']))
        .ok_or_else(|| format!("{s:?}: a placeholder must be the whole string value, like \"{{id}}\""))?;
    let ok = allowed.contains(&name) || (allowed == RESOURCE_VARS && name.starts_with("attr.") && name.len() > 5);
    if !ok {
        return Err(format!("unknown placeholder {{{name}}}; use one of {allowed:?} (or attr.NAME)"));
    }
    Ok(Some(name))
}

fn walk_strings(v: &serde_json::Value, f: &mut dyn FnMut(&str)) {
    match v {
        serde_json::Value::String(s) => f(s),
        serde_json::Value::Array(a) => a.iter().for_each(|x| walk_strings(x, f)),
        serde_json::Value::Object(o) => o.values().for_each(|x| walk_strings(x, f)),
        _ => {}
    }
}

fn fill(v: &serde_json::Value, value: &dyn Fn(&str) -> Option<String>) -> Result<serde_json::Value, String> {
    Ok(match v {
        // `parse` checked every placeholder; here a whole "{name}" is one.
        serde_json::Value::String(s) => match s.strip_prefix('{').and_then(|x| x.strip_suffix('}')) {
            Some(name) => serde_json::Value::String(value(name).ok_or_else(|| match name.strip_prefix("attr.") {
                Some(a) => format!("attribute {a:?} is missing"),
                None => format!("{name} has no value"),
            })?),
            None => v.clone(),
        },
        serde_json::Value::Array(a) => {
            serde_json::Value::Array(a.iter().map(|x| fill(x, value)).collect::<Result<_, _>>()?)
        }
        serde_json::Value::Object(o) => serde_json::Value::Object(
            o.iter().map(|(k, x)| Ok((k.clone(), fill(x, value)?))).collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

/// `a.b.c` in a document.
pub fn get_path<'d>(d: &'d Document, path: &str) -> Option<&'d Bson> {
    let mut parts = path.split('.');
    let mut v = d.get(parts.next()?)?;
    for p in parts {
        v = v.as_document()?.get(p)?;
    }
    Some(v)
}

/// A document's field as the text reaper keys things by: ObjectIds as hex.
pub fn as_text(v: &Bson) -> Option<String> {
    match v {
        Bson::String(s) => Some(s.clone()),
        Bson::ObjectId(o) => Some(o.to_hex()),
        Bson::Int32(n) => Some(n.to_string()),
        Bson::Int64(n) => Some(n.to_string()),
        Bson::Double(n) => Some(n.to_string()),
        Bson::Boolean(b) => Some(b.to_string()),
        Bson::DateTime(d) => d.try_to_rfc3339_string().ok(),
        Bson::Null | Bson::Undefined => None,
        other => Some(other.clone().into_relaxed_extjson().to_string()),
    }
}

pub struct MongoProvider {
    db: Database,
    batch_size: u32,
    /// Longest one operation may take (`timeout_ms`).
    timeout: std::time::Duration,
    name: String,
    /// The first host of the URL, the name its certificate must carry.
    host: String,
}

impl MongoProvider {
    pub async fn build(name: &str, s: &MongoProviderSettings) -> Result<MongoProvider, ProviderError> {
        let err = |message: String| ProviderError::Build { provider: name.to_string(), message };
        // The driver's message may quote the URL, password included: keep it out.
        let mut opts = ClientOptions::parse(s.url.expose()).await.map_err(|e| {
            let why = e.kind.to_string().replace(s.url.expose(), "[url]");
            let url = crate::config::redact_url(s.url.expose());
            match e.kind.as_ref() {
                // mongodb+srv:// (Atlas) asks DNS for the cluster's servers when the client is built.
                mongodb::error::ErrorKind::DnsResolve { .. } => err(format!(
                    "url {url}: DNS did not give the cluster's servers (a mongodb+srv:// URL is looked up as \
                     SRV _mongodb._tcp.HOST and TXT HOST): check the host name and this machine's DNS ({why})"
                )),
                _ => err(format!("url {url}: {why}")),
            }
        })?;
        opts.app_name = Some("reaper".into());
        if opts.server_selection_timeout.is_none() {
            opts.server_selection_timeout = Some(std::time::Duration::from_secs(5));
        }
        let host = match opts.hosts.first() {
            Some(mongodb::options::ServerAddress::Tcp { host, .. }) => host.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        };
        // A CA file the driver would read later, empty, into an empty trust
        // store (then every server is "unknown issuer"): checked now.
        if let Some(mongodb::options::Tls::Enabled(tls)) = &opts.tls {
            if let Some(ca) = &tls.ca_file_path {
                crate::tls::read_certs("tlsCAFile", ca).map_err(|e| err(e.to_string()))?;
            }
        }
        let client = Client::with_options(opts).map_err(|e| err(e.to_string()))?;
        if s.batch_size == 0 {
            return Err(err("batch_size must be at least 1".into()));
        }
        if s.timeout_ms == 0 {
            return Err(err("timeout_ms must be at least 1 (0 would mean: wait forever)".into()));
        }
        let timeout = std::time::Duration::from_millis(s.timeout_ms);
        Ok(MongoProvider {
            name: name.to_string(),
            host,
            db: client.database(&s.database),
            batch_size: s.batch_size,
            timeout,
        })
    }

    /// A `ping`, for `reaper check-config --connect`. The driver hands on a
    /// TLS failure as text inside its server-selection error.
    pub async fn reach(&self) -> Result<String, StepError> {
        let ping = self.db.run_command(mongodb::bson::doc! { "ping": 1 });
        match tokio::time::timeout(self.timeout + std::time::Duration::from_secs(5), ping).await {
            Ok(Ok(_)) => Ok("answers (ping)".into()),
            Ok(Err(e)) => {
                let ca = format!("tlsCAFile in providers.{}.url", self.name);
                match crate::tls::explain_text(&e.to_string(), &self.host, &ca) {
                    Some(tls) => Err(StepError::Transient(tls)),
                    None => Err(classify(e)),
                }
            }
            Err(_) => Err(StepError::Transient("no answer to ping in time".into())),
        }
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    fn collection(&self, name: &str) -> Collection<Document> {
        self.db.collection(name)
    }

    /// One driver operation, bounded by `timeout_ms`: a server that stops
    /// answering is a transient step error, not a step that hangs.
    async fn op<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, mongodb::error::Error>>,
    ) -> Result<T, StepError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r.map_err(classify),
            Err(_) => Err(StepError::Transient(format!(
                "mongodb: {what} got no answer within {}",
                crate::domain::human(self.timeout)
            ))),
        }
    }

    /// Deletes every document the filter matches, a batch at a time, each
    /// batch archived first when asked; or soft-deletes them.
    pub async fn delete(
        &self,
        t: &MongoTemplate,
        r: &Resource,
        archive: Option<&dyn Archive>,
    ) -> Result<Deleted, StepError> {
        let filter = t.for_resource(r).map_err(StepError::Permanent)?;
        let coll = self.collection(&t.collection);
        if let Some(field) = &t.soft_delete_field {
            let mut f = filter;
            f.insert(field.clone(), Bson::Null);
            let now = bson::DateTime::now();
            let done = self
                .op("the soft delete", coll.update_many(f, doc! { "$set": { field.as_str(): now } }).into_future())
                .await?;
            return Ok(if done.modified_count > 0 { Deleted::Now } else { Deleted::AlreadyGone });
        }
        let mut total = 0u64;
        loop {
            let find = coll.find(filter.clone()).limit(i64::from(self.batch_size));
            let mut cursor = self.op("a find", find.into_future()).await?;
            let mut docs = Vec::new();
            while self.op("reading a batch", cursor.advance()).await? {
                docs.push(cursor.deserialize_current().map_err(classify)?);
            }
            if docs.is_empty() {
                break;
            }
            if let Some(a) = archive {
                let records: Vec<serde_json::Value> =
                    docs.iter().map(|d| Bson::Document(d.clone()).into_canonical_extjson()).collect();
                a.keep(&records).await?;
            }
            let ids: Vec<Bson> = docs.iter().filter_map(|d| d.get("_id").cloned()).collect();
            let n = docs.len();
            let done = self.op("a delete", coll.delete_many(doc! { "_id": { "$in": ids } }).into_future()).await?;
            total += done.deleted_count;
            if n < self.batch_size as usize {
                break;
            }
        }
        Ok(if total > 0 { Deleted::Now } else { Deleted::AlreadyGone })
    }

    /// Whether a document matches (a soft-deleted one does not).
    pub async fn probe(&self, t: &MongoTemplate, r: &Resource) -> Result<bool, StepError> {
        let mut filter = t.for_resource(r).map_err(StepError::Permanent)?;
        if let Some(field) = &t.soft_delete_field {
            filter.insert(field.clone(), Bson::Null);
        }
        let found = self.op("a check", self.collection(&t.collection).find_one(filter).into_future()).await?;
        Ok(found.is_some())
    }

    /// Runs a lookup: one resource per distinct `id_field` value among the
    /// matching documents.
    pub async fn lookup(&self, kind: &str, l: &MongoLookup, owner: &str) -> Result<Vec<Resource>, StepError> {
        let (t, id_field, attributes) = (&l.filter, l.id_field.as_str(), &l.attributes);
        let owner_id = owner.split_once('/').map(|(_, id)| id).unwrap_or(owner);
        let filter = t
            .render(&|name| match name {
                "owner" => Some(owner.to_string()),
                "owner_id" => Some(owner_id.to_string()),
                _ => None,
            })
            .map_err(StepError::Permanent)?;
        let mut projection = doc! { id_field: 1 };
        for a in attributes {
            projection.insert(a.clone(), 1);
        }
        let coll = self.collection(&t.collection);
        let find = coll.find(filter).projection(projection);
        let mut cursor = self.op("a lookup", find.into_future()).await?;
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        while self.op("reading a lookup", cursor.advance()).await? {
            let d: Document = cursor.deserialize_current().map_err(classify)?;
            let Some(id) = get_path(&d, id_field).and_then(as_text).filter(|s| !s.is_empty()) else { continue };
            if !seen.insert(id.clone()) {
                continue;
            }
            let attrs: BTreeMap<String, String> =
                attributes.iter().filter_map(|a| get_path(&d, a).and_then(as_text).map(|v| (a.clone(), v))).collect();
            out.push(Resource { kind: kind.to_string(), id, attributes: attrs, parent: None });
        }
        Ok(out)
    }

    /// Puts an archived document back. `Ok(false)` when one with its `_id` is
    /// already there.
    pub async fn restore(&self, collection: &str, record: &serde_json::Value) -> Result<bool, StepError> {
        let Bson::Document(d) = Bson::try_from(record.clone()).map_err(|e| StepError::Permanent(e.to_string()))? else {
            return Err(StepError::Permanent("the archived record is not a document".into()));
        };
        match self.collection(collection).insert_one(d).await {
            Ok(_) => Ok(true),
            Err(e) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(classify(e)),
        }
    }
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == 11000,
        ErrorKind::Command(c) => c.code == 11000,
        _ => false,
    }
}

/// Unreachable servers and interrupted operations pass; anything else is the
/// configuration's (or the data's) fault.
pub fn classify(e: mongodb::error::Error) -> StepError {
    use mongodb::error::ErrorKind;
    let transient = matches!(
        e.kind.as_ref(),
        ErrorKind::Io(_) | ErrorKind::ServerSelection { .. } | ErrorKind::ConnectionPoolCleared { .. }
    ) || e.contains_label("RetryableWriteError")
        || e.contains_label("TransientTransactionError");
    let text: String = e.to_string().chars().take(300).collect();
    if transient {
        StepError::Transient(format!("mongodb: {text}"))
    } else {
        StepError::Permanent(format!("mongodb refused the operation: {text}"))
    }
}

// ---- Listing, for reconcile ----

/// What a mongodb inventory needs: a collection, a key field and a filter that parses.
pub fn check_inventory(inv: &InventorySettings) -> Result<(), String> {
    inv.collection.as_ref().ok_or("a mongodb inventory needs `collection`")?;
    inv.key.as_ref().ok_or("a mongodb inventory needs `key` (a field)")?;
    let f = inv.filter.as_deref().unwrap_or("{}");
    MongoTemplate::parse("x", f, None, true).map(|_| ())
}

impl MongoProvider {
    pub async fn list(&self, inv: &InventorySettings, strict: bool, mut pages: Pages) {
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
        let coll = self.database().collection::<Document>(inv.collection.as_deref().unwrap_or_default());
        let mut cursor = match coll.find(filter).projection(projection).batch_size(PAGE as u32).await {
            Ok(c) => c,
            Err(e) => return pages.fail(classify(e).to_string()).await,
        };
        loop {
            let d = match cursor.try_next().await {
                Ok(Some(d)) => d,
                Ok(None) => break,
                Err(e) => return pages.fail(classify(e).to_string()).await,
            };
            let Some(k) = get_path(&d, &key).and_then(as_text) else {
                if strict {
                    let id = d.get("_id").cloned().unwrap_or(Bson::Null);
                    return pages.fail(format!("document {id} has no {key:?}: it could not be matched")).await;
                }
                continue;
            };
            let created_at = inv.created_at.as_deref().and_then(|f| get_path(&d, f)).and_then(|v| match v {
                Bson::DateTime(t) => DateTime::from_timestamp_millis(t.timestamp_millis()),
                other => as_text(other).and_then(|s| parse_time(&s)),
            });
            let attributes = inv
                .attributes
                .iter()
                .filter_map(|(name, f)| get_path(&d, f).and_then(as_text).map(|v| (name.clone(), v)))
                .collect();
            if !pages.push(Item { key: k, created_at, attributes }).await {
                return;
            }
        }
        pages.finish().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_whole_values() {
        let t = MongoTemplate::parse("c", r#"{"content_id": "{id}", "tenant": "{attr.tenant}"}"#, None, false).unwrap();
        assert_eq!(t.attributes(), ["tenant"]);
        let r = Resource {
            kind: "k".into(),
            id: "x\" } , {\"$where\": 1".into(),
            attributes: [("tenant".to_string(), "t1".to_string())].into(),
            parent: None,
        };
        let d = t.for_resource(&r).unwrap();
        assert_eq!(d.get_str("content_id").unwrap(), r.id, "a hostile id stays one string value");
        assert!(MongoTemplate::parse("c", r#"{"a": "pre-{id}"}"#, None, false).is_err());
        assert!(MongoTemplate::parse("c", r#"{"a": "{owner_id}"}"#, None, false).is_err());
        assert!(MongoTemplate::parse("c", r#"{"a": "{owner_id}"}"#, None, true).is_ok());
        let oid = MongoTemplate::parse("c", r#"{"_id": {"$oid": "{id}"}}"#, None, false).unwrap();
        let r = Resource { id: "507f1f77bcf86cd799439011".into(), ..r };
        assert!(matches!(oid.for_resource(&r).unwrap().get("_id"), Some(Bson::ObjectId(_))));
        let bad = Resource { id: "nothex".into(), ..r };
        assert!(oid.for_resource(&bad).is_err(), "an id that is no ObjectId is refused, not matched loosely");
    }
}
