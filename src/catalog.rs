//! The configured kinds, checked once at start-up: every provider exists,
//! every template parses against its provider, every `after` names a kind and
//! the order has no cycle. What the worker, the planner and the tools read
//! about a kind comes from here, never from the raw settings.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::{ConfigError, GuardSettings, KindSettings, LookupSettings, ProviderSettings, Settings};
use crate::providers::{Action, ArchiveSpec, LookupQuery};

/// Checks everything that can be checked without I/O: the settings' values,
/// the kinds (into the `Catalog`), and the reconcile rules against them.
pub fn validate(settings: &Settings) -> Result<Catalog, ConfigError> {
    settings.check_values()?;
    let catalog = Catalog::build(&settings.kinds, &settings.providers)?;
    settings.reconcile.check(&settings.providers, &catalog).map_err(ConfigError::Invalid)?;
    Ok(catalog)
}

/// The configured kinds, checked: every provider exists, every template parses,
/// every `after` names a kind, and `after` has no cycle.
#[derive(Debug, Clone)]
pub struct Catalog {
    kinds: BTreeMap<String, KindSpec>,
}

#[derive(Debug, Clone)]
pub struct KindSpec {
    pub name: String,
    pub provider: String,
    pub delete: Action,
    pub check: Option<Action>,
    pub after: Vec<String>,
    /// Attributes the templates use: a tracked resource without them is refused.
    pub required_attributes: BTreeSet<String>,
    pub lookup: Option<Lookup>,
    pub guard: Option<Guard>,
    /// Set when what this kind deletes is kept for `reaper restore`.
    pub archive: Option<ArchiveSpec>,
    /// Its ids come back with the next life of the name (see KindSettings).
    pub reused_ids: bool,
}

/// A kind's lookup, checked against its provider.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub provider: String,
    pub owner_type: String,
    pub query: LookupQuery,
}

impl Lookup {
    /// Whether this lookup applies to `owner` ("type/id").
    pub fn applies_to(&self, owner: &str) -> bool {
        owner.split_once('/').is_some_and(|(ty, _)| ty == self.owner_type)
    }

    fn parse(l: &LookupSettings, providers: &BTreeMap<String, ProviderSettings>) -> Result<Lookup, String> {
        match l.owner_type.as_deref() {
            Some(t) if !t.is_empty() && !t.contains('/') => {}
            _ => {
                return Err("lookup needs owner_type, the type of owner its query is about (\"node\" for node/n1): \
                            without it a content/abc teardown would also take whatever a node named abc has"
                    .into())
            }
        }
        let provider =
            providers.get(&l.provider).ok_or_else(|| format!("lookup.provider {:?} is not configured", l.provider))?;
        let query = LookupQuery::parse(provider, l).map_err(|e| match e.starts_with("lookup") {
            true => e,
            false => format!("lookup.provider {:?} {e}", l.provider),
        })?;
        Ok(Lookup { provider: l.provider.clone(), owner_type: l.owner_type.clone().unwrap_or_default(), query })
    }
}

/// A kind's "in use" check. It may live on another provider than the kind
/// (deployments in the app's database guarding a model in a registry API).
#[derive(Debug, Clone)]
pub struct Guard {
    pub provider: String,
    pub action: Action,
    pub reason: String,
}

impl Guard {
    fn parse(g: &GuardSettings, providers: &BTreeMap<String, ProviderSettings>) -> Result<Guard, String> {
        let p = providers.get(&g.provider).ok_or(format!("guard.provider {:?} is not configured", g.provider))?;
        let default_params = ["id".to_string()];
        let params = g.params.as_deref().unwrap_or(&default_params);
        let action = Action::parse(p, &g.query, params, false, g.collection.as_deref(), None)
            .map_err(|e| format!("guard.query: {e}"))?;
        let reason = g.reason.clone().unwrap_or_else(|| format!("in use (guard on provider {})", g.provider));
        Ok(Guard { provider: g.provider.clone(), action, reason })
    }
}

impl KindSpec {
    pub fn missing_attribute(&self, attrs: &BTreeMap<String, String>) -> Option<&str> {
        self.required_attributes.iter().find(|a| !attrs.contains_key(*a)).map(|s| s.as_str())
    }

    /// Why `id` and `attrs` cannot fill this kind's HTTP paths (delete, check
    /// and guard), if they cannot: an empty, `.` or `..` value would make the
    /// request reach another path than its template names.
    pub fn path_values_refused(&self, id: &str, attrs: &BTreeMap<String, String>) -> Option<String> {
        let actions = [Some(&self.delete), self.check.as_ref(), self.guard.as_ref().map(|g| &g.action)];
        actions.into_iter().flatten().filter_map(Action::http).find_map(|t| t.render(id, attrs).err())
    }
}

