//! Rows in an application's own PostgreSQL database as resources: deleted by
//! configured SQL with every value bound, in dependency order.

use chrono::Utc;
use serde_json::json;

use crate::helpers::*;

const APP_KINDS: &str = r#"
[providers.appdb]
type = "postgres"
url = "{db_url}"

[kinds.deployment_row]
provider = "appdb"
delete = "DELETE FROM app_deployments WHERE id = $1 AND tenant = $2"
check = "SELECT 1 FROM app_deployments WHERE id = $1"
params = ["id", "attr.tenant"]

[kinds.model_row]
provider = "appdb"
delete = "DELETE FROM app_models WHERE id = $1"
check = "SELECT 1 FROM app_models WHERE id = $1"
after = ["deployment_row"]
"#;

async fn app_tables(t: &TestApp) {
    for sql in [
        "CREATE TABLE app_models (id text PRIMARY KEY, name text)",
        "CREATE TABLE app_deployments (id text PRIMARY KEY, tenant text NOT NULL, model_id text NOT NULL REFERENCES app_models (id))",
        "INSERT INTO app_models VALUES ('m1', 'llama'), ('m2', 'other')",
        "INSERT INTO app_deployments VALUES ('d1', 't1', 'm1')",
    ] {
        sqlx::query(sql).execute(t.app.ledger.pool()).await.unwrap();
    }
}

/// Tracks model m1 and its deployment d1 for `owner`, and waits until both are in the ledger.
async fn track_m1_and_d1(t: &TestApp, owner: &str) {
    t.publish("resource.tracked", &json!({"event_id": "a", "owner": owner, "kind": "model_row", "id": "m1"})).await;
    t.publish(
        "resource.tracked",
        &json!({"event_id": "b", "owner": owner, "kind": "deployment_row", "id": "d1", "attributes": {"tenant": "t1"}}),
    )
    .await;
    let owners = vec![owner.to_string()];
    wait_until("2 tracked", std::time::Duration::from_secs(20), || async {
        t.app.ledger.count_tracked(&owners).await.unwrap() >= 2
    })
    .await;
}

