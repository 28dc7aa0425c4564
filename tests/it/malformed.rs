use chrono::Utc;
use reaper::devtools::demo::VpcNode;
use serde_json::json;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_malformed_message_is_dead_lettered_with_a_reason_and_the_worker_carries_on() {
    let mut t = spawn_app("").await;
    let now = Utc::now().to_rfc3339();
    let events = t.app.names.events.clone();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("deletion.requested", b"{not json".to_vec(), "not JSON"),
        ("deletion.requested", br#"{"event_id":"m2"}"#.to_vec(), "missing field"),
        (
            "deletion.requested",
            serde_json::to_vec(&json!({"event_id":"m3","owner":"noslash","occurred_at":now})).unwrap(),
            "type/id",
        ),
        (
            "deletion.requested",
            serde_json::to_vec(&json!({"event_id":"x".repeat(200),"owner":"a/b","occurred_at":now})).unwrap(),
            "event_id must be 1..128",
        ),
        (
            "deletion.requested",
            serde_json::to_vec(&json!({"event_id":"m5","owner":"a/b","occurred_at":"yesterday"})).unwrap(),
            "occurred_at \"yesterday\" is not an RFC 3339 time",
        ),
        (
            "deletion.requested",
            serde_json::to_vec(
                &json!({"event_id":"m6","owner":"a/b","occurred_at":now,"reason":"x".repeat(300 * 1024)}),
            )
            .unwrap(),
            "the limit is 262144",
        ),
        (
            "resource.tracked",
            serde_json::to_vec(&json!({"event_id":"m7","owner":"a/b","kind":"spaceship","id":"s1"})).unwrap(),
            "unknown kind \"spaceship\"",
        ),
        (
            "resource.tracked",
            serde_json::to_vec(&json!({"event_id":"m8","owner":"a/b","kind":"ip_reservation","id":"ip1"})).unwrap(),
            "lacks attribute \"subnet_id\"",
        ),
        (
            "resource.tracked",
            serde_json::to_vec(&json!({"event_id":"m10","owner":"a/b","kind":"vni","id":"v\u{0}1"})).unwrap(),
            "id contains a NUL character",
        ),
    ];
    for (key, body, _) in &cases {
        t.publish_raw(&events, key, body).await;
    }
    // Straight onto the work queue with a routing key reaper does not know.
    let work = t.app.names.work.clone();
    t.publish_raw("", &work, br#"{"event_id":"m9"}"#).await;

    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    t.publish("deletion.requested", &deletion("good-after-bad", &node.owner, Utc::now())).await;
    let r = t.next_result(30).await;
    assert_eq!(r.result.event_id, "good-after-bad");
    assert_eq!(r.result.status, "completed");

    let dead = t.dead_wait(cases.len() + 1).await;
    assert_eq!(dead.len(), cases.len() + 1, "every bad message, once");
    for (_, body, want) in &cases {
        let (_, reason) = dead.iter().find(|(b, _)| b == body).expect("the original body is kept on the dead queue");
        assert!(reason.contains(want), "reason {reason:?} should mention {want:?}");
    }
    assert!(
        dead.iter().any(|(_, r)| r.contains("unknown routing key")),
        "{:?}",
        dead.iter().map(|d| &d.1).collect::<Vec<_>>()
    );
    t.stop().await;
}
