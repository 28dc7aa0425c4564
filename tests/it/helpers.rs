use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::Future;
use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use reaper::app::App;
use reaper::broker::publisher::Publisher;
use reaper::broker::tap::{Observed, ResultTap};
use reaper::broker::{self, Names};
use reaper::config::Settings;
use reaper::devtools::demo::VpcNode;
use reaper::devtools::sim::Sim;
use serde_json::{json, Value};
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

pub fn amqp_url() -> String {
    std::env::var("REAPER_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The MongoDB-wire server the tests use (secantusd-rs, started by .ci/run).
pub fn mongo_url() -> String {
    std::env::var("REAPER_TEST_MONGO_URL")
        .unwrap_or_else(|_| "mongodb://127.0.0.1:27018/?directConnection=true&serverSelectionTimeoutMS=5000".into())
}

pub fn pg_server() -> String {
    std::env::var("REAPER_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// Everything one test needs: the worker running against its own database and
/// broker prefix, the simulated cloud, a publisher and a tap on the results.
pub struct TestApp {
    pub app: Arc<App>,
    pub sim: Sim,
    pub publisher: Publisher,
    pub tap: ResultTap,
    pub conn: lapin::Connection,
    pub shutdown: CancellationToken,
    /// A whole config file with this test's settings, for running the binary.
    pub config_text: String,
    /// Prefix of this test's MongoDB databases ("t_<id>").
    pub mongo_prefix: String,
    worker: Option<tokio::task::JoinHandle<()>>,
    /// The HTTPS front of the simulated cloud, when `extra` asked for one.
    _https: Option<HttpsFront>,
    _cleanup: Cleanup,
}

/// Drops the test's database and broker topology even when the test panics.
struct Cleanup {
    db_name: String,
    names: Names,
    /// Every retry delay a worker or command of this test declared a queue
    /// for: the app's, and those of each config file written for the binary.
    retry_delays: Arc<std::sync::Mutex<Vec<Duration>>>,
    /// Workers of this test (the app and any replicas), stopped before the
    /// topology goes, so none of them redeclares it while reconnecting.
    workers: Vec<(CancellationToken, Arc<App>)>,
    /// Set when the test's config uses MongoDB: its databases are dropped.
    mongo_prefix: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (token, _) in &self.workers {
            token.cancel();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let running = |app: &Arc<App>| app.running.load(std::sync::atomic::Ordering::SeqCst);
        while self.workers.iter().any(|(_, app)| running(app)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(std::env::temp_dir().join(format!("reaper-{}.toml", self.names.events)));
        let db_name = self.db_name.clone();
        let names = self.names.clone();
        let mut delays = self.retry_delays.lock().unwrap().clone();
        delays.sort();
        delays.dedup();
        let mongo_prefix = self.mongo_prefix.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                if let Ok(conn) = lapin::Connection::connect(&amqp_url(), Default::default()).await {
                    let _ = broker::delete_topology(&conn, &names, &delays).await;
                    let _ = conn.close(200, "test done".into()).await;
                }
                if let Some(prefix) = mongo_prefix {
                    if let Ok(client) = mongodb::Client::with_uri_str(mongo_url()).await {
                        for name in client.list_database_names().await.unwrap_or_default() {
                            if name.starts_with(&prefix) {
                                let _ = client.database(&name).drop().await;
                            }
                        }
                    }
                }
                if let Ok(mut pg) = sqlx::PgConnection::connect(&format!("{}/postgres", pg_server())).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)"))
                        .execute(&mut pg)
                        .await;
                }
            })
        })
        .join();
    }
}

/// The VPC example's kinds pointed at a fresh simulated cloud, plus `extra`
/// TOML; HTTP providers send no token and the simulated cloud asks for none.
pub async fn spawn_app(extra: &str) -> TestApp {
    spawn(extra, false).await
}

