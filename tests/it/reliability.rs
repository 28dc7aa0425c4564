//! Replay, replicas and shutdown, on the real services.

use std::process::Stdio;
use std::time::Duration;

use chrono::Utc;
use reaper::devtools::demo::VpcNode;
use reaper::devtools::sim::Faults;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_job_is_replayed_from_the_cli_once_its_cause_is_fixed() {
    let mut t = spawn_app("").await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    // The DNS API refuses (403) until someone fixes the permissions.
    t.sim.set_faults(Faults { fail_next: 1, fail_status: 403, only_method: "DELETE".into(), ..Default::default() });
    t.publish("deletion.requested", &deletion("replay-me", &node.owner, Utc::now())).await;
    let first = t.next_result(30).await.result;
    assert_eq!(first.status, "dead_lettered");
    let deleted_before = t.sim.stats().deleted;

    // Dry run lists it and changes nothing.
    let out = t.reaper(&["replay", "--owner", &node.owner, "--dry-run"], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&first.job_id.to_string()) && stdout.contains("would replay 1"), "{stdout}");

    let out = t.reaper(&["replay", "--owner", &node.owner], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("replayed 1"), "{stdout}");

    let second = t.next_result(30).await.result;
    assert_eq!(
        (second.event_id.as_str(), second.job_id),
        ("replay-me", first.job_id),
        "the same job, the same event_id"
    );
    assert_eq!(second.status, "completed", "{second:?}");
    assert!(t.sim.paths().is_empty(), "left: {:?}", t.sim.paths());
    // Steps done before the failure were not redone: only what was left got deleted.
    // One of the DNS record and the VNI was refused; what did not wait for it went.
    let done_first = first.resources.iter().filter(|s| s.outcome == "deleted").count() as u64;
    let refused = first.resources.iter().find(|s| s.outcome == "failed").expect("one step failed");
    assert_eq!(done_first, if refused.kind == "vni" { 3 } else { 1 }, "{:?}", first.resources);
    assert_eq!(t.sim.stats().deleted - deleted_before, 5 - done_first, "what was done already was left alone");
    assert_eq!(t.sim.stats().delete_not_found, 0);
    // A redone step would look first (a replay re-checks) and say already_gone
    // without a DELETE: every step says deleted, and each resource was asked
    // to go once, the refused one twice (refused, then deleted).
    assert!(second.resources.iter().all(|s| s.outcome == "deleted"), "{:?}", second.resources);
    for r in &node.resources {
        let want = if r.kind == refused.kind { 2 } else { 1 };
        assert_eq!(t.deletes_of(&r.path), want, "DELETEs of {}", r.path);
    }

    // Nothing is dead any more: a second replay finds nothing and changes nothing.
    let out = t.reaper(&["replay", "--owner", &node.owner, "--json"], &[]);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(summary["matched"], 0);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_replayed_too_often_is_held_back_and_reported() {
    let mut t = spawn_app("").await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    t.sim.set_faults(Faults { fail_next: 100, fail_status: 403, only_method: "DELETE".into(), ..Default::default() });
    t.publish("deletion.requested", &deletion("hopeless", &node.owner, Utc::now())).await;
    assert_eq!(t.next_result(30).await.result.status, "dead_lettered");
    let env = [("REAPER_WORKER__MAX_REPLAYS", "1")];
    let out = t.reaper(&["replay", "--reason", "403"], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let again = t.next_result(30).await.result;
    assert_eq!((again.status.as_str(), again.attempts), ("dead_lettered", 1), "the attempt budget was reset");
    let out = t.reaper(&["replay", "--reason", "403"], &env);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "held-back jobs make the command fail: {stdout}");
    assert!(stdout.contains("held back") && stdout.contains(&node.owner), "{stdout}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_without_a_filter_or_all_refuses_to_guess() {
    let t = spawn_app("").await;
    let out = t.reaper(&["replay"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("or --all"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_run_one_job_twice_at_once() {
    let mut t = spawn_app("").await;
    let (replica, handle, replica_app) = t.spawn_replica().await;
    wait_until("the replica consumes", Duration::from_secs(20), || async {
        replica_app.ready.load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;
    let nodes: Vec<VpcNode> = (0..12).map(|_| VpcNode::new(&unique("node"))).collect();
    for n in &nodes {
        t.provision(n).await;
    }
    t.sim.set_faults(Faults { latency_ms: 20, ..Default::default() });
    // Every deletion twice, back to back: the two copies land on different workers.
    for (i, n) in nodes.iter().enumerate() {
        let ev = deletion(&format!("twice-{i}"), &n.owner, Utc::now());
        t.publish("deletion.requested", &ev).await;
        t.publish("deletion.requested", &ev).await;
    }
    let mut by_event: std::collections::HashMap<String, Vec<Vec<u8>>> = Default::default();
    for _ in 0..nodes.len() * 2 {
        let r = t.next_result(60).await;
        by_event.entry(r.result.event_id.clone()).or_default().push(r.body);
    }
    assert_eq!(by_event.len(), nodes.len());
    for (ev, bodies) in &by_event {
        assert_eq!(bodies.len(), 2, "{ev}");
        assert_eq!(bodies[0], bodies[1], "{ev}: both results identical");
    }
    let stats = t.sim.stats();
    assert!(t.sim.paths().is_empty());
    assert_eq!(stats.deleted, 60);
    assert_eq!(stats.delete_not_found, 0, "no delete ran twice: the copies never ran at the same time");
    assert_eq!(stats.refused_for_order, 0);
    // Both workers took deliveries: the copies really met two workers.
    let handled = |app: &reaper::app::App| metric_total(app, "reaper_events_consumed_total");
    let (main, second) = (handled(&t.app), handled(&replica_app));
    assert!(main > 0.0 && second > 0.0, "deliveries handled by the first worker {main}, by the replica {second}");
    replica.cancel();
    handle.await.unwrap();
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_worker_cleanly_with_exit_code_zero() {
    let t = spawn_app("").await;
    let mut child =
        Child::spawn(reaper_cmd().args(["run", "--config"]).arg(t.config_file()).stderr(Stdio::piped()), "reaper run");
    // Wait for readiness as an operator would: the log line.
    let rx = lines_of(child.inner.stderr.take().unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .expect("the worker logs that it is ready");
        if line.contains("worker ready") {
            break;
        }
    }
    let status = child.terminate(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "a clean stop after SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_terminals_replaying_at_once_replay_each_job_once() {
    let mut t = spawn_app("").await;
    let nodes: Vec<VpcNode> = (0..4).map(|_| VpcNode::new(&unique("node"))).collect();
    for n in &nodes {
        t.provision(n).await;
    }
    t.sim.set_faults(Faults { fail_next: 4, fail_status: 403, only_method: "DELETE".into(), ..Default::default() });
    for (i, n) in nodes.iter().enumerate() {
        t.publish("deletion.requested", &deletion(&format!("both-{i}"), &n.owner, Utc::now())).await;
    }
    let mut dead = 0;
    for _ in 0..nodes.len() {
        if t.next_result(30).await.result.status == "dead_lettered" {
            dead += 1;
        }
    }
    assert!(dead >= 1, "at least one job was refused");
    let config = t.config_file();
    let run = || {
        let config = config.clone();
        std::thread::spawn(move || {
            let mut cmd = reaper_cmd();
            cmd.args(["replay", "--reason", "403", "--json", "--config"]).arg(&config);
            run_to_end(&mut cmd, "reaper replay", Duration::from_secs(60))
        })
    };
    let (a, b) = (run(), run());
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    let sa: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
    let sb: serde_json::Value = serde_json::from_slice(&b.stdout).unwrap();
    let replayed = sa["replayed"].as_array().unwrap().len() + sb["replayed"].as_array().unwrap().len();
    assert_eq!(replayed, dead, "each dead job replayed exactly once between the two: {sa} {sb}");
    for _ in 0..dead {
        assert_eq!(t.next_result(30).await.result.status, "completed");
    }
    assert!(t.tap.next(Duration::from_millis(500)).await.is_none(), "no job ran twice");
    assert!(t.sim.paths().is_empty());
    t.stop().await;
}

/// The dead copy of an event says why, by class, in `x-reaper-error-class`
/// (docs/contract.md): one scenario per class. The copy once said
/// `job_failed` for every job that reached its finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_copy_names_its_class_for_every_class() {
    let mut t = spawn_app(
        r#"
[kinds.held_vni]
provider = "cloud"
delete = "DELETE /v1/virtual_network_interfaces/{id}"
check = "GET /v1/virtual_network_interfaces/{id}"
guard = { provider = "cloud", query = "GET /v1/holds/{id}", reason = "held" }
[worker]
retry_delays_secs = [3, 0.2]
"#,
    )
    .await;
    let vni = |id: &str| format!("/v1/virtual_network_interfaces/{id}");
    let failed = |event_id: &str, owner: &str, resources: serde_json::Value| serde_json::json!({"event_id": event_id, "owner": owner, "occurred_at": Utc::now().to_rfc3339(), "resources": resources});
    // malformed: not an event at all.
    t.publish_raw(&t.app.names.events, "deletion.requested", b"{not json").await;
    check(&t, "malformed", false).await;

    // permanent: the API says 403.
    t.sim.create(&vni("perm"), &[]);
    t.sim.set_faults(Faults { fail_next: 1, fail_status: 403, only_method: "DELETE".into(), ..Default::default() });
    t.publish("provisioning.failed", &failed("c-perm", "cls/perm", serde_json::json!([{"kind": "vni", "id": "perm"}])))
        .await;
    assert_eq!(t.next_result(30).await.result.status, "dead_lettered");
    check(&t, "permanent", true).await;

    // plan: parents in a circle.
    t.publish(
        "provisioning.failed",
        &failed(
            "c-plan",
            "cls/plan",
            serde_json::json!([
                {"kind": "vni", "id": "p1", "parent": {"kind": "vni", "id": "p2"}},
                {"kind": "vni", "id": "p2", "parent": {"kind": "vni", "id": "p1"}}
            ]),
        ),
    )
    .await;
    assert_eq!(t.next_result(30).await.result.status, "dead_lettered");
    check(&t, "plan", true).await;

    // blocked: a guard finds it in use.
    t.sim.create(&vni("held"), &[]);
    t.sim.create("/v1/holds/held", &[]);
    t.publish(
        "provisioning.failed",
        &failed("c-held", "cls/held", serde_json::json!([{"kind": "held_vni", "id": "held"}])),
    )
    .await;
    assert_eq!(t.next_result(30).await.result.status, "dead_lettered");
    check(&t, "blocked", true).await;

    // exhausted: 503 on every attempt, through the whole schedule.
    t.sim.create(&vni("tired"), &[]);
    t.sim.set_faults(Faults {
        fail_next: 10_000,
        fail_status: 503,
        only_method: "DELETE".into(),
        ..Default::default()
    });
    t.publish(
        "provisioning.failed",
        &failed("c-tired", "cls/tired", serde_json::json!([{"kind": "vni", "id": "tired"}])),
    )
    .await;
    assert_eq!(t.next_result(30).await.result.status, "dead_lettered");
    check(&t, "exhausted", true).await;

    // poison: a job delivered far more often than its schedule explains (as
    // if the worker kept crashing on it): its first run ends unfinished, and
    // while it waits 3 s for its retry, its deliveries are made many.
    t.sim.create(&vni("sick"), &[]);
    t.sim.set_faults(Faults {
        fail_next: 10_000,
        fail_status: 503,
        only_method: "DELETE".into(),
        ..Default::default()
    });
    t.publish("provisioning.failed", &failed("c-sick", "cls/sick", serde_json::json!([{"kind": "vni", "id": "sick"}])))
        .await;
    wait_until("the first run gave up", Duration::from_secs(20), || async {
        t.sim.requests().iter().filter(|(m, p)| m == "DELETE" && *p == vni("sick")).count() >= 4
    })
    .await;
    t.sql("UPDATE jobs SET attempts = 100 WHERE event_id = 'c-sick'").await;
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "dead_lettered", "{r:?}");
    assert!(r.reason.as_deref().unwrap_or("").contains("poison"), "{r:?}");
    check(&t, "poison", true).await;
    t.sim.set_faults(Faults::default());
    t.stop().await;
}

/// The one dead copy the last scenario put on the dead queue.
async fn check(t: &TestApp, class: &str, job: bool) {
    let (_, h) = t.dead_headers(1).await.pop().unwrap();
    let more = t.drain_dead().await;
    assert!(more.is_empty(), "{class}: one dead copy, not {}", 1 + more.len());
    assert_eq!(h.get("x-reaper-error-class").map(String::as_str), Some(class), "{h:?}");
    assert!(h.get("x-reaper-reason").is_some_and(|r| !r.is_empty()), "{h:?}");
    assert_eq!(h.contains_key("x-reaper-job-id"), job, "{class}: a job id only where there is a job: {h:?}");
    assert!(h.contains_key("x-reaper-routing-key"), "{h:?}");
}

/// A test app whose workers' leases run out a second after a crash, in the
/// app and in the config file its `reaper run` processes read.
async fn with_short_leases() -> TestApp {
    // The binary's config file gets one [worker] table, merged (`spawn_app`).
    let t = spawn_app("[worker]\nlease_ttl_secs = 1\nowner_busy_delay_ms = 200\n").await;
    assert!(t.config_text.contains("lease_ttl_secs = 1\nowner_busy_delay_ms = 200\n"), "{}", t.config_text);
    t
}

/// Starts `reaper run` with the test's config; the worker's stderr goes to a file.
fn start_worker(t: &TestApp) -> Child {
    let log = std::fs::File::create(std::env::temp_dir().join(format!("{}.worker.log", t.app.names.events))).unwrap();
    Child::spawn(
        reaper_cmd().args(["run", "--config"]).arg(t.config_file()).stdout(Stdio::null()).stderr(log),
        "reaper run",
    )
}

/// Crashes do not spend the retry schedule. A worker killed (-9) three times
/// while a job's DELETE hangs, then a run that ends unfinished: the job still
/// has its whole schedule (two retries here) and completes. Every redelivery
/// after a crash used to count as an attempt, so this job was dead-lettered
/// "out of retries after 4 attempts" although it had failed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_crashes_keeps_its_retry_schedule() {
    let mut t = with_short_leases().await;
    t.stop().await; // the workers here are processes, killed as a crash kills.
    let id = unique("crashy");
    let owner = format!("node/{id}");
    let path = format!("/v1/virtual_network_interfaces/{id}");
    t.sim.create(&path, &[]);
    let event = serde_json::json!({
        "event_id": unique("crash"), "owner": owner, "occurred_at": Utc::now().to_rfc3339(),
        "resources": [{"kind": "vni", "id": id}],
    });
    let deletes = || t.sim.requests().iter().filter(|(m, p)| m == "DELETE" && *p == path).count();
    t.sim.set_faults(Faults { hang_rate: 1.0, hang_ms: 60_000, only_method: "DELETE".into(), ..Default::default() });
    t.publish("provisioning.failed", &event).await;
    for crash in 1..=3 {
        let mut worker = start_worker(&t);
        wait_until(&format!("delivery {crash} is deleting"), Duration::from_secs(30), || async { deletes() >= crash })
            .await;
        worker.crash();
    }
    // The next run fails its step four times (step_attempts) and ends unfinished.
    t.sim.set_faults(Faults { fail_next: 4, fail_status: 503, only_method: "DELETE".into(), ..Default::default() });
    let mut worker = start_worker(&t);
    let r = t.next_result(60).await.result;
    worker.crash();
    assert_eq!(r.status, "completed", "three crashes and one failed run are within a two-retry schedule: {r:?}");
    assert!(!t.sim.exists(&path));
    assert_eq!(r.attempts, 5, "deliveries are still counted (poison detection uses them): {r:?}");
}

/// A rate limit is the API asking to wait, not a failure: six 429s in a row
/// (more than `step_attempts` = 4) with a short Retry-After are waited out
/// within the step's time budget, in the job's first run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_waited_out_without_spending_the_steps_attempts() {
    let mut t = spawn_app("").await;
    let id = unique("limited");
    let owner = format!("node/{id}");
    let path = format!("/v1/virtual_network_interfaces/{id}");
    t.sim.create(&path, &[]);
    t.sim.set_faults(Faults {
        fail_next: 6,
        fail_status: 429,
        retry_after_secs: 0.05,
        only_method: "DELETE".into(),
        ..Default::default()
    });
    let event = serde_json::json!({
        "event_id": unique("limited"), "owner": owner, "occurred_at": Utc::now().to_rfc3339(),
        "resources": [{"kind": "vni", "id": id}],
    });
    t.publish("provisioning.failed", &event).await;
    let r = t.next_result(30).await.result;
    assert_eq!((r.status.as_str(), r.attempts), ("completed", 1), "done in its first run: {r:?}");
    assert_eq!(r.resources[0].outcome, "deleted");
    assert_eq!(r.resources[0].attempts, 1, "the 429s were waits, not failed attempts: {r:?}");
    assert_eq!(t.sim.stats().injected_rate_limits, 6);
    t.stop().await;
}

/// A guard that cannot be asked right now (503s past the step's attempts)
/// holds the owner back for this run only: nothing is deleted, the job comes
/// back on its schedule, and completes once the guard answers "not in use".
/// It used to be dead-lettered as `blocked` at once, waiting for an operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_that_fails_for_now_holds_the_job_back_for_a_retry_not_for_good() {
    let mut t = spawn_app(
        r#"
[kinds.held_vni]
provider = "cloud"
delete = "DELETE /v1/virtual_network_interfaces/{id}"
check = "GET /v1/virtual_network_interfaces/{id}"
guard = { provider = "cloud", query = "GET /v1/holds/{id}", reason = "held" }
"#,
    )
    .await;
    let id = unique("guarded");
    let path = format!("/v1/virtual_network_interfaces/{id}");
    t.sim.create(&path, &[]);
    // Four failed guard calls end the first run; the next run's guard answers.
    t.sim.set_faults(Faults { fail_next: 4, fail_status: 503, only_method: "GET".into(), ..Default::default() });
    let event = serde_json::json!({
        "event_id": unique("guarded"), "owner": format!("node/{id}"), "occurred_at": Utc::now().to_rfc3339(),
        "resources": [{"kind": "held_vni", "id": id}],
    });
    t.publish("provisioning.failed", &event).await;
    let r = t.next_result(30).await.result;
    assert_eq!((r.status.as_str(), r.attempts), ("completed", 2), "retried, not dead-lettered: {r:?}");
    assert_eq!(r.resources[0].outcome, "deleted");
    assert!(!t.sim.exists(&path));
    assert!(t.drain_dead().await.is_empty(), "nothing went to the dead queue");
    t.stop().await;
}

/// Contract 6, end to end: a worker killed (-9) in the middle of a job, after
/// some of its steps were recorded, leaves the job on the queue (nothing was
/// acked), and the next worker resumes it: every recorded step is left alone
/// (no second DELETE), what was left is done, and one result is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_resumed_after_a_crash_does_not_redo_its_recorded_steps() {
    let mut t = with_short_leases().await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    t.stop().await; // the workers from here on are processes, killed as a crash kills.
                    // The first two DELETEs (the VNI and the DNS record, which go first) pass;
                    // every later one hangs, so the job is mid-way when the worker dies.
    t.sim.set_faults(Faults {
        pass_first: 2,
        hang_rate: 1.0,
        hang_ms: 60_000,
        only_method: "DELETE".into(),
        ..Default::default()
    });
    let mut worker = start_worker(&t);
    t.publish("deletion.requested", &deletion("resume-1", &node.owner, Utc::now())).await;
    wait_until("two steps are recorded", Duration::from_secs(30), || async {
        t.count("SELECT count(*) FROM job_steps s JOIN jobs j USING (job_id) WHERE j.event_id = 'resume-1'").await >= 2
    })
    .await;
    wait_until("a later DELETE hangs", Duration::from_secs(30), || async { t.sim.stats().injected_hangs >= 1 }).await;
    let recorded: Vec<(String, String)> = sqlx::query_as(
        "SELECT s.kind, s.resource_id FROM job_steps s JOIN jobs j USING (job_id) WHERE j.event_id = 'resume-1'",
    )
    .fetch_all(t.app.ledger.pool())
    .await
    .unwrap();
    worker.crash();
    let status: String = sqlx::query_scalar("SELECT status FROM jobs WHERE event_id = 'resume-1'")
        .fetch_one(t.app.ledger.pool())
        .await
        .unwrap();
    assert_eq!(status, "running", "the crash ended nothing");

    t.sim.set_faults(Faults::default());
    let mut worker = start_worker(&t);
    let r = t.next_result(60).await.result;
    worker.crash();
    assert_eq!(r.status, "completed", "{r:?}");
    assert!(t.sim.paths().is_empty(), "left: {:?}", t.sim.paths());
    for (kind, id) in &recorded {
        let step = r.resources.iter().find(|s| &s.kind == kind && &s.id == id).unwrap();
        assert_eq!(step.outcome, "deleted", "{kind}/{id} keeps its recorded outcome");
        let path = &node.resources.iter().find(|x| x.kind == *kind && &x.id == id).unwrap().path;
        assert_eq!(t.deletes_of(path), 1, "{kind}/{id} was recorded before the crash and not asked to go again");
    }
    assert!(t.drain_dead().await.is_empty(), "nothing was dead-lettered");
}

/// The ledger's database and the broker go away for one worker (through a
/// proxy the test cuts). Without its database a job is parked on the retry
/// queue (never dead-lettered, nothing deleted) and /readyz answers 503
/// naming the database; back, the job completes. Without its broker the
/// worker answers 503 naming consumption while it reconnects, and is ready
/// and working again once the broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_its_database_or_broker_parks_its_work_and_says_it_is_not_ready() {
    let pg = TcpProxy::to("127.0.0.1:5432").await;
    let amqp = TcpProxy::to("127.0.0.1:5672").await;
    let extra = format!(
        "[database]\nurl = \"postgres://postgres@127.0.0.1:{}/{{db_name}}\"\n\
         [broker]\nurl = \"amqp://guest:guest@127.0.0.1:{}/%2f\"\n\
         [worker]\nretry_delays_secs = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]\n",
        pg.port, amqp.port
    );
    let mut t = spawn_app(&extra).await;
    wait_until("the admin API listens", Duration::from_secs(10), || async { t.app.admin_addr.get().is_some() }).await;
    let readyz = format!("http://{}/readyz", t.app.admin_addr.get().unwrap());
    let c = reqwest::Client::new();
    let ready = |c: &reqwest::Client| {
        let (c, url) = (c.clone(), readyz.clone());
        async move {
            let r = c.get(url).send().await.unwrap();
            (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
        }
    };
    wait_until("ready", Duration::from_secs(20), || async { ready(&c).await.0 == 200 }).await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;

    pg.cut();
    t.publish("deletion.requested", &deletion("no-db", &node.owner, Utc::now())).await;
    let infra = || t.app.metrics.broker_retries.with_label_values(&["infra"]).get();
    wait_until("the job is parked for a retry", Duration::from_secs(30), || async { infra() >= 1 }).await;
    let (code, body) = ready(&c).await;
    assert_eq!((code, body["database"].as_bool()), (503, Some(false)), "{body}");
    assert_eq!(t.sim.stats().deletes, 0, "nothing was deleted without the ledger");
    pg.restore();
    let r = t.next_result(60).await.result;
    assert_eq!(r.status, "completed", "{r:?}");
    assert!(t.sim.paths().is_empty());
    assert!(t.drain_dead().await.is_empty(), "parked, never dead-lettered");
    wait_until("ready again", Duration::from_secs(20), || async { ready(&c).await.0 == 200 }).await;

    amqp.cut();
    wait_until("not consuming", Duration::from_secs(20), || async {
        let (code, body) = ready(&c).await;
        code == 503 && body["consuming"] == false && body["database"] == true
    })
    .await;
    amqp.restore();
    wait_until("consuming again", Duration::from_secs(30), || async { ready(&c).await.0 == 200 }).await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    t.publish("deletion.requested", &deletion("after-broker", &node.owner, Utc::now())).await;
    assert_eq!(t.next_result(60).await.result.status, "completed");
    t.stop().await;
}

/// On shutdown the worker takes no new deliveries and gives the jobs in
/// flight `shutdown_grace_secs` to finish: one that finishes in time is
/// published; one that does not is left unacked, goes back to the queue and
/// is finished by the next worker, never lost and never dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_jobs_in_flight_finish_within_the_grace_and_hands_back_the_rest() {
    let mut t = spawn_app("[worker]\nshutdown_grace_secs = 2\nlease_ttl_secs = 1\nowner_busy_delay_ms = 200\n").await;
    let deleting = || t.sim.requests().iter().any(|(m, _)| m == "DELETE");

    // Each DELETE takes 300 ms: the job is in flight when the stop comes, and
    // finishes within the grace.
    let quick = VpcNode::new(&unique("node"));
    t.provision(&quick).await;
    t.sim.set_faults(Faults { latency_ms: 300, only_method: "DELETE".into(), ..Default::default() });
    t.publish("deletion.requested", &deletion("in-flight", &quick.owner, Utc::now())).await;
    wait_until("a DELETE is under way", Duration::from_secs(20), || async { deleting() }).await;
    t.shutdown.cancel();
    let r = t.next_result(20).await.result;
    assert_eq!((r.event_id.as_str(), r.status.as_str()), ("in-flight", "completed"), "{r:?}");
    t.stop().await;
    assert!(t.sim.paths().is_empty());

    // A DELETE that hangs outlasts the grace: the worker stops anyway, and the
    // job goes back to the queue for the next worker.
    let (replica, handle, _) = t.spawn_replica().await;
    let slow = VpcNode::new(&unique("node"));
    slow.create_in(&t.sim);
    t.sim.set_faults(Faults { hang_rate: 1.0, hang_ms: 60_000, only_method: "DELETE".into(), ..Default::default() });
    let event = serde_json::json!({
        "event_id": "outlasts-grace", "owner": slow.owner, "occurred_at": Utc::now().to_rfc3339(),
        "resources": [{"kind": "vni", "id": slow.resources.iter().find(|r| r.kind == "vni").unwrap().id}],
    });
    t.publish("provisioning.failed", &event).await;
    wait_until("the DELETE hangs", Duration::from_secs(20), || async { t.sim.stats().injected_hangs >= 1 }).await;
    let stopping = std::time::Instant::now();
    replica.cancel();
    tokio::time::timeout(Duration::from_secs(10), handle).await.expect("the replica stops after its grace").unwrap();
    let took = stopping.elapsed();
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(8), "stopped after the grace: {took:?}");
    let status: String = sqlx::query_scalar("SELECT status FROM jobs WHERE event_id = 'outlasts-grace'")
        .fetch_one(t.app.ledger.pool())
        .await
        .unwrap();
    assert_eq!(status, "running", "handed back, not ended");
    t.sim.set_faults(Faults::default());
    let (next, handle, _) = t.spawn_replica().await;
    // A result may come twice (docs/contract.md): a late copy of the first
    // job's (its outbox row drained by a replica before it was cleared) is not this one.
    let r = loop {
        let r = t.next_result(60).await.result;
        if r.event_id != "in-flight" {
            break r;
        }
    };
    assert_eq!((r.event_id.as_str(), r.status.as_str()), ("outlasts-grace", "completed"), "{r:?}");
    next.cancel();
    handle.await.unwrap();
    assert!(t.drain_dead().await.is_empty());
}

/// A job that runs longer than its owner's lease keeps the lease by the
/// heartbeat: a second delivery of the owner meanwhile (on the other worker)
/// waits as "owner busy" instead of running the same deletes beside it. A
/// lease that is not renewed runs out (`a_job_whose_worker_crashes_keeps_its_retry_schedule`
/// and `a_job_resumed_after_a_crash_does_not_redo_its_recorded_steps` rely on
/// that after a crash).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heartbeat_keeps_a_long_jobs_lease_so_a_second_delivery_waits() {
    let mut t = spawn_app("[worker]\nlease_ttl_secs = 1\nowner_busy_delay_ms = 100\n").await;
    let (replica, handle, replica_app) = t.spawn_replica().await;
    wait_until("the replica consumes", Duration::from_secs(20), || async {
        replica_app.ready.load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    // Each DELETE takes 800 ms: the job outlasts its 1 s lease several times over.
    t.sim.set_faults(Faults { latency_ms: 800, only_method: "DELETE".into(), ..Default::default() });
    let ev = deletion("long-job", &node.owner, Utc::now());
    t.publish("deletion.requested", &ev).await;
    t.publish("deletion.requested", &ev).await;
    let (a, b) = (t.next_result(60).await, t.next_result(60).await);
    assert_eq!(a.body, b.body, "one job, one result");
    assert_eq!(a.result.status, "completed", "{:?}", a.result);
    for r in &node.resources {
        assert_eq!(t.deletes_of(&r.path), 1, "{} was asked to go once: the copies never ran together", r.path);
    }
    let busy = |app: &reaper::app::App| app.metrics.broker_retries.with_label_values(&["owner_busy"]).get();
    assert!(busy(&t.app) + busy(&replica_app) >= 1, "the second delivery waited as owner busy");
    replica.cancel();
    handle.await.unwrap();
    t.stop().await;
}

/// A message whose handling panics costs retries, then a dead letter, and
/// nothing else: the worker goes on with other messages. (The panic is
/// injected by `REAPER_DEBUG_PANIC_OWNER`, which only debug builds read.)
#[cfg(debug_assertions)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_panics_the_handler_is_retried_then_dead_lettered_and_the_worker_carries_on() {
    let mut t = spawn_app("").await;
    let healthy = VpcNode::new(&unique("node"));
    t.provision(&healthy).await;
    t.stop().await; // the worker from here on is a process with the switch set
    let cursed = format!("node/{}", unique("cursed"));
    let log = std::fs::File::create(std::env::temp_dir().join(format!("{}.panic.log", t.app.names.events))).unwrap();
    let mut worker = Child::spawn(
        reaper_cmd()
            .args(["run", "--config"])
            .arg(t.config_file())
            .env("REAPER_DEBUG_PANIC_OWNER", &cursed)
            .stdout(Stdio::null())
            .stderr(log),
        "reaper run",
    );
    t.publish("deletion.requested", &deletion("cursed-1", &cursed, Utc::now())).await;
    let (body, headers) = t.dead_headers(1).await.pop().unwrap();
    assert_eq!(headers.get("x-reaper-error-class").map(String::as_str), Some("poison"), "{headers:?}");
    let reason = headers.get("x-reaper-reason").cloned().unwrap_or_default();
    let limit = t.app.settings.broker.delivery_limit;
    assert!(reason.contains(&format!("handling panicked {limit} times")), "{reason}");
    assert!(String::from_utf8_lossy(&body).contains("cursed-1"), "the original body is kept");
    // The worker is alive and well: the next owner is torn down.
    t.publish("deletion.requested", &deletion("after-panic", &healthy.owner, Utc::now())).await;
    let r = t.next_result(60).await.result;
    assert_eq!((r.event_id.as_str(), r.status.as_str()), ("after-panic", "completed"), "{r:?}");
    assert!(t.sim.paths().is_empty());
    assert!(worker.terminate(Duration::from_secs(20)).success(), "a clean stop after the panics");
}

/// Results leave through the outbox: a row a crashed worker left unpublished
/// is published by the next worker's drain once it is older than the grace,
/// and a row still young when the worker stops is flushed on the way out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_left_in_the_outbox_are_published_by_the_drain_and_the_shutdown_flush() {
    let mut t = spawn_app("").await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    t.publish("deletion.requested", &deletion("outboxed", &node.owner, Utc::now())).await;
    let first = t.next_result(30).await;
    let pool = t.app.ledger.pool().clone();
    let outbox = |age_secs: i64| {
        sqlx::query(
            "INSERT INTO outbox (job_id, event_id, target, routing_key, body, created_at)
             VALUES ($1, 'outboxed', 'result', $2, $3, now() - make_interval(secs => $4))",
        )
        .bind(first.result.job_id)
        .bind(&first.routing_key)
        .bind(first.body.clone())
        .bind(age_secs as f64)
        .execute(&pool)
    };

    // The job's own row goes once its result is confirmed, by a clear that
    // deletes the job's result rows: let it happen first, or it would take
    // the row below with it (under load it came after, and nothing drained).
    wait_until("the job's own row is cleared", Duration::from_secs(20), || async {
        t.count("SELECT count(*) FROM outbox WHERE event_id = 'outboxed'").await == 0
    })
    .await;
    // As if the worker had died between its commit and its publish, a while ago.
    outbox(60).await.unwrap();
    let again = t.next_result(30).await;
    assert_eq!(again.body, first.body, "the drain publishes the stored bytes");
    wait_until("the drained row is cleared", Duration::from_secs(20), || async {
        t.count("SELECT count(*) FROM outbox WHERE event_id = 'outboxed'").await == 0
    })
    .await;

    // A row younger than the grace is the worker's own to publish; stopping
    // flushes it rather than leave it for the next worker.
    outbox(0).await.unwrap();
    t.stop().await;
    let flushed = t.next_result(30).await;
    assert_eq!(flushed.body, first.body, "flushed on shutdown");
}

