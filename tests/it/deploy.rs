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

/// deploy/kubernetes, checked offline: every file parses, the probes and the
/// Service point at the admin API's routes and port, the grace period is
/// above the worker's, the labels select the pods, the environment names
/// settings reaper reads, and every secret the config names is in the Secret.
#[test]
fn the_kubernetes_manifests_match_the_admin_api_the_grace_and_the_settings() {
    use serde_norway::Value;
    let dir = root("deploy/kubernetes");
    let kustomization: Value =
        serde_norway::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap()).unwrap();
    let mut by_kind = std::collections::BTreeMap::new();
    for file in kustomization["resources"].as_sequence().expect("resources") {
        let text = std::fs::read_to_string(dir.join(file.as_str().unwrap())).expect("a listed file exists");
        let doc: Value = serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{file:?}: {e}"));
        by_kind.insert(doc["kind"].as_str().expect("a kind").to_string(), doc);
    }
    for kind in ["Namespace", "ConfigMap", "Secret", "Deployment", "PodDisruptionBudget", "Service", "ServiceMonitor"] {
        assert!(by_kind.contains_key(kind), "no {kind}");
    }
    let deployment = &by_kind["Deployment"];
    let pod = &deployment["spec"]["template"];
    let container = &pod["spec"]["containers"][0];
    assert_eq!(deployment["spec"]["replicas"].as_u64(), Some(2));

    // The config the pods mount is a valid config, and its grace is below the pod's.
    let toml = by_kind["ConfigMap"]["data"]["reaper.toml"].as_str().expect("reaper.toml");
    let settings = reaper::config::Settings::from_toml(toml).expect("the ConfigMap's reaper.toml");
    reaper::catalog::validate(&settings).expect("its kinds");
    let grace = pod["spec"]["terminationGracePeriodSeconds"].as_u64().expect("a grace period");
    assert!(grace > settings.worker.shutdown_grace_secs + 5, "{grace} s leaves the worker no time to flush");
    let args: Vec<&str> = container["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let mount = container["volumeMounts"][0]["mountPath"].as_str().unwrap();
    assert_eq!(args, ["run", "--config", &format!("{mount}/reaper.toml")]);

    // Probes and the Service reach the admin API where it listens.
    let env: Vec<(&str, &str)> = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["value"].as_str().unwrap_or("")))
        .collect();
    let listen = env.iter().find(|(k, _)| *k == "REAPER_ADMIN__LISTEN").expect("the admin API listens off loopback").1;
    let port = &container["ports"][0];
    assert_eq!(listen.rsplit_once(':').unwrap().1, port["containerPort"].as_u64().unwrap().to_string());
    let admin = std::fs::read_to_string(root("src/admin.rs")).unwrap();
    for (probe, path) in [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(container[probe]["httpGet"]["path"].as_str(), Some(path));
        assert_eq!(container[probe]["httpGet"]["port"], port["name"], "{probe} uses the admin port");
        assert!(admin.contains(&format!(".route(\"{path}\"")), "the admin API serves {path}");
    }
    let service = &by_kind["Service"];
    assert_eq!(service["spec"]["ports"][0]["targetPort"], port["name"]);
    let monitor = &by_kind["ServiceMonitor"]["spec"];
    assert_eq!(monitor["endpoints"][0]["port"], service["spec"]["ports"][0]["name"]);
    assert_eq!(monitor["endpoints"][0]["path"].as_str(), Some("/metrics"));
    let labels = &pod["metadata"]["labels"];
    for selector in [
        &deployment["spec"]["selector"]["matchLabels"],
        &by_kind["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        &service["spec"]["selector"],
        &monitor["selector"]["matchLabels"],
    ] {
        for (k, v) in selector.as_mapping().unwrap() {
            assert_eq!(&labels[k.as_str().unwrap()], v, "a selector that matches no pod");
        }
    }
    assert!(
        monitor["selector"]["matchLabels"]
            .as_mapping()
            .unwrap()
            .iter()
            .all(|(k, v)| &service["metadata"]["labels"][k.as_str().unwrap()] == v),
        "the ServiceMonitor selects the Service"
    );

    // Hardened, and sized.
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert!(
        container["resources"]["requests"]["memory"].is_string()
            && container["resources"]["limits"]["memory"].is_string()
    );

    // Every REAPER_<SECTION>__<KEY> given is a setting reaper reads (an
    // unknown one stops start-up), and every secret the config names is given.
    let secret = by_kind["Secret"]["stringData"].as_mapping().expect("stringData");
    let given: Vec<(String, String)> = secret
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().to_string(), v.as_str().unwrap().to_string()))
        .chain(env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    let mut layer = String::new();
    for (name, value) in &given {
        if let Some((section, key)) = name.strip_prefix("REAPER_").and_then(|n| n.split_once("__")) {
            layer.push_str(&format!("[{}]\n{} = {:?}\n", section.to_lowercase(), key.to_lowercase(), value));
        }
    }
    reaper::config::Settings::from_toml_layers(&[toml, &layer]).expect("the environment names settings");
    let mut needed = vec![settings.admin.token_env.clone()];
    for p in settings.providers.values() {
        if let reaper::config::ProviderSettings::Http(h) = p {
            let auth = h.auth.as_ref();
            needed.extend(auth.and_then(|a| a.token_env.clone()));
            needed.extend(auth.and_then(|a| a.oauth2.as_ref()).and_then(|o| o.client_secret_env.clone()));
        }
    }
    for var in needed {
        assert!(given.iter().any(|(k, _)| *k == var), "the config reads {var}, which the Secret does not give");
    }
}