/// An example as its README runs it: its config (see [`example`]) with its
/// `auth` kept, each `token_env` read from a file instead (a test cannot set
/// the process environment safely), and the simulated services answering 401
/// to any request without that token. Its schema.sql is loaded.
pub async fn spawn_example(name: &str) -> TestApp {
    let mut extra = example(name);
    let mut tokens = Vec::new();
    while let Some(start) = extra.find("token_env = \"") {
        let rest = &extra[start + "token_env = \"".len()..];
        let var = rest[..rest.find('"').expect("a quoted variable name")].to_string();
        let token = example_token(&var);
        let file = std::env::temp_dir().join(format!("reaper-example-{var}.token"));
        let part = file.with_extension(format!("{}.part", fastrand::u64(..)));
        std::fs::write(&part, &token).unwrap();
        std::fs::rename(&part, &file).unwrap();
        extra = extra.replacen(
            &format!("token_env = \"{var}\""),
            &format!("token_file = {:?}", file.display().to_string()),
            1,
        );
        tokens.push(token);
    }
    // The console's token, so a test can look at the example's data there.
    // (One file for every test, written whole: replicas read it too.)
    let admin = std::env::temp_dir().join("reaper-example-console.token");
    let part = admin.with_extension(format!("{}.part", fastrand::u64(..)));
    std::fs::write(&part, EXAMPLE_CONSOLE_TOKEN).unwrap();
    std::fs::rename(&part, &admin).unwrap();
    extra.push_str(&format!("\n[admin]\ntoken_file = {:?}\n", admin.display().to_string()));
    let t = spawn(&extra, true).await;
    if !tokens.is_empty() {
        t.sim.require_tokens(reaper::devtools::sim::TokenPolicy { fixed_tokens: tokens, ..Default::default() });
    }
    if let Some(sql) = example_sql(name) {
        t.sql(&sql).await;
    }
    t
}

pub const EXAMPLE_CONSOLE_TOKEN: &str = "example-console-tok-3e9d";

