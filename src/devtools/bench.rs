//! `reaper bench`: the numbers in docs/performance.md.
//!
//! 1. ceiling: the bare broker loop (`devtools::ceiling`), same queue type and prefetch;
//! 2. tracks: 5 single-resource tracks per owner preloaded on the queue,
//!    `reaper run`; time from the first track recorded to the last;
//! 3. reaper end to end: N owners of 5 tracked resources (the VPC node, two
//!    levels) preloaded in the ledger, N deletion events preloaded on the queue,
//!    `reaper run` as its own process against a null API (`reaper sim --null`)
//!    that answers 204 at once; time from the first result to the last;
//! 4. baseline: the same with the minimal worker of `devtools::baseline`;
//! 5. lifecycle: 5 tracks then a deletion per owner, all preloaded; owners/s;
//! 6. latency: p50/p99 from publish to result at half the measured rate;
//! 7. the end-to-end run again with 20 ms of API latency.
//!
//! Before each measured phase the bench database is vacuumed, analysed and
//! checkpointed, so no phase pays for the one before. CPU is read from /proc
//! for each process (worker, null API, RabbitMQ's beam.smp, every postgres
//! process); peak RSS is the worker's VmHWM.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde::Serialize;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

use crate::broker::publisher::Publisher;
use crate::broker::tap::ResultTap;
use crate::broker::{self, Names};
use crate::config::{QueueType, Settings};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Jobs (5 resources each) in the end-to-end runs.
    #[arg(long, default_value_t = 20_000)]
    pub jobs: usize,
    /// Prefetch of the worker and of the ceiling loop.
    #[arg(long, default_value_t = 256)]
    pub prefetch: u16,
    /// quorum or classic.
    #[arg(long, default_value = "quorum")]
    pub queue_type: String,
    /// API latency of the second end-to-end run.
    #[arg(long, default_value_t = 20)]
    pub api_latency_ms: u64,
    /// Seconds of steady load for the latency measurement.
    #[arg(long, default_value_t = 10)]
    pub steady_secs: u64,
    /// Skip the 20 ms run and the latency run (memory soak with --jobs 50000).
    #[arg(long)]
    pub only_e2e: bool,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Instead of the job runs: one reconcile sweep over this many truth items
    /// against as many copy items (1% orphans); its time and peak memory.
    #[arg(long)]
    pub reconcile_items: Option<usize>,
    /// Where the reconcile benchmark's copy lives: postgres or mongodb.
    #[arg(long, default_value = "postgres")]
    pub reconcile_copy: String,
    /// Also run an executed sweep with a worker in this process and time until
    /// every orphan is deleted (PostgreSQL copy; needs RabbitMQ).
    #[arg(long)]
    pub reconcile_execute: bool,
    /// Instead of the job runs: plan one event listing this many resources of
    /// the VPC kinds (worker.max_resources_per_event is the largest allowed)
    /// and walk it; time and peak memory. Needs no services.
    #[arg(long)]
    pub plan_resources: Option<usize>,
    /// Internal: run the baseline worker (devtools::baseline) against this API
    /// until killed; the bench starts it as its own process.
    #[arg(long, hide = true)]
    pub serve_baseline: Option<String>,
    /// The MongoDB server for --reconcile-copy mongodb.
    #[arg(long, default_value = "mongodb://127.0.0.1:27018/?directConnection=true")]
    pub mongo_url: String,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    machine: String,
    date: String,
    queue_type: String,
    prefetch: u16,
    jobs: usize,
    ceiling_msgs_per_sec: f64,
    /// Single-resource tracks (5 per owner), preloaded.
    tracks: Option<Run>,
    e2e: Option<Run>,
    ratio_to_ceiling: f64,
    /// The minimal worker (devtools::baseline) on the same job.
    baseline: Option<Run>,
    ratio_to_baseline: f64,
    /// 5 tracks then 1 deletion per owner, all preloaded: owners/s.
    lifecycle: Option<Run>,
    latency_offered_per_sec: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    e2e_api_latency: Option<Run>,
    api_latency_ms: u64,
    api_latency_ratio: f64,
}

#[derive(Debug, Default, Serialize, Clone)]
struct Run {
    jobs: usize,
    secs: f64,
    jobs_per_sec: f64,
    worker_cpu_ms_per_job: f64,
    /// CPU of every postgres process per job (or track).
    database_cpu_ms_per_job: f64,
    worker_peak_rss_mib: f64,
    cpu_share: HashMap<String, f64>,
}

