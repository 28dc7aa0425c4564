//! The benchmark's baseline: the least a worker must do for the bench's job
//! with reaper's result guarantees, so `reaper bench` can say what reaper's
//! own bookkeeping costs (docs/performance.md).
//!
//! Per deletion event: consume; one SELECT of the owner's rows, grouped
//! across concurrent jobs; the 4 children's DELETEs in parallel, then the
//! server's; one statement that inserts the job row and the outbox row and
//! marks the rows it deleted, grouped across jobs; publish the result with a
//! confirm; ack; outbox rows deleted in batches. One job per event id (the
//! job row's key; a duplicate republishes the stored result), and no result
//! before the commit that holds it. What it does not do, and reaper does:
//! serialise an owner's jobs (lease) and claim its rows before deleting (a
//! track landing meanwhile), record the event before acting (replay) and
//! per-step progress (resume), lookups, retries, late tracks.
//!
//! It runs as its own process (`reaper bench --serve-baseline URL`) so its
//! CPU is measured like the worker's.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use sqlx::{PgPool, Row};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::broker::publisher::Publisher;
use crate::broker::{self, Names};
use crate::config::Settings;
use crate::contract::{ResourceReport, TeardownResult};

/// The baseline's tables, in the bench's database beside reaper's.
pub const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS baseline_resources (
        owner TEXT NOT NULL, kind TEXT NOT NULL, resource_id TEXT NOT NULL,
        attributes JSONB NOT NULL DEFAULT '{}', state TEXT NOT NULL DEFAULT 'live',
        PRIMARY KEY (owner, kind, resource_id))",
    "CREATE TABLE IF NOT EXISTS baseline_jobs (
        event_id TEXT PRIMARY KEY, job_id UUID NOT NULL, owner TEXT NOT NULL, result BYTEA NOT NULL,
        finished_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS baseline_outbox (id BIGSERIAL PRIMARY KEY, job_id UUID NOT NULL, body BYTEA NOT NULL)",
];

/// Most requests one grouped statement takes.
const MAX_BATCH: usize = 256;

type Row3 = (String, String, serde_json::Value);

struct Finish {
    event_id: String,
    job_id: Uuid,
    owner: String,
    body: Vec<u8>,
    /// (kind, resource_id) of the rows it deleted: only these are marked.
    deleted: Vec<(String, String)>,
}

struct Ctx {
    lookups: mpsc::UnboundedSender<(String, oneshot::Sender<Vec<Row3>>)>,
    finishes: mpsc::UnboundedSender<(Finish, oneshot::Sender<Option<i64>>)>,
    clears: mpsc::UnboundedSender<i64>,
    pool: PgPool,
    http: reqwest::Client,
    api: String,
    publisher: Publisher,
    results: String,
}

/// Runs the baseline worker on the configured work queue until killed.
pub async fn serve(settings: &Settings, api: &str) -> anyhow::Result<()> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(settings.database.max_connections)
        .connect(settings.database.url.expose())
        .await?;
    let names = Names::new(&settings.broker.prefix);
    let (conn, publisher) = broker::link::open(settings, &names).await?;
    let (lookups, lookup_rx) = mpsc::unbounded_channel();
    let (finishes, finish_rx) = mpsc::unbounded_channel();
    let (clears, clear_rx) = mpsc::unbounded_channel();
    tokio::spawn(grouped(lookup_rx, {
        let p = pool.clone();
        move |b| lookup(p.clone(), b)
    }));
    tokio::spawn(grouped(finish_rx, {
        let p = pool.clone();
        move |b| finish(p.clone(), b)
    }));
    tokio::spawn(grouped(clear_rx, {
        let p = pool.clone();
        move |b| clear(p.clone(), b)
    }));
    let ctx = Arc::new(Ctx {
        lookups,
        finishes,
        clears,
        pool,
        http: reqwest::Client::new(),
        api: api.trim_end_matches('/').to_string(),
        publisher,
        results: names.results.clone(),
    });
    let ch = conn.create_channel().await?;
    ch.basic_qos(settings.broker.prefetch, BasicQosOptions::default()).await?;
    let mut deliveries = ch
        .basic_consume(
            names.work.as_str().into(),
            "baseline".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // On SIGTERM: take no more, let the jobs in hand finish and ack, so the
    // bench's next phase finds no deliveries of this one coming back.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let jobs = tokio_util::task::TaskTracker::new();
    loop {
        let d = tokio::select! {
            d = deliveries.next() => match d {
                Some(d) => d?,
                None => break,
            },
            _ = term.recv() => break,
        };
        let ctx = ctx.clone();
        jobs.spawn(async move {
            match job(&ctx, &d.data).await {
                Ok(()) => d.acker.ack(BasicAckOptions::default()).await,
                Err(e) => {
                    eprintln!("baseline: {e:#}");
                    d.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await
                }
            }
        });
    }
    jobs.close();
    jobs.wait().await;
    let _ = ch.close(200, "baseline done".into()).await;
    let _ = conn.close(200, "baseline done".into()).await;
    Ok(())
}

