//! Operators in control: a pause every replica honours, lifted from the CLI
//! or the admin API.

use std::time::Duration;

use chrono::Utc;
use reaper::app::App;
use reaper::devtools::demo::VpcNode;
use serde_json::Value;

use crate::helpers::*;

const TOKEN: &str = "control-tok-51b2e0";

fn paused_bounces(app: &App) -> u64 {
    app.metrics.broker_retries.with_label_values(&["paused"]).get()
}

/// `reaper pause` (no worker needed: a flag in the ledger) holds both
/// replicas: a deletion sent meanwhile goes round the retry queue, deletes
/// nothing and is not even recorded, so it counts no attempt. Scheduled and
/// executed sweeps wait too. The admin API resumes (with its token), and
/// the job runs once, as its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_holds_both_replicas_and_counts_nothing_until_resumed() {
    let (mut t, base, token_file) =
        spawn_with_admin("[worker]\nowner_busy_delay_ms = 100\npause_poll_ms = 100", TOKEN).await;
    let (stop, replica, replica_app) = t.spawn_replica().await;
    let _ = std::fs::remove_file(token_file);
    let node = VpcNode::new(&unique("held"));
    t.provision(&node).await;

    let out = t.reaper(&["pause", "--reason", "incident 42"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until("both replicas see the pause", Duration::from_secs(10), || async {
        t.app.paused().is_some() && replica_app.paused().is_some()
    })
    .await;
    assert_eq!((t.app.metrics.paused.get(), replica_app.metrics.paused.get()), (1, 1));

    t.publish("deletion.requested", &deletion("held-1", &node.owner, Utc::now())).await;
    wait_until("the deletion went round the retry queue three times", Duration::from_secs(30), || async {
        paused_bounces(&t.app) + paused_bounces(&replica_app) >= 3
    })
    .await;
    assert_eq!(t.sim.stats().deletes, 0, "nothing was deleted while paused");
    assert_eq!(t.count("SELECT count(*) FROM jobs").await, 0, "nothing was recorded: no attempt counted");
    // Tracks are still recorded: held back, an undated one would be dated by
    // its arrival after the pause and miss its teardown.
    t.provision(&VpcNode::new(&unique("tracked-while-paused"))).await;

    let out = t.reaper(&["status", "--json"], &[]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["paused"]["reason"], "incident 42", "{status}");
    assert!(status["paused"]["by"].as_str().unwrap().starts_with("reaper-cli"), "{status}");
    let out = t.reaper(&["status"], &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("PAUSED since"), "{}", String::from_utf8_lossy(&out.stdout));

    let c = reqwest::Client::new();
    let refused = c.post(format!("{base}/v1/resume")).send().await.unwrap();
    assert_eq!(refused.status(), 401, "changing the flag needs the token");
    assert!(t.app.paused().is_some());
    let resumed = c.post(format!("{base}/v1/resume")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(resumed.status(), 200);
    let body: Value = resumed.json().await.unwrap();
    assert_eq!(body["was"]["reason"], "incident 42", "{body}");

    let r = t.next_result(30).await.result;
    assert_eq!((r.owner.as_str(), r.status.as_str()), (node.owner.as_str(), "completed"), "{r:?}");
    assert_eq!(t.count("SELECT attempts::bigint FROM jobs").await, 1, "the held deliveries counted no attempt");
    assert!(node.resources.iter().all(|res| !t.sim.exists(&res.path)));

    // And the other way round: the API pauses, the CLI resumes.
    let paused = c
        .post(format!("{base}/v1/pause"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({ "reason": "deploy freeze" }))
        .send()
        .await
        .unwrap();
    assert_eq!(paused.status(), 200);
    assert_eq!(
        t.app.paused().map(|p| p.reason),
        Some("deploy freeze".into()),
        "the replica that answered knows at once"
    );
    let out = t.reaper(&["resume"], &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("resumed"), "{}", String::from_utf8_lossy(&out.stdout));
    wait_until("both replicas see the resume", Duration::from_secs(10), || async {
        t.app.paused().is_none() && replica_app.paused().is_none()
    })
    .await;
    stop.cancel();
    let _ = replica.await;
}

fn owner_free_live(owner: &str) -> String {
    format!("SELECT count(*) FROM tracked_resources WHERE owner = '{owner}' AND job_id IS NULL AND state = 'live'")
}

/// A job waiting for its broker retry ends `cancelled` at once (CLI): the
/// result says so and why, on `teardown.cancelled`; the resources it did not
/// delete go back to the owner, so the owner's next teardown takes them. A
/// dead-lettered job is cancelled the same way (API), and replay leaves it be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_or_dead_lettered_job_ends_cancelled_with_a_result() {
    let (mut t, base, token_file) = spawn_with_admin("[worker]\nretry_delays_secs = [30]", TOKEN).await;
    let _ = std::fs::remove_file(token_file);
    let node = VpcNode::new(&unique("waits"));
    t.provision(&node).await;
    t.sim.set_faults(reaper::devtools::sim::Faults { error_rate: 1.0, ..Default::default() });
    t.publish("deletion.requested", &deletion("waits-1", &node.owner, Utc::now())).await;
    let waiting = "SELECT count(*) FROM jobs j WHERE failed_runs = 1 AND status = 'running' \
                   AND NOT EXISTS (SELECT 1 FROM owner_leases l WHERE l.owner = j.owner)";
    wait_until("the job failed a run and waits 30 s for its retry", Duration::from_secs(30), || async {
        t.count(waiting).await == 1
    })
    .await;
    let job: uuid::Uuid = sqlx::query_scalar("SELECT job_id FROM jobs").fetch_one(t.app.ledger.pool()).await.unwrap();
    let out = t.reaper(&["cancel", &job.to_string(), "--reason", "decommission called off"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("cancelled; its result is published"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = t.next_result(30).await;
    assert_eq!(seen.routing_key, "teardown.cancelled");
    let r = seen.result;
    assert_eq!((r.job_id, r.status.as_str(), r.reason.as_deref()), (job, "cancelled", Some("decommission called off")));
    assert_eq!(r.resources.len(), 5, "{r:?}");
    assert_eq!(t.count(&owner_free_live(&node.owner)).await, 5, "its resources went back to the owner");
    let out = t.reaper(&["cancel", &job.to_string()], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("had ended cancelled"));

    // A cancelled teardown ended nothing: a resource tracked now is the
    // owner's, not a late track to delete at once.
    t.sim.set_faults(Default::default());
    t.sim.create("/v1/virtual_network_interfaces/extra-vni", &[]);
    let track =
        serde_json::json!({ "event_id": unique("extra"), "owner": node.owner, "kind": "vni", "id": "extra-vni" });
    t.publish("resource.tracked", &track).await;
    wait_until("the extra VNI is tracked", Duration::from_secs(20), || async {
        t.count(&owner_free_live(&node.owner)).await == 6
    })
    .await;
    assert_eq!(t.count("SELECT count(*) FROM jobs").await, 1, "no late-track job");
    assert!(t.sim.exists("/v1/virtual_network_interfaces/extra-vni"));

    // The owner's next teardown takes them all.
    t.publish("deletion.requested", &deletion("waits-2", &node.owner, Utc::now())).await;
    let r = t.next_result(30).await.result;
    assert_eq!((r.status.as_str(), r.resources.len()), ("completed", 6), "{r:?}");
    assert!(node.resources.iter().all(|res| !t.sim.exists(&res.path)));

    // A dead-lettered job, through the API.
    let other = VpcNode::new(&unique("dead"));
    t.provision(&other).await;
    t.sim.set_faults(reaper::devtools::sim::Faults { fail_next: 1000, fail_status: 403, ..Default::default() });
    t.publish("deletion.requested", &deletion("dead-1", &other.owner, Utc::now())).await;
    let dead = t.next_result(30).await.result;
    assert_eq!(dead.status, "dead_lettered", "{dead:?}");
    t.sim.set_faults(Default::default());
    let c = reqwest::Client::new();
    let url = format!("{base}/v1/jobs/{}/cancel", dead.job_id);
    assert_eq!(c.post(&url).send().await.unwrap().status(), 401);
    let answer =
        c.post(&url).bearer_auth(TOKEN).json(&serde_json::json!({ "reason": "node kept" })).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    let body: Value = answer.json().await.unwrap();
    assert_eq!((body["outcome"].as_str(), body["published"].as_bool()), (Some("cancelled"), Some(true)), "{body}");
    let r = t.next_result(30).await.result;
    assert_eq!((r.job_id, r.status.as_str(), r.reason.as_deref()), (dead.job_id, "cancelled", Some("node kept")));
    let again = c.post(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(again.status(), 409, "it had ended");
    let out = t.reaper(&["replay", "--job", &dead.job_id.to_string()], &[]);
    let replays: i64 =
        sqlx::query_scalar("SELECT replays::bigint FROM jobs WHERE job_id = $1 AND status = 'cancelled'")
            .bind(dead.job_id)
            .fetch_one(t.app.ledger.pool())
            .await
            .unwrap();
    assert_eq!(replays, 0, "a cancelled job is not replayed: {}", String::from_utf8_lossy(&out.stdout));
    assert!(other.resources.iter().all(|res| t.sim.exists(&res.path)), "nothing of the kept node was deleted");
}

/// A job a worker is running when it is cancelled starts no further deletes:
/// the DELETEs in flight (the VNI's and the DNS record's) finish, the server
/// and IP reservations that would go next are left, and the job ends
/// `cancelled` saying what it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_cancelled_starts_no_further_deletes_and_ends_cancelled() {
    // A three-second lease: the heartbeat that reads cancels runs every second.
    let mut t = spawn_app("[worker]\nlease_ttl_secs = 3\n").await;
    let node = VpcNode::new(&unique("runs"));
    t.provision(&node).await;
    // Every request takes 6 s: the cancel is read long before the first DELETEs end.
    t.sim.set_faults(reaper::devtools::sim::Faults { latency_ms: 6000, ..Default::default() });
    t.publish("deletion.requested", &deletion("runs-1", &node.owner, Utc::now())).await;
    wait_until("the first DELETEs are in flight", Duration::from_secs(30), || async {
        t.sim.requests().iter().any(|(m, _)| m == "DELETE")
    })
    .await;
    let job: uuid::Uuid = sqlx::query_scalar("SELECT job_id FROM jobs").fetch_one(t.app.ledger.pool()).await.unwrap();
    let out = t.reaper(&["cancel", "--owner", &node.owner, "--reason", "wrong node"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("running on a worker"), "{text}");
    let r = t.next_result(30).await.result;
    assert_eq!((r.job_id, r.status.as_str(), r.reason.as_deref()), (job, "cancelled", Some("wrong node")), "{r:?}");
    let outcome =
        |kind: &str| r.resources.iter().filter(|x| x.kind == kind).map(|x| x.outcome.clone()).collect::<Vec<_>>();
    assert_eq!(outcome("vni"), ["deleted"], "{r:?}");
    assert_eq!(outcome("dns_record"), ["deleted"], "{r:?}");
    assert_eq!(outcome("bare_metal_server"), ["blocked"], "not attempted: {r:?}");
    let left: Vec<_> = node.resources.iter().filter(|x| t.sim.exists(&x.path)).map(|x| x.kind).collect();
    assert_eq!(left.len(), 3, "the server and both IP reservations are still there: {left:?}");
    assert!(
        !t.sim.requests().iter().any(|(m, p)| m == "DELETE" && p.contains("bare_metal_servers")),
        "no DELETE of the server"
    );
    assert_eq!(t.count(&owner_free_live(&node.owner)).await, 3, "what is left goes back to the owner");
}

/// Messages on a queue now (a passive declare).
async fn depth(t: &TestApp, queue: &str) -> u32 {
    let ch = t.conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions { passive: true, ..Default::default() },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = ch.close(200, "counted".into()).await;
    q.message_count()
}

/// The dead queue is an archive and the ledger the list of what is dead: a
/// replayed job leaves `reaper_dead_lettered_jobs` at once, while its dead
/// copy stays on the queue until it expires (`broker.dead_ttl_days`). A dead
/// queue declared before that setting cannot take it (RabbitMQ refuses to
/// change a queue's arguments): a worker goes on with it as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_queue_is_an_archive_and_the_ledger_says_what_is_dead() {
    // Dead copies expire after about nine seconds here.
    let mut t = spawn_app("[broker]\ndead_ttl_days = 0.0001\n[worker]\npause_poll_ms = 100\n").await;
    let node = VpcNode::new(&unique("dead"));
    t.provision(&node).await;
    t.sim.set_faults(reaper::devtools::sim::Faults { fail_next: 1000, fail_status: 403, ..Default::default() });
    t.publish("deletion.requested", &deletion("dead-1", &node.owner, Utc::now())).await;
    let dead = t.next_result(30).await.result;
    assert_eq!(dead.status, "dead_lettered");
    wait_until("the dead copy is on the queue", Duration::from_secs(5), || async {
        depth(&t, &t.app.names.dead).await == 1
    })
    .await;
    wait_until("the gauge counts the dead job", Duration::from_secs(10), || async {
        t.app.metrics.dead_jobs.get() == 1
    })
    .await;

    t.sim.set_faults(Default::default());
    let out = t.reaper(&["replay", "--job", &dead.job_id.to_string()], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(t.next_result(30).await.result.status, "completed");
    wait_until("the gauge says nothing is dead", Duration::from_secs(10), || async {
        t.app.metrics.dead_jobs.get() == 0
    })
    .await;
    wait_until("the archived dead copy expires", Duration::from_secs(30), || async {
        depth(&t, &t.app.names.dead).await == 0
    })
    .await;

    // A dead queue declared without the age limit, as before the setting.
    let legacy = spawn_app("[broker]\ndead_ttl_days = 0\n").await;
    let (stop, replica, replica_app) = legacy.spawn_replica_with(|s| s.broker.dead_ttl_days = 30.0).await;
    wait_until("a worker with the setting consumes all the same", Duration::from_secs(20), || async {
        replica_app.is_ready()
    })
    .await;
    stop.cancel();
    let _ = replica.await;
}

/// Retention: `reaper run` purges what ended more than `ledger.retention_days`
/// ago — the job, its steps, its resources proven gone — and keeps what has
/// not: a dead-lettered job (until replayed or cancelled), a recent one, the
/// owner's live resources. A duplicate of a purged event starts a new job
/// (docs/contract.md), which finds nothing of its life left to delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_leave_the_ledger_after_their_retention_and_dead_ones_stay() {
    let mut t = spawn_app("").await;
    let (old, recent, dead) =
        (VpcNode::new(&unique("old")), VpcNode::new(&unique("recent")), VpcNode::new(&unique("dead")));
    for n in [&old, &recent, &dead] {
        t.provision(n).await;
    }
    let sent = Utc::now();
    t.publish("deletion.requested", &deletion("ret-old", &old.owner, sent)).await;
    assert_eq!(t.next_result(30).await.result.status, "completed");
    t.publish("deletion.requested", &deletion("ret-recent", &recent.owner, sent)).await;
    assert_eq!(t.next_result(30).await.result.status, "completed");
    t.sim.set_faults(reaper::devtools::sim::Faults { fail_next: 1000, fail_status: 403, ..Default::default() });
    t.publish("deletion.requested", &deletion("ret-dead", &dead.owner, sent)).await;
    assert_eq!(t.next_result(30).await.result.status, "dead_lettered");
    t.sim.set_faults(Default::default());
    // Still live: a resource tracked for the old owner's next life.
    let next_life = serde_json::json!({
        "event_id": unique("next"), "owner": old.owner, "kind": "vni", "id": "next-life-vni",
        "created_at": Utc::now().to_rfc3339(),
    });
    t.sim.create("/v1/virtual_network_interfaces/next-life-vni", &[]);
    t.publish("resource.tracked", &next_life).await;
    wait_until("the next life's VNI is tracked", Duration::from_secs(20), || async {
        t.count(&owner_free_live(&old.owner)).await == 1
    })
    .await;
    // Forty days pass for two of them.
    t.sql("UPDATE jobs SET started_at = started_at - interval '40 days', finished_at = finished_at - interval '40 days' WHERE event_id IN ('ret-old', 'ret-dead')").await;

    // A replica's housekeeping runs at its start (then hourly), in batches.
    let (stop, replica, _) = t.spawn_replica().await;
    wait_until("the old job is purged", Duration::from_secs(30), || async {
        t.count("SELECT count(*) FROM jobs WHERE event_id = 'ret-old'").await == 0
    })
    .await;
    stop.cancel();
    let _ = replica.await;
    assert_eq!(
        t.count(&format!("SELECT count(*) FROM tracked_resources WHERE owner = '{}' AND state <> 'live'", old.owner))
            .await,
        0,
        "its gone resources went too"
    );
    assert_eq!(
        t.count("SELECT count(*) FROM job_steps s WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.job_id = s.job_id)")
            .await,
        0,
        "and its steps"
    );
    assert_eq!(t.count(&owner_free_live(&old.owner)).await, 1, "the next life's live resource stays");
    assert_eq!(
        t.count("SELECT count(*) FROM jobs WHERE event_id IN ('ret-recent', 'ret-dead')").await,
        2,
        "the recent and the dead-lettered stay"
    );
    assert_eq!(t.count(&format!("SELECT count(*) FROM tracked_resources WHERE owner = '{}'", recent.owner)).await, 5);

    // The purged event again (a redelivery a month late): a new job, which
    // touches nothing of the next life (created after its occurred_at).
    t.publish("deletion.requested", &deletion("ret-old", &old.owner, sent)).await;
    let again = t.next_result(30).await.result;
    assert_eq!((again.status.as_str(), again.resources.len()), ("completed", 0), "{again:?}");
    assert!(t.sim.exists("/v1/virtual_network_interfaces/next-life-vni"));

    // An event that occurred longer ago than the retention, with no job in
    // the ledger: it may have run and been purged, so it is refused, not run.
    t.drain_dead().await;
    let ancient = Utc::now() - chrono::Duration::days(40);
    t.publish("deletion.requested", &deletion("ret-ancient", &old.owner, ancient)).await;
    let dead = t.dead_wait(1).await;
    assert!(dead[0].1.contains("longer ago than ledger.retention_days"), "{dead:?}");
    assert_eq!(t.count("SELECT count(*) FROM jobs WHERE event_id = 'ret-ancient'").await, 0);
    assert!(t.sim.exists("/v1/virtual_network_interfaces/next-life-vni"), "the next life's VNI stays");
    // ...while a dead-lettered job's event, as old, is still replayed: its job is there.
    t.sql("UPDATE jobs SET occurred_at = occurred_at - interval '40 days' WHERE event_id = 'ret-dead'").await;
    let dead_job: uuid::Uuid = sqlx::query_scalar("SELECT job_id FROM jobs WHERE event_id = 'ret-dead'")
        .fetch_one(t.app.ledger.pool())
        .await
        .unwrap();
    let out = t.reaper(&["replay", "--job", &dead_job.to_string()], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(t.next_result(30).await.result.status, "completed");
}
