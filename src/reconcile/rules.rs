//! Reconcile rules as configured: what each side reads, what is done with an
//! orphan, the safety settings, and the checks made at start-up.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::inventory::{InventorySettings, Item};
use crate::config::{Catalog, ProviderSettings};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileSettings {
    /// The shortest `every_secs` a rule's schedule may have.
    pub min_interval_secs: f64,
    /// Whether `reaper run` runs the rules' schedules (off: by hand and the admin API only).
    pub run_schedules: bool,
    #[serde(default)]
    pub rules: BTreeMap<String, RuleSettings>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSettings {
    /// The source of truth. Without one, every item of the copy that passes
    /// the filters is an orphan (a rule like "failed for more than 24 hours").
    #[serde(default)]
    pub truth: Option<InventorySettings>,
    pub copy: InventorySettings,
    pub action: ActionSettings,
    /// Items younger than this (by their created_at, else by when reaper first
    /// saw them orphaned) are left alone.
    #[serde(default)]
    pub grace_secs: f64,
    /// Consecutive sweeps that must all find an item orphaned before it is touched.
    #[serde(default = "one")]
    pub quarantine_sweeps: u32,
    /// Refuse (unless forced) when a sweep would tear down more than this many...
    #[serde(default = "default_max_count")]
    pub max_count: u64,
    /// ...or more than this fraction of the copy (rules with a truth only).
    #[serde(default = "default_max_fraction")]
    pub max_fraction: f64,
    /// Only items matching all of these are considered.
    #[serde(default)]
    pub include: Vec<Filter>,
    /// Items matching any of these are never touched.
    #[serde(default)]
    pub exclude: Vec<Filter>,
    /// Run inside `reaper run` this often; unset: by hand only.
    #[serde(default)]
    pub every_secs: Option<f64>,
    /// Scheduled sweeps act (true) or only report (false, the default).
    #[serde(default)]
    pub execute_on_schedule: bool,
}

fn one() -> u32 {
    1
}
fn default_max_count() -> u64 {
    100
}
fn default_max_fraction() -> f64 {
    0.5
}

/// What a sweep does with each orphan.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionSettings {
    /// Tear the orphan down as a resource of this kind (provisioning.failed
    /// listing it). Without a kind, the owner itself is torn down
    /// (deletion.requested or provisioning.failed, lookups finding the rest).
    #[serde(default)]
    pub kind: Option<String>,
    /// The attribute that is the resource's id; default the key.
    #[serde(default)]
    pub id: Option<String>,
    /// The owner, "type/{key}"; default "reconcile.RULE/{key}".
    #[serde(default)]
    pub owner: Option<String>,
    /// "deletion.requested" or "provisioning.failed".
    #[serde(default)]
    pub event: Option<String>,
}

/// `field` is "key" or an attribute; `glob` may use `*`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub field: String,
    pub glob: String,
}

impl Filter {
    pub fn matches(&self, item: &Item) -> bool {
        let v = if self.field == "key" { Some(&item.key) } else { item.attributes.get(&self.field) };
        v.is_some_and(|v| glob(&self.glob, v))
    }
}

/// `*` matches any run of characters; everything else itself.
pub fn glob(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first) || s.len() < first.len() + last.len() || !s.ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for p in &parts[1..parts.len() - 1] {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    true
}

impl ReconcileSettings {
    /// Checks every rule against the providers and kinds, at start-up.
    pub fn check(&self, providers: &BTreeMap<String, ProviderSettings>, catalog: &Catalog) -> Result<(), String> {
        for (name, r) in &self.rules {
            let err = |m: String| format!("reconcile rule {name:?}: {m}");
            if name.is_empty()
                || name.len() > 64
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(err("a rule name is 1..64 ASCII letters, digits, '-', '_' or '.'".into()));
            }
            if let Some(t) = &r.truth {
                t.check(providers).map_err(|e| err(format!("truth: {e}")))?;
            }
            r.copy.check(providers).map_err(|e| err(format!("copy: {e}")))?;
            if let Some(k) = &r.action.kind {
                if catalog.kind(k).is_none() {
                    return Err(err(format!("action.kind {k:?} is not a configured kind")));
                }
            }
            match r.action.event.as_deref() {
                None | Some(crate::contract::DELETION_REQUESTED) | Some(crate::contract::PROVISIONING_FAILED) => {}
                Some(e) => {
                    return Err(err(format!("action.event {e:?} must be deletion.requested or provisioning.failed")))
                }
            }
            if r.action.kind.is_some() && r.action.event.as_deref() == Some(crate::contract::DELETION_REQUESTED) {
                return Err(err("action.kind lists the orphan, which only provisioning.failed can carry".into()));
            }
            let owner = r.action.owner.as_deref().unwrap_or("x/{key}");
            if owner.matches("{key}").count() != 1 || !owner.contains('/') {
                return Err(err(format!("action.owner {owner:?} must be \"type/...\" with {{key}} once")));
            }
            if !(r.max_fraction > 0.0 && r.max_fraction <= 1.0) {
                return Err(err("max_fraction must be in (0, 1]".into()));
            }
            if r.grace_secs < 0.0 || !r.grace_secs.is_finite() {
                return Err(err("grace_secs must be a non-negative number".into()));
            }
            if r.quarantine_sweeps == 0 {
                return Err(err("quarantine_sweeps must be at least 1".into()));
            }
            if let Some(every) = r.every_secs {
                if every.is_nan() || every < self.min_interval_secs {
                    return Err(err(format!(
                        "every_secs {every} is below reconcile.min_interval_secs {}",
                        self.min_interval_secs
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("gs://b2b-recs-quicktest-*", "gs://b2b-recs-quicktest-artifacts/x"));
        assert!(!glob("gs://b2b-recs-quicktest-*", "gs://b2b-recs-training-artifacts/x"));
        assert!(glob("*test*", "trd-test-20260129"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxcyyb"));
        assert!(glob("exact", "exact"));
        assert!(!glob("ab*ba", "aba"), "prefix and suffix may not overlap");
    }
}