pub async fn run(settings: Settings, args: BenchArgs) -> ExitCode {
    if let Some(api) = &args.serve_baseline {
        return match crate::devtools::baseline::serve(&settings, api).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(n) = args.plan_resources {
        return plan_bench(n, args.json);
    }
    if let Some(items) = args.reconcile_items {
        let (copy, url, execute) = (&args.reconcile_copy, &args.mongo_url, args.reconcile_execute);
        return match crate::devtools::reconcile_bench::run(settings, items, copy, url, execute).await {
            Ok(r) => {
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&r).expect("serializable"));
                } else {
                    println!(
                        "reconcile sweep, {} vs {} items ({} copy), {} on {}\n  seeding          {:>8.1} s\n  sweep            {:>8.1} s  ({:.0} items/s read)\n  orphans found    {:>8} (expected {})\n  RSS before       {:>8.1} MiB\n  peak RSS         {:>8.1} MiB",
                        r.items, r.items, r.copy, r.date, r.machine, r.seed_seconds, r.sweep_seconds, r.items_per_sec,
                        r.orphans_found, r.orphans_expected, r.rss_before_mib, r.peak_rss_mib
                    );
                    if let (Some(sweep), Some(clean)) = (r.execute_sweep_seconds, r.cleanup_seconds) {
                        println!(
                            "  executed sweep   {sweep:>8.1} s  (publishing {} teardowns)\n  all deleted after {clean:>7.1} s  ({:.0} orphans/s)",
                            r.orphans_expected,
                            r.orphans_expected as f64 / clean
                        );
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match bench(settings, &args).await {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report).expect("serializable"));
            } else {
                print_table(&report);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(mut settings: Settings, args: &BenchArgs) -> anyhow::Result<Report> {
    let queue_type = match args.queue_type.as_str() {
        "quorum" => QueueType::Quorum,
        "classic" => QueueType::Classic,
        other => anyhow::bail!("--queue-type {other:?}: quorum or classic"),
    };
    let id = format!("{:08x}", fastrand::u32(..));
    let prefix = format!("bench-{id}");
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("reaper-bench-{id}"));
    std::fs::create_dir_all(&dir)?;

    // A database of the bench's own, dropped at the end.
    let admin: PgConnectOptions = settings.database.url.expose().parse()?;
    let db_name = format!("reaper_bench_{id}");
    let mut admin_conn = admin.clone().connect().await?;
    sqlx::query(&format!("CREATE DATABASE \"{db_name}\"")).execute(&mut admin_conn).await?;
    let db_url = format!("{}/{db_name}", server_part(settings.database.url.expose()));

    settings.broker.prefix = prefix.clone();
    settings.broker.queue_type = queue_type;
    settings.broker.prefetch = args.prefetch;
    let names = Names::new(&prefix);
    let mut report = Report {
        machine: machine(),
        date: chrono::Utc::now().format("%Y-%m-%d").to_string(),
        queue_type: args.queue_type.clone(),
        prefetch: args.prefetch,
        jobs: args.jobs,
        api_latency_ms: args.api_latency_ms,
        ..Default::default()
    };

    let outcome = async {
        let body = sample_event("bench/x-0000000", "ev-0000000");
        let (conn, _) = broker::link::open(&settings, &names).await?;
        let _ = conn.close(200, "declared".into()).await;
        eprintln!("bench: ceiling ({} messages)", args.jobs);
        let secs = crate::devtools::ceiling::measure(
            settings.broker.url.expose(),
            &prefix,
            queue_type,
            args.prefetch,
            args.jobs,
            &body,
        )
        .await?;
        report.ceiling_msgs_per_sec = args.jobs as f64 / secs;

        let ctx = Ctx {
            exe: exe.clone(),
            dir: dir.clone(),
            settings: settings.clone(),
            db_url: db_url.clone(),
            names: names.clone(),
        };
        eprintln!("bench: tracks ({} owners of 5 resources, one track each)", args.jobs);
        report.tracks = Some(ctx.tracks("t", args.jobs).await?);
        eprintln!("bench: reaper end to end ({} jobs, API at 0 ms)", args.jobs);
        let e2e = ctx.end_to_end("a", args.jobs, 0, Worker::Reaper).await?;
        report.ratio_to_ceiling = e2e.jobs_per_sec / report.ceiling_msgs_per_sec;
        let max_rate = e2e.jobs_per_sec;
        eprintln!("bench: the baseline worker end to end ({} jobs, API at 0 ms)", args.jobs);
        let baseline = ctx.end_to_end("base", args.jobs, 0, Worker::Baseline).await?;
        report.ratio_to_baseline = e2e.jobs_per_sec / baseline.jobs_per_sec;
        report.e2e = Some(e2e);
        report.baseline = Some(baseline);
        eprintln!("bench: lifecycle ({} owners: 5 tracks, then a deletion)", args.jobs);
        report.lifecycle = Some(ctx.lifecycle("l", args.jobs).await?);
        if !args.only_e2e {
            eprintln!("bench: latency at half the rate ({:.0}/s for {} s)", max_rate / 2.0, args.steady_secs);
            let (p50, p99) = ctx.latency("b", max_rate / 2.0, args.steady_secs).await?;
            report.latency_offered_per_sec = max_rate / 2.0;
            report.latency_p50_ms = p50;
            report.latency_p99_ms = p99;
            eprintln!("bench: reaper end to end ({} jobs, API at {} ms)", args.jobs, args.api_latency_ms);
            let slow = ctx.end_to_end("c", args.jobs, args.api_latency_ms, Worker::Reaper).await?;
            report.api_latency_ratio = slow.jobs_per_sec / max_rate;
            report.e2e_api_latency = Some(slow);
        }
        anyhow::Ok(())
    }
    .await;

    // Leave nothing behind, whatever happened.
    if let Ok(conn) = lapin::Connection::connect(settings.broker.url.expose(), Default::default()).await {
        let _ = broker::delete_topology(&conn, &names, &settings.worker.all_delays()).await;
        let _ = conn.close(200, "bench done".into()).await;
    }
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)")).execute(&mut admin_conn).await;
    let _ = admin_conn.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    outcome?;
    Ok(report)
}

/// The VPC node's 5 resources (the kinds of `Ctx::config`), as SQL rows
/// `k(kind, suffix, attrs)`: a resource's id is its kind, the owner's tag and
/// number, and the suffix. `publish_tracks` sends the same as events.
pub(crate) const NODE_ROWS: &str =
    "(VALUES ('vni', '', '{}'::jsonb), ('dns_record', '', '{\"zone_id\": \"z1\"}'::jsonb),
        ('bare_metal_server', '', '{}'::jsonb), ('ip_reservation', '-1', '{\"subnet_id\": \"s1\"}'::jsonb),
        ('ip_reservation', '-2', '{\"subnet_id\": \"s1\"}'::jsonb)) AS k(kind, suffix, attrs)";

