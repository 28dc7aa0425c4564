//! `reaper bench --reconcile-items N`: one reconcile sweep over N truth items
//! against N copy items (1% of them orphans), in a database of its own. The
//! copy is a PostgreSQL table or a MongoDB collection. Reports the sweep's
//! time and this process's peak memory (VmHWM), which is what "bounded
//! memory" is about: the items stream through; the set difference is
//! PostgreSQL's.

use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

use crate::config::Settings;
use crate::reconcile::{Mode, Sweeper};

#[derive(Debug, Serialize)]
pub struct ReconcileBench {
    pub machine: String,
    pub date: String,
    pub items: usize,
    pub copy: String,
    pub seed_seconds: f64,
    pub sweep_seconds: f64,
    pub items_per_sec: f64,
    pub orphans_found: u64,
    pub orphans_expected: u64,
    pub rss_before_mib: f64,
    pub peak_rss_mib: f64,
    /// With --reconcile-execute: the executed sweep (publishing one teardown
    /// per orphan) and the time until a worker in this process deleted them all.
    pub execute_sweep_seconds: Option<f64>,
    pub cleanup_seconds: Option<f64>,
}

/// `copy`: "postgres" or "mongodb" (then `mongo_url` is used).
pub async fn run(
    settings: Settings,
    items: usize,
    copy: &str,
    mongo_url: &str,
    execute: bool,
) -> anyhow::Result<ReconcileBench> {
    let id = format!("{:08x}", fastrand::u32(..));
    let db_name = format!("reaper_bench_rc_{id}");
    let admin: PgConnectOptions = settings.database.url.expose().parse()?;
    let mut conn = admin.clone().database("postgres").connect().await.context("connecting to PostgreSQL")?;
    sqlx::query(&format!("CREATE DATABASE \"{db_name}\"")).execute(&mut conn).await?;
    let result = bench(&settings, &admin, &db_name, items, copy, mongo_url, execute).await;
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)")).execute(&mut conn).await;
    if copy == "mongodb" {
        if let Ok(c) = mongodb::Client::with_uri_str(mongo_url).await {
            let _ = c.database(&db_name).drop().await;
        }
    }
    let _ = conn.close().await;
    result
}

async fn bench(
    settings: &Settings,
    admin: &PgConnectOptions,
    db_name: &str,
    items: usize,
    copy: &str,
    mongo_url: &str,
    execute: bool,
) -> anyhow::Result<ReconcileBench> {
    anyhow::ensure!(!(execute && copy != "postgres"), "--reconcile-execute measures the PostgreSQL copy only");
    let url = db_url(admin, db_name);
    let orphans = (items / 100) as u64;
    let seeded = Instant::now();
    let mut app = admin.clone().database(db_name).connect().await?;
    // Truth: item-0 .. item-(N-1). Copy: the same, except the last 1% are orphans.
    sqlx::raw_sql(
        "CREATE UNLOGGED TABLE truth_items (key text NOT NULL);
         CREATE UNLOGGED TABLE copy_items (key text NOT NULL, created_at timestamptz NOT NULL);",
    )
    .execute(&mut app)
    .await?;
    sqlx::query("INSERT INTO truth_items SELECT 'item-' || n FROM generate_series(0, $1 - 1) AS n")
        .bind(items as i64)
        .execute(&mut app)
        .await?;
    let copy_toml = match copy {
        "postgres" => {
            sqlx::query(
                "INSERT INTO copy_items SELECT CASE WHEN n < $1 - $2 THEN 'item-' || n ELSE 'orphan-' || n END, \
                 now() - interval '2 days' FROM generate_series(0, $1 - 1) AS n",
            )
            .bind(items as i64)
            .bind(orphans as i64)
            .execute(&mut app)
            .await?;
            // The teardowns of --reconcile-execute delete by key.
            sqlx::query("CREATE INDEX ON copy_items (key)").execute(&mut app).await?;
            r#"copy = { provider = "app", sql = "SELECT key, created_at FROM copy_items", created_at = "created_at" }"#
                .to_string()
        }
        "mongodb" => {
            seed_mongo(mongo_url, db_name, items, orphans as usize).await?;
            format!(
                "copy = {{ provider = \"docs\", collection = \"copy_items\", key = \"key\" }}\n\
                 [providers.docs]\ntype = \"mongodb\"\nurl = \"{mongo_url}\"\ndatabase = \"{db_name}\"\n"
            )
        }
        other => anyhow::bail!("--reconcile-copy {other:?}: postgres or mongodb"),
    };
    let _ = app.close().await;
    let seed_seconds = seeded.elapsed().as_secs_f64();

    let toml = format!(
        "[providers.app]\ntype = \"postgres\"\nurl = \"{url}\"\n\
         [kinds.copy_item]\nprovider = \"app\"\ndelete = \"DELETE FROM copy_items WHERE key = $1\"\n\
         [reconcile.rules.bench]\n\
         truth = {{ provider = \"app\", sql = \"SELECT key FROM truth_items\" }}\n\
         action = {{ kind = \"copy_item\" }}\nmax_count = 100000000\nmax_fraction = 1.0\n{copy_toml}"
    );
    let mut s = Settings::from_toml_layers(&[&toml])?;
    s.database = settings.database.clone();
    s.database.url = crate::config::Secret::new(url.clone());
    s.broker = settings.broker.clone();
    s.broker.prefix = format!("bench-rc-{}", &db_name[db_name.len() - 8..]);
    s.broker.prefetch = 256;
    s.admin.listen = String::new();
    crate::catalog::validate(&s)?;
    let ledger = crate::ledger::Ledger::from_settings(&s).await?;
    ledger.migrate().await?;
    let providers = crate::providers::Providers::build(&s.providers).await?;
    let sweeper = Sweeper { settings: &s, ledger: &ledger, providers: &providers, metrics: None };
    let rss_before_mib = status_mib("VmRSS:");
    let started = Instant::now();
    let report = sweeper.sweep("bench", Mode::default()).await?;
    let sweep_seconds = started.elapsed().as_secs_f64();
    ledger.pool().close().await;
    let peak_rss_mib = status_mib("VmHWM:");
    let (execute_sweep_seconds, cleanup_seconds) = if execute {
        let (a, b) = execute_and_clean(s, items as i64 - orphans as i64).await?;
        (Some(a), Some(b))
    } else {
        (None, None)
    };
    Ok(ReconcileBench {
        machine: crate::devtools::bench::machine(),
        date: chrono::Utc::now().format("%Y-%m-%d").to_string(),
        items,
        copy: copy.to_string(),
        seed_seconds,
        sweep_seconds,
        items_per_sec: (2 * items) as f64 / sweep_seconds,
        orphans_found: report.orphans,
        orphans_expected: orphans,
        rss_before_mib,
        peak_rss_mib,
        execute_sweep_seconds,
        cleanup_seconds,
    })
}

