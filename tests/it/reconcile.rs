//! Reconcile's safety rules, each tried against a sweep that would otherwise
//! delete: a failed inventory, an empty one, the brakes, the grace period, the
//! quarantine, exclusions, dry runs that change nothing, and the admin route.

use std::time::Duration;

use chrono::Utc;
use reaper::app::App;
use serde_json::{json, Value};

use crate::helpers::*;

/// A gateway (the simulated cloud's /gw/models list, 100 a page) is the truth;
/// the `models` table of the app database is the copy.
pub(crate) const RULE: &str = r#"
[providers.gateway]
type = "http"
base_url = "{sim_url}"

[providers.appdb]
type = "postgres"
url = "{db_url}"

[kinds.model_row]
provider = "appdb"
delete = "DELETE FROM models WHERE id = $1"
archive = true
archive_table = "models"

[reconcile]
min_interval_secs = 0.2

[reconcile.rules.models]
truth = { provider = "gateway", request = "GET /gw/models", items = "/items", key = "/id", next = "/next" }
copy = { provider = "appdb", sql = "SELECT id AS key, created_at FROM models", created_at = "created_at" }
action = { kind = "model_row", owner = "model/{key}" }
max_count = 5
max_fraction = 0.5
exclude = [{ field = "key", glob = "keep-*" }]
"#;

/// `live` models in both, `orphans` only in the table, `old` hours old.
pub(crate) async fn world(t: &TestApp, live: usize, orphans: &[&str]) {
    t.sql("CREATE TABLE models (id text PRIMARY KEY, name text, created_at timestamptz NOT NULL DEFAULT now() - interval '2 days')")
        .await;
    t.sim.create_collection("/gw/models");
    for i in 0..live {
        let id = format!("live-{i:04}");
        t.sim.create_with(&format!("/gw/models/{id}"), json!({}));
        sqlx::query("INSERT INTO models (id, name) VALUES ($1, $1)")
            .bind(&id)
            .execute(t.app.ledger.pool())
            .await
            .unwrap();
    }
    for id in orphans {
        sqlx::query("INSERT INTO models (id, name) VALUES ($1, $1)")
            .bind(id)
            .execute(t.app.ledger.pool())
            .await
            .unwrap();
    }
}

/// `world`, with the copy appearing at once and only after the truth is
/// whole: a scheduled sweep that reads the truth before a live model exists
/// and the copy after its row does would take it for an orphan (and the rows
/// are two days old, past any grace).
async fn world_at_once(t: &TestApp, live: usize, orphans: &[&str]) {
    t.sim.create_collection("/gw/models");
    let mut ids: Vec<String> = (0..live).map(|i| format!("live-{i:04}")).collect();
    for id in &ids {
        t.sim.create_with(&format!("/gw/models/{id}"), json!({}));
    }
    ids.extend(orphans.iter().map(|o| o.to_string()));
    let values: Vec<String> = ids.iter().map(|id| format!("('{id}', '{id}')")).collect();
    t.sql(&format!(
        "CREATE TABLE models_seed (id text PRIMARY KEY, name text, created_at timestamptz NOT NULL DEFAULT now() - interval '2 days');
         INSERT INTO models_seed (id, name) VALUES {};
         ALTER TABLE models_seed RENAME TO models;",
        values.join(", ")
    ))
    .await;
}

async fn models(t: &TestApp) -> i64 {
    t.count("SELECT count(*) FROM models").await
}

