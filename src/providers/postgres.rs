//! The PostgreSQL provider: rows in an application's own database, deleted
//! (or soft-deleted with an UPDATE) by configured SQL whose values are always
//! bound — `$1`, `$2`, … take the resource's id and attributes in the order
//! `params` names them; nothing is ever pasted into the SQL. One pool per
//! configured database.

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use super::listing::{Item, Pages};
use super::{Archive, Deleted, ProviderError, StepError};
use crate::config::reconcile::InventorySettings;
use crate::config::PostgresProviderSettings;
use crate::domain::Resource;
use chrono::{DateTime, NaiveDateTime, Utc};
use futures_util::TryStreamExt;

/// A statement and what binds to its placeholders, checked at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlTemplate {
    pub sql: String,
    params: Vec<Param>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Param {
    Id,
    Attr(String),
}

impl SqlTemplate {
    /// `params` says what binds to $1, $2, …; the delete must use them all, a
    /// check may use the first few (`exact = false`).
    pub fn parse(sql: &str, params: &[String], exact: bool) -> Result<SqlTemplate, String> {
        let sql = sql.trim();
        if sql.is_empty() {
            return Err("the SQL is empty".into());
        }
        let highest = placeholders(sql);
        if highest > params.len() || (exact && highest != params.len()) {
            return Err(format!(
                "the SQL uses ${highest} as its highest placeholder but params names {} values",
                params.len()
            ));
        }
        let params = params[..highest]
            .iter()
            .map(|p| match p.as_str() {
                "id" => Ok(Param::Id),
                other => match other.strip_prefix("attr.") {
                    Some(a) if !a.is_empty() => Ok(Param::Attr(a.to_string())),
                    _ => Err(format!("param {other:?} must be \"id\" or \"attr.NAME\"")),
                },
            })
            .collect::<Result<_, _>>()?;
        Ok(SqlTemplate { sql: sql.to_string(), params })
    }

    /// Whether the statement uses the resource's id (a placeholder bound to it).
    pub fn uses_id(&self) -> bool {
        placeholder_numbers(&self.sql).into_iter().any(|n| n > 0 && matches!(self.params.get(n - 1), Some(Param::Id)))
    }

    pub fn attributes(&self) -> impl Iterator<Item = String> + '_ {
        self.params.iter().filter_map(|p| match p {
            Param::Attr(a) => Some(a.clone()),
            Param::Id => None,
        })
    }

    /// The SQL and the values it will be bound to, for a plan.
    pub fn describe(&self, r: &Resource) -> Result<String, String> {
        let values = self.values(r)?;
        Ok(format!("SQL {} -- with {}", self.sql, serde_json::to_string(&values).expect("strings serialize")))
    }

    /// The table an archived DELETE keeps its rows for: the DELETE takes
    /// `RETURNING *`, and the table must be a plain name (it is quoted into
    /// the restore's INSERT).
    pub fn archive_target(&self, table: Option<&str>) -> Result<String, String> {
        if !self.sql.trim_start().to_ascii_uppercase().starts_with("DELETE") {
            return Err("archive: the SQL must be a DELETE (its rows are kept with RETURNING *)".into());
        }
        if self.sql.to_ascii_uppercase().contains("RETURNING") {
            return Err("archive: leave RETURNING out of the DELETE; reaper adds RETURNING *".into());
        }
        let table = table.ok_or("archive: SQL kinds need archive_table")?;
        let ident = |p: &str| {
            !p.is_empty()
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !p.starts_with(|c: char| c.is_ascii_digit())
        };
        if !table.split('.').all(ident) || table.split('.').count() > 2 {
            return Err(format!("archive_table {table:?} must be a plain [schema.]table name"));
        }
        Ok(table.to_string())
    }

    /// The values, in placeholder order.
    pub fn values(&self, r: &Resource) -> Result<Vec<String>, String> {
        self.params
            .iter()
            .map(|p| match p {
                Param::Id => Ok(r.id.clone()),
                Param::Attr(a) => r.attributes.get(a).cloned().ok_or_else(|| format!("attribute {a:?} is missing")),
            })
            .collect()
    }
}

