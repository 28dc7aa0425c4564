//! The files for users elsewhere: docker-compose.yml, the Dockerfile, the
//! Grafana dashboard and the alert rules. No Docker engine runs here, so these
//! check what can be checked: they parse, and what they reference exists.

use serde_json::Value;

fn root(p: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

#[test]
fn docker_compose_is_valid_and_wires_reaper_to_healthy_services() {
    let text = std::fs::read_to_string(root("docker-compose.yml")).unwrap();
    let doc: serde_norway::Value = serde_norway::from_str(&text).expect("docker-compose.yml is YAML");
    let services = doc["services"].as_mapping().expect("services");
    for name in ["rabbitmq", "postgres", "mongodb", "reaper"] {
        assert!(services.contains_key(name), "service {name} missing");
    }
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        assert!(svc.get("image").is_some() || svc.get("build").is_some(), "{name} has neither image nor build");
        if let Some(deps) = svc.get("depends_on").and_then(|d| d.as_mapping()) {
            for (dep, cond) in deps {
                let dep = dep.as_str().unwrap();
                assert!(services.contains_key(dep), "{name} depends on unknown {dep}");
                assert_eq!(cond["condition"].as_str(), Some("service_healthy"), "{name} waits for {dep} to be healthy");
                assert!(services[dep].get("healthcheck").is_some(), "{dep} has no healthcheck");
            }
        }
    }
    let reaper = &services["reaper"];
    assert_eq!(reaper["build"].as_str(), Some("."));
    let env = reaper["environment"].as_mapping().unwrap();
    assert!(
        env.keys().any(|k| k.as_str() == Some("REAPER_BROKER__URL"))
            && env.keys().any(|k| k.as_str() == Some("REAPER_DATABASE__URL"))
    );
}

#[test]
fn the_dockerfile_copies_only_what_exists_and_builds_the_binary() {
    let text = std::fs::read_to_string(root("Dockerfile")).unwrap();
    assert!(text.matches("FROM ").count() >= 2, "multi-stage");
    for line in text.lines().filter(|l| l.starts_with("COPY ") && !l.contains("--from")) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(root(src).exists(), "Dockerfile copies {src}, which does not exist");
        }
    }
    assert!(text.contains("cargo build --release --locked --bin reaper"));
}

#[test]
fn the_dashboard_and_alerts_use_only_metrics_reaper_exports() {
    let metrics = reaper::metrics::Metrics::new();
    // Labelled gauges render once a label set exists.
    metrics.reconcile_orphans.with_label_values(&["rule"]).set(0);
    let exported = metrics.render();
    let names: Vec<&str> = [
        "reaper_events_consumed_total",
        "reaper_jobs_total",
        "reaper_step_duration_seconds",
        "reaper_step_retries_total",
        "reaper_broker_retries_total",
        "reaper_dead_letters_total",
        "reaper_outbox_backlog",
        "reaper_jobs_in_flight",
        "reaper_ready",
        "reaper_reconcile_runs_total",
        "reaper_reconcile_duration_seconds",
        "reaper_reconcile_orphans",
        "reaper_reconcile_published_total",
    ]
    .to_vec();
    for n in &names {
        assert!(exported.contains(n) || n.ends_with("_total") || n.ends_with("_seconds"), "{n} is not exported");
    }
    let docs = std::fs::read_to_string(root("docs/operations.md")).unwrap();
    for n in &names {
        assert!(docs.contains(n), "docs/operations.md does not list {n}");
    }
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(root("deploy/grafana-dashboard.json")).unwrap())
        .expect("the dashboard is JSON");
    let alerts: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(root("deploy/alerts.yml")).unwrap()).expect("alerts are YAML");
    let mut exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_string()))
        .collect();
    for g in alerts["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            exprs.push(r["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 8);
    for e in &exprs {
        let used: Vec<&str> =
            e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("reaper_")).collect();
        assert!(!used.is_empty(), "{e} uses no reaper metric");
        for u in used {
            let base = u.trim_end_matches("_bucket").trim_end_matches("_count").trim_end_matches("_sum");
            assert!(names.contains(&base), "{e} uses {u}, which reaper does not export");
        }
    }
}
