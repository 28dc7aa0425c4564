//! Operators in control: a pause every replica honours, lifted from the CLI
//! or the admin API.

use std::time::Duration;

use chrono::Utc;
use reaper::app::App;
use reaper::devtools::demo::VpcNode;
use serde_json::Value;

use crate::helpers::*;

const TOKEN: &str = "control-tok-51b2e0";

/// An app with an admin token (and the token's file, which a replica reads too).
async fn with_admin(extra: &str) -> (TestApp, String, std::path::PathBuf) {
    let file = std::env::temp_dir().join(format!("reaper-control-{:08x}", fastrand::u32(..)));
    std::fs::write(&file, TOKEN).unwrap();
    let t = spawn_app(&format!("{extra}\n[admin]\ntoken_file = \"{}\"\n", file.display())).await;
    let mut addr = None;
    wait_until("the admin API listens", Duration::from_secs(10), || {
        addr = t.app.admin_addr.get().copied();
        async move { addr.is_some() }
    })
    .await;
    (t, format!("http://{}", addr.unwrap()), file)
}

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
    let (mut t, base, token_file) = with_admin("[worker]\nowner_busy_delay_ms = 100\npause_poll_ms = 100").await;
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