/// A lookup's SQL: `$1` is the owner's id, `$2` the whole owner.
pub fn parse_lookup(l: &crate::config::LookupSettings) -> Result<String, String> {
    let sql = l.sql.clone().ok_or("lookup: a postgres lookup needs `sql`")?;
    if placeholders(&sql) > 2 {
        return Err("lookup.sql may use $1 (the owner's id) and $2 (the whole owner), no more".into());
    }
    Ok(sql)
}

/// The highest `$N` in `sql`, outside quotes.
pub fn placeholders(sql: &str) -> usize {
    placeholder_numbers(sql).into_iter().max().unwrap_or(0)
}

/// Every `$N` the SQL uses outside quotes and comments.
fn placeholder_numbers(sql: &str) -> Vec<usize> {
    let mut found = Vec::new();
    let mut quote: Option<char> = None;
    let chars: Vec<char> = sql.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            // Comments: a `$1` in one binds nothing.
            None if c == '-' && chars.get(i + 1) == Some(&'-') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            None if c == '/' && chars.get(i + 1) == Some(&'*') => {
                i += 2;
                while i + 1 < chars.len() && !(chars[i] == '*' && chars[i + 1] == '/') {
                    i += 1;
                }
                i += 1;
            }
            None if c == '$' => {
                let digits: String = chars[i + 1..].iter().take_while(|d| d.is_ascii_digit()).collect();
                if let Ok(n) = digits.parse::<usize>() {
                    found.push(n);
                }
            }
            None => {}
        }
        i += 1;
    }
    found
}

pub struct PostgresProvider {
    pool: PgPool,
    /// The client's own deadline per call, a little past the server's
    /// statement_timeout: for a server (or network) that stopped answering.
    deadline: Duration,
    name: String,
    /// For a connection of its own, outside the pool.
    opts: PgConnectOptions,
}

impl PostgresProvider {
    pub fn build(name: &str, s: &PostgresProviderSettings) -> Result<PostgresProvider, ProviderError> {
        let opts: PgConnectOptions = crate::config::pg_options(&format!("providers.{name}.url"), s.url.expose())
            .map_err(|e| ProviderError::Build { provider: name.to_string(), message: e.to_string() })?;
        if s.timeout_ms == 0 || s.lock_timeout_ms == 0 {
            let message = "timeout_ms and lock_timeout_ms must be at least 1 (0 would mean: wait forever)".into();
            return Err(ProviderError::Build { provider: name.to_string(), message });
        }
        // Set per connection, so an application's row lock or a slow query
        // fails the statement in time instead of hanging the step forever.
        let opts = opts.options([
            ("statement_timeout", s.timeout_ms.to_string()),
            ("lock_timeout", s.lock_timeout_ms.to_string()),
        ]);
        let pool = PgPoolOptions::new()
            .max_connections(s.max_connections)
            .acquire_timeout(Duration::from_millis(s.acquire_timeout_ms))
            .connect_lazy_with(opts.clone());
        let deadline = Duration::from_millis(s.timeout_ms + s.acquire_timeout_ms) + Duration::from_secs(5);
        Ok(PostgresProvider { name: name.to_string(), opts, pool, deadline })
    }

