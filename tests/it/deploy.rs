//! The files for users elsewhere: docker-compose.yml, the Dockerfile, the
//! Grafana dashboard and the alert rules. No Docker engine runs here, so these
//! check what can be checked: they parse, and what they reference exists.

use crate::helpers::dashboard_metrics;

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
fn the_dashboard_and_alerts_use_only_metrics_reaper_registers_and_the_docs_list_them_all() {
    let registered = reaper::metrics::Metrics::new().names();
    assert!(registered.len() >= 10, "{registered:?}");
    let docs = std::fs::read_to_string(root("docs/operations.md")).unwrap();
    for n in &registered {
        assert!(docs.contains(n.as_str()), "docs/operations.md does not list {n}");
    }
    let used = dashboard_metrics();
    assert!(used.len() >= 8, "{used:?}");
    for u in &used {
        assert!(registered.contains(u), "the dashboard or an alert uses {u}, which reaper does not register");
    }
}

/// docs/contract.md names the test of each guarantee: each named test exists.
#[test]
fn every_test_the_contract_names_exists() {
    let doc = std::fs::read_to_string(root("docs/contract.md")).unwrap();
    let named: Vec<&str> = doc
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| w.split("::").count() == 2 && w.chars().all(|c| c.is_ascii_lowercase() || c == '_' || c == ':'))
        .collect();
    assert!(named.len() >= 20, "{named:?}");
    for n in named {
        let (module, test) = n.split_once("::").unwrap();
        let file = root(&format!("tests/it/{module}.rs"));
        let source = std::fs::read_to_string(&file).unwrap_or_else(|_| panic!("{n}: no tests/it/{module}.rs"));
        assert!(source.contains(&format!("fn {test}(")), "docs/contract.md names {n}, which does not exist");
    }
}
