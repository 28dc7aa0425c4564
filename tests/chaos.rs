//! The chaos suite: over many jobs with a flaky simulated cloud, kill -9 the
//! worker at random moments, restart RabbitMQ once, and stop PostgreSQL for
//! about ten seconds; then prove nothing was lost, duplicated differently,
//! deleted out of order, or deleted without being asked.
//!
//! It restarts services other tests share, so it is ignored by `cargo test`
//! and run alone (`.ci/run` does, after the rest):
//!
//!     cargo test --release --test chaos -- --ignored --nocapture --test-threads=1
//!
//! CHAOS_JOBS (default 1000) and CHAOS_KILLS (default 20) make it longer.

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ConnectionProperties};
use reaper::broker::publisher::Publisher;
use reaper::broker::Names;
use reaper::config::Settings;
use reaper::devtools::demo::VpcNode;
use reaper::devtools::sim::{Faults, Sim};
use serde_json::json;
use sqlx::Connection as _;
use tokio_util::sync::CancellationToken;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn amqp_url() -> String {
    std::env::var("REAPER_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn pg_server() -> String {
    std::env::var("REAPER_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

fn sh(cmd: &str) {
    let status = Command::new("bash").arg("-c").arg(cmd).status().expect("running a shell command");
    assert!(status.success(), "`{cmd}` failed");
}

fn pg_cluster() -> String {
    std::fs::read_dir("/etc/postgresql")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .unwrap_or_else(|| "15".into())
}

/// A publisher that reconnects when RabbitMQ goes away, so the test itself
/// rides out the restart it causes.
struct Producer {
    names: Names,
    link: Option<(Connection, Publisher)>,
}

impl Producer {
    async fn publish(&mut self, key: &str, body: &serde_json::Value) {
        let bytes = serde_json::to_vec(body).unwrap();
        let id = body["event_id"].as_str().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if self.link.is_none() {
                if let Ok(conn) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await {
                    if let Ok(ch) = conn.create_channel().await {
                        if ch.confirm_select(ConfirmSelectOptions::default()).await.is_ok() {
                            self.link = Some((conn, Publisher::new(ch)));
                        }
                    }
                }
            }
            if let Some((_, p)) = &self.link {
                if p.publish(&self.names.events, key, &bytes, &id, &[]).await.is_ok() {
                    return;
                }
                self.link = None;
            }
            assert!(Instant::now() < deadline, "could not publish {id} for two minutes");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Collects results from a durable queue of the test's own, reconnecting as needed.
async fn collect_results(
    names: Names,
    tap: String,
    stop: CancellationToken,
    out: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
) {
    while !stop.is_cancelled() {
        // Any step of opening the tap can hang across the broker restart
        // without an error: the whole of it is bounded, and an idle watchdog
        // reconnects too.
        let opened = tokio::time::timeout(Duration::from_secs(15), open_tap(&names, &tap)).await;
        let Ok(Some((conn, mut consumer))) = opened else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                // Unacked deliveries go back to the tap queue when we close.
                _ = tokio::time::sleep(Duration::from_secs(5)) => break,
                next = consumer.next() => match next {
                    Some(Ok(d)) => {
                        let acked = tokio::time::timeout(Duration::from_secs(5), d.acker.ack(BasicAckOptions::default())).await;
                        if !matches!(acked, Ok(Ok(_))) {
                            break; // redelivered after the reconnect; a copy is compared like any duplicate
                        }
                        let _ = out.send(d.data.clone());
                    }
                    _ => break,
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "reconnecting".into())).await;
    }
}

/// The test's own durable result queue, bound to the results exchange, with a consumer on it.
async fn open_tap(names: &Names, tap: &str) -> Option<(Connection, lapin::Consumer)> {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.ok()?;
    let ch = conn.create_channel().await.ok()?;
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
    ch.queue_declare(tap.into(), QueueDeclareOptions { durable: true, ..Default::default() }, args).await.ok()?;
    ch.queue_bind(
        tap.into(),
        names.results.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .ok()?;
    ch.basic_qos(500, BasicQosOptions::default()).await.ok()?;
    let consumer = ch
        .basic_consume(tap.into(), "chaos-tap".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .ok()?;
    Some((conn, consumer))
}

struct Worker {
    child: Option<Child>,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Worker {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_reaper"));
        // Only what this test sets: none of the developer's REAPER_* variables.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("REAPER_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "warn,reaper=info")
            .env("REAPER_LOG__FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting reaper run");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    fn term(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One chaos run's shape.
struct Scenario {
    jobs: usize,
    min_kills: usize,
    /// The worker's broker retry schedule and in-process attempts per step.
    retry_delays: &'static str,
    step_attempts: u32,
    faults: Faults,
    /// Milliseconds between kills (a random pick in this range).
    kill_gap_ms: std::ops::Range<u64>,
    /// Restart RabbitMQ and stop PostgreSQL once each.
    services: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts RabbitMQ and PostgreSQL; run alone: cargo test --test chaos -- --ignored"]
async fn nothing_is_lost_when_the_worker_the_broker_and_the_database_fail() {
    chaos(Scenario {
        jobs: env_or("CHAOS_JOBS", 1000),
        min_kills: env_or("CHAOS_KILLS", 20),
        retry_delays: "[0.5, 1, 2, 4, 8, 15]",
        step_attempts: 4,
        faults: Faults {
            error_rate: 0.10,
            rate_limit_rate: 0.02,
            retry_after_secs: 0.1,
            latency_ms: 2,
            seed: Some(42),
            ..Default::default()
        },
        kill_gap_ms: 300..900,
        services: true,
    })
    .await;
}

/// Crashes must not spend a job's retry schedule: a short schedule (four
/// retries, 1 to 8 s), few in-process attempts, a flakier cloud (10% 5xx, 5%
/// 429 with Retry-After) and a kill -9 every two to four seconds. Every
/// delivery after a crash once counted as an attempt, and healthy jobs were
/// dead-lettered "out of retries" in half the runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kills workers for a minute; run alone: cargo test --test chaos -- --ignored"]
async fn a_short_retry_schedule_survives_many_kills() {
    chaos(Scenario {
        jobs: 200,
        min_kills: env_or("CHAOS_KILLS", 20).max(20),
        retry_delays: "[1, 2, 4, 8]",
        step_attempts: 2,
        faults: Faults {
            error_rate: 0.10,
            rate_limit_rate: 0.05,
            retry_after_secs: 0.1,
            latency_ms: 2,
            seed: Some(7),
            ..Default::default()
        },
        // About 20 kills a minute, as in the report.
        kill_gap_ms: 2000..4000,
        services: false,
    })
    .await;
}

/// Waits until the work queue and every delay queue hold no ready message,
/// seen twice half a second apart (a copy moves from a delay queue to the
/// work queue between two reads).
async fn wait_until_queues_empty(names: &Names, delays: &[Duration], within: Duration) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut queues = vec![names.work.clone()];
    queues.extend(delays.iter().map(|d| names.retry(*d)));
    let deadline = Instant::now() + within;
    let mut empty_reads = 0;
    while empty_reads < 2 {
        let mut held = Vec::new();
        for q in &queues {
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            let n = ch.queue_declare(q.as_str().into(), passive, FieldTable::default()).await.unwrap().message_count();
            if n > 0 {
                held.push(format!("{q}: {n}"));
            }
        }
        empty_reads = if held.is_empty() { empty_reads + 1 } else { 0 };
        assert!(Instant::now() < deadline, "queues still hold messages after {within:?}: {held:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = conn.close(200, "queues empty".into()).await;
}

async fn chaos(sc: Scenario) {
    let Scenario { jobs, min_kills, retry_delays, step_attempts, faults, kill_gap_ms, services } = sc;
    let started = Instant::now();
    let id = format!("{:08x}", fastrand::u32(..));
    let prefix = format!("chaos-{id}");
    let db = format!("reaper_chaos_{id}");
    let names = Names::new(&prefix);
    {
        let mut pg = sqlx::PgConnection::connect(&format!("{}/postgres", pg_server())).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE \"{db}\"")).execute(&mut pg).await.unwrap();
    }

    // The simulated cloud lives in this process and outlives every worker.
    let sim = Sim::new();
    let stop_sim = CancellationToken::new();
    let addr = sim.spawn(0, stop_sim.clone()).await.unwrap();
    let config = format!(
        "{}\n[broker]\nurl = \"{}\"\nprefix = \"{prefix}\"\nprefetch = 64\n\
         [admin]\nlisten = \"\"\n[database]\nurl = \"{}/{db}\"\nmax_connections = 16\nacquire_timeout_ms = 2000\n\
         [worker]\nstep_attempts = {step_attempts}\nstep_min_backoff_ms = 20\nstep_max_backoff_ms = 300\n\
         retry_delays_secs = {retry_delays}\nlease_ttl_secs = 3\nowner_busy_delay_ms = 300\nshutdown_grace_secs = 10\n",
        include_str!("../config/vpc-node.toml")
            .replace("auth = {", "# auth = {")
            .replace("base_url = \"http://127.0.0.1:8089\"", &format!("base_url = \"http://{addr}\"")),
        amqp_url(),
        pg_server(),
    );
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let config_path = dir.join("reaper.toml");
    std::fs::write(&config_path, &config).unwrap();
    let settings = Settings::from_toml(&config).unwrap();
    let ledger = reaper::ledger::Ledger::from_settings(&settings).await.unwrap();
    ledger.migrate().await.unwrap();
    // Declare the topology, then the test's own result queue.
    let (conn, _) = reaper::broker::link::open(&settings, &names).await.unwrap();
    let _ = conn.close(200, "declared".into()).await;
    let tap = format!("{prefix}.chaos-tap");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stop_tap = CancellationToken::new();
    let collector = tokio::spawn(collect_results(names.clone(), tap.clone(), stop_tap.clone(), tx));

    let mut worker = Worker { child: None, config: config_path, log: dir.join("worker.log") };
    worker.start();
    let mut producer = Producer { names: names.clone(), link: None };

    // Nodes to tear down, and control nodes nobody asks to delete.
    let nodes: Vec<VpcNode> = (0..jobs).map(|i| VpcNode::new(&format!("c{id}-{i:05}"))).collect();
    let controls: Vec<VpcNode> = (0..20).map(|i| VpcNode::new(&format!("keep{id}-{i:03}"))).collect();
    for n in nodes.iter().chain(&controls) {
        n.create_in(&sim);
        for e in n.track_events(&n.owner) {
            producer.publish("resource.tracked", &e).await;
        }
    }
    let owners: Vec<String> = nodes.iter().chain(&controls).map(|n| n.owner.clone()).collect();
    let want = (owners.len() * 5) as i64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while ledger.count_tracked(&owners).await.unwrap() < want {
        assert!(Instant::now() < deadline, "tracks were not all recorded in two minutes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("chaos: {} resources tracked in {:.1}s", want, started.elapsed().as_secs_f64());

    sim.set_faults(faults);

    // Publish the deletions over a while, killing the worker as it works, and
    // take the broker and the database away once each.
    let chaos_started = Instant::now();
    let mut kills = 0;
    // Kills while results were still owed: crashes that hit work in flight.
    let mut kills_mid_work = 0;
    let mut next_kill = Instant::now() + Duration::from_millis(fastrand::u64(kill_gap_ms.clone()));
    let mut broker_restarted = !services;
    let mut db_stopped = !services;
    let per_event = Duration::from_secs_f64(15.0 / jobs as f64);
    for (i, n) in nodes.iter().enumerate() {
        let (key, ev) = if i % 2 == 0 {
            (
                "deletion.requested",
                json!({"event_id": format!("chaos-{i}"), "owner": n.owner, "occurred_at": Utc::now().to_rfc3339()}),
            )
        } else {
            (
                "provisioning.failed",
                json!({"event_id": format!("chaos-{i}"), "owner": n.owner, "failed_step": "boot", "occurred_at": Utc::now().to_rfc3339()}),
            )
        };
        producer.publish(key, &ev).await;
        tokio::time::sleep(per_event).await;
        if Instant::now() >= next_kill {
            worker.kill9();
            kills += 1;
            kills_mid_work += 1;
            worker.start();
            next_kill = Instant::now() + Duration::from_millis(fastrand::u64(kill_gap_ms.clone()));
        }
        if !broker_restarted && i >= jobs / 3 {
            broker_restarted = true;
            println!("chaos: restarting RabbitMQ");
            sh("rabbitmqctl -q stop_app && rabbitmqctl -q start_app && rabbitmqctl -q await_startup");
        }
        if !db_stopped && i >= 2 * jobs / 3 {
            db_stopped = true;
            println!("chaos: stopping PostgreSQL for 10s");
            let cluster = pg_cluster();
            sh(&format!("pg_ctlcluster --skip-systemctl-redirect {cluster} main stop -m fast"));
            tokio::time::sleep(Duration::from_secs(10)).await;
            sh(&format!("pg_ctlcluster --skip-systemctl-redirect {cluster} main start"));
        }
    }

    // Keep killing until the quota is met, then let the last worker finish.
    let mut results: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        while let Ok(body) = rx.try_recv() {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            results.entry(v["event_id"].as_str().unwrap().to_string()).or_default().push(body);
        }
        if results.len() >= jobs && kills >= min_kills {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {jobs} events got a result in time (kills {kills})",
            results.len()
        );
        if kills < min_kills && Instant::now() >= next_kill {
            worker.kill9();
            kills += 1;
            kills_mid_work += usize::from(results.len() < jobs);
            worker.start();
            next_kill = Instant::now() + Duration::from_millis(fastrand::u64(kill_gap_ms.clone()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Results a killed worker stored but did not publish are published by the
    // last worker's outbox drain (after its grace): wait for the outbox to
    // empty, so those copies are compared with the others too.
    let drained_by = Instant::now() + Duration::from_secs(60);
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(ledger.pool()).await.unwrap();
        if left == 0 {
            break;
        }
        assert!(Instant::now() < drained_by, "{left} outbox rows were never published");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A killed worker may have scheduled a retry for a delivery that was then
    // redelivered and finished: that copy is still in a delay queue and comes
    // back as a duplicate up to the longest delay later. Let the last worker
    // see every such copy before it stops, so the work queue is empty for a
    // reason and not by luck.
    wait_until_queues_empty(&names, &settings.worker.all_delays(), Duration::from_secs(60)).await;
    let exit = worker.term();
    // Stragglers on their way to the tap: wait until its queue is empty.
    let tap_conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let tap_ch = tap_conn.create_channel().await.unwrap();
    let emptied_by = Instant::now() + Duration::from_secs(10);
    loop {
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let q = tap_ch.queue_declare(tap.as_str().into(), passive, FieldTable::default()).await.unwrap();
        if q.message_count() == 0 {
            break;
        }
        assert!(Instant::now() < emptied_by, "the tap still holds {} results", q.message_count());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = tap_conn.close(200, "tap drained".into()).await;
    while let Ok(body) = rx.try_recv() {
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        results.entry(v["event_id"].as_str().unwrap().to_string()).or_default().push(body);
    }
    stop_tap.cancel();
    let _ = collector.await;

    // The verdict.
    let stats = sim.stats();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut retries = 0u64;
    let mut duplicates = 0;
    let mut dead = 0;
    for (ev, bodies) in &results {
        assert!(bodies.iter().all(|b| b == &bodies[0]), "{ev}: results differ between copies");
        duplicates += bodies.len() - 1;
        let v: serde_json::Value = serde_json::from_slice(&bodies[0]).unwrap();
        *outcomes.entry(v["status"].as_str().unwrap().to_string()).or_default() += 1;
        if v["status"] == "dead_lettered" {
            dead += 1;
            println!("chaos: dead-lettered {ev}: {}", v["reason"]);
        }
        retries += v["attempts"].as_u64().unwrap().saturating_sub(1);
        for r in v["resources"].as_array().unwrap() {
            retries += r["attempts"].as_u64().unwrap_or(1).saturating_sub(1);
        }
    }
    let queue_depth = {
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                names.work.as_str().into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let depth = q.message_count();
        // Leave nothing behind on the broker.
        let _ = ch.queue_delete(tap.as_str().into(), Default::default()).await;
        let _ = reaper::broker::delete_topology(&conn, &names, &settings.worker.all_delays()).await;
        depth
    };
    let left: Vec<String> = sim.paths();
    let controls_intact = controls.iter().flat_map(|c| c.resources.iter()).all(|r| sim.exists(&r.path));
    println!(
        "chaos: jobs {jobs}, results {} ({:?}), kills {kills}, broker restart and database stop {services}, retries {retries}, \
         dead letters {dead}, duplicate results {duplicates}, injected 5xx {} / 429 {}, refused for order {}, \
         left in the cloud {} (controls {}), work queue depth {queue_depth}, last worker exit {exit:?}, {:.1}s of chaos, {:.1}s in all",
        results.len(),
        outcomes,
        stats.injected_errors,
        stats.injected_rate_limits,
        stats.refused_for_order,
        left.len(),
        controls.len() * 5,
        chaos_started.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64(),
    );
    {
        let mut pg = sqlx::PgConnection::connect(&format!("{}/postgres", pg_server())).await.unwrap();
        drop(ledger);
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)")).execute(&mut pg).await;
    }
    stop_sim.cancel();

    assert_eq!(results.len(), jobs, "every event has a terminal result");
    assert_eq!(outcomes.get("completed").copied().unwrap_or(0), jobs, "every job completed: {outcomes:?}");
    assert!(controls_intact, "nothing was deleted that no event asked for");
    assert_eq!(
        left.len(),
        controls.len() * 5,
        "the cloud holds only the control nodes: {:?}",
        left.iter().filter(|p| !p.contains("keep")).take(5).collect::<Vec<_>>()
    );
    assert_eq!(stats.refused_for_order, 0, "no delete was refused for order");
    assert_eq!(queue_depth, 0, "the work queue is empty");
    assert!(
        kills_mid_work >= 3,
        "at least three kills hit a worker with results still owed: {kills_mid_work} of {kills}"
    );
    assert_eq!(exit, Some(0), "the last worker stops cleanly on SIGTERM");
}