/// The console shows an example's data: logged in with the example's admin
/// token, the overview, dead letters, reconcile rules, the owner's page and
/// (given) a job's page answer 200 and name what they should.
pub async fn console_renders(t: &TestApp, owner: &str, job: Option<uuid::Uuid>) {
    let mut addr = None;
    wait_until("the admin API listens", Duration::from_secs(10), || {
        addr = t.app.admin_addr.get().copied();
        async move { addr.is_some() }
    })
    .await;
    let base = format!("http://{}", addr.unwrap());
    let c = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = c
        .post(format!("{base}/ui/login"))
        .form(&[("token", EXAMPLE_CONSOLE_TOKEN), ("next", "/ui")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "the console logs in");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_string();
    let owner_page = format!("/ui/owners/{}", owner.replace('/', "%2F"));
    let dead = t.app.ledger.dead_jobs(&Default::default()).await.unwrap().len();
    let mut pages = vec![
        ("/ui".to_string(), format!("Owners tracked: {}", t.app.ledger.status_counts().await.unwrap().owners_tracked)),
        ("/ui/dead".to_string(), format!("{dead} dead-lettered job")),
        (owner_page.clone(), "Tracked resources by life".to_string()),
    ];
    // Each rule the example configures, with how it runs.
    for (name, rule) in &t.app.settings.reconcile.rules {
        pages.push(("/ui/reconcile".to_string(), format!("{name}</a></td><td>{}", rule.when())));
    }
    if let Some(j) = job {
        pages.push((format!("/ui/jobs/{j}"), owner.to_string()));
        // The owner's page lists the job among its jobs.
        pages.push((owner_page, format!("/ui/jobs/{j}")));
    }
    for (path, must) in pages {
        let r = c.get(format!("{base}{path}")).header("cookie", &cookie).send().await.unwrap();
        let status = r.status();
        let html = r.text().await.unwrap();
        assert_eq!(status, 200, "{path}: {html}");
        assert!(html.contains(&must), "{path} should show {must:?}: {html}");
    }
}

/// `extra` appended to `base` as one TOML file: a table both have (a test's
/// `[worker]` beside the test base's) is written once, `extra`'s keys
/// replacing `base`'s, as the layered settings of the worker in the test do.
fn merge_tables(base: &str, extra: &str) -> String {
    // (header, lines) per table; the lines before the first header have "".
    fn tables(text: &str) -> Vec<(String, Vec<String>)> {
        let mut out = vec![(String::new(), Vec::new())];
        for line in text.lines() {
            let t = line.trim();
            if t.starts_with('[') && !t.starts_with("[[") && t.ends_with(']') {
                out.push((t.to_string(), Vec::new()));
            } else {
                out.last_mut().expect("one").1.push(line.to_string());
            }
        }
        out
    }
    let key = |l: &str| l.split_once('=').map(|(k, _)| k.trim().to_string()).filter(|k| !k.starts_with('#'));
    let mut merged = tables(base);
    for (header, lines) in tables(extra) {
        match merged.iter_mut().find(|(h, _)| *h == header && !h.is_empty()) {
            Some((_, have)) => {
                let new: Vec<String> = lines.iter().filter_map(|l| key(l)).collect();
                have.retain(|l| key(l).is_none_or(|k| !new.contains(&k)));
                have.extend(lines);
            }
            None => merged.push((header, lines)),
        }
    }
    let mut out = String::new();
    for (header, lines) in merged {
        if !header.is_empty() {
            out.push_str(&header);
            out.push('\n');
        }
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
}

/// `spawn_app(extra)` with an admin token read from a file, once its admin
/// API listens: the app, the API's base URL and the token's file (a replica
/// reads it too; the test removes it when none will).
pub async fn spawn_with_admin(extra: &str, token: &str) -> (TestApp, String, std::path::PathBuf) {
    let file = std::env::temp_dir().join(format!("reaper-admin-{:08x}", fastrand::u32(..)));
    std::fs::write(&file, token).unwrap();
    let t = spawn_app(&format!("{extra}\n[admin]\ntoken_file = \"{}\"\n", file.display())).await;
    let mut addr = None;
    wait_until("the admin API listens", Duration::from_secs(10), || {
        addr = t.app.admin_addr.get().copied();
        async move { addr.is_some() }
    })
    .await;
    (t, format!("http://{}", addr.unwrap()), file)
}

/// The token an example's `token_env` variable holds in the tests.
pub fn example_token(var: &str) -> String {
    match var {
        // Proxmox's token is the Authorization header's whole value.
        "PROXMOX_TOKEN" => "PVEAPIToken=reaper@pve!reaper=0b5e2c1d-test".to_string(),
        _ => format!("{}-test-secret", var.to_lowercase()),
    }
}

async fn spawn(extra: &str, keep_auth: bool) -> TestApp {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .try_init();
    let sim = Sim::new();
    let shutdown = CancellationToken::new();
    // The simulated cloud outlives the worker, so a test can stop one and run another.
    let addr = sim.spawn(0, CancellationToken::new()).await.expect("starting the simulated cloud");
    let id = format!("{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff);
    let db_name = format!("reaper_t_{id}");
    let prefix = format!("t-{id}");
    {
        let mut pg = sqlx::PgConnection::connect(&format!("{}/postgres", pg_server()))
            .await
            .expect("PostgreSQL must be running on 127.0.0.1:5432");
        sqlx::query(&format!("CREATE DATABASE \"{db_name}\""))
            .execute(&mut pg)
            .await
            .expect("creating the test database");
    }
    let mongo_prefix = format!("t_{id}");
    let mut cleanup = Cleanup {
        db_name: db_name.clone(),
        names: Names::new(&prefix),
        retry_delays: Arc::default(),
        workers: Vec::new(),
        mongo_prefix: extra.contains("{mongo_url}").then(|| mongo_prefix.clone()),
    };
    let overrides = format!(
        "[providers.cloud]\nbase_url = \"http://{addr}\"\n\
         [broker]\nurl = \"{amqp}\"\nprefix = \"{prefix}\"\nprefetch = 16\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[database]\nurl = \"{pg}/{db_name}\"\nmax_connections = 8\n\
         [worker]\nstep_attempts = 4\nstep_min_backoff_ms = 10\nstep_max_backoff_ms = 100\nretry_delays_secs = [0.2, 0.4]\nshutdown_grace_secs = 5\n\
",
        amqp = amqp_url(),
        pg = pg_server(),
    );
    // An example that brings its own cloud provider replaces the VPC base in the file.
    let base = if extra.contains("[providers.cloud]") { "" } else { include_str!("../../config/vpc-node.toml") };
    let config_text = format!(
        "{}\n{}",
        base.replace("auth = {", "# auth = {")
            .replace("base_url = \"http://127.0.0.1:8089\"", &format!("base_url = \"http://{addr}\"")),
        overrides.split_once("[broker]").map(|(_, rest)| format!("[broker]{rest}")).unwrap_or_default()
    );
    // `{sim_https_url}`: the simulated cloud behind HTTPS (see `HttpsFront`).
    let https = if extra.contains("{sim_https_url}") { Some(HttpsFront::to(addr).await) } else { None };
    let extra = match &https {
        Some(front) => extra.replace("{sim_https_url}", &format!("https://localhost:{}", front.port)),
        None => extra.to_string(),
    };
    // `{db_url}` in `extra` is this test's own database (an "application" database for SQL kinds).
    let extra = extra
        .replace("{db_url}", &format!("{}/{db_name}", pg_server()))
        .replace("{db_name}", &db_name)
        .replace("{sim_url}", &format!("http://{addr}"))
        .replace("{mongo_url}", &mongo_url())
        .replace("{mongo_prefix}", &mongo_prefix);
    let extra_text = if keep_auth { extra.clone() } else { extra.replace("auth = {", "# auth = {") };
    let config_text = merge_tables(&config_text, &extra_text);
    // A test that gives the cloud an auth table of its own replaces the example's.
    let own_auth = keep_auth || extra.contains("[providers.cloud.auth]");
    let vpc = include_str!("../../config/vpc-node.toml");
    let vpc = if own_auth { vpc.replace("auth = {", "# auth = {") } else { vpc.to_string() };
    let mut settings = Settings::from_toml_layers(&[&vpc, &overrides, &extra]).expect("test settings");
    // Schedules fire at start on a fresh ledger; a test that wants them says so.
    settings.reconcile.run_schedules = extra.contains("run_schedules = true");
    // The admin token comes from the test (token_file), never from the
    // developer's REAPER_ADMIN_TOKEN.
    if !extra.contains("token_env") {
        settings.admin.token_env = "REAPER_TEST_UNSET_ADMIN_TOKEN".into();
    }
    // The simulated services take no token (the config file for the binary
    // has its auth lines commented out), unless the test gives the cloud an
    // `[providers.cloud.auth]` table of its own.
    for p in settings.providers.values_mut().filter(|_| !own_auth) {
        if let reaper::config::ProviderSettings::Http(h) = p {
            h.auth = None;
        }
    }
    cleanup.retry_delays.lock().unwrap().extend(settings.worker.all_delays());
    let app = Arc::new(App::build(settings).await.expect("building the app"));
    cleanup.workers.push((shutdown.clone(), app.clone()));
    // The test's own link goes straight to the broker, even when the worker's
    // goes through a proxy the test cuts.
    let mut direct = app.settings.clone();
    direct.broker.url = reaper::config::Secret::new(amqp_url());
    let (conn, publisher) =
        broker::link::open(&direct, &app.names).await.expect("RabbitMQ must be running on 127.0.0.1:5672");
    let tap = ResultTap::open(&conn, &app.names).await.expect("opening the results tap");
    let worker = Some(tokio::spawn(app.clone().run(shutdown.clone())));
    TestApp {
        app,
        sim,
        publisher,
        tap,
        conn,
        shutdown,
        config_text,
        mongo_prefix,
        worker,
        _https: https,
        _cleanup: cleanup,
    }
}

impl TestApp {
    pub async fn publish(&self, routing_key: &str, body: &Value) {
        let bytes = serde_json::to_vec(body).unwrap();
        let id = body["event_id"].as_str().unwrap_or("no-id");
        self.publisher.publish(&self.app.names.events, routing_key, &bytes, id, &[]).await.expect("publishing");
    }

    pub async fn publish_raw(&self, exchange: &str, routing_key: &str, bytes: &[u8]) {
        self.publisher.publish(exchange, routing_key, bytes, "raw", &[]).await.expect("publishing");
    }

    /// Creates `node` in the simulated cloud, tracks its resources, and waits
    /// until the ledger holds all of them.
    pub async fn provision(&self, node: &VpcNode) {
        node.create_in(&self.sim);
        for e in node.track_events(&node.owner) {
            self.publish("resource.tracked", &e).await;
        }
        let owners = vec![node.owner.clone()];
        let want = node.resources.len() as i64;
        wait_until(&format!("all {want} resources of {} tracked", node.owner), Duration::from_secs(20), || async {
            self.app.ledger.count_tracked(&owners).await.unwrap() >= want
        })
        .await;
    }

    /// The next result; fails the test after `secs` seconds.
    pub async fn next_result(&mut self, secs: u64) -> Observed {
        self.tap.next(Duration::from_secs(secs)).await.unwrap_or_else(|| panic!("no result within {secs}s"))
    }

    /// Waits for `n` messages on the dead queue; each with its string headers.
    pub async fn dead_headers(&self, n: usize) -> Vec<(Vec<u8>, std::collections::BTreeMap<String, String>)> {
        let ch = self.conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        let start = Instant::now();
        while out.len() < n {
            assert!(start.elapsed() < Duration::from_secs(30), "only {} of {n} dead letters arrived", out.len());
            let Some(m) =
                ch.basic_get(self.app.names.dead.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap()
            else {
                tokio::time::sleep(Duration::from_millis(25)).await;
                continue;
            };
            let headers = m.delivery.properties.headers().as_ref().map(|h| {
                h.inner()
                    .iter()
                    .filter_map(|(k, v)| match v {
                        AMQPValue::LongString(s) => {
                            Some((k.to_string(), String::from_utf8_lossy(s.as_bytes()).into_owned()))
                        }
                        _ => None,
                    })
                    .collect()
            });
            out.push((m.delivery.data.clone(), headers.unwrap_or_default()));
        }
        out
    }

    /// Messages now on the dead queue, with their reason header.
    pub async fn drain_dead(&self) -> Vec<(Vec<u8>, String)> {
        let ch = self.conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(m) =
            ch.basic_get(self.app.names.dead.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap()
        {
            let reason = m
                .delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| match h.inner().get("x-reaper-reason") {
                    Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
                    _ => None,
                })
                .unwrap_or_default();
            out.push((m.delivery.data.clone(), reason));
        }
        out
    }

    /// Stops the worker and waits for it.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(w) = self.worker.take() {
            tokio::time::timeout(Duration::from_secs(15), w).await.expect("the worker stops within 15s").unwrap();
        }
    }
}

impl TestApp {
    /// When the first DELETE of `path` reached the cloud.
    pub fn first_delete(&self, path: &str) -> Duration {
        let timeline = self.sim.timeline();
        let first = timeline.iter().find(|a| a.method == "DELETE" && a.path == path);
        first.unwrap_or_else(|| panic!("no DELETE of {path} reached the cloud")).at
    }

    /// When the DELETE that removed `path` was answered: it was gone from then.
    pub fn gone_at(&self, path: &str) -> Duration {
        let timeline = self.sim.timeline();
        let gone = timeline.iter().find(|a| a.method == "DELETE" && a.path == path && a.status == 204);
        gone.unwrap_or_else(|| panic!("no DELETE removed {path}")).done
    }

    /// How many DELETEs of `path` reached the cloud.
    pub fn deletes_of(&self, path: &str) -> usize {
        self.sim.requests().iter().filter(|(m, p)| m == "DELETE" && p == path).count()
    }
}

/// The reaper metrics the Grafana dashboard and the alert rules use (a
/// histogram's `_bucket`, `_count` and `_sum` are its own name).
pub fn dashboard_metrics() -> std::collections::BTreeSet<String> {
    let file = |p: &str| std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(p)).unwrap();
    let dash: Value = serde_json::from_str(&file("deploy/grafana-dashboard.json")).expect("the dashboard is JSON");
    let alerts: serde_norway::Value = serde_norway::from_str(&file("deploy/alerts.yml")).expect("alerts are YAML");
    let mut exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_string()))
        .collect();
    for g in alerts["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            exprs.push(r["expr"].as_str().unwrap().to_string());
        }
    }
    let mut used = std::collections::BTreeSet::new();
    for e in &exprs {
        let words: Vec<&str> =
            e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("reaper_")).collect();
        assert!(!words.is_empty(), "{e} uses no reaper metric");
        for w in words {
            used.insert(w.trim_end_matches("_bucket").trim_end_matches("_count").trim_end_matches("_sum").to_string());
        }
    }
    used
}