    /// One connection of its own (a pool would hide why it failed) and a
    /// `SELECT 1`, for `reaper check-config --connect`.
    pub async fn reach(&self) -> Result<String, StepError> {
        use sqlx::{ConnectOptions, Connection};
        let explain = |e: sqlx::Error| {
            let ca = format!("sslrootcert in providers.{}.url", self.name);
            match crate::tls::explain(&e, self.opts.get_host(), &ca) {
                Some(tls) => StepError::Transient(tls),
                None => classify(e),
            }
        };
        let work = async {
            let mut conn = self.opts.connect().await.map_err(explain)?;
            sqlx::query("SELECT 1").execute(&mut conn).await.map_err(explain)?;
            let _ = conn.close().await;
            Ok("answers (SELECT 1)".to_string())
        };
        super::within(self.deadline, "connecting", work).await
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    pub async fn delete(
        &self,
        t: &SqlTemplate,
        r: &Resource,
        archive: Option<&dyn Archive>,
    ) -> Result<Deleted, StepError> {
        let Some(archive) = archive else {
            let done = bind(sqlx::query(&t.sql), t, r)?.execute(&self.pool).await.map_err(classify)?;
            return Ok(if done.rows_affected() > 0 { Deleted::Now } else { Deleted::AlreadyGone });
        };
        // The rows are deleted in a transaction that commits only after the
        // ledger holds them: a crash in between leaves the rows in place.
        let sql = format!(
            "WITH deleted AS ({} RETURNING *) SELECT row_to_json(deleted)::text FROM deleted",
            t.sql.trim_end().trim_end_matches(';')
        );
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let rows: Vec<(String,)> = bind_as(sqlx::query_as(&sql), t, r)?.fetch_all(&mut *tx).await.map_err(classify)?;
        if rows.is_empty() {
            return Ok(Deleted::AlreadyGone);
        }
        let records: Vec<serde_json::Value> =
            rows.iter().map(|(j,)| serde_json::from_str(j).unwrap_or(serde_json::Value::String(j.clone()))).collect();
        archive.keep(&records).await?;
        tx.commit().await.map_err(classify)?;
        Ok(Deleted::Now)
    }

    /// Inserts an archived row back into `table`. `Ok(false)` when it conflicts
    /// with a row that is there again.
    pub async fn restore(&self, table: &str, record: &serde_json::Value) -> Result<bool, StepError> {
        // `table` is checked at start-up to be a plain [schema.]name.
        let quoted: Vec<String> = table.split('.').map(|p| format!("\"{p}\"")).collect();
        let t = quoted.join(".");
        let sql =
            format!("INSERT INTO {t} SELECT * FROM json_populate_record(NULL::{t}, $1::json) ON CONFLICT DO NOTHING");
        let done = sqlx::query(&sql).bind(record.to_string()).execute(&self.pool).await.map_err(classify)?;
        Ok(done.rows_affected() > 0)
    }

    /// A row back means it exists (or, for a guard, is in use).
    pub async fn probe(&self, t: &SqlTemplate, r: &Resource) -> Result<bool, StepError> {
        let row = bind(sqlx::query(&t.sql), t, r)?.fetch_optional(&self.pool).await.map_err(classify)?;
        Ok(row.is_some())
    }
}

impl PostgresProvider {
    /// Runs a lookup: each row is a resource of `kind`, its `id` column the
    /// provider's ID and every other column an attribute.
    pub async fn lookup(&self, kind: &str, sql: &str, owner: &str) -> Result<Vec<Resource>, StepError> {
        use sqlx::{Column, Row};
        let owner_id = owner.split_once('/').map(|(_, id)| id).unwrap_or(owner);
        let mut q = sqlx::query(sql);
        let n = placeholders(sql);
        if n >= 1 {
            q = q.bind(owner_id);
        }
        if n >= 2 {
            q = q.bind(owner);
        }
        let rows = q.fetch_all(&self.pool).await.map_err(classify)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut id = None;
            let mut attributes = std::collections::BTreeMap::new();
            for (i, col) in row.columns().iter().enumerate() {
                let value: Option<String> = row.try_get(i).map_err(|e| {
                    StepError::Permanent(format!(
                        "lookup for {kind}: column {:?} is not text (cast it with ::text): {e}",
                        col.name()
                    ))
                })?;
                match (col.name(), value) {
                    ("id", v) => id = v,
                    (_, Some(v)) => {
                        attributes.insert(col.name().to_string(), v);
                    }
                    (_, None) => {}
                }
            }
            match id {
                Some(id) if !id.is_empty() => {
                    out.push(Resource { kind: kind.to_string(), id, attributes, parent: None })
                }
                // A row with no id (a provisioner that failed before the call returned) has nothing to delete.
                _ => continue,
            }
        }
        Ok(out)
    }
}

fn bind<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    t: &SqlTemplate,
    r: &Resource,
) -> Result<sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>, StepError> {
    for v in t.values(r).map_err(StepError::Permanent)? {
        q = q.bind(v);
    }
    Ok(q)
}

fn bind_as<'q, O>(
    mut q: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    t: &SqlTemplate,
    r: &Resource,
) -> Result<sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>, StepError> {
    for v in t.values(r).map_err(StepError::Permanent)? {
        q = q.bind(v);
    }
    Ok(q)
}

