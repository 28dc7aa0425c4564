use std::time::Duration;

use chrono::Utc;
use reaper::devtools::demo::VpcNode;
use reaper::devtools::sim::Faults;
use serde_json::json;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vpc_node_is_torn_down_children_first_with_zero_order_refusals() {
    let mut t = spawn_app("").await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    t.publish("deletion.requested", &deletion("del-1", &node.owner, Utc::now())).await;

    let r = t.next_result(30).await;
    assert_eq!(r.routing_key, "teardown.completed");
    assert_eq!(r.result.status, "completed", "{:?}", r.result);
    assert_eq!(r.result.event_id, "del-1");
    assert_eq!(r.result.trigger, "deletion.requested");
    assert_eq!(r.result.resources.len(), 5);
    assert!(r.result.resources.iter().all(|s| s.outcome == "deleted"), "{:?}", r.result.resources);
    // Children first, as the cloud saw it: nothing was asked to go before
    // what depends on it was gone (the first DELETE of each came after).
    let path = |kind: &str| node.resources.iter().find(|r| r.kind == kind).unwrap().path.clone();
    let server = t.first_delete(&path("bare_metal_server"));
    for child in ["vni", "dns_record"] {
        assert!(t.gone_at(&path(child)) < server, "{child} was not gone before the server's DELETE");
    }
    for ip in node.resources.iter().filter(|r| r.kind == "ip_reservation") {
        assert!(t.gone_at(&path("dns_record")) < t.first_delete(&ip.path), "the DNS record goes before {}", ip.path);
    }
    assert!(t.sim.paths().is_empty(), "left in the cloud: {:?}", t.sim.paths());
    assert_eq!(t.sim.stats().refused_for_order, 0);
    let states = t.app.ledger.owner_resources(&node.owner).await.unwrap();
    assert!(states.iter().all(|(_, s, _)| s == "deleted"), "{states:?}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_retry_through_5xx_and_429_to_success() {
    let mut t = spawn_app("").await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    t.sim.set_faults(Faults { fail_next: 2, ..Default::default() });
    t.publish("deletion.requested", &deletion("del-flaky", &node.owner, Utc::now())).await;
    let r = t.next_result(30).await;
    assert_eq!(r.result.status, "completed", "{:?}", r.result);
    assert!(
        r.result.resources.iter().any(|s| s.attempts > 1),
        "some step must have needed a retry: {:?}",
        r.result.resources
    );

    let node2 = VpcNode::new(&unique("node"));
    t.provision(&node2).await;
    t.sim.set_faults(Faults {
        rate_limit_rate: 0.3,
        retry_after_secs: 0.3,
        seed: Some(7),
        only_method: "DELETE".into(),
        ..Default::default()
    });
    t.publish("deletion.requested", &deletion("del-429", &node2.owner, Utc::now())).await;
    let r = t.next_result(30).await;
    assert_eq!(r.result.status, "completed", "{:?}", r.result);
    let stats = t.sim.stats();
    assert!(stats.injected_errors >= 2 && stats.injected_rate_limits >= 1, "{stats:?}");
    // Each 429 paused the whole provider: nothing reached the cloud during
    // its Retry-After (past the first 50 ms, for requests already on their way).
    let timeline = t.sim.timeline();
    for limited in timeline.iter().filter(|a| a.status == 429) {
        let window = limited.at + Duration::from_millis(50)..limited.at + Duration::from_millis(250);
        let during: Vec<_> = timeline.iter().filter(|a| window.contains(&a.at)).collect();
        assert!(during.is_empty(), "requests during the pause after {limited:?}: {during:?}");
    }
    assert!(t.sim.paths().is_empty(), "left: {:?}", t.sim.paths());
    assert_eq!(stats.refused_for_order, 0);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_outlasts_its_step_retries_comes_back_through_the_broker() {
    // Two in-process attempts per step; the server's delete fails four times.
    let mut t = spawn_app("[worker]\nstep_attempts = 2\n").await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    t.sim.set_faults(Faults { fail_next: 3, only_method: "DELETE".into(), ..Default::default() });
    t.publish("deletion.requested", &deletion("del-broker-retry", &node.owner, Utc::now())).await;
    let r = t.next_result(30).await;
    assert_eq!(r.result.status, "completed", "{:?}", r.result);
    assert!(r.result.attempts >= 2, "the job must have taken a broker retry: {:?}", r.result);
    assert!(t.sim.paths().is_empty());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_id_twice_is_one_job_with_identical_results() {
    let mut t = spawn_app("").await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    let ev = deletion("dup-1", &node.owner, Utc::now());
    t.publish("deletion.requested", &ev).await;
    t.publish("deletion.requested", &ev).await;
    let a = t.next_result(30).await;
    let b = t.next_result(30).await;
    assert_eq!(a.body, b.body, "duplicate results must be byte-identical");
    assert_eq!(a.result.job_id, b.result.job_id);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE event_id = 'dup-1'")
        .fetch_one(t.app.ledger.pool())
        .await
        .unwrap();
    assert_eq!(n, 1);
    // Each resource was asked to go once: the second copy ran nothing.
    for r in &node.resources {
        assert_eq!(t.deletes_of(&r.path), 1, "DELETEs of {}", r.path);
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_dead_letters_with_a_report_and_a_result() {
    let mut t = spawn_app("").await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    t.sim.set_faults(Faults { fail_next: 1, fail_status: 403, only_method: "DELETE".into(), ..Default::default() });
    t.publish("deletion.requested", &deletion("del-403", &node.owner, Utc::now())).await;
    let r = t.next_result(30).await;
    assert_eq!(r.routing_key, "teardown.dead_lettered");
    assert_eq!(r.result.status, "dead_lettered");
    let reason = r.result.reason.clone().expect("a dead-lettered result has a reason");
    assert!(reason.contains("403"), "{reason}");
    let failed: Vec<_> = r.result.resources.iter().filter(|s| s.outcome == "failed").collect();
    assert_eq!(failed.len(), 1, "{:?}", r.result.resources);
    assert!(failed[0].error.as_deref().unwrap_or("").contains("403"));
    // What waits for the failed one never started: the server waits for both
    // the VNI and the DNS record, the IP reservations for the DNS record only.
    let blocked = r.result.resources.iter().filter(|s| s.outcome == "blocked").count();
    let expected = if failed[0].kind == "dns_record" { 3 } else { 1 };
    assert_eq!(blocked, expected, "{:?}", r.result.resources);
    assert!(t.sim.exists(&node.resources[2].path), "the server must not be touched");

    let dead = t.dead_wait(1).await;
    assert_eq!(dead.len(), 1);
    let original: serde_json::Value = serde_json::from_slice(&dead[0].0).unwrap();
    assert_eq!(original["event_id"], "del-403");
    assert!(dead[0].1.contains("403"), "reason header: {}", dead[0].1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_deletes_nothing_and_reports_would_delete() {
    let mut t = spawn_app("").await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    // One of them is gone already: the dry run must ask, not assume.
    let gone = node.resources.iter().find(|r| r.kind == "ip_reservation").unwrap();
    t.sim.remove(&gone.path);
    let before = t.sim.paths();
    let mut ev = deletion("dry-1", &node.owner, Utc::now());
    ev["dry_run"] = json!(true);
    t.publish("deletion.requested", &ev).await;
    let r = t.next_result(30).await;
    assert_eq!(r.result.status, "completed");
    assert!(r.result.dry_run);
    assert_eq!(r.result.resources.len(), 5);
    for s in &r.result.resources {
        let want = if s.id == gone.id { "already_gone" } else { "would_delete" };
        assert_eq!(s.outcome, want, "{:?}", r.result.resources);
    }
    // Each resource's check endpoint was asked (GET of its path); nothing was deleted.
    let asked: Vec<(String, String)> = t.sim.requests();
    for res in &node.resources {
        assert!(asked.iter().any(|(m, p)| m == "GET" && *p == res.path), "no check of {}: {asked:?}", res.path);
    }
    assert_eq!(t.sim.paths(), before);
    assert_eq!(t.sim.stats().deletes, 0);
    // And the owner's resources are still there for a real teardown.
    t.publish("deletion.requested", &deletion("real-1", &node.owner, Utc::now())).await;
    let r = t.next_result(30).await;
    for s in &r.result.resources {
        let want = if s.id == gone.id { "already_gone" } else { "deleted" };
        assert_eq!(s.outcome, want, "{:?}", r.result.resources);
    }
    assert!(t.sim.paths().is_empty());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_failed_tears_down_what_it_lists_as_well_as_what_was_tracked() {
    let mut t = spawn_app("").await;
    let node = VpcNode::new(&unique("node"));
    node.create_in(&t.sim);
    // Only the IPs and the server were tracked before the provisioner failed;
    // it lists the DNS record and the VNI in its failure event.
    let tracks = node.track_events("pf");
    for e in tracks.iter().filter(|e| e["kind"] == "ip_reservation" || e["kind"] == "bare_metal_server") {
        t.publish("resource.tracked", e).await;
    }
    let owners = vec![node.owner.clone()];
    wait_until("3 tracked", Duration::from_secs(20), || async {
        t.app.ledger.count_tracked(&owners).await.unwrap() >= 3
    })
    .await;
    let listed: Vec<_> = node
        .resources
        .iter()
        .filter(|r| r.kind == "dns_record" || r.kind == "vni")
        .map(|r| json!({"kind": r.kind, "id": r.id, "attributes": r.attributes}))
        .collect();
    let ev = json!({
        "event_id": "pf-1", "owner": node.owner, "failed_step": "attach_vni", "error": "quota exceeded",
        "occurred_at": Utc::now().to_rfc3339(), "resources": listed,
    });
    t.publish("provisioning.failed", &ev).await;
    let r = t.next_result(30).await;
    assert_eq!(r.result.status, "completed", "{:?}", r.result);
    assert_eq!(r.result.trigger, "provisioning.failed");
    assert_eq!(r.result.resources.len(), 5);
    assert!(t.sim.paths().is_empty(), "left: {:?}", t.sim.paths());
    assert_eq!(t.sim.stats().refused_for_order, 0);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_already_gone_at_the_provider_counts_as_done() {
    let mut t = spawn_app("").await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    // Someone removed the VNI by hand.
    let vni = node.resources.iter().find(|r| r.kind == "vni").unwrap();
    let client = reqwest::Client::new();
    let addr = t.app.settings.providers.get("cloud").and_then(|p| match p {
        reaper::config::ProviderSettings::Http(h) => Some(h.base_url.clone()),
        _ => None,
    });
    let resp = client.delete(format!("{}{}", addr.unwrap(), vni.path)).send().await.unwrap();
    assert_eq!(resp.status(), 204);
    t.publish("deletion.requested", &deletion("gone-1", &node.owner, Utc::now())).await;
    let r = t.next_result(30).await;
    let v = r.result.resources.iter().find(|s| s.kind == "vni").unwrap();
    assert_eq!(v.outcome, "already_gone");
    assert_eq!(r.result.status, "completed");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_holds_back_only_what_waits_for_it() {
    let mut t = spawn_app("").await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    // Something outside the job hangs on to the VNI: its DELETE answers 409 for good.
    let vni = node.resources.iter().find(|r| r.kind == "vni").unwrap();
    t.sim.create("/v1/attachments/held", &[vni.path.as_str()]);
    t.publish("deletion.requested", &deletion(&unique("del"), &node.owner, Utc::now())).await;
    let r = t.next_result(60).await.result;
    assert_eq!(r.status, "dead_lettered", "{r:?}");
    let outcome = |kind: &str| -> Vec<(String, Option<String>)> {
        r.resources.iter().filter(|s| s.kind == kind).map(|s| (s.outcome.clone(), s.error.clone())).collect()
    };
    assert_eq!(outcome("vni")[0].0, "failed", "{r:?}");
    // The reservations wait only for the DNS record, which went: they go too.
    assert_eq!(outcome("ip_reservation").iter().filter(|(o, _)| o == "deleted").count(), 2, "{r:?}");
    assert_eq!(outcome("dns_record")[0].0, "deleted", "{r:?}");
    // The server waits for the VNI: held back, and the reason names it.
    let (o, why) = &outcome("bare_metal_server")[0];
    assert_eq!(o, "blocked", "{r:?}");
    assert!(why.as_deref().unwrap_or("").contains(&format!("waits for vni/{}", vni.id)), "{why:?}");
    let mut left = t.sim.paths();
    left.sort();
    let server = node.resources.iter().find(|r| r.kind == "bare_metal_server").unwrap();
    let mut want = vec!["/v1/attachments/held".to_string(), server.path.clone(), vni.path.clone()];
    want.sort();
    assert_eq!(left, want);
    let vni_deletes = t.sim.requests().iter().filter(|(m, p)| m == "DELETE" && *p == vni.path).count() as u64;
    assert_eq!(t.sim.stats().refused_for_order, vni_deletes, "every refusal was the VNI's own: {:?}", t.sim.stats());
    assert_eq!(t.sim.stats().delete_not_found, 0, "nothing was deleted twice");
    t.stop().await;
}

/// `parent` links order resources of one kind: a VNI attached to another
/// (its parent) goes first, as the cloud requires, in a chain of three. The
/// cloud answers slowly, so resources started together would meet there at
/// once (and the parents be refused), whatever order they were started in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parent_links_order_resources_of_one_kind_end_to_end() {
    let mut t = spawn_app("").await;
    let vni = |id: &str| format!("/v1/virtual_network_interfaces/{id}");
    let owner = format!("node/{}", unique("chain"));
    // The root's dependent is the middle one, whose dependent is the leaf: the
    // cloud refuses the root while the middle exists, the middle while the leaf does.
    t.sim.create(&vni("c-root"), &[]);
    t.sim.create(&vni("b-mid"), &[&vni("c-root")]);
    t.sim.create(&vni("a-leaf"), &[&vni("b-mid")]);
    t.sim.set_faults(Faults { latency_ms: 30, ..Default::default() });
    let event = json!({
        "event_id": unique("parents"), "owner": owner, "occurred_at": Utc::now().to_rfc3339(),
        "resources": [
            {"kind": "vni", "id": "c-root"},
            {"kind": "vni", "id": "b-mid", "parent": {"kind": "vni", "id": "c-root"}},
            {"kind": "vni", "id": "a-leaf", "parent": {"kind": "vni", "id": "b-mid"}},
        ],
    });
    t.publish("provisioning.failed", &event).await;
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "completed", "{r:?}");
    assert!(t.gone_at(&vni("a-leaf")) < t.first_delete(&vni("b-mid")), "the child goes before its parent");
    assert!(t.gone_at(&vni("b-mid")) < t.first_delete(&vni("c-root")), "the child goes before its parent");
    assert_eq!(t.sim.stats().refused_for_order, 0);
    assert!(t.sim.paths().is_empty());
    t.stop().await;
}
