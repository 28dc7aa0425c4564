//! What comes in through the door: inputs a buggy producer, a fast clock or a
//! hostile tenant can send, and what reaper must do with them (issue 10).
//! Each test shows a harm today's main did; docs/contract.md states the rules.

use std::time::Duration;

use chrono::Utc;
use reaper::devtools::demo::VpcNode;
use reaper::devtools::sim::{Faults, Sim};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// The VPC kinds' request paths, `*` standing for one non-empty segment.
const TEMPLATES: &[&str] = &[
    "/v1/virtual_network_interfaces/*",
    "/v1/dns_zones/*/resource_records/*",
    "/v1/bare_metal_servers/*",
    "/v1/subnets/*/reserved_ips/*",
];

fn fits_a_template(path: &str) -> bool {
    let segs: Vec<&str> = path.split('/').collect();
    TEMPLATES.iter().any(|t| {
        let tsegs: Vec<&str> = t.split('/').collect();
        tsegs.len() == segs.len()
            && tsegs
                .iter()
                .zip(&segs)
                .all(|(t, s)| if *t == "*" { !s.is_empty() && *s != "." && *s != ".." } else { t == s })
    })
}

fn assert_every_request_fits(sim: &Sim) {
    let odd: Vec<_> = sim.requests().into_iter().filter(|(_, p)| !fits_a_template(p)).collect();
    assert!(odd.is_empty(), "requests whose path is not of a template's shape: {odd:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_never_change_which_path_is_requested() {
    let lookups = r#"
[providers.provisioner_db]
type = "postgres"
url = "{db_url}"
[kinds.dns_record]
lookup = { provider = "provisioner_db", owner_type = "box", sql = "SELECT record_id AS id, zone_id FROM dns_records WHERE node_name = $1" }
"#;
    let mut t = spawn_app(lookups).await;
    t.sim.create("/v1/dns_zones/zone-1", &[]);
    t.sim.create("/v1/bare_metal_servers", &[]);
    t.sim.create("/v1/dns_zones/zone-1/resource_records/r1", &[]);
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;

    // Through the door: an id or attribute that is `.`, `..` or empty.
    let bad = [
        json!({"event_id": unique("dots"), "owner": node.owner, "kind": "dns_record", "id": "..", "attributes": {"zone_id": "zone-1"}}),
        json!({"event_id": unique("dots"), "owner": node.owner, "kind": "bare_metal_server", "id": "."}),
        json!({"event_id": unique("dots"), "owner": node.owner, "kind": "dns_record", "id": "r1", "attributes": {"zone_id": ".."}}),
        json!({"event_id": unique("dots"), "owner": node.owner, "kind": "vni", "id": ""}),
    ];
    for e in &bad {
        t.publish("resource.tracked", e).await;
    }
    let dead = t.dead_wait(bad.len()).await;
    for (body, reason) in &dead {
        assert!(
            reason.contains("request path") || reason.contains("id must be 1.."),
            "{reason:?} for {}",
            String::from_utf8_lossy(body)
        );
    }
    t.publish("deletion.requested", &deletion(&unique("del"), &node.owner, Utc::now())).await;
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "completed", "{r:?}");
    assert_eq!(r.resources.len(), 5, "only the node's own five: {:?}", r.resources);

    // From a lookup, which no door checked: a permanent step error.
    sqlx::raw_sql(
        "CREATE TABLE dns_records (node_name text, record_id text, zone_id text);
         INSERT INTO dns_records VALUES ('b1', '..', 'zone-1'), ('b1', 'r1', '..');",
    )
    .execute(t.app.ledger.pool())
    .await
    .unwrap();
    t.publish("deletion.requested", &deletion(&unique("del"), "box/b1", Utc::now())).await;
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "dead_lettered", "{r:?}");
    assert_eq!(r.resources.len(), 2, "{r:?}");
    for s in &r.resources {
        assert_eq!(s.outcome, "failed", "{s:?}");
        assert!(s.error.as_deref().unwrap_or("").contains("cannot be used in a request path"), "{s:?}");
    }

    assert!(t.sim.exists("/v1/dns_zones/zone-1"), "the zone is still there");
    assert!(t.sim.exists("/v1/bare_metal_servers"), "the collection is still there");
    assert!(t.sim.exists("/v1/dns_zones/zone-1/resource_records/r1"));
    assert_every_request_fits(&t.sim);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_a_permanent_error_and_is_not_followed() {
    let mut t = spawn_app("").await;
    // Where the API would send us: another server holding the same paths.
    let elsewhere = Sim::new();
    let addr = elsewhere.spawn(0, CancellationToken::new()).await.unwrap();
    let node = VpcNode::new(&unique("node"));
    node.create_in(&elsewhere);
    t.provision(&node).await;
    t.sim.set_faults(Faults { redirect_to: format!("http://{addr}"), redirect_status: 307, ..Faults::default() });

    t.publish("deletion.requested", &deletion(&unique("del"), &node.owner, Utc::now())).await;
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "dead_lettered", "{r:?}");
    let reason = r.reason.clone().unwrap_or_default();
    assert!(reason.contains(&format!("redirects to http://{addr}/v1/")), "{reason}");
    assert!(elsewhere.requests().is_empty(), "nothing was sent where the redirect pointed: {:?}", elsewhere.requests());
    assert_eq!(elsewhere.paths().len(), 5, "and nothing there was deleted");

    // A 303 would turn the DELETE into a GET whose 200 looks like success.
    t.sim.set_faults(Faults { redirect_to: format!("http://{addr}"), redirect_status: 303, ..Faults::default() });
    let node2 = VpcNode::new(&unique("node"));
    t.provision(&node2).await;
    t.publish("deletion.requested", &deletion(&unique("del"), &node2.owner, Utc::now())).await;
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "dead_lettered", "{r:?}");
    assert!(r.resources.iter().all(|s| s.outcome != "deleted"), "{r:?}");
    assert!(elsewhere.requests().is_empty(), "{:?}", elsewhere.requests());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_without_occurred_at_is_torn_down_as_of_its_receipt() {
    let mut t = spawn_app("").await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    let id = unique("no-time");
    t.publish("deletion.requested", &json!({"event_id": id, "owner": node.owner})).await;
    let r = t.next_result(30).await.result;
    assert_eq!((r.event_id.as_str(), r.status.as_str()), (id.as_str(), "completed"), "{r:?}");
    assert_eq!(r.resources.iter().filter(|s| s.outcome == "deleted").count(), 5, "{r:?}");
    assert!(t.sim.paths().is_empty(), "{:?}", t.sim.paths());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_dated_in_the_future_does_not_reach_the_owners_next_life() {
    // No skew allowed: a deletion ends its life at the latest when reaper receives it.
    let mut t = spawn_app("[worker]\nmax_clock_skew_secs = 0\n").await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    let tomorrow = Utc::now() + chrono::Duration::days(1);
    t.publish("deletion.requested", &deletion(&unique("del"), &node.owner, tomorrow)).await;
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "completed", "{r:?}");

    // The owner's name comes back: a new server, created after the deletion.
    t.sim.create("/v1/bare_metal_servers/next-life", &[]);
    let track = json!({"event_id": unique("next"), "owner": node.owner, "kind": "bare_metal_server",
                       "id": "next-life", "created_at": Utc::now().to_rfc3339()});
    t.publish("resource.tracked", &track).await;
    let find = || async {
        t.app.ledger.owner_resources(&node.owner).await.unwrap().into_iter().find(|(r, _, _)| r.id == "next-life")
    };
    wait_until("the next life's server is tracked", Duration::from_secs(20), || async { find().await.is_some() }).await;
    let (_, state, job) = find().await.unwrap();
    assert_eq!((state.as_str(), job), ("live", None), "the new server belongs to the new life, claimed by nobody");
    assert!(t.sim.exists("/v1/bare_metal_servers/next-life"));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_id_names_one_job_of_one_owner_and_a_track_is_itself() {
    let mut t = spawn_app("").await;
    let a = VpcNode::new(&unique("a"));
    let b = VpcNode::new(&unique("b"));
    t.provision(&a).await;
    t.provision(&b).await;
    let id = unique("e");
    t.publish("deletion.requested", &deletion(&id, &a.owner, Utc::now())).await;
    let r = t.next_result(30).await.result;
    assert_eq!((r.owner.as_str(), r.status.as_str()), (a.owner.as_str(), "completed"));

    // B's event, a dry run, a provisioning failure and a track, all reusing A's event_id.
    let reuse = [
        ("deletion.requested", deletion(&id, &b.owner, Utc::now())),
        ("deletion.requested", json!({"event_id": id, "owner": a.owner, "dry_run": true})),
        ("provisioning.failed", json!({"event_id": id, "owner": a.owner})),
        ("resource.tracked", json!({"event_id": id, "owner": b.owner, "kind": "vni", "id": "v-new"})),
    ];
    for (key, e) in &reuse {
        t.publish(key, e).await;
    }
    let dead = t.dead_wait(reuse.len()).await;
    for (body, reason) in &dead {
        assert!(
            reason.contains(&format!("event_id already names a job of {}", a.owner)),
            "{reason:?} for {}",
            String::from_utf8_lossy(body)
        );
    }
    assert_eq!(b.resources.len(), t.sim.paths().len(), "B's resources are all still there");

    // A track is itself: a redelivery is recognised, another track under its id is refused.
    let tid = unique("track");
    let track = json!({"event_id": tid, "owner": b.owner, "kind": "vni", "id": "v-extra"});
    t.publish("resource.tracked", &track).await;
    wait_until("the track is recorded", Duration::from_secs(20), || async {
        t.app.ledger.owner_resources(&b.owner).await.unwrap().iter().any(|(r, _, _)| r.id == "v-extra")
    })
    .await;
    t.publish("resource.tracked", &track).await;
    t.publish("resource.tracked", &json!({"event_id": tid, "owner": b.owner, "kind": "vni", "id": "v-other"})).await;
    t.publish("deletion.requested", &deletion(&tid, &b.owner, Utc::now())).await;
    let dead = t.dead_wait(2).await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    for (_, reason) in &dead {
        assert!(reason.contains(&format!("event_id already names a track of {} (vni/v-extra)", b.owner)), "{reason:?}");
    }
    let tracked = t.app.ledger.owner_resources(&b.owner).await.unwrap();
    assert!(tracked.iter().any(|(r, _, _)| r.id == "v-extra"), "the track was recorded");
    assert!(!tracked.iter().any(|(r, _, _)| r.id == "v-other"), "the impostor was not");
    assert!(t.tap.next(Duration::from_millis(300)).await.is_none(), "no result was published for any of them");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_id_longer_than_255_bytes_is_refused_and_the_worker_shuts_down_cleanly() {
    let mut t = spawn_app("").await;
    // Publishing such an id is an error, not a panic.
    let long = "é".repeat(128);
    let err = t.publisher.publish(&t.app.names.events, "deletion.requested", b"{}", &long, &[]).await;
    assert!(err.is_err(), "{err:?}");
    t.stop().await;

    let node = VpcNode::new(&unique("node"));
    node.create_in(&t.sim);
    let mut child = Child::spawn(
        reaper_cmd()
            .args(["run", "--config"])
            .arg(t.config_file())
            .env("REAPER_ADMIN__LISTEN", "")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
        "reaper run",
    );
    // 128 characters, 256 bytes: within the old character limit, over AMQP's.
    let bad = serde_json::to_vec(&json!({"event_id": long, "owner": "node/long-id"})).unwrap();
    t.publish_raw(&t.app.names.events, "deletion.requested", &bad).await;
    for e in node.track_events(&node.owner) {
        t.publish("resource.tracked", &e).await;
    }
    let owners = vec![node.owner.clone()];
    wait_until("the node is tracked", Duration::from_secs(30), || async {
        t.app.ledger.count_tracked(&owners).await.unwrap() >= 5
    })
    .await;
    t.publish("deletion.requested", &deletion(&unique("after"), &node.owner, Utc::now())).await;
    let r = t.next_result(60).await.result;
    assert_eq!(r.status, "completed", "{r:?}");
    let dead = t.dead_wait(1).await;
    assert!(dead[0].1.contains("at most 255 bytes"), "{:?}", dead[0].1);

    let status = child.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "reaper run exits 0 on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_cannot_choose_how_its_message_is_read() {
    let mut t = spawn_app("").await;
    let node = VpcNode::new(&unique("node"));
    node.create_in(&t.sim);
    let vni = node.resources.iter().find(|r| r.kind == "vni").unwrap();
    // Allowed to publish only resource.tracked, it says "read me as provisioning.failed".
    let body = json!({"event_id": unique("sneak"), "owner": node.owner, "occurred_at": Utc::now().to_rfc3339(),
                      "resources": [{"kind": "vni", "id": vni.id}]});
    let bytes = serde_json::to_vec(&body).unwrap();
    t.publisher
        .publish(
            &t.app.names.events,
            "resource.tracked",
            &bytes,
            "sneak",
            &[("x-reaper-routing-key", "provisioning.failed")],
        )
        .await
        .unwrap();
    // Read as the resource.tracked it was published as: a bulk track of the
    // VNI, recorded for the owner's teardown, and nothing deleted.
    let owners = vec![node.owner.clone()];
    wait_until("the VNI is tracked", Duration::from_secs(20), || async {
        t.app.ledger.count_tracked(&owners).await.unwrap() >= 1
    })
    .await;
    let tracked = t.app.ledger.owner_resources(&node.owner).await.unwrap();
    assert_eq!(tracked.len(), 1, "{tracked:?}");
    assert_eq!((tracked[0].1.as_str(), &tracked[0].2), ("live", &None), "tracked, claimed by no job");
    assert_eq!(t.count("SELECT count(*) FROM jobs").await, 0, "no job was opened");
    assert!(t.sim.exists(&vni.path), "the VNI is still there");
    assert!(t.sim.requests().is_empty(), "{:?}", t.sim.requests());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_listed_twice_is_one_resource() {
    let mut t = spawn_app("").await;
    let node = VpcNode::new(&unique("node"));
    node.create_in(&t.sim);
    let vni = node.resources.iter().find(|r| r.kind == "vni").unwrap();
    let twice = json!({"kind": "vni", "id": vni.id});
    t.publish(
        "provisioning.failed",
        &json!({"event_id": unique("pf"), "owner": node.owner, "resources": [twice, twice]}),
    )
    .await;
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "completed", "{r:?}");
    assert_eq!(r.resources.len(), 1, "{r:?}");
    assert!(!t.sim.exists(&vni.path));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_ledger_keeps_refusing_is_dead_lettered_not_retried_forever() {
    let mut t = spawn_app("[worker]\nmax_ledger_refusals = 3\n").await;
    // A ledger that refuses one owner's jobs, the same way every time.
    t.sql(
        "CREATE FUNCTION refuse_cursed() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.owner = 'node/cursed' THEN RAISE EXCEPTION 'cursed owner'; END IF; RETURN NEW; END $$;
         CREATE TRIGGER refuse_cursed BEFORE INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION refuse_cursed();",
    )
    .await;
    t.publish("deletion.requested", &deletion(&unique("cursed"), "node/cursed", Utc::now())).await;
    let dead = t.dead_wait(1).await;
    assert!(dead[0].1.contains("refused this message 3 times in a row"), "{:?}", dead[0].1);
    assert!(dead[0].1.contains("cursed owner"), "{:?}", dead[0].1);
    // Other owners are not held up.
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    t.publish("deletion.requested", &deletion(&unique("ok"), &node.owner, Utc::now())).await;
    assert_eq!(t.next_result(30).await.result.status, "completed");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misspelt_routing_key_is_dead_lettered_with_its_reason() {
    let t = spawn_app("").await;
    let body = serde_json::to_vec(&deletion(&unique("typo"), "node/n1", Utc::now())).unwrap();
    t.publish_raw(&t.app.names.events, "deletion.requestd", &body).await;
    let dead = t.dead_wait(1).await;
    assert_eq!(dead[0].0, body);
    assert!(dead[0].1.contains("unknown routing key \"deletion.requestd\""), "{:?}", dead[0].1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_waits_for_a_busy_owner_keeps_its_receipt_time_and_timestamp() {
    let mut t = spawn_app("[worker]\nowner_busy_delay_ms = 200\n").await;
    let (plain, stamped) = (VpcNode::new(&unique("plain")), VpcNode::new(&unique("stamped")));
    t.provision(&plain).await;
    t.provision(&stamped).await;
    // Someone else (a worker that is gone) holds both owners for three more seconds.
    let received = Utc::now();
    for owner in [&plain.owner, &stamped.owner] {
        sqlx::query("INSERT INTO owner_leases (owner, holder, until) VALUES ($1, gen_random_uuid(), now() + interval '3 seconds')")
            .bind(owner)
            .execute(t.app.ledger.pool())
            .await
            .unwrap();
    }
    // No occurred_at: one without a timestamp, one with the AMQP timestamp a minute ago.
    let (plain_id, stamped_id) = (unique("busy"), unique("busy-ts"));
    t.publish("deletion.requested", &json!({"event_id": plain_id, "owner": plain.owner})).await;
    let minute_ago = received.timestamp() - 60;
    let ch = t.conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let body = serde_json::to_vec(&json!({"event_id": stamped_id, "owner": stamped.owner})).unwrap();
    let props = lapin::BasicProperties::default().with_timestamp(minute_ago as u64).with_delivery_mode(2);
    ch.basic_publish(t.app.names.events.as_str().into(), "deletion.requested".into(), Default::default(), &body, props)
        .await
        .unwrap()
        .await
        .unwrap();
    for _ in 0..2 {
        let r = t.next_result(30).await.result;
        assert_eq!(r.status, "completed", "{r:?}");
        assert!(
            r.started_at > received + chrono::Duration::seconds(2),
            "the job opened only once the owner was free: {r:?}"
        );
    }
    let pool = t.app.ledger.pool().clone();
    let occurred = |id: String| {
        let pool = pool.clone();
        async move {
            let at: chrono::DateTime<Utc> = sqlx::query_scalar("SELECT occurred_at FROM jobs WHERE event_id = $1")
                .bind(&id)
                .fetch_one(&pool)
                .await
                .unwrap();
            at
        }
    };
    let plain_at = occurred(plain_id).await;
    assert!(
        plain_at < received + chrono::Duration::seconds(1),
        "occurred_at is when reaper first received the event ({plain_at}), not when the owner came free"
    );
    assert_eq!(occurred(stamped_id).await.timestamp(), minute_ago, "the AMQP timestamp survives the retry hops");
    t.stop().await;
}