/// A row still referenced (foreign key) is "not yet"; conflicts and
/// unreachable databases pass; anything else the SQL itself got wrong.
fn classify(e: sqlx::Error) -> StepError {
    match &e {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("23503") => StepError::NotYet { status: 409, detail: db.message().chars().take(200).collect() },
            Some("40001" | "40P01" | "55P03" | "57014" | "57P01") => StepError::Transient(db.message().to_string()),
            _ => StepError::Permanent(format!("the database refused the statement: {}", db.message())),
        },
        // The pool keeps why it could not connect to itself.
        sqlx::Error::PoolTimedOut => StepError::Transient(
            "database: no connection within acquire_timeout_ms (`reaper check-config --connect` says why)".into(),
        ),
        _ => StepError::Transient(format!("database: {e}")),
    }
}

// ---- Listing, for reconcile ----

/// What a postgres inventory needs: a query without parameters.
pub fn check_inventory(inv: &InventorySettings) -> Result<(), String> {
    match &inv.sql {
        Some(sql) if placeholders(sql) == 0 => Ok(()),
        Some(_) => Err("an inventory's SQL takes no parameters".into()),
        None => Err("a postgres inventory needs `sql`".into()),
    }
}

impl PostgresProvider {
    /// An application database's inventory query. It runs in a transaction of
    /// its own with a statement timeout of an hour instead of the provider's
    /// (which bounds a step, not a list of a million rows read as fast as the
    /// ledger takes them); a load that takes longer fails, touching nothing.
    pub async fn list(&self, inv: &InventorySettings, strict: bool, pages: Pages) {
        let mut tx = match self.pool.begin().await {
            Ok(tx) => tx,
            Err(e) => return pages.fail(format!("query failed: {e}")).await,
        };
        if let Err(e) = sqlx::query("SET LOCAL statement_timeout = '1h'").execute(&mut *tx).await {
            return pages.fail(format!("query failed: {e}")).await;
        }
        let sql = inv.sql.clone().unwrap_or_default();
        let rows = sqlx::query(&sql).fetch(&mut *tx);
        list_rows(rows, inv, strict, pages).await
    }
}

/// Hands over the rows of an inventory query (an application database's or
/// the ledger's), each row an item keyed by its `key` column.
pub async fn list_rows<'a>(
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

#[cfg(test)]
mod tests {

    #[test]
    fn a_placeholder_in_a_comment_does_not_count_as_using_the_id() {
        let params = ["id".to_string(), "attr.tenant".to_string()];
        let t = SqlTemplate::parse("DELETE FROM t WHERE tenant = $2 -- AND id = $1", &params, false).unwrap();
        assert!(!t.uses_id());
        let t = SqlTemplate::parse("DELETE FROM t WHERE /* $1 */ tenant = $2", &params, false).unwrap();
        assert!(!t.uses_id());
        let t = SqlTemplate::parse("DELETE FROM t WHERE id = $1 AND tenant = $2", &params, true).unwrap();
        assert!(t.uses_id());
    }

    use super::*;

    #[test]
    fn placeholders_and_params_must_agree() {
        assert!(SqlTemplate::parse("DELETE FROM models WHERE id = $1", &["id".into()], true).is_ok());
        assert!(SqlTemplate::parse("DELETE FROM t WHERE a = $1 AND b = $2", &["id".into()], true).is_err());
        assert!(
            SqlTemplate::parse("DELETE FROM t WHERE a = '$2' AND b = $1", &["id".into()], true).is_ok(),
            "quoted $2 is text"
        );
        assert!(SqlTemplate::parse("DELETE FROM t WHERE a = $1", &["name".into()], true).is_err());
        assert!(
            SqlTemplate::parse("SELECT 1 FROM t WHERE a = $1", &["id".into(), "attr.x".into()], false).is_ok(),
            "a check may use fewer"
        );
        assert!(
            SqlTemplate::parse("DELETE FROM t WHERE a = $1", &["id".into(), "attr.x".into()], true).is_err(),
            "a delete uses them all"
        );
        let t = SqlTemplate::parse(
            "UPDATE t SET deleted_at = now() WHERE a = $1 AND b = $2",
            &["id".into(), "attr.tenant".into()],
            true,
        )
        .unwrap();
        assert_eq!(t.attributes().collect::<Vec<_>>(), ["tenant"]);
    }
}
