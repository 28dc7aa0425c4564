//! Reconcile rules: their start-up checks and filters. The settings
//! themselves are plain data in `config::reconcile`.

pub use crate::config::reconcile::{ActionSettings, Filter, ReconcileSettings, RuleSettings};

use std::collections::BTreeMap;

use super::inventory::Item;
use crate::catalog::Catalog;
use crate::config::ProviderSettings;

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
            // An item removed before our offset while the truth is read shifts
            // the next one past it: unread, its copy would look orphaned. A
            // `total` does not catch a removal and a creation in one read.
            if r.truth.as_ref().is_some_and(|t| t.offset_param.is_some()) && r.quarantine_sweeps < 2 {
                return Err(err("a truth read by offset paging needs quarantine_sweeps of at least 2: an item that moves while the list is read can be missed, and a `total` does not catch one removed while another is created".into()));
            }
            if let Some(every) = r.every_secs {
                if every.is_nan() || every < self.min_interval_secs {
                    return Err(err(format!(
                        "every_secs {every} is below reconcile.min_interval_secs {}",
                        self.min_interval_secs
                    )));
                }
            }
            if let Some(pattern) = &r.schedule {
                if r.every_secs.is_some() {
                    return Err(err("give every_secs or schedule, not both".into()));
                }
                let gap = cron(pattern).and_then(|c| shortest_gap(&c)).map_err(err)?;
                if gap < self.min_interval_secs {
                    return Err(err(format!(
                        "schedule {pattern:?} runs {gap}s apart, below reconcile.min_interval_secs {}",
                        self.min_interval_secs
                    )));
                }
            }
        }
        Ok(())
    }
}

/// A rule's `schedule`, parsed: five fields (minute first) or six (second first), UTC.
pub fn cron(pattern: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::new()
        .parse(pattern)
        .map_err(|e| format!("schedule {pattern:?} is not a cron pattern: {e}"))
}

/// The shortest time between two of the next hundred slots, in seconds.
fn shortest_gap(c: &croner::Cron) -> Result<f64, String> {
    let slots: Vec<_> = c.iter_after(chrono::Utc::now()).take(100).collect();
    if slots.len() < 2 {
        return Err(format!("schedule {:?} never runs again", c.pattern.to_string()));
    }
    Ok(slots.windows(2).map(|w| (w[1] - w[0]).num_milliseconds() as f64 / 1000.0).fold(f64::INFINITY, f64::min))
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
