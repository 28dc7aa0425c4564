//! `reaper demo`: the main job in one command. Starts the simulated cloud,
//! creates N bare-metal VPC nodes there and tracks their resources as a
//! provisioner would, sends a mix of deletion and provisioning-failure events,
//! runs the worker, and exits 0 only if every simulated resource is gone.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::broker::{self, tap::ResultTap};
use crate::config::Settings;
use crate::contract::{DELETION_REQUESTED, PROVISIONING_FAILED, RESOURCE_TRACKED};
use crate::devtools::sim::{Faults, Sim};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Sample nodes to create and tear down.
    #[arg(long, default_value_t = 50)]
    pub nodes: usize,
    /// Fraction of simulated API calls that fail with 503 (retried), 0 to 1.
    #[arg(long, default_value_t = 0.05, value_parser = fraction)]
    pub error_rate: f64,
    /// Fraction answered 429 with Retry-After, 0 to 1.
    #[arg(long, default_value_t = 0.02, value_parser = fraction)]
    pub rate_limit_rate: f64,
    /// Give up waiting for results after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
    /// Then dead-letter two more nodes (their API refuses once with 403) and
    /// keep the worker and the operator console (admin.listen, /ui) running
    /// until Ctrl-C, so there is something to look at and replay. The
    /// demo's database is dropped when it ends, as always.
    #[arg(long)]
    pub keep_failures: bool,
}

fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{s:?} is not a fraction between 0 and 1")),
    }
}

/// One resource of a sample node: its kind, its ID, attributes, and where the
/// simulated cloud keeps it.
#[derive(Debug, Clone)]
pub struct SampleResource {
    pub kind: &'static str,
    pub id: String,
    pub attributes: BTreeMap<String, String>,
    pub path: String,
    pub depends_on: Vec<String>,
}

/// A bare-metal node on a VPC: a server, two IP reservations, a DNS record
/// pointing at them, and a VNI attached to the server.
#[derive(Debug, Clone)]
pub struct VpcNode {
    pub owner: String,
    pub resources: Vec<SampleResource>,
}

impl VpcNode {
    pub fn new(name: &str) -> VpcNode {
        let server = format!("{name}-bm");
        let server_path = format!("/v1/bare_metal_servers/{server}");
        let subnet = "subnet-mgmt".to_string();
        let zone = "zone-1".to_string();
        let ip = |n: u8| {
            let id = format!("{name}-ip{n}");
            SampleResource {
                kind: "ip_reservation",
                path: format!("/v1/subnets/{subnet}/reserved_ips/{id}"),
                attributes: BTreeMap::from([("subnet_id".to_string(), subnet.clone())]),
                id,
                depends_on: vec![],
            }
        };
        let (ip1, ip2) = (ip(1), ip(2));
        let dns_id = format!("{name}-dns");
        let dns = SampleResource {
            kind: "dns_record",
            path: format!("/v1/dns_zones/{zone}/resource_records/{dns_id}"),
            attributes: BTreeMap::from([("zone_id".to_string(), zone.clone())]),
            id: dns_id,
            depends_on: vec![server_path.clone(), ip1.path.clone(), ip2.path.clone()],
        };
        let vni_id = format!("{name}-vni");
        let vni = SampleResource {
            kind: "vni",
            path: format!("/v1/virtual_network_interfaces/{vni_id}"),
            attributes: BTreeMap::new(),
            id: vni_id,
            depends_on: vec![server_path.clone()],
        };
        let server = SampleResource {
            kind: "bare_metal_server",
            id: server,
            attributes: BTreeMap::new(),
            path: server_path,
            depends_on: vec![],
        };
        VpcNode { owner: format!("node/{name}"), resources: vec![ip1, ip2, server, dns, vni] }
    }

    /// Creates the node's resources in the simulated cloud, dependencies first.
    pub fn create_in(&self, sim: &Sim) {
        for r in &self.resources {
            let deps: Vec<&str> = r.depends_on.iter().map(|s| s.as_str()).collect();
            sim.create(&r.path, &deps);
        }
    }

    /// The `resource.tracked` events a provisioner would send, one per resource.
    pub fn track_events(&self, event_prefix: &str) -> Vec<serde_json::Value> {
        self.resources
            .iter()
            .map(|r| {
                json!({
                    "event_id": format!("{event_prefix}-track-{}-{}", r.kind, r.id),
                    "owner": self.owner,
                    "kind": r.kind,
                    "id": r.id,
                    "attributes": r.attributes,
                    "created_at": Utc::now().to_rfc3339(),
                })
            })
            .collect()
    }
}

fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    let style =
        indicatif::ProgressStyle::with_template("  {bar:40} {pos:>5}/{len:<5} {msg}").expect("a valid template");
    bar.set_style(style);
    bar.set_message(what.to_string());
    bar
}

/// Runs the demo in a database of its own (made beside the configured one
/// and dropped after), so the real ledger never holds its jobs: a later
/// `status` or `replay --all` would otherwise find them.
pub async fn run(mut settings: Settings, args: DemoArgs) -> ExitCode {
    let own = match OwnDatabase::create(&settings).await {
        Ok(own) => own,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(3);
        }
    };
    settings.database.url = crate::config::Secret::new(own.url.clone());
    println!("reaper demo: a ledger of its own in database {} (dropped at the end)", own.name);
    // Ctrl-C ends the demo early, and its database still goes. Once it
    // serves the console (--keep-failures), Ctrl-C is how it ends: the demo
    // then stops its worker and removes its queues itself.
    let stop = CancellationToken::new();
    let serving = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on_signal = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
        // A second Ctrl-C while the demo winds down: leave at once.
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("interrupted twice: leaving without cleaning up");
        std::process::exit(130);
    });
    let run = demo(&mut settings, args, stop.clone(), serving.clone());
    tokio::pin!(run);
    let outcome = tokio::select! {
        outcome = &mut run => outcome,
        _ = stop.cancelled() => match serving.load(std::sync::atomic::Ordering::SeqCst) {
            true => run.await,
            false => Err(anyhow::anyhow!("interrupted")),
        },
    };
    own.drop_it().await;
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(3)
        }
    }
}

/// The demo's database: `reaper_demo_<hex>` on the configured server.
struct OwnDatabase {
    server: sqlx::postgres::PgConnectOptions,
    name: String,
    url: String,
}

impl OwnDatabase {
    async fn create(settings: &Settings) -> anyhow::Result<OwnDatabase> {
        use sqlx::ConnectOptions;
        let configured = settings.database.url.expose();
        let server: sqlx::postgres::PgConnectOptions = configured.parse()?;
        // Made of hex digits only: safe to put in the statement as a quoted name.
        let name = format!("reaper_demo_{:08x}", fastrand::u32(..));
        let mut url = reqwest::Url::parse(configured)?;
        url.set_path(&format!("/{name}"));
        // `dbname=` in the query would win over the path (sqlx reads both).
        let kept: Vec<(String, String)> =
            url.query_pairs().filter(|(k, _)| k != "dbname").map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
        url.set_query(None);
        if !kept.is_empty() {
            url.query_pairs_mut().extend_pairs(kept);
        }
        let mut conn = server.connect().await.map_err(|e| {
            anyhow::anyhow!(
                "the demo makes a database of its own on {}:{}, but cannot connect there: {e}",
                server.get_host(),
                server.get_port()
            )
        })?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut conn).await.map_err(|e| {
            anyhow::anyhow!("the demo makes a database of its own ({name}) and could not: {e} (it needs CREATEDB)")
        })?;
        Ok(OwnDatabase { server, name, url: url.to_string() })
    }

    async fn drop_it(self) {
        use sqlx::ConnectOptions;
        if let Ok(mut conn) = self.server.connect().await {
            // WITH (FORCE) needs PostgreSQL 13; older servers get the plain form.
            let force = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
            let plain = format!("DROP DATABASE IF EXISTS \"{}\"", self.name);
            if sqlx::query(&force).execute(&mut conn).await.is_err() {
                if let Err(e) = sqlx::query(&plain).execute(&mut conn).await {
                    eprintln!("note: could not drop the demo's database {}: {e}", self.name);
                }
            }
        }
    }
}

