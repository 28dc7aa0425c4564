//! Group commit: jobs ending together share a statement, and one job the
//! database refuses does not take its batch-mates down with it.

use chrono::Utc;
use reaper::contract::TeardownRequest;
use reaper::domain::{JobStatus, Trigger};
use reaper::ledger::{Begin, JobEnd};
use uuid::Uuid;

use crate::helpers::*;

// One thread: the eight finishes are all queued before the batcher runs, so
// they meet in one batch whatever the machine is doing.
#[tokio::test(flavor = "current_thread")]
async fn a_refused_finish_fails_alone_and_its_batch_mates_are_written() {
    let mut t = spawn_app("").await;
    t.stop().await; // drive the ledger directly
    let ledger = t.app.ledger.clone();
    let mut jobs = Vec::new();
    for i in 0..8 {
        let req = TeardownRequest {
            event_id: format!("gc-{i}"),
            owner: format!("node/gc-{i}"),
            trigger: Trigger::DeletionRequested,
            dry_run: false,
            occurred_at: Utc::now(),
            generation: None,
            resources: vec![],
            asked: Default::default(),
        };
        let holder = Uuid::new_v4();
        match ledger.begin_job(&req, b"{}", "deletion.requested", holder).await.unwrap() {
            Begin::Start(s) => jobs.push((s.job, holder)),
            Begin::Busy | Begin::Conflict(_) => panic!("nobody else holds these owners or event ids"),
        }
    }
    // Job 3's reason holds a NUL, which PostgreSQL refuses; the rest are fine.
    let finishes = jobs.iter().enumerate().map(|(i, (job, holder))| {
        let ledger = ledger.clone();
        async move {
            let reason = if i == 3 { Some("bad\u{0}reason") } else { None };
            let body = format!("{{\"n\":{i}}}").into_bytes();
            let end = JobEnd {
                status: JobStatus::Completed,
                reason,
                error_class: None,
                steps: &[],
                result: &body,
                result_key: "teardown.completed",
                dead: None,
                traceparent: None,
                result_headers: Vec::new(),
            };
            ledger.finish(job, &end, *holder).await
        }
    });
    let before = ledger.finish_batches();
    let answers = futures_util::future::join_all(finishes).await;
    let counts = ledger.finish_batches();
    // The eight shared statements (fewer than one each), and the refused
    // batch was split and written one by one: the path this test is about.
    assert_eq!(counts.statements - before.statements, 1, "one statement for the eight: {before:?} -> {counts:?}");
    assert_eq!(counts.largest, 8, "{counts:?}");
    assert_eq!(counts.splits - before.splits, 1, "{before:?} -> {counts:?}");
    for (i, a) in answers.iter().enumerate() {
        if i == 3 {
            assert!(a.is_err(), "the refused job reports the failure");
        } else {
            let f = a.as_ref().unwrap_or_else(|e| panic!("job {i} failed with its batch-mate: {e}"));
            assert_eq!(f.result, format!("{{\"n\":{i}}}").into_bytes());
            assert!(f.outbox_written);
        }
    }
    let done: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'completed'")
        .fetch_one(ledger.pool())
        .await
        .unwrap();
    assert_eq!(done, 7);
}

fn track(event_id: &str, owner: &str, ids: &[&str], zone: &str) -> reaper::contract::Tracked {
    reaper::contract::Tracked {
        event_id: event_id.into(),
        owner: owner.into(),
        generation: None,
        resources: ids
            .iter()
            .map(|id| reaper::contract::TrackedResource {
                resource: reaper::domain::Resource {
                    kind: "dns_record".into(),
                    id: id.to_string(),
                    attributes: [("zone_id".to_string(), zone.to_string())].into(),
                    parent: None,
                },
                created_at: Some(Utc::now()),
            })
            .collect(),
    }
}

async fn track_all(
    ledger: &reaper::ledger::Ledger,
    tracks: &[reaper::contract::Tracked],
) -> Vec<Result<reaper::ledger::TrackOutcome, reaper::ledger::LedgerError>> {
    futures_util::future::join_all(tracks.iter().map(|tr| ledger.track(tr, b"{}", "resource.tracked", Uuid::new_v4())))
        .await
}

// Tracks of concurrent deliveries share one statement: two of one owner, a
// list, the same event twice, two events of one resource. Then one the
// database refuses (a NUL) fails alone while its batch-mate is recorded.
#[tokio::test(flavor = "current_thread")]
async fn tracks_share_a_statement_and_a_refused_one_fails_alone() {
    let mut t = spawn_app("").await;
    t.stop().await; // drive the ledger directly
    let ledger = t.app.ledger.clone();
    let tracks = [
        track("gt-1", "node/gt-a", &["a1"], "z"),
        track("gt-2", "node/gt-a", &["a2"], "z"),
        track("gt-3", "node/gt-b", &["b1", "b2", "b3"], "z"),
        track("gt-5", "node/gt-d", &["d1"], "z"),
        track("gt-5", "node/gt-d", &["d1"], "z"),
        // Another event naming the same resource (a producer's retry under a new id).
        track("gt-6", "node/gt-d", &["d1"], "z"),
    ];
    let before = ledger.track_batches();
    let answers = track_all(&ledger, &tracks).await;
    let counts = ledger.track_batches();
    assert_eq!(counts.statements - before.statements, 1, "one statement for the six: {before:?} -> {counts:?}");
    assert_eq!(counts.splits, before.splits, "{before:?} -> {counts:?}");
    for (i, a) in answers.iter().enumerate() {
        assert!(matches!(a, Ok(reaper::ledger::TrackOutcome::Recorded)), "track {i}: {a:?}");
    }

    let refused = [track("gt-4", "node/gt-c", &["c1"], "bad\u{0}zone"), track("gt-7", "node/gt-e", &["e1"], "z")];
    let before = ledger.track_batches();
    let answers = track_all(&ledger, &refused).await;
    let counts = ledger.track_batches();
    assert_eq!(counts.statements - before.statements, 1, "{before:?} -> {counts:?}");
    assert_eq!(counts.splits - before.splits, 1, "{before:?} -> {counts:?}");
    assert!(answers[0].is_err(), "the refused track reports the failure: {:?}", answers[0]);
    assert!(matches!(answers[1], Ok(reaper::ledger::TrackOutcome::Recorded)), "{:?}", answers[1]);

    let resources: Vec<String> = sqlx::query_scalar("SELECT resource_id FROM tracked_resources ORDER BY resource_id")
        .fetch_all(ledger.pool())
        .await
        .unwrap();
    assert_eq!(resources, ["a1", "a2", "b1", "b2", "b3", "d1", "e1"]);
    assert_eq!(t.count("SELECT count(*) FROM tracks").await, 6, "one identity per recorded event");
}
