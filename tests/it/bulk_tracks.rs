//! One `resource.tracked` may list several resources of one owner: recorded
//! together, refused together, and late together, resource by resource.

use std::time::Duration;

use chrono::{Duration as Ch, Utc};
use reaper::devtools::demo::VpcNode;
use serde_json::{json, Value};

use crate::helpers::*;

/// One bulk track of the node's resources, all created at `created_at`.
fn bulk(event_id: &str, node: &VpcNode, created_at: chrono::DateTime<Utc>) -> Value {
    let resources: Vec<Value> = node
        .resources
        .iter()
        .map(|r| json!({"kind": r.kind, "id": r.id, "attributes": r.attributes, "created_at": created_at.to_rfc3339()}))
        .collect();
    json!({"event_id": event_id, "owner": node.owner, "resources": resources})
}

fn ip(id: &str, created_at: chrono::DateTime<Utc>) -> Value {
    json!({"kind": "ip_reservation", "id": id, "attributes": {"subnet_id": "subnet-mgmt"}, "created_at": created_at.to_rfc3339()})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_track_records_every_resource_once_and_the_deletion_tears_them_all_down() {
    let mut t = spawn_app("").await;
    let node = VpcNode::new(&unique("node"));
    node.create_in(&t.sim);
    let event = bulk(&unique("bulk"), &node, Utc::now());
    t.publish("resource.tracked", &event).await;
    // The same event again (a redelivery, a producer's retry) is itself.
    t.publish("resource.tracked", &event).await;
    let owners = vec![node.owner.clone()];
    wait_until("the five resources are tracked", Duration::from_secs(20), || async {
        t.app.ledger.count_tracked(&owners).await.unwrap() >= 5
    })
    .await;
    let tracks = t
        .count(&format!("SELECT count(*) FROM tracks WHERE event_id = '{}'", event["event_id"].as_str().unwrap()))
        .await;
    assert_eq!(tracks, 1, "one track identity for the event");
    assert_eq!(t.app.ledger.owner_resources(&node.owner).await.unwrap().len(), 5);

    t.publish("deletion.requested", &deletion(&unique("del"), &node.owner, Utc::now())).await;
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "completed", "{r:?}");
    assert_eq!(r.resources.len(), 5, "{r:?}");
    assert!(t.sim.paths().is_empty(), "left: {:?}", t.sim.paths());
    assert!(t.tap.next(Duration::from_millis(300)).await.is_none(), "no result for the tracks");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_track_over_the_cap_or_reusing_an_event_id_is_refused_whole() {
    let mut t = spawn_app("[worker]\nmax_resources_per_event = 3\n").await;
    let node = VpcNode::new(&unique("node"));
    let now = Utc::now();
    let over = bulk(&unique("over"), &node, now);
    t.publish("resource.tracked", &over).await;
    let dead = t.dead_wait(1).await;
    assert!(dead[0].1.contains("lists 5 resources, the limit is 3"), "{:?}", dead[0].1);

    let id = unique("two");
    let two = json!({"event_id": id, "owner": node.owner, "resources": [ip("a", now), ip("b", now)]});
    t.publish("resource.tracked", &two).await;
    let owners = vec![node.owner.clone()];
    wait_until("the two IPs are tracked", Duration::from_secs(20), || async {
        t.app.ledger.count_tracked(&owners).await.unwrap() >= 2
    })
    .await;
    // Listed in another order, it is the same track; with another list, or
    // as a one-resource track, it is an impostor.
    let reordered = json!({"event_id": id, "owner": node.owner, "resources": [ip("b", now), ip("a", now)]});
    t.publish("resource.tracked", &reordered).await;
    let other = json!({"event_id": id, "owner": node.owner, "resources": [ip("a", now), ip("c", now)]});
    t.publish("resource.tracked", &other).await;
    let single = json!({"event_id": id, "owner": node.owner, "kind": "ip_reservation", "id": "a", "attributes": {"subnet_id": "subnet-mgmt"}});
    t.publish("resource.tracked", &single).await;
    // Both forms at once, or an empty list, say nothing clear.
    let mut both = json!({"event_id": unique("both"), "owner": node.owner, "resources": [ip("d", now)]});
    both["kind"] = json!("vni");
    both["id"] = json!("v-1");
    t.publish("resource.tracked", &both).await;
    let empty = json!({"event_id": unique("empty"), "owner": node.owner, "resources": []});
    t.publish("resource.tracked", &empty).await;
    // The same resource twice with two creation times: which life is it?
    let twice = json!({"event_id": unique("twice"), "owner": node.owner,
                       "resources": [ip("e", now), ip("e", now - Ch::days(1))]});
    t.publish("resource.tracked", &twice).await;
    // A listed resource of another owner would be torn down with this one.
    let mut foreign = ip("f", now);
    foreign["owner"] = json!("node/someone-else");
    t.publish("resource.tracked", &json!({"event_id": unique("foreign"), "owner": node.owner, "resources": [foreign]}))
        .await;
    let dead = t.dead_wait(6).await;
    assert_eq!(dead.len(), 6, "{dead:?}");
    let reasons: Vec<&str> = dead.iter().map(|(_, r)| r.as_str()).collect();
    assert!(reasons.iter().any(|r| r.contains("ip_reservation/e is listed twice with different")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("ip_reservation/f in resources has its own owner")), "{reasons:?}");
    let named = format!("event_id already names a track of {} (ip_reservation/a and 1 more)", node.owner);
    assert_eq!(reasons.iter().filter(|r| r.contains(&named)).count(), 2, "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("either kind and id, or resources")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("resources is empty")), "{reasons:?}");
    let tracked: Vec<String> =
        t.app.ledger.owner_resources(&node.owner).await.unwrap().into_iter().map(|(r, _, _)| r.id).collect();
    assert_eq!(tracked.len(), 2, "only the first list is recorded: {tracked:?}");

    // What some protobuf writers print for a one-resource track: an empty list beside it.
    let proto_style = json!({"event_id": unique("proto"), "owner": node.owner, "kind": "ip_reservation", "id": "g",
                             "attributes": {"subnet_id": "subnet-mgmt"}, "resources": []});
    t.publish("resource.tracked", &proto_style).await;
    wait_until("the proto-style track is recorded", Duration::from_secs(20), || async {
        t.app.ledger.count_tracked(&owners).await.unwrap() >= 3
    })
    .await;
    assert!(t.tap.next(Duration::from_millis(300)).await.is_none(), "no result for any of them");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_track_after_the_teardown_deletes_only_what_belonged_to_the_ended_life() {
    let mut t = spawn_app("").await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    let deleted_at = Utc::now();
    t.publish("deletion.requested", &deletion(&unique("end"), &node.owner, deleted_at)).await;
    assert_eq!(t.next_result(30).await.result.status, "completed");

    // One bulk track: two IPs made before the deletion (late), one after (the next life).
    for id in ["old-1", "old-2", "new-1"] {
        t.sim.create(&format!("/v1/subnets/subnet-mgmt/reserved_ips/{id}"), &[]);
    }
    let before = deleted_at - Ch::seconds(5);
    let after = deleted_at + Ch::seconds(5);
    let late_id = unique("late");
    let event = json!({"event_id": late_id, "owner": node.owner,
                       "resources": [ip("old-1", before), ip("new-1", after), ip("old-2", before)]});
    t.publish("resource.tracked", &event).await;
    let r = t.next_result(30).await.result;
    assert_eq!(
        (r.event_id.as_str(), r.trigger.as_str(), r.status.as_str()),
        (late_id.as_str(), "late_track", "completed")
    );
    let mut torn: Vec<&str> = r.resources.iter().map(|s| s.id.as_str()).collect();
    torn.sort();
    assert_eq!(torn, ["old-1", "old-2"], "{r:?}");
    assert!(!t.sim.exists("/v1/subnets/subnet-mgmt/reserved_ips/old-1"));
    assert!(!t.sim.exists("/v1/subnets/subnet-mgmt/reserved_ips/old-2"));
    assert!(t.sim.exists("/v1/subnets/subnet-mgmt/reserved_ips/new-1"), "the next life's IP is left alone");
    let states = t.app.ledger.owner_resources(&node.owner).await.unwrap();
    let (_, state, job) = states.iter().find(|(r, _, _)| r.id == "new-1").unwrap();
    assert_eq!((state.as_str(), job), ("live", &None));

    // Its redelivery republishes the late job's result and deletes nothing more.
    t.publish("resource.tracked", &event).await;
    let again = t.next_result(30).await.result;
    assert_eq!(again.job_id, r.job_id);
    assert!(t.sim.exists("/v1/subnets/subnet-mgmt/reserved_ips/new-1"));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_track_late_for_two_ended_lives_claims_only_the_earliest_lifes() {
    let mut t = spawn_app("").await;
    let owner = format!("node/{}", unique("twice-dead"));
    let now = Utc::now();
    let (end1, end2) = (now - Ch::seconds(60), now - Ch::seconds(30));
    for (i, at) in [end1, end2].into_iter().enumerate() {
        t.publish("deletion.requested", &deletion(&unique(&format!("end{i}")), &owner, at)).await;
        assert_eq!(t.next_result(30).await.result.status, "completed");
    }
    for id in ["life1-ip", "life2-ip"] {
        t.sim.create(&format!("/v1/subnets/subnet-mgmt/reserved_ips/{id}"), &[]);
    }
    // life1-ip was made before the first end, life2-ip between the two.
    let event = json!({"event_id": unique("late"), "owner": owner,
                       "resources": [ip("life1-ip", end1 - Ch::seconds(5)), ip("life2-ip", end1 + Ch::seconds(5))]});
    t.publish("resource.tracked", &event).await;
    let r = t.next_result(30).await.result;
    assert_eq!((r.trigger.as_str(), r.status.as_str()), ("late_track", "completed"), "{r:?}");
    let torn: Vec<&str> = r.resources.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(torn, ["life1-ip"], "one job holds one life's resources: {r:?}");
    assert!(t.sim.exists("/v1/subnets/subnet-mgmt/reserved_ips/life2-ip"));
    let states = t.app.ledger.owner_resources(&owner).await.unwrap();
    let (_, state, job) = states.iter().find(|(r, _, _)| r.id == "life2-ip").unwrap();
    assert_eq!((state.as_str(), job), ("live", &None), "recorded, claimed by no job");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_list_is_recorded_on_its_own_and_torn_down_whole() {
    let mut t = spawn_app("").await;
    let owner = format!("node/{}", unique("long"));
    // More than a group-commit batch takes from one track (the general path).
    let ids: Vec<String> = (0..100).map(|i| format!("{owner}-ip{i}").replace('/', "-")).collect();
    for id in &ids {
        t.sim.create(&format!("/v1/subnets/subnet-mgmt/reserved_ips/{id}"), &[]);
    }
    let resources: Vec<Value> = ids.iter().map(|id| ip(id, Utc::now())).collect();
    t.publish("resource.tracked", &json!({"event_id": unique("long"), "owner": owner, "resources": resources})).await;
    let owners = vec![owner.clone()];
    wait_until("the 100 IPs are tracked", Duration::from_secs(20), || async {
        t.app.ledger.count_tracked(&owners).await.unwrap() >= 100
    })
    .await;
    t.publish("deletion.requested", &deletion(&unique("del"), &owner, Utc::now())).await;
    let r = t.next_result(30).await.result;
    assert_eq!((r.status.as_str(), r.resources.len()), ("completed", 100), "{r:?}");
    assert!(t.sim.paths().is_empty(), "left: {:?}", t.sim.paths());
    t.stop().await;
}