async fn exists(t: &TestApp, id: &str) -> bool {
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM models WHERE id = $1")
        .bind(id)
        .fetch_one(t.app.ledger.pool())
        .await
        .unwrap()
        == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_sweep_tears_down_exactly_the_orphans_and_dry_run_changes_nothing() {
    let mut t = spawn_app(RULE).await;
    world(&t, 250, &["gone-1", "gone-2", "keep-me"]).await;

    let (code, r, err) = t.reconcile("models", &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["dry_run"], json!(true));
    assert_eq!(
        (r["truth"].as_u64(), r["copy"].as_u64(), r["excluded"].as_u64()),
        (Some(250), Some(252), Some(1)),
        "{r}"
    );
    assert_eq!(r["actionable"], json!(2), "{r}");
    assert_eq!(r["sample_actionable"], json!(["gone-1", "gone-2"]));
    assert_eq!(models(&t).await, 253, "a dry run deletes nothing");
    let sweeps: i64 = t.count("SELECT count(*) FROM reconcile_rules").await;
    assert_eq!(sweeps, 0, "a dry run leaves no state behind");

    let (code, r, err) = t.reconcile("models", &["--execute"]);
    assert_eq!((code, r["outcome"].as_str(), r["published"].as_u64()), (0, Some("acted"), Some(2)), "{r} {err}");
    for _ in 0..2 {
        let res = t.next_result(30).await.result;
        assert_eq!(res.status, "completed", "{res:?}");
        assert_eq!(res.resources[0].outcome, "deleted");
    }
    assert!(!exists(&t, "gone-1").await && !exists(&t, "gone-2").await);
    assert!(exists(&t, "keep-me").await, "an excluded item is never touched");
    assert_eq!(models(&t).await, 251);

    let (code, r, _) = t.reconcile("models", &["--execute"]);
    assert_eq!((code, r["orphans"].as_u64(), r["outcome"].as_str()), (0, Some(0), Some("nothing_to_do")), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truth_that_fails_to_load_or_comes_back_empty_touches_nothing() {
    let t = spawn_app(RULE).await;
    world(&t, 3, &["gone-1"]).await;

    // The gateway answers 503 to every list request.
    t.sim.set_faults(reaper::devtools::sim::Faults { fail_next: 1000, fail_status: 503, ..Default::default() });
    let (code, r, err) = t.reconcile("models", &["--execute", "--force"]);
    assert_eq!(code, 3, "a failed inventory exits 3: {r} {err}");
    assert!(err.contains("truth inventory failed to load, so nothing was touched"), "{err}");
    assert_eq!(models(&t).await, 4);
    t.sim.set_faults(Default::default());

    // The gateway answers, with nothing in it: everything would look orphaned.
    for i in 0..3 {
        t.sim.remove(&format!("/gw/models/live-{i:04}"));
    }
    let (code, r, err) = t.reconcile("models", &["--execute", "--force"]);
    assert_eq!(code, 1, "a refusal exits 1: {r} {err}");
    assert_eq!(r["outcome"], json!("refused"));
    assert!(r["refused"].as_str().unwrap().contains("truth inventory came back empty"), "{r}");
    assert_eq!(models(&t).await, 4, "--force does not go past an empty inventory");

    // The copy's query is wrong: a failed load too, not an empty copy.
    let broken = RULE.replace("FROM models\"", "FROM no_such_table\"");
    drop(t);
    let t = spawn_app(&broken).await;
    world(&t, 3, &["gone-1"]).await;
    let (code, _, err) = t.reconcile("models", &["--execute"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("copy inventory failed to load") && err.contains("no_such_table"), "{err}");
    assert_eq!(models(&t).await, 4);
}

/// A truth whose second page answers 429 with `Retry-After: 1e20`. That
/// header once panicked the reader (before cf29e53 clamped it), and the sweep
/// took the first page for the whole list: 40 live models looked orphaned,
/// within the brakes, and were deleted. The list must fail to load instead.
/// (That a reader which dies is a failed load is shown by the unit tests in
/// src/reconcile/inventory.rs, with a reader that panics.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truth_list_cut_short_after_its_first_page_touches_nothing() {
    let mut t = spawn_app(&RULE.replace("max_count = 5\n", "max_count = 50\n")).await;
    world(&t, 140, &[]).await;
    t.sim.set_faults(reaper::devtools::sim::Faults {
        pass_first: 1,
        fail_next: 1,
        fail_status: 429,
        retry_after_secs: 1e20,
        only_method: "GET".into(),
        ..Default::default()
    });
    let (code, r, err) = t.reconcile("models", &["--execute"]);
    assert_eq!(code, 3, "a list cut short is a failed load: {r} {err}");
    assert!(err.contains("truth inventory failed to load, so nothing was touched"), "{err}");
    assert!(err.contains("429"), "the error says what cut the list: {err}");
    assert_eq!(models(&t).await, 140, "no live model was taken for an orphan");
    assert!(t.tap.next(Duration::from_millis(300)).await.is_none(), "no teardown was published");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brakes_refuse_a_sweep_that_would_delete_too_much_unless_forced() {
    let mut t = spawn_app(RULE).await;
    let orphans: Vec<String> = (0..7).map(|i| format!("gone-{i}")).collect();
    let refs: Vec<&str> = orphans.iter().map(|s| s.as_str()).collect();
    world(&t, 10, &refs).await;

    let (code, r, _) = t.reconcile("models", &["--execute"]);
    assert_eq!(code, 1, "{r}");
    assert!(r["refused"].as_str().unwrap().contains("7 deletions exceed max_count 5"), "{r}");
    assert_eq!((r["published"].as_u64(), r["actionable"].as_u64()), (Some(0), Some(7)));
    assert_eq!(models(&t).await, 17);

    let (code, r, _) = t.reconcile("models", &["--execute", "--force"]);
    assert_eq!((code, r["published"].as_u64()), (0, Some(7)), "{r}");
    for _ in 0..7 {
        assert_eq!(t.next_result(30).await.result.status, "completed");
    }
    assert_eq!(models(&t).await, 10);

    // The fraction brake: 4 orphans of 7 rows is over half.
    let t = spawn_app(&RULE.replace("max_count = 5", "max_count = 100")).await;
    world(&t, 3, &["a", "b", "c", "d"]).await;
    let (code, r, _) = t.reconcile("models", &["--execute"]);
    assert_eq!(code, 1, "{r}");
    assert!(r["refused"].as_str().unwrap().contains("exceed max_fraction 0.5 of the copy's 7 items"), "{r}");
    assert_eq!(models(&t).await, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_and_quarantine_hold_young_and_newly_seen_orphans_back() {
    let rule = RULE.replace("max_fraction = 0.5", "max_fraction = 1.0\ngrace_secs = 3600\nquarantine_sweeps = 2");
    let mut t = spawn_app(&rule).await;
    world(&t, 2, &["old-orphan"]).await;
    t.sql("INSERT INTO models (id, name, created_at) VALUES ('young-orphan', 'y', now() - interval '5 minutes')").await;

    // Dry runs do not count as sweeps: however many, the quarantine still holds.
    for _ in 0..3 {
        let (_, r, _) = t.reconcile("models", &[]);
        assert_eq!(
            (r["too_young"].as_u64(), r["in_quarantine"].as_u64(), r["actionable"].as_u64()),
            (Some(1), Some(1), Some(0)),
            "{r}"
        );
    }
    let (_, r, _) = t.reconcile("models", &["--execute"]);
    assert_eq!(
        (r["in_quarantine"].as_u64(), r["actionable"].as_u64(), r["sweep"].as_i64()),
        (Some(1), Some(0), Some(1)),
        "{r}"
    );
    assert!(exists(&t, "old-orphan").await);

    // A sweep that finds it no longer orphaned resets its count.
    t.sim.create_with("/gw/models/old-orphan", json!({}));
    let (_, r, _) = t.reconcile("models", &["--execute"]);
    assert_eq!(r["orphans"], json!(1), "only the young one: {r}");
    t.sim.remove("/gw/models/old-orphan");
    let (_, r, _) = t.reconcile("models", &["--execute"]);
    assert_eq!((r["in_quarantine"].as_u64(), r["actionable"].as_u64()), (Some(1), Some(0)), "the count restarted: {r}");
    let (_, r, _) = t.reconcile("models", &["--execute"]);
    assert_eq!((r["actionable"].as_u64(), r["published"].as_u64()), (Some(1), Some(1)), "{r}");
    assert_eq!(t.next_result(30).await.result.owner, "model/old-orphan");
    assert!(!exists(&t, "old-orphan").await);
    assert!(exists(&t, "young-orphan").await, "inside the grace period");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_route_needs_the_token_runs_dry_by_default_and_counts_its_sweeps() {
    let file = std::env::temp_dir().join(format!("reaper-admin-{:08x}", fastrand::u32(..)));
    std::fs::write(&file, "rc-token-91b2").unwrap();
    let mut t = spawn_app(&format!("{RULE}\n[admin]\ntoken_file = \"{}\"\n", file.display())).await;
    let _ = std::fs::remove_file(&file);
    world(&t, 2, &["gone-1"]).await;
    wait_until("the admin API listens", Duration::from_secs(10), || async { t.app.admin_addr.get().is_some() }).await;
    let base = format!("http://{}", t.app.admin_addr.get().unwrap());
    let c = reqwest::Client::new();
    let url = format!("{base}/v1/reconcile/models");
    assert_eq!(c.post(&url).send().await.unwrap().status(), 401);
    let post = |u: String| c.post(u).bearer_auth("rc-token-91b2").send();
    let dry: Value = post(url.clone()).await.unwrap().json().await.unwrap();
    assert_eq!((dry["dry_run"].as_bool(), dry["actionable"].as_u64()), (Some(true), Some(1)), "{dry}");
    assert_eq!(models(&t).await, 3);
    let unknown = post(format!("{base}/v1/reconcile/nope")).await.unwrap();
    assert_eq!(unknown.status(), 404);
    let done: Value = post(format!("{url}?execute=true")).await.unwrap().json().await.unwrap();
    assert_eq!(done["published"], json!(1), "{done}");
    let job = t.next_result(30).await.result;
    assert_eq!(job.status, "completed");
    assert!(!exists(&t, "gone-1").await);

    // The deleted row was archived: the API puts it back (a dry run first, which changes nothing).
    let restore = format!("{base}/v1/jobs/{}/restore", job.job_id);
    let dry: Value = post(format!("{restore}?dry_run=true")).await.unwrap().json().await.unwrap();
    assert_eq!((dry["dry_run"].as_bool(), dry["restored"].as_u64()), (Some(true), Some(1)), "{dry}");
    assert!(!exists(&t, "gone-1").await);
    let put: Value = post(restore.clone()).await.unwrap().json().await.unwrap();
    assert_eq!(put["restored"], json!(1), "{put}");
    assert!(exists(&t, "gone-1").await);
    let again: Value = post(restore).await.unwrap().json().await.unwrap();
    assert_eq!((again["restored"].as_u64(), again["restored_before"].as_u64()), (Some(0), Some(1)), "{again}");
    assert_eq!(post(format!("{base}/v1/jobs/{}/restore", uuid::Uuid::new_v4())).await.unwrap().status(), 404);
    let metrics = c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"reaper_reconcile_runs_total{outcome="dry_run",rule="models"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"reaper_reconcile_published_total{rule="models"} 1"#), "{metrics}");
    // After a job and a sweep, every metric the dashboard and the alerts use
    // has a series in what the running worker exports.
    let scraped = scraped_families(&metrics);
    let missing: Vec<_> = dashboard_metrics().into_iter().filter(|m| !scraped.contains(m)).collect();
    assert!(missing.is_empty(), "used by the dashboard or alerts but not exported: {missing:?}\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_rule_runs_inside_the_worker_once_per_interval() {
    let rule = RULE
        .replace("max_count = 5", "max_count = 5\nevery_secs = 0.5\nexecute_on_schedule = true")
        .replace("min_interval_secs = 0.2", "min_interval_secs = 0.2\nrun_schedules = true");
    let mut t = spawn_app(&rule).await;
    let (replica_token, replica, _) = t.spawn_replica().await;
    world_at_once(&t, 2, &["gone-1"]).await;
    let res = t.next_result(30).await.result;
    assert_eq!((res.owner.as_str(), res.status.as_str()), ("model/gone-1", "completed"));
    assert!(!exists(&t, "gone-1").await);
    // Two workers, half-second intervals: at most one sweep per interval
    // between them, so three more sweeps after one take three intervals (two
    // sweeping each interval would take one and a half).
    let sweeps = || t.count("SELECT sweeps FROM reconcile_rules WHERE rule = 'models'");
    let first = sweeps().await;
    let from = std::time::Instant::now();
    wait_until("three more sweeps", Duration::from_secs(20), || async { sweeps().await >= first + 3 }).await;
    let took = from.elapsed();
    replica_token.cancel();
    let _ = replica.await;
    assert!(took >= Duration::from_millis(1200), "three sweeps in {took:?}: more than one per interval");
}

/// While reaper is paused no sweep acts: `--execute` is refused (exit 2,
/// saying why) and the schedule skips; a dry run still reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_reaper_executes_no_sweep_but_dry_runs_still_report() {
    let rule = RULE.replace("max_count = 5", "max_count = 5\nevery_secs = 0.2\nexecute_on_schedule = true")
        + "\n[worker]\npause_poll_ms = 50\n";
    let mut t = spawn_app(&rule).await;
    world(&t, 3, &["gone-1"]).await;
    t.app.ledger.pause("migration window", "test").await.unwrap();
    // A replica that runs the schedules, started paused (it reads the flag first).
    let (stop, replica, replica_app) = t.spawn_replica_with(|s| s.reconcile.run_schedules = true).await;
    let (code, _, err) = t.reconcile("models", &["--execute"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("reaper is paused") && err.contains("migration window"), "{err}");
    let (code, r, _) = t.reconcile("models", &[]);
    assert_eq!((code, r["actionable"].as_u64()), (0, Some(1)), "a dry run reports: {r}");
    assert!(exists(&t, "gone-1").await);
    assert!(replica_app.paused().is_some());
    assert_eq!(metric_total(&replica_app, "reaper_reconcile_runs_total"), 0.0, "the schedule ran no sweep");
    assert_eq!(t.count("SELECT count(*) FROM reconcile_rules").await, 0, "nor claimed one");
    t.app.ledger.resume().await.unwrap();
    let res = t.next_result(30).await.result;
    assert_eq!((res.owner.as_str(), res.status.as_str()), ("model/gone-1", "completed"), "resumed, the schedule acts");
    stop.cancel();
    let _ = replica.await;
}

/// A rule with a cron schedule (here every second, seconds first): two
/// replicas sweep each slot once between them, starting at the slot's time,
/// the claim being the slot rather than the time since the last start. A
/// rule with `enabled = false` stays configured and runs by hand; its
/// schedule never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_rule_sweeps_each_slot_once_across_replicas_and_a_disabled_rule_never() {
    let off = RULE
        .split("[reconcile.rules.models]")
        .nth(1)
        .unwrap()
        .replace("max_count = 5", "max_count = 5\nevery_secs = 0.2\nenabled = false");
    let rule = RULE
        .replace("max_count = 5", "max_count = 5\nschedule = \"* * * * * *\"\nexecute_on_schedule = true")
        .replace("min_interval_secs = 0.2", "min_interval_secs = 0.2\nrun_schedules = true")
        + "\n[reconcile.rules.models_off]"
        + &off;
    let started = Utc::now().timestamp();
    let mut t = spawn_app(&rule).await;
    let (replica_token, replica, replica_app) = t.spawn_replica().await;
    world_at_once(&t, 2, &[]).await;
    let runs = |a: &App| metric_total(a, "reaper_reconcile_runs_total");
    wait_until("five scheduled sweeps", Duration::from_secs(30), || async { runs(&t.app) + runs(&replica_app) >= 5.0 })
        .await;
    replica_token.cancel();
    let _ = replica.await;
    t.stop().await;
    let (slot, lag): (i64, f64) = sqlx::query_as(
        "SELECT extract(epoch FROM last_slot)::bigint, extract(epoch FROM last_started_at - last_slot)::float8 \
         FROM reconcile_rules WHERE rule = 'models'",
    )
    .fetch_one(t.app.ledger.pool())
    .await
    .unwrap();
    let (ran, slots) = (runs(&t.app) + runs(&replica_app), (slot - started + 1) as f64);
    let lines = |a: &App| {
        a.metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("reaper_reconcile_runs_total"))
            .map(str::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        ran <= slots,
        "{ran} sweeps in at most {slots} one-second slots: a slot ran twice\n{}\n{}",
        lines(&t.app),
        lines(&replica_app)
    );
    assert!((0.0..1.5).contains(&lag), "the last sweep started {lag}s after its slot's time");
    let never = t.count("SELECT count(*) FROM reconcile_rules WHERE rule = 'models_off'").await;
    assert_eq!(never, 0, "the disabled rule's schedule never ran");
    let (code, r, err) = t.reconcile("models_off", &[]);
    assert_eq!((code, r["copy"].as_u64()), (0, Some(2)), "a disabled rule runs by hand: {r} {err}");
    let out = t.reaper(&["reconcile"], &[]);
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(list.contains("cron * * * * * * (UTC), executes"), "{list}");
    assert!(list.contains("every 0.2s (disabled: by hand only)"), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_mongodb_inventory_touches_nothing() {
    // The truth lives in a MongoDB that does not answer; the copy is the table.
    let rule = RULE
        .replace(
            r#"truth = { provider = "gateway", request = "GET /gw/models", items = "/items", key = "/id", next = "/next" }"#,
            r#"truth = { provider = "content", collection = "models", key = "_id" }"#,
        )
        .replace(
            "[providers.appdb]",
            "[providers.content]\ntype = \"mongodb\"\nurl = \"mongodb://127.0.0.1:1/?directConnection=true&serverSelectionTimeoutMS=300\"\ndatabase = \"x\"\n\n[providers.appdb]",
        );
    let t = spawn_app(&rule).await;
    world(&t, 2, &["gone-1"]).await;
    let (code, _, err) = t.reconcile("models", &["--execute", "--force"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("truth inventory failed to load, so nothing was touched") && err.contains("mongodb"), "{err}");
    assert_eq!(models(&t).await, 3);
}

/// The other direction: resources in the cloud that nobody tracks. The truth
/// is reaper's own ledger (what provisioners tracked), the copy the cloud's list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_resources_nobody_tracks_are_found_against_the_ledger() {
    let rule = r#"
[reconcile.rules.untracked_vnis]
truth = { provider = "ledger", kind = "vni" }
copy = { provider = "cloud", request = "GET /v1/virtual_network_interfaces", items = "/items", key = "/id", next = "/next" }
action = { kind = "vni", owner = "untracked/{key}" }
max_fraction = 1.0
"#;
    let mut t = spawn_app(rule).await;
    let nodes: Vec<reaper::devtools::demo::VpcNode> =
        (0..3).map(|i| reaper::devtools::demo::VpcNode::new(&unique(&format!("n{i}")))).collect();
    for n in &nodes {
        t.provision(n).await;
    }
    // Created by a provisioner that crashed before its resource.tracked went out.
    t.sim.create("/v1/virtual_network_interfaces/leaked-vni", &[]);

    let (code, r, err) = t.reconcile("untracked_vnis", &["--execute"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!((r["truth"].as_u64(), r["copy"].as_u64(), r["published"].as_u64()), (Some(3), Some(4), Some(1)), "{r}");
    let res = t.next_result(30).await.result;
    assert_eq!((res.owner.as_str(), res.status.as_str()), ("untracked/leaked-vni", "completed"), "{res:?}");
    assert!(!t.sim.exists("/v1/virtual_network_interfaces/leaked-vni"));
    for n in &nodes {
        assert!(n.resources.iter().all(|r| t.sim.exists(&r.path)), "tracked resources are untouched");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truth_item_without_a_key_fails_the_load_instead_of_orphaning_its_counterpart() {
    let rule = RULE.replace(r#"key = "/id", next"#, r#"key = "/attributes/model_name", next"#);
    let t = spawn_app(&rule).await;
    t.sql(
        "CREATE TABLE models (id text PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT now() - interval '2 days')",
    )
    .await;
    t.sql("INSERT INTO models (id) VALUES ('a'), ('b'), ('c')").await;
    t.sim.create_with("/gw/models/a", json!({ "model_name": "a" }));
    t.sim.create_with("/gw/models/b", json!({ "model_name": "b" }));
    // The API renamed its field for this one: skipping it would make row c an orphan.
    t.sim.create_with("/gw/models/c", json!({ "name": "c" }));
    let (code, _, err) = t.reconcile("models", &["--execute", "--force"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("could not be matched"), "{err}");
    assert_eq!(models(&t).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_without_a_zone_are_read_as_utc() {
    let rule = r#"
[providers.appdb]
type = "postgres"
url = "{db_url}"

[kinds.job_row]
provider = "appdb"
delete = "DELETE FROM stale_jobs WHERE id = $1"

[reconcile.rules.stale]
copy = { provider = "appdb", sql = "SELECT id AS key, finished AS finished FROM stale_jobs", created_at = "finished" }
action = { kind = "job_row" }
grace_secs = 3600
"#;
    let t = spawn_app(rule).await;
    // A `timestamp` column holding UTC wall-clock times, on a session whose zone is far from UTC.
    t.sql("CREATE TABLE stale_jobs (id text PRIMARY KEY, finished timestamp NOT NULL)").await;
    t.sql("DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET timezone TO %L', current_database(), 'Pacific/Kiritimati'); END $$")
        .await;
    t.sql(
        "INSERT INTO stale_jobs VALUES ('old', (now() AT TIME ZONE 'UTC') - interval '2 hours'), \
                                        ('new', (now() AT TIME ZONE 'UTC') - interval '10 minutes')",
    )
    .await;
    let (code, r, err) = t.reconcile("stale", &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!((r["actionable"].as_u64(), r["too_young"].as_u64()), (Some(1), Some(1)), "{r}");
    assert_eq!(r["sample_actionable"], json!(["old"]));
}

/// Lists that are not whole, or not there: a 404 for the list, an API that
/// hands back a page token it sent before (a list that would never end, or
/// repeat), and a copy that comes back empty next to a full truth. Each is
/// refused, and nothing is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_that_are_missing_looping_or_empty_on_one_side_touch_nothing() {
    // The list is not there: 404 is a failed load, not an empty list.
    let t = spawn_app(&RULE.replace("GET /gw/models", "GET /gw/no_such_list")).await;
    world(&t, 3, &["gone-1"]).await;
    let (code, r, err) = t.reconcile("models", &["--execute", "--force"]);
    assert_eq!(code, 3, "{r} {err}");
    assert!(err.contains("truth inventory failed to load") && err.contains("404"), "{err}");
    assert_eq!(models(&t).await, 4);
    drop(t);

    // The API ignores the token it is sent back (the wrong parameter name), so
    // its second page is its first again, with the same token.
    let t = spawn_app(&RULE.replace(r#"next = "/next" }"#, r#"next = "/next", next_param = "cursor" }"#)).await;
    world(&t, 150, &["gone-1"]).await;
    let (code, r, err) = t.reconcile("models", &["--execute", "--force"]);
    assert_eq!(code, 3, "{r} {err}");
    assert!(err.contains("sent page token") && err.contains("twice"), "{err}");
    assert!(err.contains("cursor=live%2D0099"), "{err}");
    assert_eq!(models(&t).await, 151);
    drop(t);

    // The copy comes back empty while the truth holds three: refused, even forced.
    let mut t =
        spawn_app(&RULE.replace(
            "SELECT id AS key, created_at FROM models",
            "SELECT id AS key, created_at FROM models WHERE false",
        ))
        .await;
    world(&t, 3, &["gone-1"]).await;
    let (code, r, _) = t.reconcile("models", &["--execute", "--force"]);
    assert_eq!(code, 1, "{r}");
    assert!(r["refused"].as_str().unwrap().contains("copy inventory came back empty while the truth holds 3"), "{r}");
    assert_eq!(models(&t).await, 4);
    assert!(t.tap.next(Duration::from_millis(200)).await.is_none(), "no teardown was published");
}

/// A copy row without a key is left out (it cannot be matched, and a copy
/// item is only ever a candidate), counted by neither side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_item_without_a_key_is_left_out() {
    let t = spawn_app(&RULE.replace("SELECT id AS key,", "SELECT NULLIF(id, 'no-key') AS key,")).await;
    world(&t, 3, &["gone-1", "no-key"]).await;
    let (code, r, err) = t.reconcile("models", &[]);
    assert_eq!(code, 0, "{r} {err}");
    assert_eq!((r["copy"].as_u64(), r["orphans"].as_u64()), (Some(4), Some(1)), "{r}");
    assert_eq!(r["sample_actionable"], json!(["gone-1"]), "{r}");
}

/// Quarantine counts sweeps that completed: one whose inventory failed to
/// load advances nothing, so an orphan seen by two good sweeps with failures
/// between them is still waiting for its third.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sweeps_do_not_count_toward_the_quarantine() {
    let t = spawn_app(&RULE.replace("max_fraction = 0.5", "max_fraction = 1.0\nquarantine_sweeps = 3")).await;
    world(&t, 2, &["gone-1"]).await;
    let (_, r, _) = t.reconcile("models", &["--execute"]);
    assert_eq!((r["sweep"].as_i64(), r["in_quarantine"].as_u64()), (Some(1), Some(1)), "{r}");
    t.sim.set_faults(reaper::devtools::sim::Faults { fail_next: 1000, fail_status: 503, ..Default::default() });
    for _ in 0..2 {
        let (code, _, err) = t.reconcile("models", &["--execute"]);
        assert_eq!(code, 3, "{err}");
    }
    t.sim.set_faults(Default::default());
    let (_, r, _) = t.reconcile("models", &["--execute"]);
    assert_eq!(
        (r["sweep"].as_i64(), r["in_quarantine"].as_u64(), r["actionable"].as_u64()),
        (Some(2), Some(1), Some(0)),
        "the failed sweeps counted nothing: {r}"
    );
    assert!(exists(&t, "gone-1").await);
}

/// Grace runs from when reaper first saw an orphan that says nothing of its
/// age, not from the sweep that acts: seen now, it is too young now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_for_an_item_without_a_creation_time_counts_from_when_it_was_first_seen() {
    let rule = RULE
        .replace(
            r#"copy = { provider = "appdb", sql = "SELECT id AS key, created_at FROM models", created_at = "created_at" }"#,
            r#"copy = { provider = "appdb", sql = "SELECT id AS key FROM models" }"#,
        )
        .replace("max_fraction = 0.5", "max_fraction = 1.0\ngrace_secs = 1");
    assert!(!rule.contains("created_at = \"created_at\""));
    let mut t = spawn_app(&rule).await;
    world(&t, 2, &["gone-1"]).await;
    // (Only executed sweeps record when an orphan was first seen.)
    let first_seen = std::time::Instant::now();
    let (_, r, _) = t.reconcile("models", &["--execute"]);
    assert_eq!((r["too_young"].as_u64(), r["actionable"].as_u64()), (Some(1), Some(0)), "{r}");
    let mut r = Value::Null;
    wait_until("the orphan comes of age", Duration::from_secs(20), || {
        r = t.reconcile("models", &["--execute"]).1;
        let ready = r["published"].as_u64() == Some(1);
        async move { ready }
    })
    .await;
    assert!(first_seen.elapsed() >= Duration::from_secs(1), "acted on before its grace ran out: {r}");
    assert_eq!(t.next_result(30).await.result.owner, "model/gone-1");
}

/// Two sweeps of one rule never run at once: the second is refused as busy,
/// exit 3 from the CLI and 409 from the admin route, and touches nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_of_a_rule_already_being_swept_is_refused() {
    let file = std::env::temp_dir().join(format!("reaper-admin-{:08x}", fastrand::u32(..)));
    std::fs::write(&file, "busy-token-5d1").unwrap();
    let admin = format!("\n[admin]\ntoken_file = \"{}\"\n", file.display());
    let t = spawn_app(&format!("{RULE}{admin}")).await;
    let _ = std::fs::remove_file(&file);
    world(&t, 2, &["gone-1"]).await;
    // Another sweep holds the rule's lock, as a running sweep does.
    let mut other = t.app.ledger.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('reaper.reconcile'), hashtext('models'))")
        .execute(&mut *other)
        .await
        .unwrap();
    let (code, r, err) = t.reconcile("models", &["--execute", "--force"]);
    assert_eq!(code, 3, "{r} {err}");
    assert!(err.contains("another sweep of it is running"), "{err}");
    wait_until("the admin API listens", Duration::from_secs(10), || async { t.app.admin_addr.get().is_some() }).await;
    let url = format!("http://{}/v1/reconcile/models?execute=true", t.app.admin_addr.get().unwrap());
    let answer = reqwest::Client::new().post(url).bearer_auth("busy-token-5d1").send().await.unwrap();
    assert_eq!(answer.status(), 409);
    assert_eq!(models(&t).await, 3);
    other.rollback().await.unwrap();
    let (code, _, err) = t.reconcile("models", &[]);
    assert_eq!(code, 0, "free again: {err}");

    // The route's other answers: 503 when an inventory fails to load, 422
    // when a safety rule refuses; neither touches anything.
    let post = |u: String| reqwest::Client::new().post(u).bearer_auth("busy-token-5d1").send();
    let route = format!("http://{}/v1/reconcile/models", t.app.admin_addr.get().unwrap());
    t.sim.set_faults(reaper::devtools::sim::Faults { fail_next: 1000, fail_status: 503, ..Default::default() });
    let failed = post(format!("{route}?execute=true&force=true")).await.unwrap();
    assert_eq!(failed.status(), 503);
    assert!(failed.text().await.unwrap().contains("failed to load"));
    t.sim.set_faults(Default::default());
    for i in 0..2 {
        t.sim.remove(&format!("/gw/models/live-{i:04}"));
    }
    let refused = post(format!("{route}?execute=true&force=true")).await.unwrap();
    assert_eq!(refused.status(), 422);
    let report: Value = refused.json().await.unwrap();
    assert!(report["refused"].as_str().unwrap().contains("truth inventory came back empty"), "{report}");
    assert_eq!(models(&t).await, 3);
}

/// `reconcile.run_schedules = false` keeps a worker's schedules off: while
/// a replica with them on sweeps the rule again and again, this one never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_run_schedules_false_never_sweeps_on_schedule() {
    let rule = RULE.replace("max_count = 5", "max_count = 5\nevery_secs = 0.5");
    let t = spawn_app(&rule).await;
    assert!(!t.app.settings.reconcile.run_schedules, "the test's own worker has them off");
    let (replica_token, replica, replica_app) = t.spawn_replica_with(|s| s.reconcile.run_schedules = true).await;
    world_at_once(&t, 2, &[]).await;
    let runs = |app: &reaper::app::App| metric_total(app, "reaper_reconcile_runs_total");
    wait_until("the replica swept three times", Duration::from_secs(20), || async { runs(&replica_app) >= 3.0 }).await;
    assert_eq!(runs(&t.app), 0.0, "the worker with run_schedules = false swept");
    replica_token.cancel();
    let _ = replica.await;
}