async fn job(ctx: &Ctx, body: &[u8]) -> anyhow::Result<()> {
    #[derive(serde::Deserialize)]
    struct Event {
        event_id: String,
        owner: String,
    }
    let ev: Event = serde_json::from_slice(body)?;
    let started_at = chrono::Utc::now();
    let (tx, rx) = oneshot::channel();
    ctx.lookups.send((ev.owner.clone(), tx))?;
    let rows = rx.await?;
    let (servers, children): (Vec<&Row3>, Vec<&Row3>) = rows.iter().partition(|r| r.0 == "bare_metal_server");
    for level in [children, servers] {
        let deletes = level.iter().map(|r| ctx.delete(r));
        for d in futures_util::future::join_all(deletes).await {
            d?;
        }
    }
    let result = TeardownResult {
        event_id: ev.event_id.clone(),
        job_id: Uuid::new_v4(),
        owner: ev.owner.clone(),
        trigger: "deletion.requested".into(),
        status: "completed".into(),
        dry_run: false,
        resources: rows
            .iter()
            .map(|(kind, id, _)| ResourceReport {
                kind: kind.clone(),
                id: id.clone(),
                outcome: "deleted".into(),
                attempts: 1,
                error: None,
            })
            .collect(),
        attempts: 1,
        started_at,
        finished_at: chrono::Utc::now(),
        reason: None,
    };
    let mut body = serde_json::to_vec(&result)?;
    let (tx, rx) = oneshot::channel();
    let deleted = rows.iter().map(|(kind, id, _)| (kind.clone(), id.clone())).collect();
    let fin =
        Finish { event_id: ev.event_id.clone(), job_id: result.job_id, owner: ev.owner, body: body.clone(), deleted };
    ctx.finishes.send((fin, tx))?;
    let outbox_id = rx.await?;
    if outbox_id.is_none() {
        // A duplicate: its job is recorded; publish the stored result again.
        body = sqlx::query_scalar("SELECT result FROM baseline_jobs WHERE event_id = $1")
            .bind(&ev.event_id)
            .fetch_one(&ctx.pool)
            .await?;
    }
    ctx.publisher.publish(&ctx.results, "teardown.completed", &body, &ev.event_id, &[]).await?;
    if let Some(id) = outbox_id {
        let _ = ctx.clears.send(id);
    }
    Ok(())
}

impl Ctx {
    async fn delete(&self, (kind, id, attrs): &Row3) -> anyhow::Result<()> {
        let seg = |s: &str| percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string();
        let attr = |name: &str| seg(attrs[name].as_str().unwrap_or_default());
        let path = match kind.as_str() {
            "vni" => format!("/v1/virtual_network_interfaces/{}", seg(id)),
            "dns_record" => format!("/v1/dns_zones/{}/resource_records/{}", attr("zone_id"), seg(id)),
            "ip_reservation" => format!("/v1/subnets/{}/reserved_ips/{}", attr("subnet_id"), seg(id)),
            _ => format!("/v1/bare_metal_servers/{}", seg(id)),
        };
        let status = self.http.delete(format!("{}{path}", self.api)).send().await?.status();
        anyhow::ensure!(status.is_success() || status == 404, "DELETE {path}: {status}");
        Ok(())
    }
}

/// Takes whatever requests are waiting (up to MAX_BATCH) and hands them to
/// `write` at once, forever.
async fn grouped<T, F, Fut>(mut rx: mpsc::UnboundedReceiver<T>, write: F)
where
    F: Fn(Vec<T>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        write(batch).await;
    }
}

