//! The five examples under examples/, each run end to end with its own config
//! and schema against real PostgreSQL, RabbitMQ, a MongoDB-wire server and the
//! simulated services, in the shapes the field reports describe.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::Utc;
use mongodb::bson::{doc, oid::ObjectId, Document};
use reaper::devtools::sim::ListShape;
use serde_json::json;

use crate::helpers::*;

async fn setup(name: &str) -> TestApp {
    spawn_example(name).await
}

/// Results until `n` arrived, by owner.
async fn results(t: &mut TestApp, n: usize) -> Vec<reaper::contract::TeardownResult> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(t.next_result(60).await.result);
    }
    out.sort_by(|a, b| a.owner.cmp(&b.owner));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_registry_sync() {
    let mut t = setup("model-registry-sync").await;
    // LiteLLM's own shape: {"data": [...]}, keyed by model_info.id.
    t.sim.set_list_shape("/model/info", ListShape::Data, 1000);
    for m in ["granite-8b-code-instruct", "mistral-7b-instruct", "llama-13b"] {
        t.sim.create_with(
            &format!("/model/info/{m}"),
            json!({ "model_name": format!("openai/{m}"), "litellm_params": { "model": m }, "model_info": { "id": m, "db_model": true } }),
        );
    }

    // Found 3 models in LiteLLM, 5 in the backend: 2 orphaned.
    let (code, r, err) = t.reconcile("backend_models", &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!((r["truth"].as_u64(), r["copy"].as_u64(), r["actionable"].as_u64()), (Some(3), Some(5), Some(2)), "{r}");
    assert_eq!(r["sample_actionable"], json!(["old-model-1", "old-model-2"]));

    let (code, r, _) = t.reconcile("backend_models", &["--execute"]);
    assert_eq!((code, r["published"].as_u64()), (0, Some(2)), "{r}");
    let done = results(&mut t, 2).await;
    assert!(done.iter().all(|d| d.status == "completed" && d.resources[0].outcome == "deleted"), "{done:?}");
    console_renders(&t, &done[0].owner, Some(done[0].job_id)).await;
    let left: Vec<String> =
        sqlx::query_scalar("SELECT id FROM models ORDER BY id").fetch_all(t.app.ledger.pool()).await.unwrap();
    assert_eq!(left, ["granite-8b-code-instruct", "llama-13b", "mistral-7b-instruct"]);

    // The second run: no cleanup needed.
    let out = t.reaper(&["reconcile", "backend_models", "--execute"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("no cleanup needed"), "{text}");
    let out = t.reaper(&["status", "--json"], &[]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rule = &status["reconcile"]["backend_models"];
    assert_eq!(
        (rule["sweeps"].as_i64(), rule["last_report"]["outcome"].as_str()),
        (Some(2), Some("nothing_to_do")),
        "{status}"
    );

    // An admin removes llama-13b from LiteLLM: `reaper run`'s hourly
    // schedule sweeps at start-up and removes its backend row.
    t.sim.remove("/model/info/llama-13b");
    let (stop, replica, _) = t.spawn_replica_with(|s| s.reconcile.run_schedules = true).await;
    let r = t.next_result(60).await.result;
    assert_eq!((r.owner.as_str(), r.status.as_str()), ("model/llama-13b", "completed"), "{r:?}");
    stop.cancel();
    let _ = replica.await;
    assert_eq!(t.count("SELECT count(*) FROM models").await, 2);
    assert_eq!(t.sim.stats().unauthorized, 0, "every request carried the master key");
    t.sim.create_with(
        "/model/info/llama-13b",
        json!({ "model_name": "openai/llama-13b", "model_info": { "id": "llama-13b", "db_model": true } }),
    );
    t.sql("INSERT INTO models (id, provider) VALUES ('llama-13b', 'vllm')").await;

    // An admin deleted a model by mistake: its row comes back from the archive.
    let out = t.reaper(&["restore", &done[0].job_id.to_string()], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(t.count("SELECT count(*) FROM models WHERE id = 'old-model-1'").await, 1);
    t.sql("DELETE FROM models WHERE id = 'old-model-1'").await;
    // Archives past archive.retention_days are purged.
    t.sql("UPDATE archived_records SET archived_at = now() - interval '31 days' WHERE resource_id = 'old-model-2'")
        .await;
    assert_eq!(t.app.ledger.purge_archive(t.app.settings.archive.retention_days).await.unwrap(), 1);
    assert_eq!(t.count("SELECT count(*) FROM archived_records WHERE resource_id LIKE 'old-model-%'").await, 1);

    // The gateway answers an empty list: nothing is deleted.
    for m in ["granite-8b-code-instruct", "mistral-7b-instruct", "llama-13b"] {
        t.sim.remove(&format!("/model/info/{m}"));
    }
    let (code, r, _) = t.reconcile("backend_models", &["--execute", "--force"]);
    assert_eq!((code, r["outcome"].as_str()), (1, Some("refused")), "{r}");
    assert_eq!(t.count("SELECT count(*) FROM models").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ml_model_registry() {
    let mut t = setup("ml-model-registry").await;
    let base = "/v1/projects/b2b-recs/locations/europe-central2/models";
    // Vertex AI's shape, two models a page so the page token goes back and forth.
    t.sim.set_list_shape(base, ListShape::PageToken, 2);
    for (id, name, bucket) in [
        ("5241525861236080640", "chern_retriv_v2", "training"),
        ("8920403806844354560", "chern_retriv_v5", "training"),
        ("7334503419312340992", "chern_retriv_v6", "training"),
        ("2864962264123834368", "chern_rank_v3", "training"),
        ("3326581225929310208", "chern_rank_v4", "training"),
        ("174413330490851328", "chern_hybrid_v1", "training"),
        ("7115797362408161280", "chern_hybrid_v3", "training"),
        ("252311530295525376", "trd-test-20260129-123106", "quicktest"),
        ("4998894431311495168", "trd-test-20260129-123928", "quicktest"),
    ] {
        t.sim.create_with(
            &format!("{base}/{id}"),
            json!({
                "name": format!("projects/b2b-recs/locations/europe-central2/models/{id}"),
                "displayName": name,
                "artifactUri": format!("gs://b2b-recs-{bucket}-artifacts/{name}/pushed_model"),
                "versionId": "1",
            }),
        );
    }

    // chern_rank_v1's model answers NOT_FOUND: its record goes.
    let (code, r, err) = t.reconcile("records_missing_in_registry", &["--execute"]);
    assert_eq!((code, r["actionable"].as_u64()), (0, Some(1)), "{r} {err}");
    let d = t.next_result(60).await.result;
    assert_eq!((d.status.as_str(), d.resources[0].id.as_str()), ("completed", "3"), "{d:?}");

    // Never registered and older than 7 days: 5 and 7 go; 11 is 2 days old;
    // 12's training run is still running, so the guard blocks it.
    let (code, r, _) = t.reconcile("records_never_registered", &["--execute"]);
    assert_eq!((code, r["actionable"].as_u64(), r["too_young"].as_u64()), (0, Some(3), Some(1)), "{r}");
    let done = results(&mut t, 3).await;
    let by_id = |id: &str| done.iter().find(|d| d.resources[0].id == id).unwrap_or_else(|| panic!("{id}: {done:?}"));
    assert_eq!(by_id("5").status, "completed");
    assert_eq!(by_id("7").status, "completed");
    let blocked = by_id("12");
    assert_eq!((blocked.status.as_str(), blocked.resources[0].outcome.as_str()), ("dead_lettered", "blocked"));
    assert!(
        blocked.reason.as_deref().unwrap().contains("a linked training run is still pending or running"),
        "{blocked:?}"
    );
    let ids: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM registered_model ORDER BY id").fetch_all(t.app.ledger.pool()).await.unwrap();
    assert_eq!(ids, [1, 2, 4, 6, 8, 9, 10, 11, 12]);
    assert_eq!(t.count("SELECT count(*) FROM training_schedule").await, 0, "cascaded with record 5");

    // The other way: test models with no record; one still serves traffic.
    let (code, r, _) = t.reconcile("registry_models_without_record", &["--execute"]);
    assert_eq!((code, r["excluded"].as_u64(), r["actionable"].as_u64()), (0, Some(7), Some(2)), "{r}");
    let done = results(&mut t, 2).await;
    let gone = done.iter().find(|d| d.resources[0].id == "252311530295525376").unwrap();
    assert_eq!(gone.status, "completed");
    let kept = done.iter().find(|d| d.resources[0].id == "4998894431311495168").unwrap();
    assert_eq!((kept.status.as_str(), kept.resources[0].outcome.as_str()), ("dead_lettered", "blocked"));
    assert!(kept.reason.as_deref().unwrap().contains("an active deployment serves this model"));
    assert!(!t.sim.exists(&format!("{base}/252311530295525376")));
    assert!(t.sim.exists(&format!("{base}/4998894431311495168")));
    assert_eq!(t.sim.paths().len(), 8, "the seven legitimate models and the deployed test model stay");
    assert!(t.sim.exists(&format!("{base}/3326581225929310208")), "deployed, and recorded: untouched");

    // Later sweeps do not request record 12 again (no new job, no new dead letter): that is replay's job.
    let (code, r, _) = t.reconcile("records_never_registered", &["--execute"]);
    assert_eq!(
        (code, r["actionable"].as_u64(), r["already_requested"].as_u64(), r["published"].as_u64()),
        (0, Some(1), Some(1), Some(0)),
        "{r}"
    );

    // The run finished: replaying the blocked job deletes record 12.
    t.sql("UPDATE training_run SET status = 'failed' WHERE id = 102").await;
    let out = t.reaper(&["replay", "--job", &blocked.job_id.to_string()], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let again = t.next_result(60).await.result;
    assert_eq!((again.job_id, again.status.as_str()), (blocked.job_id, "completed"), "{again:?}");
    assert_eq!(t.count("SELECT count(*) FROM registered_model WHERE id = 12").await, 0);

    // `reaper run`: the daily schedule sweeps at start-up and executes, as
    // the example says. A record abandoned eight days ago goes; 11 is young.
    t.sql("INSERT INTO registered_model VALUES (13, 'chern_rank_v6', '', now() - interval '8 days')").await;
    let (stop, replica, _) = t.spawn_replica_with(|s| s.reconcile.run_schedules = true).await;
    let r = t.next_result(60).await.result;
    assert_eq!((r.owner.as_str(), r.status.as_str()), ("registered_model/13", "completed"), "{r:?}");
    console_renders(&t, &r.owner, Some(r.job_id)).await;
    stop.cancel();
    let _ = replica.await;
    let ids: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM registered_model ORDER BY id").fetch_all(t.app.ledger.pool()).await.unwrap();
    assert_eq!(ids, [1, 2, 4, 6, 8, 9, 10, 11]);
    assert_eq!(t.sim.stats().unauthorized, 0, "every request carried the registry token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_db_mongodb() {
    let mut t = setup("cross-db-mongodb").await;
    let bayit = t.mongo("bayit").await;
    let olorin = t.mongo("olorin_platform").await;
    let contents: Vec<ObjectId> = (0..5).map(|_| ObjectId::new()).collect();
    let deleted_content = contents[0].to_hex();
    let never_announced = ObjectId::new().to_hex();
    // Content soft-deleted in Bayit+ (deleted_at set): it counts as gone.
    let soft_deleted = ObjectId::new();
    bayit
        .collection::<Document>("contents")
        .insert_many(
            contents
                .iter()
                .map(|id| doc! { "_id": id, "title": "x", "deleted_at": null })
                .chain([doc! { "_id": soft_deleted, "title": "gone", "deleted_at": mongodb::bson::DateTime::now() }]),
        )
        .await
        .unwrap();
    bayit.collection::<Document>("live_channels").insert_one(doc! { "_id": "ch-1" }).await.unwrap();
    bayit
        .collection::<Document>("integration_partners")
        .insert_many([
            doc! { "partner_id": "p1", "status": "active" },
            doc! { "partner_id": "p2", "status": "suspended" },
        ])
        .await
        .unwrap();
    let emb = olorin.collection::<Document>("content_embeddings");
    let mut docs: Vec<Document> = (0..2500)
        .map(|i| doc! { "content_id": &deleted_content, "embedding_type": "title", "n": i, "embedding": [0.1, 0.2], "model": { "name": "e5", "dim": 2 } })
        .collect();
    for c in &contents[1..] {
        docs.extend((0..10).map(|i| doc! { "content_id": c.to_hex(), "n": i }));
    }
    docs.extend((0..30).map(|i| doc! { "content_id": &never_announced, "n": i }));
    docs.extend((0..3).map(|i| doc! { "content_id": soft_deleted.to_hex(), "n": i }));
    emb.insert_many(docs).await.unwrap();
    olorin
        .collection::<Document>("recap_sessions")
        .insert_many([doc! { "channel_id": "ch-1" }, doc! { "channel_id": "ch-9" }, doc! { "channel_id": "ch-9" }])
        .await
        .unwrap();
    olorin
        .collection::<Document>("dubbing_sessions")
        .insert_many([doc! { "partner_id": "p1", "deleted_at": null }, doc! { "partner_id": "p2", "deleted_at": null }])
        .await
        .unwrap();

    // The content service deletes content A: its 2500 embeddings go, in batches of 1000.
    let owner = format!("content/{deleted_content}");
    t.publish("deletion.requested", &deletion("del-content-a", &owner, Utc::now())).await;
    let r = t.next_result(60).await.result;
    assert_eq!(r.status, "completed", "{r:?}");
    assert_eq!(r.resources.len(), 1, "one resource per content id, however many documents: {r:?}");
    assert_eq!(emb.count_documents(doc! { "content_id": &deleted_content }).await.unwrap(), 0);
    assert_eq!(emb.count_documents(doc! {}).await.unwrap(), 40 + 30 + 3, "the others are untouched");
    let archived = t.count("SELECT count(*) FROM archived_records").await;
    assert_eq!(archived, 2500, "every document archived before it was deleted");

    // Reconcile finds the embeddings no event announced.
    let (code, rep, err) = t.reconcile("orphan_embeddings", &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        (rep["truth"].as_u64(), rep["copy"].as_u64(), rep["actionable"].as_u64()),
        (Some(5), Some(6), Some(2)),
        "{rep}"
    );
    let mut want = vec![never_announced.clone(), soft_deleted.to_hex()];
    want.sort();
    assert_eq!(rep["sample_actionable"], json!(want));
    // `reaper run`: the daily schedule sweeps at start-up and executes.
    let (stop, replica, _) = t.spawn_replica_with(|s| s.reconcile.run_schedules = true).await;
    let done = results(&mut t, 2).await;
    stop.cancel();
    let _ = replica.await;
    assert!(done.iter().all(|r| r.status == "completed"), "{done:?}");
    console_renders(&t, &done[0].owner, Some(done[0].job_id)).await;
    let owners: Vec<&str> = done.iter().map(|r| r.owner.as_str()).collect();
    let mut want_owners = vec![format!("content/{never_announced}"), format!("content/{}", soft_deleted.to_hex())];
    want_owners.sort();
    assert_eq!(owners, want_owners);
    assert_eq!(emb.count_documents(doc! {}).await.unwrap(), 40);

    let (_, rep, _) = t.reconcile("orphan_recaps", &["--execute"]);
    assert_eq!(rep["published"], json!(1), "{rep}");
    assert_eq!(t.next_result(60).await.result.status, "completed");
    let recaps: Vec<String> = olorin
        .collection::<Document>("recap_sessions")
        .distinct("channel_id", doc! {})
        .await
        .unwrap()
        .into_iter()
        .filter_map(|b| b.as_str().map(str::to_string))
        .collect();
    assert_eq!(recaps, ["ch-1"]);

    // A suspended partner's sessions are soft-deleted, not removed.
    let (_, rep, _) = t.reconcile("orphan_dubbing", &["--execute"]);
    assert_eq!((rep["actionable"].as_u64(), rep["published"].as_u64()), (Some(1), Some(1)), "{rep}");
    assert_eq!(t.next_result(60).await.result.status, "completed");
    let dubbing = olorin.collection::<Document>("dubbing_sessions");
    assert_eq!(dubbing.count_documents(doc! {}).await.unwrap(), 2);
    let p2 = dubbing.find_one(doc! { "partner_id": "p2" }).await.unwrap().unwrap();
    assert!(matches!(p2.get("deleted_at"), Some(mongodb::bson::Bson::DateTime(_))), "{p2:?}");
    let (_, rep, _) = t.reconcile("orphan_dubbing", &[]);
    assert_eq!(rep["orphans"], json!(0), "{rep}");

    // Content A comes back: so do its embeddings, from the archive.
    let out = t.reaper(&["restore", &r.job_id.to_string(), "--json"], &[]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(report["restored"], json!(2500), "{report} {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(emb.count_documents(doc! { "content_id": &deleted_content }).await.unwrap(), 2500);
    let one = emb.find_one(doc! { "content_id": &deleted_content, "n": 7 }).await.unwrap().unwrap();
    assert_eq!(one.get_array("embedding").unwrap().len(), 2, "the document came back whole: {one:?}");
    let keys: Vec<&str> = one.keys().map(|k| k.as_str()).collect();
    assert_eq!(keys, ["_id", "content_id", "embedding_type", "n", "embedding", "model"], "field order kept");
    // An embedded document matches by equality only with its fields in the same order.
    let exact = emb
        .count_documents(doc! { "content_id": &deleted_content, "model": { "name": "e5", "dim": 2 } })
        .await
        .unwrap();
    assert_eq!(exact, 2500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ghost_containers() {
    let mut t = setup("ghost-containers").await;
    // Proxmox's shape: {"data": [{"vmid": 101, ...}]}, vmid a number.
    t.sim.set_list_shape("/api2/json/nodes/pve/lxc", ListShape::Data, 1000);
    for vmid in 101..=107 {
        t.sim.create_with(&format!("/api2/json/nodes/pve/lxc/{vmid}"), json!({ "vmid": vmid, "status": "running" }));
    }

    // Proxmox cannot be reached: nothing is touched.
    t.sim.set_faults(reaper::devtools::sim::Faults { fail_next: 100, fail_status: 502, ..Default::default() });
    let (code, _, err) = t.reconcile("ghost_apps", &["--execute", "--force"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("truth inventory failed to load"), "{err}");
    assert_eq!(t.count("SELECT count(*) FROM apps").await, 49);
    t.sim.set_faults(Default::default());

    // 41 of 49 rows is over half: the dry run says --execute would be refused...
    let (code, r, _) = t.reconcile("ghost_apps", &[]);
    assert_eq!(
        (code, r["orphans"].as_u64(), r["too_young"].as_u64(), r["actionable"].as_u64()),
        (1, Some(42), Some(1), Some(41)),
        "{r}"
    );
    assert_eq!(r["outcome"], json!("refused"));
    // ...and it is, until an operator who has looked forces it.
    let (code, r, _) = t.reconcile("ghost_apps", &["--execute"]);
    assert_eq!((code, r["outcome"].as_str()), (1, Some("refused")), "{r}");
    assert_eq!(t.count("SELECT count(*) FROM apps").await, 49);
    let (code, r, _) = t.reconcile("ghost_apps", &["--execute", "--force"]);
    assert_eq!((code, r["published"].as_u64()), (0, Some(41)), "{r}");
    let done = results(&mut t, 41).await;
    console_renders(&t, &done[0].owner, Some(done[0].job_id)).await;
    assert!(done.iter().all(|d| d.status == "completed"), "{:?}", done.iter().find(|d| d.status != "completed"));
    let left: BTreeSet<i32> = sqlx::query_scalar("SELECT lxc_id FROM apps")
        .fetch_all(t.app.ledger.pool())
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(left, (101..=107).chain([190]).collect(), "the deploying row is inside its grace period");

    // The ghost's id, hostname and ports are free again: a deployment takes them.
    t.sql("INSERT INTO apps (lxc_id, hostname, public_port, internal_port, status, created_at, updated_at) VALUES (140, 'app-140', 20140, 30140, 'deploying', now(), now())")
        .await;

    // `reaper run` with the example's schedules: both rules sweep at start-up
    // and execute. Row 107 is in `error` for two days, but its container
    // runs: removing the row would free an id and hostname in use, so the
    // guard blocks it.
    const GHOST_SWEEPS: &str = "SELECT sweeps FROM reconcile_rules WHERE rule = 'ghost_apps'";
    let before = t.count(GHOST_SWEEPS).await;
    let (stop, replica, _) = t.spawn_replica_with(|s| s.reconcile.run_schedules = true).await;
    let r = t.next_result(60).await.result;
    assert_eq!(
        (r.owner.as_str(), r.status.as_str(), r.resources[0].outcome.as_str()),
        ("app/107", "dead_lettered", "blocked"),
        "{r:?}"
    );
    assert!(r.reason.as_deref().unwrap_or_default().contains("its container still exists in Proxmox"), "{r:?}");
    wait_until("the schedule's ghost_apps sweep", Duration::from_secs(30), || async {
        t.count(GHOST_SWEEPS).await > before
    })
    .await;
    stop.cancel();
    let _ = replica.await;
    assert_eq!(t.count("SELECT count(*) FROM apps WHERE lxc_id IN (107, 140, 190)").await, 3, "all in use");
    // Results go out at least once: the replica's shutdown flush may send
    // 107's again (the same job), but no other teardown ran.
    while let Some(o) = t.tap.next(Duration::from_millis(300)).await {
        assert_eq!(o.result.job_id, r.job_id, "nothing else was torn down: {:?}", o.result);
    }
    assert_eq!(t.sim.stats().unauthorized, 0, "every request carried the PVEAPIToken header");

    // Once the container is destroyed, the replay removes the row.
    t.sim.remove("/api2/json/nodes/pve/lxc/107");
    let out = t.reaper(&["replay", "--job", &r.job_id.to_string()], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(t.next_result(60).await.result.status, "completed");
    assert_eq!(t.count("SELECT count(*) FROM apps WHERE lxc_id = 107").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vpc_node() {
    let mut t = setup("vpc-node").await;
    let stuck = reaper::devtools::demo::VpcNode::new(&unique("stuck"));
    let recent = reaper::devtools::demo::VpcNode::new(&unique("recent"));
    let deleted = reaper::devtools::demo::VpcNode::new(&unique("deleted"));
    for (node, status, age_h) in [(&stuck, "failed", 30), (&recent, "failed", 2), (&deleted, "deleting", 0)] {
        node.create_in(&t.sim);
        let name = node.owner.trim_start_matches("node/");
        let mut server = None;
        for r in &node.resources {
            let q = match r.kind {
                "ip_reservation" => sqlx::query(
                    "INSERT INTO ip_reservations (node_name, reservation_id, subnet_id) VALUES ($1, $2, $3)",
                )
                .bind(name)
                .bind(&r.id)
                .bind(&r.attributes["subnet_id"]),
                "dns_record" => {
                    sqlx::query("INSERT INTO dns_records (node_name, record_id, zone_id) VALUES ($1, $2, $3)")
                        .bind(name)
                        .bind(&r.id)
                        .bind(&r.attributes["zone_id"])
                }
                "vni" => {
                    sqlx::query("INSERT INTO vnic_info (node_name, vnic_id) VALUES ($1, $2)").bind(name).bind(&r.id)
                }
                _ => {
                    server = Some(r.id.clone());
                    continue;
                }
            };
            q.execute(t.app.ledger.pool()).await.unwrap();
        }
        sqlx::query("INSERT INTO nodes VALUES ($1, $2, $3, now() - make_interval(hours => $4))")
            .bind(name)
            .bind(server)
            .bind(status)
            .bind(age_h)
            .execute(t.app.ledger.pool())
            .await
            .unwrap();
    }
    let paths_of = |n: &reaper::devtools::demo::VpcNode| n.resources.iter().map(|r| r.path.clone()).collect::<Vec<_>>();

    // The node being deleted: its service sends deletion.requested.
    t.publish("deletion.requested", &deletion("del-node", &deleted.owner, Utc::now())).await;
    let r = t.next_result(60).await.result;
    assert_eq!((r.status.as_str(), r.resources.len()), ("completed", 6), "5 cloud resources and the node row: {r:?}");
    assert_eq!(r.resources.last().unwrap().kind, "node_record", "the node row is marked last");
    assert!(paths_of(&deleted).iter().all(|p| !t.sim.exists(p)));

    // A provisioner died 30 hours ago without sending provisioning.failed.
    let (code, rep, err) = t.reconcile("failed_nodes", &["--execute"]);
    assert_eq!((code, rep["actionable"].as_u64(), rep["too_young"].as_u64()), (0, Some(1), Some(1)), "{rep} {err}");
    let r = t.next_result(60).await.result;
    assert_eq!(
        (r.owner.as_str(), r.trigger.as_str(), r.status.as_str()),
        (stuck.owner.as_str(), "provisioning.failed", "completed"),
        "{r:?}"
    );
    assert!(paths_of(&stuck).iter().all(|p| !t.sim.exists(p)), "{:?}", t.sim.paths());
    assert!(paths_of(&recent).iter().all(|p| t.sim.exists(p)), "the node failed 2 hours ago is left alone");
    assert_eq!(t.sim.stats().refused_for_order, 0, "children always went first");
    let statuses: Vec<(String, String)> =
        sqlx::query_as("SELECT node_name, status FROM nodes ORDER BY status, node_name")
            .fetch_all(t.app.ledger.pool())
            .await
            .unwrap();
    let status_of = |n: &reaper::devtools::demo::VpcNode| {
        statuses.iter().find(|(name, _)| n.owner.ends_with(name.as_str())).map(|(_, s)| s.clone()).unwrap()
    };
    assert_eq!(status_of(&stuck), "cleanup_completed");
    assert_eq!(status_of(&deleted), "cleanup_completed");
    assert_eq!(status_of(&recent), "failed");

    // Nothing left to do for the stuck node; validate agrees with the cloud.
    let (_, rep, _) = t.reconcile("failed_nodes", &[]);
    assert_eq!(rep["actionable"], json!(0), "{rep}");
    let out = t.reaper(&["validate", &stuck.owner], &[]);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));

    // Cloud deletions cannot be undone, and restore says so.
    let out = t.reaper(&["restore", &r.job_id.to_string()], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("restored 0 record(s)") && text.contains("deleted through an API, which cannot be undone"),
        "{text}"
    );
    assert_eq!(text.matches("deleted through an API").count(), 5, "{text}");
    assert!(text.contains("node_record/") && text.contains("without `archive = true`"), "{text}");
}

/// The VPC example's README, in its order: sample rows and cloud resources,
/// a plan, `reaper run` whose first scheduled sweep only reports, the dry
/// run, the execute, validate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vpc_node_as_its_readme_runs_it() {
    let mut t = setup("vpc-node").await;
    t.sql(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/vpc-node/sample.sql")).unwrap())
        .await;
    let reaper::config::ProviderSettings::Http(cloud) = &t.app.settings.providers["cloud"] else {
        panic!("cloud is HTTP")
    };
    let out = run_to_end(
        std::process::Command::new("sh")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/vpc-node/sample-cloud.sh"))
            .env("SIM", &cloud.base_url)
            .env("REAPER_CLOUD_TOKEN", example_token("REAPER_CLOUD_TOKEN")),
        "sample-cloud.sh",
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(t.sim.paths().len(), 7, "{:?}", t.sim.paths());
    // IBM VPC's list shape, one server a page: two pages linked by next.href.
    t.sim.set_list_shape("/v1/bare_metal_servers", ListShape::NextHref, 1);

    // A server no node names: reported, then torn down once two executed sweeps agree.
    let (code, rep, err) = t.reconcile("unnamed_servers", &[]);
    assert_eq!(
        (
            code,
            rep["truth"].as_u64(),
            rep["copy"].as_u64(),
            rep["excluded"].as_u64(),
            rep["orphans"].as_u64(),
            rep["actionable"].as_u64()
        ),
        (0, Some(2), Some(2), Some(1), Some(1), Some(0)),
        "in quarantine until two sweeps agree: {rep} {err}"
    );
    let (_, rep, _) = t.reconcile("unnamed_servers", &["--execute"]);
    assert_eq!((rep["in_quarantine"].as_u64(), rep["published"].as_u64()), (Some(1), Some(0)), "{rep}");
    let (_, rep, _) = t.reconcile("unnamed_servers", &["--execute"]);
    assert_eq!(rep["published"].as_u64(), Some(1), "{rep}");
    let r = t.next_result(60).await.result;
    assert_eq!((r.owner.as_str(), r.status.as_str()), ("server/stray-bm", "completed"), "{r:?}");
    assert!(!t.sim.exists("/v1/bare_metal_servers/stray-bm"));
    assert_eq!(t.sim.paths().len(), 6, "node01's five and the other team's server stay: {:?}", t.sim.paths());

    let out = t.reaper(&["plan", "node/node01"], &[]);
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{plan}{}", String::from_utf8_lossy(&out.stderr));
    for id in ["node01-vni", "node01-dns", "node01-bm", "node01-ip1", "node01-ip2"] {
        assert!(plan.contains(id), "the plan finds {id} through the lookups: {plan}");
    }

    // `reaper run`: the schedule's first sweep runs at start-up, as a dry run.
    let (stop, replica, replica_app) = t.spawn_replica_with(|s| s.reconcile.run_schedules = true).await;
    wait_until("the schedule's first sweep", Duration::from_secs(30), || async {
        replica_app.metrics.render().lines().any(|l| {
            l.starts_with("reaper_reconcile_runs_total{")
                && l.contains("outcome=\"dry_run\"")
                && l.contains("rule=\"failed_nodes\"")
        })
    })
    .await;
    stop.cancel();
    let _ = replica.await;
    assert!(t.tap.next(Duration::from_millis(300)).await.is_none(), "the scheduled sweep published nothing");
    assert_eq!(t.sim.paths().len(), 6);

    // Known only through the provisioner's tables, node01 is not "nothing tracked".
    let out = t.reaper(&["validate", "node/node01"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.matches("FAIL ").count(), 6, "five cloud resources and the row still there: {text}");
    let out = t.reaper(&["plan", "node/node01", "--format", "sh"], &[]);
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(script.contains("/v1/virtual_network_interfaces/node01-vni"), "{script}");

    let (code, rep, err) = t.reconcile("failed_nodes", &[]);
    assert_eq!((code, rep["actionable"].as_u64(), rep["too_young"].as_u64()), (0, Some(1), Some(1)), "{rep} {err}");
    assert_eq!(rep["sample_actionable"], json!(["node01"]));
    // The age is the rule's unless a run says otherwise; executing with a
    // shorter one than the rule's needs --force.
    let (code, rep, _) = t.reconcile("failed_nodes", &["--older-than", "1h"]);
    assert_eq!((code, rep["actionable"].as_u64(), rep["grace_secs"].as_f64()), (0, Some(2), Some(3600.0)), "{rep}");
    let (code, _, err) = t.reconcile("failed_nodes", &["--older-than", "1h", "--execute"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("shorter than the rule's grace of 24h"), "{err}");
    let (code, rep, _) = t.reconcile("failed_nodes", &["--older-than", "48h", "--execute"]);
    assert_eq!((code, rep["actionable"].as_u64(), rep["too_young"].as_u64()), (0, Some(0), Some(2)), "{rep}");
    let (code, _, err) = t.reconcile("failed_nodes", &["--older-than", "48x"]);
    assert!(code == 2 && err.contains("is not an age"), "{err}");
    assert!(t.tap.next(Duration::from_millis(200)).await.is_none(), "nothing was published");

    let (code, rep, _) = t.reconcile("failed_nodes", &["--execute"]);
    assert_eq!((code, rep["published"].as_u64()), (0, Some(1)), "{rep}");
    let r = t.next_result(60).await.result;
    assert_eq!((r.owner.as_str(), r.status.as_str(), r.resources.len()), ("node/node01", "completed", 6), "{r:?}");
    console_renders(&t, &r.owner, Some(r.job_id)).await;
    assert_eq!(t.sim.paths(), ["/v1/bare_metal_servers/ci-runner-7"], "the other team's server stays");
    assert_eq!(t.count("SELECT count(*) FROM nodes WHERE status = 'cleanup_completed'").await, 1);
    let out = t.reaper(&["validate", "node/node01"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    // Batches: validate and request deletion for the owners in a file.
    let dir = std::env::temp_dir();
    let list = dir.join(format!("reaper-owners-{}.txt", unique("l")));
    std::fs::write(&list, "# nodes to check\nnode/node01\nnode/node02   # failed 2 h ago\n\nnode/node01\n").unwrap();
    let list = list.to_str().unwrap();
    let out = t.reaper(&["validate", "--owners-from", list], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("2 owner(s): 1 gone, 1 still there"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("PASS") && l.contains("node/node01")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("FAIL") && l.contains("node/node02")), "{text}");

    // `#` inside an owner is part of it, not a comment: cut, it would name another owner.
    let hash = dir.join(format!("reaper-owners-{}.txt", unique("h")));
    std::fs::write(&hash, "node/node01#2 # a comment\n").unwrap();
    let out = t.reaper(&["validate", "--owners-from", hash.to_str().unwrap()], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("node/node01#2") && text.contains("NOTHING"), "{text}");
    // More owners than --max (default 20) is refused before anything is sent.
    let many = dir.join(format!("reaper-owners-{}.txt", unique("m")));
    std::fs::write(&many, (0..21).map(|i| format!("node/n{i}\n")).collect::<String>()).unwrap();
    let out = t.reaper(&["request-deletion", "--owners-from", many.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && err.contains("more than --max 20"), "{err}");

    let bad = dir.join(format!("reaper-owners-{}.txt", unique("b")));
    std::fs::write(&bad, "node/node02\nnode02\n").unwrap();
    let out = t.reaper(&["request-deletion", "--owners-from", bad.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("line 2"), "says which line: {err}");
    assert!(t.tap.next(Duration::from_millis(300)).await.is_none(), "a bad line sends nothing, not even line 1");

    let out = t.reaper(&["request-deletion", "--owners-from", list], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("sent 2 of 2 deletion request(s)"), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    let done = results(&mut t, 2).await;
    assert!(done.iter().all(|d| d.status == "completed"), "{done:?}");
    let out = t.reaper(&["validate", "--owners-from", list, "--json"], &[]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(report["summary"]["gone"], json!(2), "{report}");
    assert!(out.status.success(), "{report}");
    assert_eq!(t.count("SELECT count(*) FROM nodes WHERE status = 'cleanup_completed'").await, 2);
    assert_eq!(t.sim.stats().unauthorized, 0, "every request carried the cloud token");
    for f in [std::path::PathBuf::from(list), hash, many, bad] {
        let _ = std::fs::remove_file(f);
    }
}
