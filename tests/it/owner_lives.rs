//! A resource tracked after its owner's teardown began belongs to the old life
//! (torn down) or a new one (kept), by generation, created_at, or the window.

use std::time::Duration;

use chrono::{Duration as Ch, Utc};
use reaper::devtools::demo::VpcNode;
use serde_json::json;

use crate::helpers::*;

fn ip_track(event_id: &str, owner: &str, id: &str) -> serde_json::Value {
    json!({"event_id": event_id, "owner": owner, "kind": "ip_reservation", "id": id, "attributes": {"subnet_id": "subnet-mgmt"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_track_is_torn_down_and_a_new_life_is_left_alone() {
    let mut t = spawn_app("").await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    let deleted_at = Utc::now();
    t.publish("deletion.requested", &deletion("end-of-life-1", &node.owner, deleted_at)).await;
    let r = t.next_result(30).await;
    assert_eq!(r.result.status, "completed");

    // Created before the deletion, tracked after it finished: a late track.
    t.sim.create("/v1/subnets/subnet-mgmt/reserved_ips/late-ip", &[]);
    let mut late = ip_track("late-1", &node.owner, "late-ip");
    late["created_at"] = json!((deleted_at - Ch::seconds(5)).to_rfc3339());
    t.publish("resource.tracked", &late).await;
    let r = t.next_result(30).await;
    assert_eq!(r.result.event_id, "late-1");
    assert_eq!(r.result.trigger, "late_track");
    assert_eq!(r.result.status, "completed");
    assert_eq!(r.result.resources.len(), 1);
    assert_eq!(r.result.resources[0].outcome, "deleted");
    assert!(!t.sim.exists("/v1/subnets/subnet-mgmt/reserved_ips/late-ip"));

    // Created after the deletion: the owner name lives again; nothing is deleted.
    t.sim.create("/v1/subnets/subnet-mgmt/reserved_ips/new-ip", &[]);
    let mut fresh = ip_track("new-1", &node.owner, "new-ip");
    fresh["created_at"] = json!((deleted_at + Ch::seconds(5)).to_rfc3339());
    t.publish("resource.tracked", &fresh).await;
    let owners = vec![node.owner.clone()];
    wait_until("the new life's IP is tracked", Duration::from_secs(20), || async {
        t.app.ledger.count_tracked(&owners).await.unwrap() >= 7
    })
    .await;
    let states = t.app.ledger.owner_resources(&node.owner).await.unwrap();
    let (_, state, job) = states.iter().find(|(r, _, _)| r.id == "new-ip").unwrap();
    assert_eq!((state.as_str(), job), ("live", &None));
    assert!(t.sim.exists("/v1/subnets/subnet-mgmt/reserved_ips/new-ip"));

    // The second life ends too: only its resource is in that job.
    t.publish("deletion.requested", &deletion("end-of-life-2", &node.owner, deleted_at + Ch::seconds(10))).await;
    let r = t.next_result(30).await;
    assert_eq!(r.result.event_id, "end-of-life-2");
    let ids: Vec<&str> = r.result.resources.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["new-ip"]);
    assert!(t.sim.paths().is_empty());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_decide_when_both_sides_carry_one() {
    let mut t = spawn_app("").await;
    let owner = format!("node/{}", unique("gen"));
    let mut ev = deletion("gen-del-1", &owner, Utc::now());
    ev["generation"] = json!(1);
    t.publish("deletion.requested", &ev).await;
    let r = t.next_result(30).await;
    assert!(r.result.resources.is_empty());

    // No created_at, tracked right after: the window alone would call it late,
    // but its generation says it is the owner's second life.
    t.sim.create("/v1/subnets/subnet-mgmt/reserved_ips/g2-ip", &[]);
    let mut g2 = ip_track("gen-track-2", &owner, "g2-ip");
    g2["generation"] = json!("2");
    t.publish("resource.tracked", &g2).await;
    // Same timing, generation 1: late, torn down.
    t.sim.create("/v1/subnets/subnet-mgmt/reserved_ips/g1-ip", &[]);
    let mut g1 = ip_track("gen-track-1", &owner, "g1-ip");
    g1["generation"] = json!(1);
    t.publish("resource.tracked", &g1).await;

    let r = t.next_result(30).await;
    assert_eq!(r.result.event_id, "gen-track-1");
    assert_eq!(r.result.resources[0].id, "g1-ip");
    assert!(!t.sim.exists("/v1/subnets/subnet-mgmt/reserved_ips/g1-ip"));
    let owners = vec![owner.clone()];
    wait_until("both tracked", Duration::from_secs(20), || async {
        t.app.ledger.count_tracked(&owners).await.unwrap() >= 2
    })
    .await;
    // A track is recorded and judged in one transaction: once it is in the
    // ledger, whether it opened a job is decided. g2's did not, and nothing claims it.
    let rows = t.app.ledger.owner_resources(&owner).await.unwrap();
    let g2 = rows.iter().find(|(r, _, _)| r.id == "g2-ip").expect("g2 is tracked");
    assert_eq!((g2.1.as_str(), g2.2), ("live", None), "the second life's IP is live and unclaimed: {rows:?}");
    assert_eq!(t.count("SELECT count(*) FROM jobs WHERE event_id = 'gen-track-2'").await, 0);
    assert!(t.sim.exists("/v1/subnets/subnet-mgmt/reserved_ips/g2-ip"));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_track_racing_a_running_teardown_is_not_leaked() {
    // The VNI blocks the server (409) until it is gone. The provisioner's track
    // of the VNI arrives only after the deletion event: the teardown must wait
    // (retrying) and the late-track job must take the VNI down.
    let mut t = spawn_app("[worker]\nretry_delays_secs = [0.3, 0.6, 1.0, 2.0, 4.0]\n").await;
    let node = VpcNode::new(&unique("node"));
    node.create_in(&t.sim);
    let tracks = node.track_events("race");
    let (vni, others): (Vec<_>, Vec<_>) = tracks.into_iter().partition(|e| e["kind"] == "vni");
    for e in &others {
        t.publish("resource.tracked", e).await;
    }
    let owners = vec![node.owner.clone()];
    wait_until("4 tracked", Duration::from_secs(20), || async {
        t.app.ledger.count_tracked(&owners).await.unwrap() >= 4
    })
    .await;
    let deleted_at = Utc::now();
    t.publish("deletion.requested", &deletion("race-del", &node.owner, deleted_at)).await;
    let mut late = vni[0].clone();
    late["created_at"] = json!((deleted_at - Ch::seconds(1)).to_rfc3339());
    t.publish("resource.tracked", &late).await;

    // Two orders are possible: the track is recorded before the deletion claims
    // (one job with all five) or after (a late_track job for the VNI). Either way
    // every resource is torn down exactly once and nothing leaks.
    let first = t.next_result(30).await.result;
    let mut results = vec![first];
    let vni_in =
        |rs: &[reaper::contract::TeardownResult]| rs.iter().any(|r| r.resources.iter().any(|s| s.kind == "vni"));
    if !vni_in(&results) || results[0].trigger == "late_track" {
        results.push(t.next_result(30).await.result);
    }
    assert!(results.iter().all(|r| r.status == "completed"), "{results:?}");
    assert!(results.iter().any(|r| r.trigger == "deletion.requested"));
    let mut torn: Vec<String> =
        results.iter().flat_map(|r| r.resources.iter().map(|s| format!("{}/{}", s.kind, s.id))).collect();
    torn.sort();
    let mut want: Vec<String> = node.resources.iter().map(|r| format!("{}/{}", r.kind, r.id)).collect();
    want.sort();
    assert_eq!(torn, want, "each resource in exactly one job");
    assert!(t.sim.paths().is_empty(), "leaked: {:?}", t.sim.paths());
    t.stop().await;
}

/// A node's VNI found in the provisioner's own table (no tracks at all).
const VNI_LOOKUP: &str = r#"
[providers.provisioner_db]
type = "postgres"
url = "{db_url}"
[kinds.vni]
lookup = { provider = "provisioner_db", owner_type = "node", sql = "SELECT vnic_id AS id FROM vnic_info WHERE node_name = $1" }
[worker]
retry_delays_secs = [2, 2]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_does_not_look_up_the_owners_next_life() {
    let mut t = spawn_app(VNI_LOOKUP).await;
    let name = unique("n");
    t.sql(&format!(
        "CREATE TABLE vnic_info (node_name text, vnic_id text); INSERT INTO vnic_info VALUES ('{name}', 'vni-old')"
    ))
    .await;
    t.sim.create("/v1/virtual_network_interfaces/vni-old", &[]);
    // Something holds on to the old VNI for a while: the first attempt ends unfinished.
    t.sim.create("/v1/attachments/held", &["/v1/virtual_network_interfaces/vni-old"]);
    t.publish("provisioning.failed", &json!({"event_id": unique("pf"), "owner": format!("node/{name}")})).await;
    wait_until("the first attempt gave up on the old VNI", Duration::from_secs(20), || async {
        t.sim.requests().iter().filter(|(m, p)| m == "DELETE" && p.ends_with("/vni-old")).count() >= 4
    })
    .await;
    // Before the retry (2 s later) the node's name lives again, with a new VNI.
    t.sql(&format!("DELETE FROM vnic_info; INSERT INTO vnic_info VALUES ('{name}', 'vni-new')")).await;
    t.sim.create("/v1/virtual_network_interfaces/vni-new", &[]);
    t.sim.remove("/v1/attachments/held");
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "completed", "{r:?}");
    let ids: Vec<&str> = r.resources.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["vni-old"], "the retry works from what the first delivery found");
    assert!(t.sim.exists("/v1/virtual_network_interfaces/vni-new"), "the new life's VNI is left alone");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_does_not_take_a_resource_tracked_again_for_a_new_life() {
    let mut t = spawn_app("").await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    let vni = node.resources.iter().find(|r| r.kind == "vni").unwrap();
    // Every DELETE is refused: the job is dead-lettered with the VNI still claimed.
    t.sim.set_faults(reaper::devtools::sim::Faults {
        fail_next: 100,
        fail_status: 403,
        only_method: "DELETE".into(),
        ..Default::default()
    });
    let ended = Utc::now();
    t.publish("deletion.requested", &deletion(&unique("del"), &node.owner, ended)).await;
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "dead_lettered", "{r:?}");
    // The name lives again: a VNI of the same id is created (attached to
    // nothing of the old life) and tracked for the new life.
    t.sim.remove(&vni.path);
    t.sim.create(&vni.path, &[]);
    let mut again = json!({"event_id": unique("again"), "owner": node.owner, "kind": "vni", "id": vni.id});
    again["created_at"] = json!((Utc::now() + Ch::seconds(1)).to_rfc3339());
    t.publish("resource.tracked", &again).await;
    wait_until("the VNI belongs to nobody's ended life again", Duration::from_secs(20), || async {
        let states = t.app.ledger.owner_resources(&node.owner).await.unwrap();
        states.iter().any(|(r, _, job)| r.id == vni.id && job.is_none())
    })
    .await;
    t.sim.set_faults(reaper::devtools::sim::Faults::default());
    let out = t.reaper(&["replay", "--owner", &node.owner], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "completed", "{r:?}");
    assert!(r.resources.iter().all(|s| s.id != vni.id), "the replay leaves the new life's VNI out: {r:?}");
    assert!(t.sim.exists(&vni.path), "and it is still there");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_does_not_mark_the_next_node_of_the_same_name_cleaned_up() {
    // examples/vpc-node: the node's own row is keyed by the node name.
    let mut t = spawn_app(&example("vpc-node")).await;
    t.sql(&example_sql("vpc-node").unwrap()).await;
    let name = unique("n");
    t.sql(&format!(
        "INSERT INTO nodes (node_name, status) VALUES ('{name}', 'failed');
         INSERT INTO vnic_info (node_name, vnic_id) VALUES ('{name}', 'vni-1');"
    ))
    .await;
    t.sim.create("/v1/virtual_network_interfaces/vni-1", &[]);
    // The VNI API refuses: the job is dead-lettered before the node row is marked.
    t.sim.set_faults(reaper::devtools::sim::Faults {
        fail_next: 100,
        fail_status: 403,
        only_method: "DELETE".into(),
        ..Default::default()
    });
    t.publish("provisioning.failed", &json!({"event_id": unique("pf"), "owner": format!("node/{name}")})).await;
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "dead_lettered", "{r:?}");
    assert!(r.resources.iter().any(|s| s.kind == "node_record" && s.outcome == "blocked"), "{r:?}");
    // The next day a node of the same name is created; the old one's row is gone.
    t.sql(&format!(
        "DELETE FROM nodes WHERE node_name = '{name}';
         INSERT INTO nodes (node_name, status) VALUES ('{name}', 'provisioning');"
    ))
    .await;
    t.sim.set_faults(reaper::devtools::sim::Faults::default());
    let out = t.reaper(&["replay", "--owner", &format!("node/{name}")], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "completed", "{r:?}");
    let status: String = sqlx::query_scalar("SELECT status FROM nodes WHERE node_name = $1")
        .bind(&name)
        .fetch_one(t.app.ledger.pool())
        .await
        .unwrap();
    assert_eq!(status, "provisioning", "the new node is not marked cleaned up: {r:?}");
    t.stop().await;
}

#[test]
fn a_kind_whose_ids_come_back_must_tell_its_lives_apart() {
    let config = include_str!("../../examples/vpc-node/reaper.toml")
        .replace(" AND created_at = $2::timestamptz", "")
        .replace("params = [\"id\", \"attr.created_at\"]\n", "");
    let settings = reaper::config::Settings::from_toml(&config).unwrap();
    let err = reaper::catalog::validate(&settings).unwrap_err().to_string();
    assert!(err.contains("node_record") && err.contains("reused_ids"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_that_first_runs_on_a_retry_claims_only_what_it_can_date() {
    let mut t = spawn_app(VNI_LOOKUP).await;
    let name = unique("n");
    // The provisioner's table is not there yet: the first delivery's lookup fails.
    t.publish("provisioning.failed", &json!({"event_id": unique("pf"), "owner": format!("node/{name}")})).await;
    wait_until("the first attempt's lookup failed and went to the retry queue", Duration::from_secs(20), || async {
        t.app.metrics.broker_retries.with_label_values(&["unfinished"]).get() >= 1
    })
    .await;
    // Before the retry the name lives again; its row has no creation time.
    t.sql(&format!(
        "CREATE TABLE vnic_info (node_name text, vnic_id text); INSERT INTO vnic_info VALUES ('{name}', 'vni-next')"
    ))
    .await;
    t.sim.create("/v1/virtual_network_interfaces/vni-next", &[]);
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "completed", "{r:?}");
    assert!(r.resources.is_empty(), "nothing it cannot date is claimed on a retry: {r:?}");
    assert!(t.sim.exists("/v1/virtual_network_interfaces/vni-next"));
    let states = t.app.ledger.owner_resources(&format!("node/{name}")).await.unwrap();
    assert!(
        states.iter().any(|(r, s, job)| r.id == "vni-next" && s == "live" && job.is_none()),
        "kept for the owner's next teardown: {states:?}"
    );
    t.stop().await;
}

/// Rule 3, the window: a track with neither `created_at` nor `generation`
/// belongs to a teardown if it was tracked no later than its `occurred_at`
/// plus `late_track_window_secs`. Inside the window it is a late track and
/// goes; past it, it is the next life's and stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_date_or_generation_the_window_decides_which_life_a_track_belongs_to() {
    let mut t = spawn_app("[worker]\nlate_track_window_secs = 60\n").await;
    let ip = |id: &str| format!("/v1/subnets/subnet-mgmt/reserved_ips/{id}");

    // Torn down a moment ago: a track now is inside the window.
    let recent = format!("node/{}", unique("recent"));
    t.publish("deletion.requested", &deletion(&unique("del"), &recent, Utc::now())).await;
    assert!(t.next_result(30).await.result.resources.is_empty());
    t.sim.create(&ip("in-window"), &[]);
    let late = unique("late");
    t.publish("resource.tracked", &ip_track(&late, &recent, "in-window")).await;
    let r = t.next_result(30).await.result;
    assert_eq!((r.event_id.as_str(), r.trigger.as_str()), (late.as_str(), "late_track"), "{r:?}");
    assert!(!t.sim.exists(&ip("in-window")));

    // Torn down two minutes ago: a track now is past the window, the next life's.
    let older = format!("node/{}", unique("older"));
    t.publish("deletion.requested", &deletion(&unique("del"), &older, Utc::now() - Ch::seconds(120))).await;
    assert!(t.next_result(30).await.result.resources.is_empty());
    t.sim.create(&ip("past-window"), &[]);
    let next_life = unique("next-life");
    t.publish("resource.tracked", &ip_track(&next_life, &older, "past-window")).await;
    let owners = vec![older.clone()];
    wait_until("the track is recorded", Duration::from_secs(20), || async {
        t.app.ledger.count_tracked(&owners).await.unwrap() >= 1
    })
    .await;
    let rows = t.app.ledger.owner_resources(&older).await.unwrap();
    assert_eq!((rows[0].1.as_str(), rows[0].2), ("live", None), "the next life's IP is live and unclaimed: {rows:?}");
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE event_id = $1")
        .bind(&next_life)
        .fetch_one(t.app.ledger.pool())
        .await
        .unwrap();
    assert_eq!(jobs, 0, "no job for the next life's track");
    assert!(t.sim.exists(&ip("past-window")));
    t.stop().await;
}