async fn count(t: &TestApp, table: &str) -> i64 {
    let sql = match table {
        "models" => "SELECT count(*) FROM app_models",
        _ => "SELECT count(*) FROM app_deployments",
    };
    sqlx::query_scalar(sql).fetch_one(t.app.ledger.pool()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_deleted_by_bound_sql_children_first_and_nothing_else_is_touched() {
    let mut t = spawn_app(APP_KINDS).await;
    app_tables(&t).await;
    // The order is read from the database: each row's delete is logged as it
    // happens, and a deployment's delete takes 300 ms. Without the foreign key
    // (which would refuse a model first and hide a wrong order behind a retry),
    // a model deleted at the same time as its deployment would be logged first.
    for sql in [
        "ALTER TABLE app_deployments DROP CONSTRAINT app_deployments_model_id_fkey",
        "CREATE TABLE deleted_log (seq serial, what text)",
        "CREATE FUNCTION log_delete() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
           IF TG_TABLE_NAME = 'app_deployments' THEN PERFORM pg_sleep(0.3); END IF;
           INSERT INTO deleted_log (what) VALUES (TG_TABLE_NAME || '/' || OLD.id); RETURN OLD; END $$",
        "CREATE TRIGGER log_model AFTER DELETE ON app_models FOR EACH ROW EXECUTE FUNCTION log_delete()",
        "CREATE TRIGGER log_deployment AFTER DELETE ON app_deployments FOR EACH ROW EXECUTE FUNCTION log_delete()",
    ] {
        t.sql(sql).await;
    }
    let owner = "model/m1";
    for (kind, id, attrs) in [("model_row", "m1", json!({})), ("deployment_row", "d1", json!({"tenant": "t1"}))] {
        t.publish(
            "resource.tracked",
            &json!({"event_id": format!("tr-{id}"), "owner": owner, "kind": kind, "id": id, "attributes": attrs}),
        )
        .await;
    }
    // A hostile id: if it were pasted into the SQL it would delete every model.
    t.publish(
        "resource.tracked",
        &json!({"event_id": "tr-evil", "owner": owner, "kind": "model_row", "id": "x' OR '1'='1"}),
    )
    .await;
    let owners = vec![owner.to_string()];
    wait_until("3 tracked", std::time::Duration::from_secs(20), || async {
        t.app.ledger.count_tracked(&owners).await.unwrap() >= 3
    })
    .await;

    let mut dry = deletion("sql-dry", owner, Utc::now());
    dry["dry_run"] = json!(true);
    t.publish("deletion.requested", &dry).await;
    let r = t.next_result(30).await.result;
    let outcomes: Vec<(&str, &str)> = r.resources.iter().map(|s| (s.id.as_str(), s.outcome.as_str())).collect();
    assert!(
        outcomes.contains(&("m1", "would_delete"))
            && outcomes.contains(&("d1", "would_delete"))
            && outcomes.contains(&("x' OR '1'='1", "already_gone")),
        "{outcomes:?}"
    );
    assert_eq!((count(&t, "models").await, count(&t, "deployments").await), (2, 1), "a dry run deletes nothing");

    t.publish("deletion.requested", &deletion("sql-del", owner, Utc::now())).await;
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "completed", "{r:?}");
    let order: Vec<String> =
        sqlx::query_scalar("SELECT what FROM deleted_log ORDER BY seq").fetch_all(t.app.ledger.pool()).await.unwrap();
    assert_eq!(order, ["app_deployments/d1", "app_models/m1"], "the deployment goes first");
    let by_id = |id: &str| r.resources.iter().find(|s| s.id == id).unwrap().outcome.clone();
    assert_eq!(
        (by_id("d1").as_str(), by_id("m1").as_str(), by_id("x' OR '1'='1").as_str()),
        ("deleted", "deleted", "already_gone")
    );
    assert_eq!(count(&t, "deployments").await, 0);
    let left: Vec<String> =
        sqlx::query_scalar("SELECT id FROM app_models").fetch_all(t.app.ledger.pool()).await.unwrap();
    assert_eq!(left, ["m2"], "only the owner's rows went");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_another_row_still_references_is_retried_as_not_yet_then_dead_lettered_untouched() {
    // A deployment that is not the owner's (d2) keeps the model referenced: the
    // foreign key refuses the delete (not yet), the job retries through the
    // broker, and is dead-lettered in the end with the model untouched.
    let kinds = APP_KINDS.replace("after = [\"deployment_row\"]\n", "");
    let mut t = spawn_app(&format!("{kinds}\n[worker]\nstep_attempts = 2\n")).await;
    app_tables(&t).await;
    sqlx::query("INSERT INTO app_deployments VALUES ('d2', 't1', 'm1')").execute(t.app.ledger.pool()).await.unwrap();
    let owner = "model/m1";
    track_m1_and_d1(&t, owner).await;
    t.publish("deletion.requested", &deletion("fk", owner, Utc::now())).await;
    // d2 is not ours and keeps m1 referenced: the model can never go.
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "dead_lettered", "{r:?}");
    let m1 = r.resources.iter().find(|s| s.id == "m1").unwrap();
    assert!(m1.error.as_deref().unwrap_or("").contains("dependency still exists"), "{m1:?}");
    // Retried: each run tried the step twice, and the job ran once per
    // retry delay (0.2 s, 0.4 s) and once more before it was given up.
    assert_eq!(m1.attempts, 2, "{m1:?}");
    assert_eq!(r.attempts, 3, "{r:?}");
    let (_, headers) = t.dead_headers(1).await.pop().unwrap();
    assert_eq!(headers.get("x-reaper-error-class").map(String::as_str), Some("exhausted"), "{headers:?}");
    assert_eq!(count(&t, "models").await, 2, "the referenced model is still there");
    t.stop().await;
}

/// The provisioner's own tables, as in the VPC field report, keyed by node name.
const LOOKUPS: &str = r#"
[providers.provisioner_db]
type = "postgres"
url = "{db_url}"

[kinds.ip_reservation]
lookup = { provider = "provisioner_db", owner_type = "node", sql = "SELECT reservation_id AS id, subnet_id FROM ip_reservations WHERE node_name = $1" }
[kinds.dns_record]
lookup = { provider = "provisioner_db", owner_type = "node", sql = "SELECT record_id AS id, zone_id FROM dns_records WHERE node_name = $1" }
[kinds.vni]
lookup = { provider = "provisioner_db", owner_type = "node", sql = "SELECT vnic_id AS id FROM vnic_info WHERE node_name = $1" }
[kinds.bare_metal_server]
lookup = { provider = "provisioner_db", owner_type = "node", sql = "SELECT bare_metal_id AS id FROM nodes WHERE node_name = $1 AND bare_metal_id IS NOT NULL" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_found_in_the_provisioners_tables_are_torn_down_in_order_without_any_track() {
    let mut t = spawn_app(LOOKUPS).await;
    let name = unique("node");
    let node = reaper::devtools::demo::VpcNode::new(&name);
    node.create_in(&t.sim);
    let pool = t.app.ledger.pool();
    for sql in [
        "CREATE TABLE ip_reservations (id serial PRIMARY KEY, node_name text, reservation_id text, subnet_id text)",
        "CREATE TABLE dns_records (id serial PRIMARY KEY, node_name text, record_id text, zone_id text)",
        "CREATE TABLE vnic_info (id serial PRIMARY KEY, node_name text, vnic_id text)",
        "CREATE TABLE nodes (id serial PRIMARY KEY, node_name text, bare_metal_id text)",
    ] {
        sqlx::query(sql).execute(pool).await.unwrap();
    }
    for r in &node.resources {
        let q = match r.kind {
            "ip_reservation" => {
                sqlx::query("INSERT INTO ip_reservations (node_name, reservation_id, subnet_id) VALUES ($1, $2, $3)")
                    .bind(&name)
                    .bind(&r.id)
                    .bind(&r.attributes["subnet_id"])
            }
            "dns_record" => sqlx::query("INSERT INTO dns_records (node_name, record_id, zone_id) VALUES ($1, $2, $3)")
                .bind(&name)
                .bind(&r.id)
                .bind(&r.attributes["zone_id"]),
            "vni" => sqlx::query("INSERT INTO vnic_info (node_name, vnic_id) VALUES ($1, $2)").bind(&name).bind(&r.id),
            _ => sqlx::query("INSERT INTO nodes (node_name, bare_metal_id) VALUES ($1, $2)").bind(&name).bind(&r.id),
        };
        q.execute(pool).await.unwrap();
    }
    // A node of the same pool that must be left alone.
    sqlx::query("INSERT INTO vnic_info (node_name, vnic_id) VALUES ('someone-else', 'their-vni')")
        .execute(pool)
        .await
        .unwrap();
    t.sim.create("/v1/virtual_network_interfaces/their-vni", &[]);

    // No resource.tracked at all: the provisioner died before it could send any.
    t.publish("provisioning.failed", &serde_json::json!({"event_id": "pf-lookup", "owner": node.owner, "failed_step": "boot", "occurred_at": Utc::now().to_rfc3339()})).await;
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "completed", "{r:?}");
    assert_eq!(r.resources.len(), 5, "{:?}", r.resources);
    assert!(r.resources.iter().all(|s| s.outcome == "deleted"), "{:?}", r.resources);
    assert_eq!(t.sim.paths(), ["/v1/virtual_network_interfaces/their-vni"], "only the other node's VNI is left");
    assert_eq!(t.sim.stats().refused_for_order, 0);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_that_fails_stops_the_job_before_anything_is_deleted() {
    // The table does not exist: the inventory cannot load, so nothing may act on half of it.
    let lookups = LOOKUPS.replace(
        "SELECT vnic_id AS id FROM vnic_info",
        "SELECT vnic_id AS id, created_at::text AS created_at FROM vnic_info",
    );
    let mut t = spawn_app(&format!("{lookups}\n[worker]\nretry_delays_secs = [0.1]\n")).await;
    let node = reaper::devtools::demo::VpcNode::new(&unique("node"));
    t.provision(&node).await;
    t.publish("deletion.requested", &deletion("lookup-broken", &node.owner, Utc::now())).await;
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "dead_lettered", "{r:?}");
    assert!(r.reason.as_deref().unwrap_or("").contains("lookup for"), "{r:?}");
    assert_eq!(t.sim.stats().deletes, 0, "nothing was deleted");

    // The tables are there now, with two VNIs of the node nobody tracked: one
    // made before the deletion (this life's), one nothing dates. A replay's
    // lookups find both; strict, it claims the first and leaves the second
    // for the owner's next teardown (it may be a new life's). The preview
    // says what the replay will do, and the replay does that.
    let name = node.owner.trim_start_matches("node/");
    for sql in [
        "CREATE TABLE ip_reservations (id serial PRIMARY KEY, node_name text, reservation_id text, subnet_id text)",
        "CREATE TABLE dns_records (id serial PRIMARY KEY, node_name text, record_id text, zone_id text)",
        "CREATE TABLE vnic_info (id serial PRIMARY KEY, node_name text, vnic_id text, created_at timestamptz)",
        "CREATE TABLE nodes (id serial PRIMARY KEY, node_name text, bare_metal_id text)",
    ] {
        t.sql(sql).await;
    }
    sqlx::query(
        "INSERT INTO vnic_info (node_name, vnic_id, created_at) VALUES ($1, 'dated-vni', now() - interval '1 hour'),
                                                                       ($1, 'undated-vni', NULL)",
    )
    .bind(name)
    .execute(t.app.ledger.pool())
    .await
    .unwrap();
    let out = t.reaper(&["replay", "--owner", &node.owner, "--dry-run"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("its lookups have not run yet"), "{text}");
    assert!(text.contains("its lookups find now, and it would delete: vni/dated-vni"), "{text}");
    assert!(text.contains("its lookups find, but it would leave (not of this life): vni/undated-vni"), "{text}");
    for vni in ["dated-vni", "undated-vni"] {
        t.sim.create(&format!("/v1/virtual_network_interfaces/{vni}"), &[]);
    }
    let out = t.reaper(&["replay", "--owner", &node.owner], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "completed", "{r:?}");
    assert!(r.resources.iter().any(|s| s.id == "dated-vni" && s.outcome == "deleted"), "{:?}", r.resources);
    assert!(r.resources.iter().all(|s| s.id != "undated-vni"), "{:?}", r.resources);
    assert_eq!(t.sim.paths(), ["/v1/virtual_network_interfaces/undated-vni"], "what the preview said stays, stayed");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_that_cannot_be_asked_counts_as_in_use_and_nothing_of_the_owner_is_deleted() {
    // The guard's table does not exist: "in use" cannot be ruled out, so the
    // model and its deployment (which has no guard) both stay.
    let kinds = APP_KINDS.replace(
        "after = [\"deployment_row\"]\n",
        "after = [\"deployment_row\"]\nguard = { provider = \"appdb\", query = \"SELECT 1 FROM no_such_serving WHERE model_id = $1\" }\n",
    );
    let mut t = spawn_app(&kinds).await;
    app_tables(&t).await;
    let owner = "model/m1";
    track_m1_and_d1(&t, owner).await;
    t.publish("deletion.requested", &deletion("guard-broken", owner, Utc::now())).await;
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "dead_lettered", "{r:?}");
    assert!(r.resources.iter().all(|s| s.outcome == "blocked"), "{:?}", r.resources);
    let m1 = r.resources.iter().find(|s| s.id == "m1").unwrap();
    assert!(m1.error.as_deref().unwrap().contains("the guard could not be checked"), "{m1:?}");
    assert!(r.reason.as_deref().unwrap().contains("model_row/m1 blocked"), "{r:?}");
    assert_eq!((count(&t, "models").await, count(&t, "deployments").await), (2, 1), "nothing was deleted");
    let dead = t.dead_wait(1).await;
    assert!(dead[0].1.contains("blocked"), "{:?}", dead[0].1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mongodb_lookup_that_cannot_reach_its_server_stops_the_job_before_anything_is_deleted() {
    let lookup = r#"
[providers.docs]
type = "mongodb"
url = "mongodb://127.0.0.1:1/?directConnection=true&serverSelectionTimeoutMS=200"
database = "x"

[kinds.vni]
lookup = { provider = "docs", owner_type = "node", collection = "vnics", filter = '{"node": "{owner_id}"}', id_field = "vnic_id" }

[worker]
retry_delays_secs = [0.1]
"#;
    let mut t = spawn_app(lookup).await;
    let node = reaper::devtools::demo::VpcNode::new(&unique("node"));
    t.provision(&node).await;
    t.publish("deletion.requested", &deletion("mongo-lookup-down", &node.owner, Utc::now())).await;
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "dead_lettered", "{r:?}");
    assert!(r.reason.as_deref().unwrap_or("").contains("lookup for vni failed"), "{r:?}");
    assert_eq!(t.sim.stats().deletes, 0, "nothing was deleted");
    t.stop().await;
}

/// A row held locked by another transaction (an application's long
/// transaction, a stuck migration): the step used to wait forever while the
/// heartbeat kept the owner leased. Now the provider's lock timeout ends the
/// statement, the step fails as transient, the job retries through its
/// schedule and is dead-lettered as `exhausted`; replayed once the lock is
/// gone, it completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_locked_by_another_transaction_fails_the_step_in_time_instead_of_hanging_it() {
    let kinds = APP_KINDS.replace(
        "[providers.appdb]\ntype = \"postgres\"\nurl = \"{db_url}\"\n",
        "[providers.appdb]\ntype = \"postgres\"\nurl = \"{db_url}\"\nlock_timeout_ms = 300\n",
    );
    assert!(kinds.contains("lock_timeout_ms = 300"));
    let mut t = spawn_app(&kinds).await;
    app_tables(&t).await;
    let owner = "model/m2";
    t.publish("resource.tracked", &json!({"event_id": "lk", "owner": owner, "kind": "model_row", "id": "m2"})).await;
    let owners = vec![owner.to_string()];
    wait_until("tracked", std::time::Duration::from_secs(20), || async {
        t.app.ledger.count_tracked(&owners).await.unwrap() >= 1
    })
    .await;
    let mut holder = t.app.ledger.pool().begin().await.unwrap();
    sqlx::query("SELECT * FROM app_models WHERE id = 'm2' FOR UPDATE").execute(&mut *holder).await.unwrap();

    t.publish("deletion.requested", &deletion("locked", owner, Utc::now())).await;
    let r = t.next_result(30).await.result;
    assert_eq!(r.status, "dead_lettered", "{r:?}");
    let why = r.reason.clone().unwrap_or_default();
    assert!(why.contains("out of retries") && why.contains("lock"), "the reason names the lock: {why}");
    assert_eq!(count(&t, "models").await, 2, "nothing was deleted under the lock");

    holder.rollback().await.unwrap();
    let out = t.reaper(&["replay", "--owner", owner], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = t.next_result(30).await.result;
    assert_eq!((r.status.as_str(), r.resources[0].outcome.as_str()), ("completed", "deleted"), "{r:?}");
    assert_eq!(count(&t, "models").await, 1);
    t.stop().await;
}