async fn lookup(pool: PgPool, batch: Vec<(String, oneshot::Sender<Vec<Row3>>)>) {
    let owners: Vec<&str> = batch.iter().map(|(o, _)| o.as_str()).collect();
    let rows = sqlx::query(
        "SELECT owner, kind, resource_id, attributes FROM baseline_resources WHERE owner = ANY($1) AND state = 'live'",
    )
    .bind(&owners)
    .fetch_all(&pool)
    .await;
    let Ok(rows) = rows.inspect_err(|e| eprintln!("baseline lookup: {e}")) else { return };
    let mut by_owner: HashMap<String, Vec<Row3>> = HashMap::new();
    for r in rows {
        by_owner.entry(r.get("owner")).or_default().push((r.get("kind"), r.get("resource_id"), r.get("attributes")));
    }
    for (owner, reply) in batch {
        let _ = reply.send(by_owner.get(&owner).cloned().unwrap_or_default());
    }
}

async fn finish(pool: PgPool, batch: Vec<(Finish, oneshot::Sender<Option<i64>>)>) {
    let rows = sqlx::query(
        "WITH input AS (
             SELECT * FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::bytea[]) AS u(event_id, job_id, owner, result)),
         j AS (
             INSERT INTO baseline_jobs (event_id, job_id, owner, result)
             SELECT event_id, job_id, owner, result FROM input
             ON CONFLICT (event_id) DO NOTHING
             RETURNING job_id, owner, result),
         o AS (INSERT INTO baseline_outbox (job_id, body) SELECT job_id, result FROM j RETURNING id, job_id),
         d AS (SELECT * FROM UNNEST($5::uuid[], $6::text[], $7::text[]) AS d(job_id, kind, resource_id)),
         m AS (UPDATE baseline_resources r SET state = 'deleted' FROM j JOIN d ON d.job_id = j.job_id
               WHERE r.owner = j.owner AND r.kind = d.kind AND r.resource_id = d.resource_id)
         SELECT id, job_id FROM o",
    )
    .bind(batch.iter().map(|(f, _)| f.event_id.as_str()).collect::<Vec<_>>())
    .bind(batch.iter().map(|(f, _)| f.job_id).collect::<Vec<_>>())
    .bind(batch.iter().map(|(f, _)| f.owner.as_str()).collect::<Vec<_>>())
    .bind(batch.iter().map(|(f, _)| f.body.as_slice()).collect::<Vec<_>>())
    .bind(batch.iter().flat_map(|(f, _)| f.deleted.iter().map(|_| f.job_id)).collect::<Vec<_>>())
    .bind(batch.iter().flat_map(|(f, _)| f.deleted.iter().map(|(k, _)| k.as_str())).collect::<Vec<_>>())
    .bind(batch.iter().flat_map(|(f, _)| f.deleted.iter().map(|(_, i)| i.as_str())).collect::<Vec<_>>())
    .fetch_all(&pool)
    .await;
    let Ok(rows) = rows.inspect_err(|e| eprintln!("baseline finish: {e}")) else { return };
    let ids: HashMap<Uuid, i64> = rows.iter().map(|r| (r.get("job_id"), r.get("id"))).collect();
    for (f, reply) in batch {
        let _ = reply.send(ids.get(&f.job_id).copied());
    }
}

async fn clear(pool: PgPool, batch: Vec<i64>) {
    if let Err(e) = sqlx::query("DELETE FROM baseline_outbox WHERE id = ANY($1)").bind(&batch).execute(&pool).await {
        eprintln!("baseline outbox clear: {e}");
    }
}

/// Loads `n` owners of the bench's 5 resources into the baseline's table.
pub async fn preload(pool: &PgPool, tag: &str, n: usize) -> anyhow::Result<()> {
    for stmt in SCHEMA {
        sqlx::query(stmt).execute(pool).await?;
    }
    sqlx::query(&format!(
        "INSERT INTO baseline_resources (owner, kind, resource_id, attributes)
             SELECT 'bench/' || $1 || '-' || i, k.kind, k.kind || '-' || $1 || '-' || i || k.suffix, k.attrs
             FROM generate_series(0, $2 - 1) AS i CROSS JOIN {}",
        crate::devtools::bench::NODE_ROWS
    ))
    .bind(tag)
    .bind(n as i64)
    .execute(pool)
    .await?;
    Ok(())
}
