//! The admin API over real HTTP, and what operators can see without psql.

use std::time::Duration;

use chrono::Utc;
use reaper::devtools::demo::VpcNode;
use reaper::devtools::sim::Faults;
use serde_json::Value;

use crate::helpers::*;

const TOKEN: &str = "admin-tok-7f3a9c";

async fn with_admin() -> (TestApp, String) {
    let (t, base, file) = spawn_with_admin("", TOKEN).await;
    // The token is read at start-up; the file is not needed after that.
    let _ = std::fs::remove_file(&file);
    (t, base)
}

fn enc(owner: &str) -> String {
    owner.replace('/', "%2F")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_metrics_and_openapi_are_open_everything_else_needs_the_token() {
    let (_t, base) = with_admin().await;
    let c = reqwest::Client::new();
    assert_eq!(c.get(format!("{base}/healthz")).send().await.unwrap().status(), 200);
    wait_until("ready", Duration::from_secs(10), || {
        let c = c.clone();
        let url = format!("{base}/readyz");
        async move { c.get(url).send().await.map(|r| r.status() == 200).unwrap_or(false) }
    })
    .await;
    let metrics = c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    for name in ["reaper_ready 1", "reaper_jobs_in_flight", "reaper_outbox_backlog"] {
        assert!(metrics.contains(name), "{name} missing from /metrics:\n{metrics}");
    }
    let spec: Value = c.get(format!("{base}/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(spec["openapi"], "3.0.3");

    for path in ["/v1/status", "/v1/dead", "/v1/owners/node%2Fx"] {
        assert_eq!(c.get(format!("{base}{path}")).send().await.unwrap().status(), 401, "{path} without a token");
        assert_eq!(
            c.get(format!("{base}{path}")).bearer_auth("nope").send().await.unwrap().status(),
            403,
            "{path} with a wrong token"
        );
    }
    let r = c.get(format!("{base}/v1/status")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(!text.contains(TOKEN), "the token must not appear in /v1/status");
    let status: Value = serde_json::from_str(&text).unwrap();
    assert!(status["config"]["kinds"]["bare_metal_server"]["after"].is_array());
    assert!(!status["config"]["broker"]["url"].as_str().unwrap().contains("guest:guest"), "credentials are redacted");
}

#[test]
fn the_openapi_document_lists_every_route_the_server_has() {
    let spec: Value = serde_json::from_str(reaper::admin::OPENAPI).unwrap();
    let paths: Vec<&String> = spec["paths"].as_object().unwrap().keys().collect();
    let source = include_str!("../../src/admin.rs");
    let routes: Vec<&str> = source
        .lines()
        .filter_map(|l| l.trim().strip_prefix(".route(\""))
        .map(|l| l.split('"').next().unwrap())
        .collect();
    assert!(routes.len() >= 12, "{routes:?}");
    for r in &routes {
        assert!(paths.iter().any(|p| p == r), "route {r} is not in src/openapi.json");
    }
    for p in &paths {
        assert!(routes.contains(&p.as_str()), "src/openapi.json documents {p}, which the server lacks");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_plans_tears_down_and_validates_an_owner_through_the_api() {
    let (mut t, base) = with_admin().await;
    let c = reqwest::Client::new();
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    let owner_url = format!("{base}/v1/owners/{}", enc(&node.owner));

    let plan: Value = c
        .post(format!("{owner_url}/teardown?dry_run=true"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let steps = plan["plan"].as_array().unwrap();
    assert_eq!(steps.len(), 5);
    assert!(steps.iter().take(2).all(|s| s["level"] == 0) && steps.iter().skip(2).all(|s| s["level"] == 1), "{plan}");
    assert_eq!(t.sim.stats().deletes, 0, "a dry run deletes nothing");

    let script = c.get(format!("{owner_url}/script")).bearer_auth(TOKEN).send().await.unwrap().text().await.unwrap();
    assert!(script.starts_with("#!/bin/sh") && script.contains("del DELETE 'http://"), "{script}");
    assert_eq!(script.matches("\ndel ").count(), 5, "{script}");

    let validate: Value =
        c.get(format!("{owner_url}/validate")).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
    assert_eq!(validate["result"], "FAIL", "everything still exists: {validate}");

    let r = c.post(format!("{owner_url}/teardown")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let accepted: Value = r.json().await.unwrap();
    let result = t.next_result(30).await.result;
    assert_eq!(result.event_id, accepted["event_id"].as_str().unwrap());
    assert_eq!(result.status, "completed");

    let validate: Value =
        c.get(format!("{owner_url}/validate")).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
    assert_eq!(validate["result"], "PASS", "{validate}");
    let owner: Value = c.get(&owner_url).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
    assert!(owner["resources"].as_array().unwrap().iter().all(|r| r["state"] == "deleted"), "{owner}");
    let job: Value = c
        .get(format!("{base}/v1/jobs/{}", result.job_id))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["status"], "completed");
    assert_eq!(job["result"]["resources"].as_array().unwrap().len(), 5);
    // What the request said is kept with the job, and shown.
    assert_eq!(job["request"]["reason"], "requested through the admin API", "{job}");
    assert_eq!(job["request"]["requested_by"], "admin-api", "{job}");
    assert_eq!((job["attempts"].as_i64(), job["failed_runs"].as_i64()), (Some(1), Some(0)), "{job}");
    let metrics = c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("reaper_jobs_total{outcome=\"completed\"} 1"), "{metrics}");
    assert!(metrics.contains("reaper_step_duration_seconds_count{kind=\"vni\",provider=\"cloud\"} 1"), "{metrics}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_jobs_are_listed_and_replayed_through_the_api() {
    let (mut t, base) = with_admin().await;
    let c = reqwest::Client::new();
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;
    t.sim.set_faults(Faults { fail_next: 1, fail_status: 403, only_method: "DELETE".into(), ..Default::default() });
    t.publish("deletion.requested", &deletion("api-dead", &node.owner, Utc::now())).await;
    assert_eq!(t.next_result(30).await.result.status, "dead_lettered");

    let dead: Value = c
        .get(format!("{base}/v1/dead?owner={}", enc(&node.owner)))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(dead["jobs"].as_array().unwrap().len(), 1, "{dead}");
    assert_eq!(dead["jobs"][0]["error_class"], "permanent");

    let r =
        c.post(format!("{base}/v1/dead/replay")).bearer_auth(TOKEN).json(&serde_json::json!({})).send().await.unwrap();
    assert_eq!(r.status(), 400, "no filter, no all: refused");
    let summary: Value = c
        .post(format!("{base}/v1/dead/replay"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({ "owner": node.owner }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(summary["replayed"].as_array().unwrap().len(), 1, "{summary}");
    assert_eq!(t.next_result(30).await.result.status, "completed");
    assert!(t.sim.paths().is_empty());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_answers_an_operator_without_psql() {
    let mut t = spawn_app("").await;
    let node = VpcNode::new(&unique("node"));
    t.provision(&node).await;

    let out = t.reaper(&["plan", &node.owner, "--format", "json"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan.as_array().unwrap().len(), 5);
    let out = t.reaper(&["plan", &node.owner, "--format", "sh"], &[]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("#!/bin/sh"));

    let out = t.reaper(&["validate", &node.owner], &[]);
    assert_eq!(out.status.code(), Some(1), "resources still exist: FAIL exits 1");

    let out = t.reaper(&["request-deletion", &node.owner], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let event_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let r = t.next_result(30).await.result;
    assert_eq!(r.event_id, event_id);

    let out = t.reaper(&["validate", &node.owner, "--json"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    let out = t.reaper(&["show", &node.owner], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("deleted") && text.contains("completed"), "{text}");
    assert!(text.contains("asked: reason: requested by hand; by: reaper-cli"), "{text}");
    let out = t.reaper(&["status", "--json"], &[]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["jobs"]["completed"], 1);
    let out = t.reaper(&["request-deletion", "not-an-owner"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let out = t.reaper(&["completions", "bash"], &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("request-deletion"));
    t.stop().await;
}

/// Every route the OpenAPI document does not mark open, with its
/// placeholders filled: (method, path).
fn protected_routes() -> Vec<(reqwest::Method, String)> {
    let spec: Value = serde_json::from_str(reaper::admin::OPENAPI).unwrap();
    let mut out = Vec::new();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            if op["security"].as_array().is_some_and(|s| s.is_empty()) {
                continue; // open: health, readiness, metrics, the document itself
            }
            let path = path
                .replace("{owner}", "node%2Fadmin-probe")
                .replace("{id}", "6f1c2a52-8f0e-4f7e-9d3b-1a2b3c4d5e6f")
                .replace("{rule}", "models");
            out.push((method.to_uppercase().parse().unwrap(), path));
        }
    }
    assert!(out.len() >= 10, "{out:?}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protected_route_refuses_a_missing_or_wrong_token_and_changes_nothing() {
    let (t, base) = with_admin().await;
    let node = VpcNode::new("admin-probe");
    t.provision(&node).await;
    let c = reqwest::Client::new();
    for (method, path) in protected_routes() {
        let url = format!("{base}{path}?execute=true");
        let none = c.request(method.clone(), &url).send().await.unwrap().status();
        assert_eq!(none, 401, "{method} {path} without a token");
        let wrong = c.request(method.clone(), &url).bearer_auth("admin-tok-7f3a9").send().await.unwrap().status();
        assert_eq!(wrong, 403, "{method} {path} with a wrong token (the right one less its last character)");
    }
    assert_eq!(t.count("SELECT count(*) FROM jobs").await, 0, "no route opened a job");
    assert_eq!(t.sim.paths().len(), node.resources.len(), "nothing was deleted");
    assert_eq!(t.sim.stats().deletes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_token_configured_every_protected_route_answers_401() {
    // A variable nobody sets: the developer's own REAPER_ADMIN_TOKEN must not leak in.
    let t = spawn_app("[admin]\ntoken_env = \"REAPER_TEST_UNSET_ADMIN_TOKEN\"\n").await;
    wait_until("the admin API listens", Duration::from_secs(10), || async { t.app.admin_addr.get().is_some() }).await;
    let base = format!("http://{}", t.app.admin_addr.get().unwrap());
    let c = reqwest::Client::new();
    for (method, path) in protected_routes() {
        let r = c.request(method.clone(), format!("{base}{path}")).bearer_auth("anything").send().await.unwrap();
        assert_eq!(r.status(), 401, "{method} {path}");
        assert!(r.text().await.unwrap().contains("no admin token is configured"), "{method} {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_listens_beyond_loopback_only_with_a_token_read_from_its_variable_or_file() {
    let vpc = include_str!("../../config/vpc-node.toml").replace("auth = {", "# auth = {");
    let beyond = "[admin]\nlisten = \"0.0.0.0:9090\"\ntoken_env = \"REAPER_TEST_ADMIN_TOKEN\"\n";
    // `reaper check-config` runs the checks `reaper run` runs; the variable is
    // set for the child only (never in this multi-threaded test process).
    let dir = std::env::temp_dir().join(format!("reaper-admin-{:08x}", fastrand::u32(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("reaper.toml");
    std::fs::write(&file, format!("{vpc}\n{beyond}")).unwrap();
    let check = |env: &[(&str, &str)]| {
        let mut cmd = reaper_cmd();
        cmd.args(["check-config", "--config"]).arg(&file).envs(env.iter().copied());
        run_to_end(&mut cmd, "reaper check-config", Duration::from_secs(60))
    };
    let out = check(&[]);
    assert_eq!(out.status.code(), Some(2), "no token, not loopback: refused");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a loopback address and no admin token is set"), "{stderr}");
    let out = check(&[("REAPER_TEST_ADMIN_TOKEN", "from-the-environment")]);
    assert!(out.status.success(), "a token from the variable: {}", String::from_utf8_lossy(&out.stderr));

    // From a file, read as written less its newline (in process: no variable involved).
    std::fs::write(dir.join("token"), "from-a-file\n").unwrap();
    let settings = reaper::config::Settings::from_toml_layers(&[
        &vpc,
        &format!("{beyond}token_file = \"{}\"\n", dir.join("token").display()),
    ])
    .unwrap();
    let checked = reaper::app::App::check(&settings).await.expect("a token from a file");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(checked.admin_token.unwrap().expose(), "from-a-file", "the file wins, its newline trimmed");
}
