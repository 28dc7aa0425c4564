//! A resource tracked after its owner's teardown began belongs to the old life
//! (torn down) or a new one (kept), by generation, created_at, or the window.

use std::time::Duration;

use chrono::{Duration as Ch, Utc};
use reaper::demo::VpcNode;
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
