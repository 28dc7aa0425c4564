//! reaper tears down what deleted or half-provisioned things left behind, in
//! dependency order, as a durable worker on RabbitMQ with a PostgreSQL ledger.
//!
//! # Layout
//! - [`contract`]: the wire format; the only module that knows the JSON shapes.
//! - [`domain`]: plain types (resources, outcomes, triggers).
//! - [`config`]: settings and the validated catalog of resource kinds.
//! - [`plan`]: pure ordering of resources into levels.
//! - [`ledger`]: tracked resources, jobs and steps in PostgreSQL.
//! - [`providers`]: how one resource is deleted and checked: HTTP APIs, PostgreSQL rows, MongoDB documents.
//! - [`execute`]: runs a plan with bounded concurrency and in-process retries.
//! - [`handler`]: one event end to end, ending in a [`disposition::Disposition`].
//! - [`retry`]: the one classification into ack / retry later / dead-letter.
//! - [`broker`]: the only code that knows lapin.
//! - [`app`]: the state built from settings, and the run loop.
//! - [`admin`]: the admin HTTP API; [`metrics`]: every metric; [`ops`]: what operators ask, for the API and the CLI.
//! - [`sim`]: the simulated cloud used by the demo and the tests.
//! - [`demo`]: `reaper demo`.
//! - [`bench`]: `reaper bench`, the benchmark the performance figures come from.
//! - [`replay`]: `reaper replay`, for dead-lettered jobs; [`restore`]: `reaper restore`, for archived rows and documents.
//! - [`reconcile`]: orphan sweeps (inventories, set difference, safety brakes, schedule).

pub mod admin;
pub mod app;
pub mod broker;
pub mod catalog;
pub mod cli;
pub mod config;
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
        ("config.rs", &[]),
        ("config", &[]),
        ("plan.rs", &["domain"]),
        ("providers", &["domain", "config"]),
        ("catalog.rs", &["config", "domain", "plan", "providers"]),
        ("contract.rs", &["catalog", "config", "domain"]),
        ("ledger", &["config", "domain"]),
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
            let text = std::fs::read_to_string(path).expect("a source file");
            // Up to the unit tests, which may use anything.
            vec![text.split("#[cfg(test)]").next().unwrap_or_default().to_string()]
        }
    }

    fn used_modules(text: &str) -> BTreeSet<String> {
        text.match_indices("crate::")
            .map(|(i, _)| {
                text[i + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>()
            })
            .collect()
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