/// The sum of a labelled counter's series in what `app` exports.
pub fn metric_total(app: &App, name: &str) -> f64 {
    let text = app.metrics.render();
    let series = text.lines().filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{')));
    series.filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// The metric families a `/metrics` scrape holds (its `# TYPE` lines).
pub fn scraped_families(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(String::from)
        .collect()
}

/// Polls `cond` until it holds; fails with `what` after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub fn deletion(event_id: &str, owner: &str, occurred_at: DateTime<Utc>) -> Value {
    json!({ "event_id": event_id, "owner": owner, "reason": "test", "requested_by": "tests", "occurred_at": occurred_at.to_rfc3339() })
}

pub fn unique(name: &str) -> String {
    format!("{name}-{:08x}", fastrand::u32(..))
}

impl TestApp {
    /// Waits until at least `n` messages sit on the dead queue, then takes them all.
    pub async fn dead_wait(&self, n: usize) -> Vec<(Vec<u8>, String)> {
        let mut got = Vec::new();
        let start = Instant::now();
        while got.len() < n {
            got.extend(self.drain_dead().await);
            assert!(start.elapsed() < Duration::from_secs(20), "only {} of {n} dead letters arrived", got.len());
            if got.len() < n {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        got
    }
}

impl TestApp {
    /// Writes this test's config to a file and returns its path.
    pub fn config_file(&self) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("reaper-{}.toml", self.app.names.events));
        std::fs::write(&path, &self.config_text).unwrap();
        // The binary declares retry queues for this file's delays: they go too.
        if let Ok(s) = Settings::from_toml(&self.config_text) {
            self._cleanup.retry_delays.lock().unwrap().extend(s.worker.all_delays());
        }
        path
    }

    /// Runs the reaper binary with this test's config and extra environment,
    /// to its end (within two minutes).
    pub fn reaper(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let mut cmd = reaper_cmd();
        cmd.args(args).arg("--config").arg(self.config_file());
        for (k, v) in env {
            cmd.env(k, v);
        }
        run_to_end(&mut cmd, &format!("reaper {}", args.join(" ")), Duration::from_secs(120))
    }

    /// Starts a second worker on the same queue and ledger: another replica.
    /// A second worker on the same database and queues; its `App` says what it did.
    pub async fn spawn_replica(&self) -> (CancellationToken, tokio::task::JoinHandle<()>, Arc<App>) {
        self.spawn_replica_with(|_| {}).await
    }

    /// A second worker whose settings `change` makes differ from the first's.
    pub async fn spawn_replica_with(
        &self,
        change: impl FnOnce(&mut Settings),
    ) -> (CancellationToken, tokio::task::JoinHandle<()>, Arc<App>) {
        let token = CancellationToken::new();
        let mut settings = self.app.settings.clone();
        change(&mut settings);
        let app = Arc::new(App::build(settings).await.expect("building a replica"));
        (token.clone(), tokio::spawn(app.clone().run(token)), app)
    }
}

impl TestApp {
    /// This test's MongoDB database `name` (really "t_<id>_name"). Fails the
    /// test loudly when no MongoDB-wire server answers.
    pub async fn mongo(&self, name: &str) -> mongodb::Database {
        let client = mongodb::Client::with_uri_str(mongo_url()).await.expect("a MongoDB URL");
        client
            .database("admin")
            .run_command(mongodb::bson::doc! { "ping": 1 })
            .await
            .expect("a MongoDB-wire server must answer at REAPER_TEST_MONGO_URL (secantusd-rs on 127.0.0.1:27018; .ci/run starts it)");
        client.database(&format!("{}_{name}", self.mongo_prefix))
    }

    /// Runs `reaper reconcile RULE ARGS... --json` and returns the exit code and the report.
    pub fn reconcile(&self, rule: &str, args: &[&str]) -> (i32, Value, String) {
        let mut all = vec!["reconcile", rule, "--json"];
        all.extend_from_slice(args);
        let out = self.reaper(&all, &[]);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let report = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        (out.status.code().unwrap_or(-1), report, stderr)
    }

    /// Runs SQL on the test's own database (the "application" database of the examples).
    pub async fn sql(&self, sql: &str) {
        sqlx::raw_sql(sql).execute(self.app.ledger.pool()).await.unwrap_or_else(|e| panic!("{e}: {sql}"));
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(self.app.ledger.pool()).await.unwrap_or_else(|e| panic!("{e}: {sql}"))
    }
}

/// An example's config (examples/NAME/reaper.toml) with its local addresses
/// turned into this test's: the app database, the simulated services, MongoDB.
pub fn example(name: &str) -> String {
    let path = format!("{}/examples/{name}/reaper.toml", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .replace("postgres://postgres@127.0.0.1:5432/app", "{db_url}")
        .replace("http://127.0.0.1:8089", "{sim_url}")
        .replace("mongodb://127.0.0.1:27017/?directConnection=true", "{mongo_url}")
        .replace("database = \"", "database = \"{mongo_prefix}_")
}

/// An example's seed SQL (examples/NAME/schema.sql).
pub fn example_sql(name: &str) -> Option<String> {
    std::fs::read_to_string(format!("{}/examples/{name}/schema.sql", env!("CARGO_MANIFEST_DIR"))).ok()
}

/// The `reaper` binary without the developer's `REAPER_*` variables: what a
/// test's run reads is what the test sets.
pub fn reaper_cmd() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_reaper"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("REAPER_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// A child process that is killed when the test ends before it does (a
/// failed assertion included), so no worker outlives its test.
pub struct Child {
    pub inner: std::process::Child,
    what: String,
}

impl Child {
    pub fn spawn(cmd: &mut std::process::Command, what: &str) -> Child {
        let inner = cmd.spawn().unwrap_or_else(|e| panic!("starting {what}: {e}"));
        Child { inner, what: what.to_string() }
    }

    pub fn id(&self) -> u32 {
        self.inner.id()
    }

    /// Waits for it to exit, at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.inner.try_wait().expect("asking whether the child exited") {
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not exit within {limit:?}", self.what);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits for it to exit, at most `limit`.
    pub fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        let pid = self.id().to_string();
        let sent = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("running kill");
        assert!(sent.success(), "SIGTERM to {}", self.what);
        self.wait(limit)
    }

    /// SIGKILL, as a crash would, and reaps it.
    pub fn crash(&mut self) {
        let _ = self.inner.kill();
        let _ = self.inner.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if matches!(self.inner.try_wait(), Ok(None)) {
            self.crash();
        }
    }
}

/// Runs `cmd` to its end within `limit`, with its output captured; killed
/// and reported if it takes longer.
pub fn run_to_end(cmd: &mut std::process::Command, what: &str, limit: Duration) -> std::process::Output {
    use std::io::Read;
    use std::process::Stdio;
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = Child::spawn(cmd, what);
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = read(Box::new(child.inner.stdout.take().unwrap()));
    let err = read(Box::new(child.inner.stderr.take().unwrap()));
    let status = child.wait(limit);
    std::process::Output { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

/// The first line `r` gives, within `limit`.
pub fn first_line(r: impl std::io::Read + Send + 'static, limit: Duration, what: &str) -> String {
    let lines = lines_of(r);
    lines.recv_timeout(limit).unwrap_or_else(|_| panic!("no {what} within {limit:?}"))
}

/// Each line `r` gives, as it comes, from a thread of its own.
pub fn lines_of(r: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A TCP proxy the test can cut, to take a service away from one worker
/// without touching the service the other tests share.
pub struct TcpProxy {
    pub port: u16,
    cut: Arc<std::sync::atomic::AtomicBool>,
    links: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Forwards 127.0.0.1:`port` to `target` ("127.0.0.1:5432").
    pub async fn to(target: &str) -> TcpProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let links: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (target, c, l) = (target.to_string(), cut.clone(), links.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the service is away
                }
                let target = target.clone();
                l.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }));
            }
        });
        TcpProxy { port, cut, links, accept }
    }

    /// Drops every connection and refuses new ones until `restore`.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }
}

/// Where .ci/tls-endpoints.sh put the throwaway CA and certificates.
pub fn tls_file(name: &str) -> String {
    let dir = std::env::var("REAPER_TEST_TLS_DIR").unwrap_or_else(|_| "/var/tmp/reaper-ci-tls".into());
    let path = std::path::Path::new(&dir).join(name);
    assert!(path.exists(), "{} is missing: run .ci/tls-endpoints.sh (as .ci/run does) first", path.display());
    path.display().to_string()
}

/// HTTPS in front of a plain server (the simulated cloud), with the
/// certificate .ci/tls-endpoints.sh made for `localhost`.
pub struct HttpsFront {
    pub port: u16,
    accept: tokio::task::JoinHandle<()>,
}

impl HttpsFront {
    pub async fn to(target: std::net::SocketAddr) -> HttpsFront {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use tokio_rustls::rustls::{crypto::ring, ServerConfig};
        let certs: Vec<_> =
            CertificateDer::pem_file_iter(tls_file("server.pem")).unwrap().collect::<Result<_, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_file(tls_file("server.key")).unwrap();
        let config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(inbound).await else { return };
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut outbound).await;
                    }
                });
            }
        });
        HttpsFront { port, accept }
    }
}

impl Drop for HttpsFront {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