/// Which worker an end-to-end run measures.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Worker {
    Reaper,
    Baseline,
}

struct Ctx {
    exe: PathBuf,
    dir: PathBuf,
    settings: Settings,
    db_url: String,
    names: Names,
}

impl Ctx {
    /// Starts the null API and a worker configured for it.
    fn start(&self, tag: &str, api_latency_ms: u64, which: Worker) -> anyhow::Result<(Proc, Proc)> {
        let port = free_port()?;
        let api = Proc::spawn(Command::new(&self.exe).args([
            "sim",
            "--null",
            "--port",
            &port.to_string(),
            "--latency-ms",
            &api_latency_ms.to_string(),
        ]))?;
        let config = self.dir.join(format!("{tag}.toml"));
        std::fs::write(&config, self.config(port))?;
        let mut cmd = Command::new(&self.exe);
        match which {
            Worker::Reaper => cmd.args(["run", "--config"]).arg(&config),
            Worker::Baseline => cmd
                .args(["bench", "--config"])
                .arg(&config)
                .args(["--serve-baseline", &format!("http://127.0.0.1:{port}")]),
        };
        // The config file says everything: REAPER_* variables that set the
        // bench up (REAPER_DATABASE__URL) would override it in the worker.
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("REAPER_")) {
            cmd.env_remove(k);
        }
        let worker = Proc::spawn(cmd.env("RUST_LOG", "warn"))?;
        Ok((api, worker))
    }

    fn config(&self, port: u16) -> String {
        let s = &self.settings;
        let delays: Vec<String> = s.worker.retry_delays_secs.iter().map(|d| d.to_string()).collect();
        format!(
            "[broker]\nurl = \"{}\"\nprefix = \"{}\"\nqueue_type = \"{}\"\nprefetch = {}\n\
             [admin]\nlisten = \"\"\n[database]\nurl = \"{}\"\nmax_connections = {}\n\
             [worker]\nretry_delays_secs = [{}]\n\
             [providers.cloud]\ntype = \"http\"\nbase_url = \"http://127.0.0.1:{port}\"\nmax_concurrency = 512\n\
             [kinds.vni]\nprovider = \"cloud\"\ndelete = \"DELETE /v1/virtual_network_interfaces/{{id}}\"\n\
             [kinds.dns_record]\nprovider = \"cloud\"\ndelete = \"DELETE /v1/dns_zones/{{attr.zone_id}}/resource_records/{{id}}\"\n\
             [kinds.bare_metal_server]\nprovider = \"cloud\"\ndelete = \"DELETE /v1/bare_metal_servers/{{id}}\"\nafter = [\"vni\", \"dns_record\"]\n\
             [kinds.ip_reservation]\nprovider = \"cloud\"\ndelete = \"DELETE /v1/subnets/{{attr.subnet_id}}/reserved_ips/{{id}}\"\nafter = [\"dns_record\"]\n",
            s.broker.url.expose(),
            s.broker.prefix,
            if s.broker.queue_type == QueueType::Quorum { "quorum" } else { "classic" },
            s.broker.prefetch,
            self.db_url,
            s.database.max_connections,
            delays.join(", "),
        )
    }

    /// Tracks `n` VPC nodes straight into the ledger (as if their tracks had
    /// been consumed) and returns their owners.
    async fn preload_ledger(&self, tag: &str, n: usize) -> anyhow::Result<Vec<String>> {
        let mut s = self.settings.clone();
        s.database.url = crate::config::Secret::new(self.db_url.clone());
        let ledger = crate::ledger::Ledger::from_settings(&s).await?;
        ledger.migrate().await?;
        sqlx::query(&format!(
            "INSERT INTO tracked_resources (owner, kind, resource_id, attributes, created_at)
                 SELECT 'bench/' || $1 || '-' || i, k.kind, k.kind || '-' || $1 || '-' || i || k.suffix, k.attrs,
                        now() - interval '1 hour'
                 FROM generate_series(0, $2 - 1) AS i CROSS JOIN {NODE_ROWS}"
        ))
        .bind(tag)
        .bind(n as i64)
        .execute(ledger.pool())
        .await?;
        ledger.pool().close().await;
        Ok((0..n).map(|i| format!("bench/{tag}-{i}")).collect())
    }

    async fn end_to_end(&self, tag: &str, n: usize, api_latency_ms: u64, which: Worker) -> anyhow::Result<Run> {
        let owners = match which {
            Worker::Reaper => self.preload_ledger(tag, n).await?,
            Worker::Baseline => {
                let pool = sqlx::PgPool::connect(&self.db_url).await?;
                crate::devtools::baseline::preload(&pool, tag, n).await?;
                pool.close().await;
                (0..n).map(|i| format!("bench/{tag}-{i}")).collect()
            }
        };
        let (conn, publisher) = broker::link::open(&self.settings, &self.names).await?;
        let mut tap = ResultTap::open(&conn, &self.names).await?;
        publish_all(&publisher, &self.names, &owners, tag).await?;
        self.settle().await?;
        let before = Cpu::sample(None);
        let (mut api, mut worker) = self.start(tag, api_latency_ms, which)?;
        let first = tap
            .next(Duration::from_secs(60))
            .await
            .ok_or_else(|| anyhow::anyhow!("no result within 60 s; is the worker running?"))?;
        anyhow::ensure!(first.result.status == "completed", "a bench job did not complete: {:?}", first.result);
        let t0 = Instant::now();
        let mut got = 1;
        while got < n {
            let r = tap
                .next(Duration::from_secs(30))
                .await
                .ok_or_else(|| anyhow::anyhow!("stalled after {got} of {n} results"))?;
            anyhow::ensure!(r.result.status == "completed", "a bench job did not complete: {:?}", r.result);
            got += 1;
        }
        let secs = t0.elapsed().as_secs_f64();
        let after = Cpu::sample(Some((&worker, &api)));
        let rss = worker.peak_rss_kib() as f64 / 1024.0;
        worker.stop();
        api.stop();
        let _ = conn.close(200, "bench".into()).await;
        Ok(Run::new(n, secs, &before, &after, rss))
    }

    /// `n` owners' 5 single-resource tracks, preloaded; from the first
    /// recorded to the last.
    async fn tracks(&self, tag: &str, n: usize) -> anyhow::Result<Run> {
        let pool = self.ledger_pool().await?;
        let (conn, publisher) = broker::link::open(&self.settings, &self.names).await?;
        publish_tracks(&publisher, &self.names, tag, n).await?;
        self.settle().await?;
        let before = Cpu::sample(None);
        let (mut api, mut worker) = self.start(tag, 0, Worker::Reaper)?;
        let want = 5 * n as i64;
        let t0 = wait_for_track(&pool, &track_event_id(tag, "vni", 0, ""), Duration::from_secs(60)).await?;
        wait_for_track(&pool, &track_event_id(tag, "ip_reservation", n - 1, "-2"), Duration::from_secs(600)).await?;
        wait_for_all_tracks(&pool, want, Duration::from_secs(60)).await?;
        let secs = t0.elapsed().as_secs_f64();
        let after = Cpu::sample(Some((&worker, &api)));
        let rss = worker.peak_rss_kib() as f64 / 1024.0;
        worker.stop();
        api.stop();
        sqlx::query("TRUNCATE tracks").execute(&pool).await?;
        pool.close().await;
        let _ = conn.close(200, "bench".into()).await;
        Ok(Run::new(want as usize, secs, &before, &after, rss))
    }

    /// `n` owners' lifecycles: 5 tracks each, then a deletion each, all
    /// preloaded in that order; from the first track recorded to the last
    /// result. Owners per second.
    async fn lifecycle(&self, tag: &str, n: usize) -> anyhow::Result<Run> {
        let pool = self.ledger_pool().await?;
        let (conn, publisher) = broker::link::open(&self.settings, &self.names).await?;
        let mut tap = ResultTap::open(&conn, &self.names).await?;
        publish_tracks(&publisher, &self.names, tag, n).await?;
        let owners: Vec<String> = (0..n).map(|i| format!("bench/{tag}-{i}")).collect();
        publish_all(&publisher, &self.names, &owners, tag).await?;
        self.settle().await?;
        let before = Cpu::sample(None);
        let (mut api, mut worker) = self.start(tag, 0, Worker::Reaper)?;
        let t0 = wait_for_track(&pool, &track_event_id(tag, "vni", 0, ""), Duration::from_secs(60)).await?;
        for got in 0..n {
            let r = tap
                .next(Duration::from_secs(60))
                .await
                .ok_or_else(|| anyhow::anyhow!("stalled after {got} of {n} results"))?;
            anyhow::ensure!(r.result.status == "completed", "a bench job did not complete: {:?}", r.result);
            anyhow::ensure!(r.result.resources.len() == 5, "a lifecycle job missed tracks: {:?}", r.result);
        }
        let secs = t0.elapsed().as_secs_f64();
        let after = Cpu::sample(Some((&worker, &api)));
        let rss = worker.peak_rss_kib() as f64 / 1024.0;
        worker.stop();
        api.stop();
        pool.close().await;
        let _ = conn.close(200, "bench".into()).await;
        Ok(Run::new(n, secs, &before, &after, rss))
    }

    /// Vacuums, analyses and checkpoints the bench database, so that a phase
    /// does not pay for the dead rows and dirty pages of the one before.
    /// Empty tables are left alone: statistics saying "empty" make PostgreSQL
    /// plan scans of them that it keeps as they fill, which no production
    /// ledger sees (autovacuum first analyses a table once it holds rows), so
    /// analysing them would measure an artefact. (CHECKPOINT needs a superuser
    /// or pg_checkpoint; without, it is skipped.)
    async fn settle(&self) -> anyhow::Result<()> {
        let mut conn = sqlx::PgConnection::connect(&self.db_url).await?;
        // Names from the catalog, quoted by the server: VACUUM takes no bound parameters.
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT quote_ident(c.relname) FROM pg_class c
             WHERE c.relkind = 'r' AND c.relnamespace = 'public'::regnamespace",
        )
        .fetch_all(&mut conn)
        .await?;
        for table in tables {
            let rows: bool =
                sqlx::query_scalar(&format!("SELECT EXISTS (SELECT 1 FROM {table})")).fetch_one(&mut conn).await?;
            if rows {
                sqlx::query(&format!("VACUUM ANALYZE {table}")).execute(&mut conn).await?;
            }
        }
        let _ = sqlx::query("CHECKPOINT").execute(&mut conn).await;
        let _ = conn.close().await;
        Ok(())
    }

    /// The bench database, migrated.
    async fn ledger_pool(&self) -> anyhow::Result<sqlx::PgPool> {
        let pool = sqlx::PgPool::connect(&self.db_url).await?;
        crate::ledger::MIGRATOR.run(&pool).await?;
        Ok(pool)
    }

    /// Publishes at `rate`/s for `secs` and returns (p50, p99) publish-to-result in ms.
    async fn latency(&self, tag: &str, rate: f64, secs: u64) -> anyhow::Result<(f64, f64)> {
        let n = (rate * secs as f64) as usize;
        let owners = self.preload_ledger(tag, n).await?;
        let (conn, publisher) = broker::link::open(&self.settings, &self.names).await?;
        let mut tap = ResultTap::open(&conn, &self.names).await?;
        let (mut api, mut worker) = self.start(tag, 0, Worker::Reaper)?;
        // Wait for the worker: one warm-up event.
        let warm = self.preload_ledger(&format!("{tag}w"), 1).await?;
        publish_all(&publisher, &self.names, &warm, &format!("{tag}w")).await?;
        tap.next(Duration::from_secs(60)).await.ok_or_else(|| anyhow::anyhow!("the worker did not start"))?;

        let sent = std::sync::Arc::new(std::sync::Mutex::new(HashMap::<String, Instant>::new()));
        let pace = Duration::from_millis(10);
        let per_tick = (rate / 100.0).max(1.0);
        let sender = {
            let sent = sent.clone();
            let publisher = publisher.clone();
            let names = self.names.clone();
            let tag = tag.to_string();
            tokio::spawn(async move {
                let start = Instant::now();
                let mut i = 0usize;
                let mut tick = 0u64;
                while i < owners.len() {
                    tick += 1;
                    let due = ((tick as f64) * per_tick) as usize;
                    let mut batch = Vec::new();
                    while i < owners.len() && i < due {
                        let ev = format!("{tag}-ev-{i}");
                        sent.lock().unwrap().insert(ev.clone(), Instant::now());
                        batch.push((owners[i].clone(), ev));
                        i += 1;
                    }
                    let sends = batch.iter().map(|(o, e)| {
                        let body = sample_event(o, e);
                        let p = publisher.clone();
                        let ex = names.events.clone();
                        async move { p.publish(&ex, "deletion.requested", &body, e, &[]).await }
                    });
                    for r in join_all(sends).await {
                        r?;
                    }
                    tokio::time::sleep_until((start + pace * tick as u32).into()).await;
                }
                anyhow::Ok(())
            })
        };
        let mut lat = Vec::with_capacity(n);
        while lat.len() < n {
            let r = tap
                .next(Duration::from_secs(30))
                .await
                .ok_or_else(|| anyhow::anyhow!("stalled after {} of {n} results", lat.len()))?;
            if let Some(t) = sent.lock().unwrap().get(&r.result.event_id) {
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
        sender.await??;
        worker.stop();
        api.stop();
        let _ = conn.close(200, "bench".into()).await;
        lat.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
        Ok((pct(0.50), pct(0.99)))
    }
}

impl Run {
    /// `n` jobs (or tracks, or owners) in `secs`, the first not timed.
    fn new(n: usize, secs: f64, before: &Cpu, after: &Cpu, rss_mib: f64) -> Run {
        Run {
            jobs: n,
            secs,
            jobs_per_sec: (n - 1) as f64 / secs,
            worker_cpu_ms_per_job: (after.worker - before.worker) * 1000.0 / n as f64,
            database_cpu_ms_per_job: (after.database - before.database) * 1000.0 / n as f64,
            worker_peak_rss_mib: rss_mib,
            cpu_share: after.shares(before),
        }
    }
}

/// When the track stored under `event_id` is in the ledger: one index probe
/// per poll, so that polling costs the database next to nothing.
async fn wait_for_track(pool: &sqlx::PgPool, event_id: &str, limit: Duration) -> anyhow::Result<Instant> {
    let start = Instant::now();
    loop {
        let found: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tracks WHERE event_id = $1)")
            .bind(event_id)
            .fetch_one(pool)
            .await?;
        if found {
            return Ok(Instant::now());
        }
        anyhow::ensure!(start.elapsed() < limit, "track {event_id} not recorded after {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every preloaded track in the ledger, once the last published is: the few
/// still in flight beside it are waited for.
async fn wait_for_all_tracks(pool: &sqlx::PgPool, want: i64, limit: Duration) -> anyhow::Result<Instant> {
    let start = Instant::now();
    loop {
        let have: i64 = sqlx::query_scalar("SELECT count(*) FROM tracks").fetch_one(pool).await?;
        if have >= want {
            return Ok(Instant::now());
        }
        anyhow::ensure!(start.elapsed() < limit, "only {have} of {want} tracks recorded after {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The event id `publish_tracks` gives owner `i`'s resource of `kind` + `suffix`.
fn track_event_id(tag: &str, kind: &str, i: usize, suffix: &str) -> String {
    format!("{tag}-track-{kind}-{tag}-{i}{suffix}")
}

/// The 5 resources of each of `n` owners, one resource.tracked each, as the
/// end-to-end runs' preloaded ledger holds them.
async fn publish_tracks(p: &Publisher, names: &Names, tag: &str, n: usize) -> anyhow::Result<()> {
    let kinds = [
        ("vni", "", serde_json::json!({})),
        ("dns_record", "", serde_json::json!({"zone_id": "z1"})),
        ("bare_metal_server", "", serde_json::json!({})),
        ("ip_reservation", "-1", serde_json::json!({"subnet_id": "s1"})),
        ("ip_reservation", "-2", serde_json::json!({"subnet_id": "s1"})),
    ];
    let created = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let all: Vec<(String, Vec<u8>)> = (0..n)
        .flat_map(|i| {
            let created = &created;
            kinds.iter().map(move |(kind, suffix, attrs)| {
                let id = format!("{kind}-{tag}-{i}{suffix}");
                let event_id = track_event_id(tag, kind, i, suffix);
                let body = serde_json::json!({"event_id": event_id, "owner": format!("bench/{tag}-{i}"),
                    "kind": kind, "id": id, "attributes": attrs, "created_at": created});
                (event_id, serde_json::to_vec(&body).expect("serializable"))
            })
        })
        .collect();
    for chunk in all.chunks(1000) {
        let sends = chunk.iter().map(|(e, body)| p.publish(&names.events, "resource.tracked", body, e, &[]));
        for r in join_all(sends).await {
            r?;
        }
    }
    Ok(())
}

fn sample_event(owner: &str, event_id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "event_id": event_id, "owner": owner, "reason": "benchmark", "requested_by": "reaper bench",
        "occurred_at": chrono::Utc::now().to_rfc3339(),
    }))
    .expect("serializable")
}

async fn publish_all(p: &Publisher, names: &Names, owners: &[String], tag: &str) -> anyhow::Result<()> {
    for (c, chunk) in owners.chunks(1000).enumerate() {
        let sends = chunk.iter().enumerate().map(|(i, o)| {
            let e = format!("{tag}-ev-{}", c * 1000 + i);
            let body = sample_event(o, &e);
            async move { p.publish(&names.events, "deletion.requested", &body, &e, &[]).await }
        });
        for r in join_all(sends).await {
            r?;
        }
    }
    Ok(())
}

/// `postgres://user@host:port/db?x` → `postgres://user@host:port`.
fn server_part(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let host = rest.split(['/', '?']).next().unwrap_or(rest);
    format!("{scheme}://{host}")
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Proc(Option<Child>);

impl Proc {
    fn spawn(cmd: &mut Command) -> anyhow::Result<Proc> {
        Ok(Proc(Some(cmd.stdout(Stdio::null()).stderr(Stdio::inherit()).spawn()?)))
    }

    fn pid(&self) -> Option<u32> {
        self.0.as_ref().map(|c| c.id())
    }

    fn peak_rss_kib(&self) -> u64 {
        let Some(pid) = self.pid() else { return 0 };
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// CPU seconds by process group.
#[derive(Debug, Default)]
struct Cpu {
    worker: f64,
    api: f64,
    broker: f64,
    database: f64,
    bench: f64,
}

impl Cpu {
    fn sample(procs: Option<(&Proc, &Proc)>) -> Cpu {
        let tick = clock_ticks();
        let (mut broker, mut database) = (0.0, 0.0);
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                let comm = comm.trim();
                if comm == "beam.smp" {
                    broker += cpu_secs(pid, tick);
                } else if comm.starts_with("postgres") || comm.starts_with("postmaster") {
                    database += cpu_secs(pid, tick);
                }
            }
        }
        let (worker, api) = procs
            .map(|(w, a)| {
                (w.pid().map(|p| cpu_secs(p, tick)).unwrap_or(0.0), a.pid().map(|p| cpu_secs(p, tick)).unwrap_or(0.0))
            })
            .unwrap_or((0.0, 0.0));
        Cpu { worker, api, broker, database, bench: cpu_secs(std::process::id(), tick) }
    }

    /// Each process group's share of the CPU time used between two samples.
    fn shares(&self, before: &Cpu) -> HashMap<String, f64> {
        let parts = [
            ("worker", self.worker - before.worker),
            ("null_api", self.api - before.api),
            ("rabbitmq", self.broker - before.broker),
            ("postgresql", self.database - before.database),
            ("bench_driver", self.bench - before.bench),
        ];
        let total: f64 = parts.iter().map(|(_, v)| v.max(0.0)).sum();
        parts.iter().map(|(k, v)| (k.to_string(), if total > 0.0 { v.max(0.0) / total } else { 0.0 })).collect()
    }
}

fn cpu_secs(pid: u32, tick: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may hold spaces) start after ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    let ut: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let st: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    (ut + st) / tick
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok()))
        .map(|kib| kib / 1024 / 1024)
        .unwrap_or(0);
    format!("{cpus} cores ({model}), {mem} GiB")
}

fn print_table(r: &Report) {
    println!("reaper bench — {} — {} — {} queue, prefetch {}", r.date, r.machine, r.queue_type, r.prefetch);
    println!(
        "  {:<46} {:>10.0} msg/s",
        "ceiling: bare broker loop (consume, publish+confirm, ack)", r.ceiling_msgs_per_sec
    );
    let show_as = |name: &str, run: &Option<Run>, unit: &str| {
        if let Some(e) = run {
            println!("  {:<46} {:>10.0} {unit}s/s   ({} {unit}s in {:.1}s)", name, e.jobs_per_sec, e.jobs, e.secs);
            println!("  {:<46} {:>10.3} ms/{unit}", "    worker CPU", e.worker_cpu_ms_per_job);
            println!(
                "  {:<46} {:>10.3} ms/{unit}",
                "    PostgreSQL CPU (all its processes)", e.database_cpu_ms_per_job
            );
            println!("  {:<46} {:>10.1} MiB", "    worker peak RSS", e.worker_peak_rss_mib);
            let mut shares: Vec<_> = e.cpu_share.iter().collect();
            shares.sort_by(|a, b| b.1.total_cmp(a.1));
            let line: Vec<String> = shares.iter().map(|(k, v)| format!("{k} {:.0}%", *v * 100.0)).collect();
            println!("  {:<46} {}", "    CPU split", line.join(", "));
        }
    };
    let show = |name: &str, run: &Option<Run>| show_as(name, run, "job");
    show_as("tracks (one resource each)", &r.tracks, "track");
    show("reaper end to end, API 0 ms", &r.e2e);
    println!("  {:<46} {:>10.2}", "    ratio to the ceiling", r.ratio_to_ceiling);
    show("baseline worker end to end, API 0 ms", &r.baseline);
    println!("  {:<46} {:>10.2}", "    reaper's ratio to the baseline", r.ratio_to_baseline);
    show_as("lifecycle (5 tracks + 1 deletion per owner)", &r.lifecycle, "owner");
    if r.latency_offered_per_sec > 0.0 {
        println!(
            "  {:<46} {:>10.1} ms p50, {:.1} ms p99",
            format!("latency at {:.0} jobs/s (half the rate)", r.latency_offered_per_sec),
            r.latency_p50_ms,
            r.latency_p99_ms
        );
    }
    if r.e2e_api_latency.is_some() {
        show(&format!("reaper end to end, API {} ms", r.api_latency_ms), &r.e2e_api_latency);
        println!("  {:<46} {:>10.2}", "    ratio to the 0 ms run", r.api_latency_ratio);
    }
}

/// Plans and walks one event of `n` resources spread over the four VPC kinds
/// (servers after VNIs and DNS records, reservations after DNS records), as
/// many times as fit in about a second; reports the time per plan and this
/// process's peak memory.
fn plan_bench(n: usize, json: bool) -> ExitCode {
    use crate::domain::Resource;
    let catalog = match Settings::from_toml(include_str!("../../config/vpc-node.toml"))
        .and_then(|s| crate::catalog::validate(&s))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let kinds = ["bare_metal_server", "vni", "dns_record", "ip_reservation"];
    let resources: Vec<Resource> = (0..n)
        .map(|i| {
            let kind = kinds[i % kinds.len()];
            let attributes = [("zone_id", "zone-1"), ("subnet_id", "subnet-1")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Resource { kind: kind.into(), id: format!("{kind}-{i}"), attributes, parent: None }
        })
        .collect();
    let rss_before = status_kib("VmRSS:");
    let started = std::time::Instant::now();
    let mut runs = 0u32;
    let mut levels = 0;
    while runs == 0 || started.elapsed() < Duration::from_secs(1) {
        let graph = match crate::plan::Graph::build(&resources, &catalog) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut walk = graph.walk();
        let mut ready = walk.start();
        let mut done = 0;
        while let Some(i) = ready.pop() {
            done += 1;
            ready.extend(walk.gone(i));
        }
        assert_eq!(done, n, "every resource is reached");
        levels = (0..n).map(|i| graph.level(i)).max().map_or(0, |l| l + 1);
        runs += 1;
    }
    let per_plan_ms = started.elapsed().as_secs_f64() * 1000.0 / f64::from(runs);
    let peak = status_kib("VmHWM:");
    if json {
        let r = serde_json::json!({"resources": n, "levels": levels, "runs": runs, "ms_per_plan_and_walk": per_plan_ms,
                                   "rss_before_kib": rss_before, "peak_rss_kib": peak});
        println!("{}", serde_json::to_string_pretty(&r).expect("serializable"));
    } else {
        println!(
            "plan of one event, {n} resources in {levels} levels ({runs} runs)\n  build + walk     {per_plan_ms:>8.2} ms\n  RSS before       {:>8.1} MiB\n  peak RSS         {:>8.1} MiB",
            rss_before as f64 / 1024.0,
            peak as f64 / 1024.0
        );
    }
    ExitCode::SUCCESS
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}