/// Runs a worker in this process, sweeps with --execute, and waits until the
/// copy holds only the `keep` items that are not orphans.
async fn execute_and_clean(s: Settings, keep: i64) -> anyhow::Result<(f64, f64)> {
    let app = std::sync::Arc::new(crate::app::App::build(s).await?);
    let token = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(app.clone().run(token.clone()));
    let started = Instant::now();
    let result = async {
        let report = app.sweeper().sweep("bench", Mode { execute: true, force: false, older_than: None }).await?;
        let swept = started.elapsed().as_secs_f64();
        anyhow::ensure!(report.published > 0, "the executed sweep published nothing: {report:?}");
        let deadline = Instant::now() + std::time::Duration::from_secs(600);
        loop {
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM copy_items").fetch_one(app.ledger.pool()).await?;
            if left <= keep {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "{} orphans still there after 600 s", left - keep);
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Ok((swept, started.elapsed().as_secs_f64()))
    }
    .await;
    token.cancel();
    let _ = worker.await;
    let names = crate::broker::Names::new(&app.settings.broker.prefix);
    if let Ok(conn) = lapin::Connection::connect(app.settings.broker.url.expose(), Default::default()).await {
        let _ = crate::broker::delete_topology(&conn, &names, &app.settings.worker.all_delays()).await;
        let _ = conn.close(200, "bench done".into()).await;
    }
    app.ledger.pool().close().await;
    result
}

async fn seed_mongo(url: &str, db: &str, items: usize, orphans: usize) -> anyhow::Result<()> {
    use mongodb::bson::doc;
    let client = mongodb::Client::with_uri_str(url).await?;
    let coll = client.database(db).collection::<mongodb::bson::Document>("copy_items");
    let mut n = 0;
    while n < items {
        let end = (n + 10_000).min(items);
        let docs = (n..end).map(|i| {
            let key = if i < items - orphans { format!("item-{i}") } else { format!("orphan-{i}") };
            doc! { "key": key }
        });
        coll.insert_many(docs).await?;
        n = end;
    }
    Ok(())
}

fn db_url(admin: &PgConnectOptions, db: &str) -> String {
    let user = admin.get_username();
    let host = admin.get_host();
    let port = admin.get_port();
    format!("postgres://{user}@{host}:{port}/{db}")
}

/// A line of /proc/self/status, in MiB.
fn status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}