/// During the shutdown grace the worker still holds the leases of the jobs it
/// is finishing: a duplicate waiting on another worker must not find the
/// owner free and run the same deletes beside them. (The heartbeat used to
/// stop with the consumer, so a lease could run out mid-grace.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_finishing_in_the_shutdown_grace_keeps_its_lease() {
    let mut t = spawn_app("[worker]\nlease_ttl_secs = 1\nowner_busy_delay_ms = 100\nshutdown_grace_secs = 8\n").await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    // Each DELETE takes 800 ms: the job runs for a few seconds, well past its lease.
    t.sim.set_faults(Faults { latency_ms: 800, only_method: "DELETE".into(), ..Default::default() });
    let ev = deletion("grace-lease", &node.owner, Utc::now());
    t.publish("deletion.requested", &ev).await;
    wait_until("the first DELETE is under way", Duration::from_secs(20), || async {
        t.sim.requests().iter().any(|(m, _)| m == "DELETE")
    })
    .await;
    // Another worker, and a duplicate for it, then the first worker is told to stop.
    let (replica, handle, replica_app) = t.spawn_replica().await;
    wait_until("the replica consumes", Duration::from_secs(20), || async {
        replica_app.ready.load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;
    t.shutdown.cancel();
    t.publish("deletion.requested", &ev).await;
    let (a, b) = (t.next_result(60).await, t.next_result(60).await);
    assert_eq!(a.body, b.body, "one job, one result");
    for r in &node.resources {
        assert_eq!(t.deletes_of(&r.path), 1, "{} was asked to go once", r.path);
    }
    replica.cancel();
    handle.await.unwrap();
    t.stop().await;
}

/// The broker's own backstop: a message that keeps coming back unacked (a
/// worker that crashes on it before reaper can count anything) is
/// dead-lettered by the quorum queue after `4 × broker.delivery_limit`
/// deliveries, to the dead queue, with its body, rather than looping forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_work_queue_dead_letters_a_message_returned_unacked_too_often() {
    use lapin::options::{BasicGetOptions, BasicRejectOptions};
    let mut t = spawn_app("").await;
    t.stop().await; // nobody consumes: the test plays the crashing worker
    t.publish("deletion.requested", &deletion("crashes-every-time", "node/crashy", Utc::now())).await;
    let ch = t.conn.create_channel().await.unwrap();
    let limit = 4 * t.app.settings.broker.delivery_limit as usize;
    let mut deliveries = 0;
    loop {
        let got = ch.basic_get(t.app.names.work.as_str().into(), BasicGetOptions { no_ack: false }).await.unwrap();
        let Some(m) = got else { break };
        deliveries += 1;
        assert!(deliveries <= limit + 1, "still delivered after {deliveries} returns");
        m.delivery.acker.reject(BasicRejectOptions { requeue: true }).await.unwrap();
    }
    assert!(deliveries >= limit, "dead-lettered after only {deliveries} deliveries (limit {limit})");
    let dead = t.dead_wait(1).await;
    assert!(String::from_utf8_lossy(&dead[0].0).contains("crashes-every-time"), "the dead copy keeps the body");
}
