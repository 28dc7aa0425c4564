//! reaper tears down what deleted or half-provisioned things left behind, in
//! dependency order, as a durable worker on RabbitMQ with a PostgreSQL ledger.
//!
//! # Layout (ARCHITECTURE.md is the map; bottom first)
//! - [`domain`]: plain types (resources, outcomes, triggers, the event shapes the ledger stores).
//! - [`tls`]: certificate files and TLS failures in plain words, for every connection.
//! - [`config`]: settings, plain data; [`catalog`]: the kinds, checked into a `Catalog`.
//! - [`plan`]: pure ordering of resources into a graph and levels.
//! - [`providers`]: how one resource is deleted and checked: HTTP APIs, PostgreSQL rows, MongoDB documents.
//! - [`contract`]: the wire format; the only module that writes or reads event JSON.
//! - [`ledger`]: tracked resources, jobs, steps, outbox and archive in PostgreSQL.
//! - [`execute`]: runs a plan with bounded concurrency and in-process retries.
//! - [`disposition`]: the one classification into ack / retry later / dead-letter.
//! - [`handler`]: one event end to end, ending in a [`disposition::Disposition`].
//! - [`broker`]: connections, topology, publishing with confirms; [`consumer`]: the worker loop.
//! - [`outbox`]: publishing, draining and clearing what jobs owe the broker.
//! - [`app`]: the state built from settings; [`runner`]: starts and stops what works on it.
//! - [`admin`]: the admin HTTP API; [`console`]: the operator console at /ui on the same listener;
//!   [`metrics`]: every metric; [`ops`]: what operators ask, for the API, the console and the CLI.
//! - [`replay`]: `reaper replay`, for dead-lettered jobs; [`restore`]: `reaper restore`, for archived rows and documents.
//! - [`reconcile`]: orphan sweeps (inventories, set difference, safety brakes, schedule).
//! - [`devtools`]: the demo, the benchmarks and the simulated cloud; the worker never imports them.

pub mod admin;
pub mod app;
pub mod broker;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod console;
pub mod consumer;
pub mod contract;
pub mod devtools;
pub mod disposition;
pub mod domain;
pub mod execute;
pub mod handler;
pub mod ledger;
pub mod metrics;
pub mod ops;
pub mod ops_cli;
pub mod outbox;
pub mod plan;
pub mod providers;
pub mod reconcile;
pub mod replay;
pub mod restore;
pub mod runner;
pub mod telemetry;
pub mod tls;

/// The layering rule of ARCHITECTURE.md ("Invariants"), checked on the
/// source: the modules at the bottom import only what sits below them, so a
/// newcomer can read `domain`, `plan` and `providers` without the rest, and
/// they can never start a circle. Test modules are not counted.
#[cfg(test)]
mod layering {
    use std::collections::BTreeSet;

    /// Module (a file or a directory under src/) → the crate modules it may use.
    const RULES: &[(&str, &[&str])] = &[
        ("domain.rs", &[]),
        ("tls.rs", &[]),
        ("config.rs", &["tls"]),
        ("config", &[]),
        ("plan.rs", &["domain"]),
        ("providers", &["domain", "config", "tls"]),
        ("catalog.rs", &["config", "domain", "plan", "providers"]),
        ("contract.rs", &["catalog", "config", "domain"]),
        ("ledger", &["config", "domain", "tls"]),
        ("execute.rs", &["domain", "config", "catalog", "ledger", "plan", "providers", "metrics"]),
        ("disposition.rs", &["execute", "ledger"]),
    ];

    fn sources(path: &std::path::Path) -> Vec<String> {
        if path.is_dir() {
            let mut out = Vec::new();
            for e in std::fs::read_dir(path).expect("a source directory") {
                out.extend(sources(&e.expect("an entry").path()));
            }
            out
        } else {
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                return Vec::new();
            }
            let text = std::fs::read_to_string(path).expect("a source file");
            // Up to the unit tests (a `#[cfg(test)]` module), which may use anything.
            let cut = text.find("#[cfg(test)]\nmod ").unwrap_or(text.len());
            vec![text[..cut].to_string()]
        }
    }

    fn used_modules(text: &str) -> BTreeSet<String> {
        let word =
            |s: &str| s.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
        let mut used = BTreeSet::new();
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + 7..];
            match rest.strip_prefix('{') {
                // `crate::{a, b::c}`: each item names a module.
                Some(group) => used.extend(group.split('}').next().unwrap_or("").split(',').map(word)),
                None => {
                    used.insert(word(rest));
                }
            }
        }
        used.retain(|m| !m.is_empty());
        used
    }

    #[test]
    fn the_lower_modules_import_only_what_is_below_them() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        for (module, allowed) in RULES {
            let own = module.trim_end_matches(".rs");
            for text in sources(&src.join(module)) {
                for used in used_modules(&text) {
                    assert!(
                        used == own || allowed.contains(&used.as_str()),
                        "src/{module} uses crate::{used}; it may use only {allowed:?} (ARCHITECTURE.md, Invariants)"
                    );
                }
            }
        }
    }

    #[test]
    fn the_worker_never_imports_the_devtools() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut checked = 0;
        for e in std::fs::read_dir(&src).expect("src") {
            let path = e.expect("an entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if ["devtools", "cli.rs", "lib.rs", "main.rs"].contains(&name.as_str()) {
                continue;
            }
            for text in sources(&path) {
                checked += 1;
                assert!(!used_modules(&text).contains("devtools"), "src/{name} uses crate::devtools");
            }
        }
        assert!(checked > 20, "the sources were read");
    }

    /// No two top-level modules import each other, directly or around a
    /// circle: every module can be read knowing only what is below it.
    #[test]
    fn the_modules_import_no_circle() {
        use std::collections::BTreeMap;
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for e in std::fs::read_dir(&src).expect("src") {
            let path = e.expect("an entry").path();
            let name = path.file_stem().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if ["lib", "main"].contains(&name.as_str()) {
                continue;
            }
            let used: BTreeSet<String> =
                sources(&path).iter().flat_map(|t| used_modules(t)).filter(|m| *m != name).collect();
            deps.entry(name).or_default().extend(used);
        }
        // Depth-first, with the path so far: a module met again on it closes a circle.
        fn visit(
            m: &str,
            deps: &BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) {
            if let Some(i) = path.iter().position(|p| p == m) {
                panic!("an import circle: {} -> {m}", path[i..].join(" -> "));
            }
            if !done.insert(m.to_string()) {
                return;
            }
            path.push(m.to_string());
            for d in deps.get(m).into_iter().flatten() {
                visit(d, deps, path, done);
            }
            path.pop();
        }
        let mut done = BTreeSet::new();
        for m in deps.keys() {
            visit(m, &deps, &mut Vec::new(), &mut done);
        }
        assert!(deps.len() > 20, "the modules were read: {:?}", deps.keys());
    }
}