async fn demo(
    settings: &mut Settings,
    args: DemoArgs,
    stop: CancellationToken,
    serving: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<bool> {
    // Ctrl-C (`stop`) stops the worker too, however far the demo got.
    let shutdown = stop.child_token();
    let sim = Sim::new();
    let addr = sim.spawn(0, shutdown.clone()).await?;
    let run_id = format!("{:08x}", fastrand::u32(..));
    let demo_settings = Settings::from_toml(include_str!("../../config/vpc-node.toml"))?;
    settings.providers = demo_settings.providers;
    settings.kinds = demo_settings.kinds;
    if let Some(crate::config::ProviderSettings::Http(h)) = settings.providers.get_mut("cloud") {
        h.base_url = format!("http://{addr}");
        h.auth = None;
    }
    settings.broker.prefix = format!("reaper-demo-{run_id}");
    let _console_token = match args.keep_failures {
        true => Some(console_access(settings)?),
        false => {
            settings.admin.listen = String::new();
            None
        }
    };
    settings.worker.retry_delays_secs = vec![0.5, 1.0, 2.0, 5.0];
    settings.worker.step_min_backoff_ms = 20;
    settings.worker.step_max_backoff_ms = 500;

    println!("reaper demo {run_id}: simulated cloud on http://{addr}, {} nodes", args.nodes);
    let app = Arc::new(App::build(settings.clone()).await?);
    let (conn, publisher) = broker::link::open(&app.settings, &app.names).await?;
    let mut tap = ResultTap::open(&conn, &app.names).await?;
    let worker = tokio::spawn(app.clone().run(shutdown.clone()));

    let nodes: Vec<VpcNode> = (0..args.nodes).map(|i| VpcNode::new(&format!("demo-{run_id}-{i:04}"))).collect();
    for n in &nodes {
        n.create_in(&sim);
    }
    let total = sim.paths().len();
    sim.set_faults(Faults {
        error_rate: args.error_rate,
        rate_limit_rate: args.rate_limit_rate,
        retry_after_secs: 0.2,
        ..Default::default()
    });

    let started = Instant::now();
    for n in &nodes {
        for e in n.track_events(&run_id) {
            let body = serde_json::to_vec(&e)?;
            publisher
                .publish(&app.names.events, RESOURCE_TRACKED, &body, e["event_id"].as_str().unwrap_or(""), &[])
                .await?;
        }
    }
    let owners: Vec<String> = nodes.iter().map(|n| n.owner.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let bar = progress(total as u64, "resources tracked");
    loop {
        let n = app.ledger.count_tracked(&owners).await?;
        bar.set_position(n as u64);
        if n as usize >= total {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the worker did not record the tracked resources in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish();

    for (i, n) in nodes.iter().enumerate() {
        let (key, body) = if i % 2 == 0 {
            (
                DELETION_REQUESTED,
                json!({"event_id": format!("{run_id}-del-{i}"), "owner": n.owner, "reason": "node deleted", "requested_by": "demo", "occurred_at": Utc::now().to_rfc3339()}),
            )
        } else {
            (
                PROVISIONING_FAILED,
                json!({"event_id": format!("{run_id}-fail-{i}"), "owner": n.owner, "failed_step": "install_os", "error": "timeout waiting for the server", "occurred_at": Utc::now().to_rfc3339()}),
            )
        };
        publisher
            .publish(&app.names.events, key, &serde_json::to_vec(&body)?, body["event_id"].as_str().unwrap_or(""), &[])
            .await?;
    }

    let mut results = Vec::new();
    let bar = progress(nodes.len() as u64, "jobs finished");
    while results.len() < nodes.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tap.next(left).await {
            Some(r) => results.push(r.result),
            None => break,
        }
        bar.set_position(results.len() as u64);
    }
    bar.finish();
    let elapsed = started.elapsed();
    let left = sim.paths();

    let completed = results.iter().filter(|r| r.status == "completed").count();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut retries = 0;
    for r in &results {
        for s in &r.resources {
            *outcomes.entry(s.outcome.clone()).or_default() += 1;
            retries += s.attempts.saturating_sub(1) as usize;
        }
        retries += r.attempts.saturating_sub(1) as usize;
    }
    let stats = sim.stats();
    println!();
    println!("  {:<32} {:>8}", "jobs finished", format!("{}/{}", results.len(), nodes.len()));
    println!("  {:<32} {:>8}", "jobs completed", completed);
    for (o, n) in &outcomes {
        println!("  {:<32} {:>8}", format!("resources {o}"), n);
    }
    println!("  {:<32} {:>8}", "retries (steps + broker)", retries);
    println!("  {:<32} {:>8}", "API requests", stats.requests);
    println!(
        "  {:<32} {:>8}",
        "injected 503s / 429s",
        format!("{}/{}", stats.injected_errors, stats.injected_rate_limits)
    );
    println!("  {:<32} {:>8}", "deletes refused for order", stats.refused_for_order);
    println!("  {:<32} {:>8}", "simulated resources left", left.len());
    println!("  {:<32} {:>8}", "time", format!("{:.2}s", elapsed.as_secs_f64()));

    let ok = left.is_empty() && completed == nodes.len();
    if ok {
        println!("\nevery simulated resource is gone");
    } else {
        println!("\nFAILED: {} resources left, {} of {} jobs completed", left.len(), completed, nodes.len());
        for r in results.iter().filter(|r| r.status != "completed").take(10) {
            let why = r.reason.as_deref().unwrap_or("no reason given");
            println!("  {} {} ({}): {why}", r.status, r.owner, r.event_id);
        }
        if results.len() < nodes.len() {
            println!(
                "  {} jobs had no result within --timeout-secs {}",
                nodes.len() - results.len(),
                args.timeout_secs
            );
        }
        for p in left.iter().take(10) {
            println!("  left: {p}");
        }
    }
    if args.keep_failures {
        match leave_failures(&app, &sim, &publisher, &mut tap, &run_id).await {
            Ok(dead) => {
                serving.store(true, std::sync::atomic::Ordering::SeqCst);
                serve_until_stopped(&app, dead, &stop).await
            }
            Err(e) => eprintln!("error: could not leave failures to look at: {e:#}"),
        }
    }
    shutdown.cancel();
    let _ = worker.await;
    let _ = broker::delete_topology(&conn, &app.names, &app.settings.worker.all_delays()).await;
    let _ = conn.close(200, "demo done".into()).await;
    app.ledger.pool().close().await;
    Ok(ok)
}

/// The console's address and token for `--keep-failures`: the configured
/// listener (or 127.0.0.1:9090) and token, or a token made for this run,
/// printed once on the terminal (never logged) and kept in a file only the
/// user can read, removed when the demo ends.
struct ConsoleToken {
    file: Option<std::path::PathBuf>,
}

impl Drop for ConsoleToken {
    fn drop(&mut self) {
        if let Some(f) = &self.file {
            let _ = std::fs::remove_file(f);
        }
    }
}

fn console_access(settings: &mut Settings) -> anyhow::Result<ConsoleToken> {
    if settings.admin.listen.is_empty() {
        settings.admin.listen = "127.0.0.1:9090".into();
    }
    if settings.admin.token()?.is_some() {
        println!("console: log in with the configured admin token");
        return Ok(ConsoleToken { file: None });
    }
    let token = uuid::Uuid::new_v4().simple().to_string();
    let file = std::env::temp_dir().join(format!("reaper-demo-console-{}.token", fastrand::u32(..)));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    std::io::Write::write_all(&mut opts.open(&file)?, token.as_bytes())?;
    settings.admin.token_file = file.display().to_string();
    println!("console: log in with the token {token} (made for this demo)");
    Ok(ConsoleToken { file: Some(file) })
}

/// Two more nodes whose teardown the cloud refuses once (403): two dead
/// letters. The cloud stops refusing, so a replay from the console completes.
async fn leave_failures(
    app: &App,
    sim: &Sim,
    publisher: &crate::broker::publisher::Publisher,
    tap: &mut ResultTap,
    run_id: &str,
) -> anyhow::Result<usize> {
    sim.set_faults(Faults::default());
    let nodes: Vec<VpcNode> = (0..2).map(|i| VpcNode::new(&format!("demo-{run_id}-broken-{i}"))).collect();
    let mut events = 0;
    for n in &nodes {
        n.create_in(sim);
        for e in n.track_events(run_id) {
            let body = serde_json::to_vec(&e)?;
            publisher
                .publish(&app.names.events, RESOURCE_TRACKED, &body, e["event_id"].as_str().unwrap_or(""), &[])
                .await?;
            events += 1;
        }
    }
    let owners: Vec<String> = nodes.iter().map(|n| n.owner.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (app.ledger.count_tracked(&owners).await? as usize) < events {
        anyhow::ensure!(Instant::now() < deadline, "the worker did not record the broken nodes' resources in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut dead = 0;
    for (i, n) in nodes.iter().enumerate() {
        sim.set_faults(Faults { fail_next: 1, fail_status: 403, only_method: "DELETE".into(), ..Default::default() });
        let body = json!({"event_id": format!("{run_id}-broken-{i}"), "owner": n.owner, "reason": "node deleted",
                          "requested_by": "demo", "occurred_at": Utc::now().to_rfc3339()});
        publisher
            .publish(
                &app.names.events,
                DELETION_REQUESTED,
                &serde_json::to_vec(&body)?,
                body["event_id"].as_str().unwrap_or(""),
                &[],
            )
            .await?;
        match tap.next(Duration::from_secs(30)).await {
            Some(r) if r.result.status == "dead_lettered" => dead += 1,
            Some(r) => println!("note: {} ended {} rather than dead-lettered", r.result.owner, r.result.status),
            None => println!("note: no result for {} within 30 s", n.owner),
        }
    }
    sim.set_faults(Faults::default());
    Ok(dead)
}

async fn serve_until_stopped(app: &App, dead: usize, stop: &CancellationToken) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.admin_addr.get().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match app.admin_addr.get() {
        Some(addr) => println!("\nconsole: http://{addr}/ui ({dead} dead-lettered jobs to look at and replay)"),
        None => println!("\nthe console did not start; see the log"),
    }
    println!("the worker keeps running; Ctrl-C ends the demo and drops its database");
    stop.cancelled().await;
}