impl Catalog {
    pub fn build(
        kinds: &BTreeMap<String, KindSettings>,
        providers: &BTreeMap<String, ProviderSettings>,
    ) -> Result<Catalog, ConfigError> {
        let mut out = BTreeMap::new();
        for (name, k) in kinds {
            let err = |message: String| ConfigError::Kind { kind: name.clone(), message };
            let Some(provider) = providers.get(&k.provider) else {
                return Err(err(format!("provider {:?} is not configured", k.provider)));
            };
            let default_params = ["id".to_string()];
            let params = k.params.as_deref().unwrap_or(&default_params);
            let parse = |what: &str, text: &str| -> Result<Action, ConfigError> {
                Action::parse(
                    provider,
                    text,
                    params,
                    what == "delete",
                    k.collection.as_deref(),
                    k.soft_delete_field.as_deref(),
                )
                .map_err(|e| err(format!("{what}: {e}")))
            };
            let delete = parse("delete", &k.delete)?;
            if let Some(t) = delete.http().filter(|t| matches!(t.method().as_str(), "GET" | "HEAD")) {
                return Err(err(format!("delete uses {}, which deletes nothing; use it for check", t.method())));
            }
            match k.scope.as_deref() {
                None | Some("resource") if !delete.uses_id() => {
                    return Err(err("its delete does not use the resource's id ({id}, a param bound to \"id\", or \"{id}\" in a filter), \
                                    so every resource of the kind would delete the same thing; if that is meant, say scope = \"whole\""
                        .into()))
                }
                None | Some("resource" | "whole") => {}
                Some(other) => return Err(err(format!("scope {other:?} must be \"resource\" (the default) or \"whole\""))),
            }
            let check = k.check.as_deref().map(|c| parse("check", c)).transpose()?;
            let lookup = k.lookup.as_ref().map(|l| Lookup::parse(l, providers)).transpose().map_err(err)?;
            let guard = k.guard.as_ref().map(|g| Guard::parse(g, providers)).transpose().map_err(err)?;
            let archive =
                if k.archive { Some(delete.archive_target(k.archive_table.as_deref()).map_err(err)?) } else { None };
            for a in &k.after {
                if !kinds.contains_key(a) {
                    return Err(err(format!("after names {a:?}, which is not a configured kind")));
                }
            }
            if k.reused_ids {
                let bounded = |a: &Action| a.attributes().iter().any(|x| x == "created_at");
                if !bounded(&delete) || check.as_ref().is_some_and(|c| !bounded(c)) {
                    return Err(err("reused_ids = true, but its delete (and check) do not use the resource's \
                                    created_at ({attr.created_at}, or a param \"attr.created_at\"): reaper could not \
                                    tell one life's resource from the next's of the same id"
                        .into()));
                }
            }
            let mut required_attributes: BTreeSet<String> = delete.attributes().into_iter().collect();
            if let Some(c) = &check {
                required_attributes.extend(c.attributes());
            }
            if let Some(g) = &guard {
                required_attributes.extend(g.action.attributes());
            }
            out.insert(
                name.clone(),
                KindSpec {
                    name: name.clone(),
                    provider: k.provider.clone(),
                    delete,
                    check,
                    after: k.after.clone(),
                    required_attributes,
                    lookup,
                    guard,
                    archive,
                    reused_ids: k.reused_ids,
                },
            );
        }
        let catalog = Catalog { kinds: out };
        if let Some(cycle) = catalog.find_cycle() {
            return Err(ConfigError::Cycle(cycle.join(" -> ")));
        }
        Ok(catalog)
    }

    pub fn kind(&self, name: &str) -> Option<&KindSpec> {
        self.kinds.get(name)
    }

    pub fn kind_names(&self) -> Vec<&str> {
        self.kinds.keys().map(|s| s.as_str()).collect()
    }

    /// The kinds in the order their resources go: each after every kind it
    /// waits for (`after`), ties by name. The catalog has no cycle.
    pub fn teardown_order(&self) -> Vec<&str> {
        let mut done: Vec<&str> = Vec::with_capacity(self.kinds.len());
        while done.len() < self.kinds.len() {
            let next = self
                .kinds
                .iter()
                .find(|(k, spec)| !done.contains(&k.as_str()) && spec.after.iter().all(|a| done.contains(&a.as_str())));
            match next {
                Some((k, _)) => done.push(k),
                None => break, // a cycle: `validate` refuses those
            }
        }
        done
    }

    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }

    /// Kinds that look their resources up in an application's database.
    pub fn lookups(&self) -> impl Iterator<Item = &KindSpec> {
        self.kinds.values().filter(|k| k.lookup.is_some())
    }

    /// A cycle in `after`, as the list of kinds around it (first repeated last).
    fn find_cycle(&self) -> Option<Vec<String>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            Open,
            Done,
        }
        fn visit<'a>(
            c: &'a Catalog,
            k: &'a str,
            marks: &mut BTreeMap<&'a str, Mark>,
            path: &mut Vec<&'a str>,
        ) -> Option<Vec<String>> {
            match marks.get(k).copied().unwrap_or(Mark::New) {
                Mark::Done => return None,
                Mark::Open => {
                    let start = path.iter().position(|p| *p == k).unwrap_or(0);
                    let mut cycle: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
                    cycle.push(k.to_string());
                    return Some(cycle);
                }
                Mark::New => {}
            }
            marks.insert(k, Mark::Open);
            path.push(k);
            for a in &c.kinds[k].after {
                if let Some(cycle) = visit(c, a, marks, path) {
                    return Some(cycle);
                }
            }
            path.pop();
            marks.insert(k, Mark::Done);
            None
        }
        let mut marks = BTreeMap::new();
        for k in self.kinds.keys() {
            if let Some(cycle) = visit(self, k, &mut marks, &mut Vec::new()) {
                return Some(cycle);
            }
        }
        None
    }
}

impl crate::plan::KindOrder for Catalog {
    fn after(&self, kind: &str) -> Option<&[String]> {
        self.kind(kind).map(|k| k.after.as_slice())
    }
}
