//! Reconcile rules: find orphans as the set difference between a source of
//! truth and a copy, and tear them down through the normal job pipeline.
//!
//! A sweep reads both inventories (concurrently, page by page) into temporary
//! tables in the ledger, lets PostgreSQL compute what is only in the copy, and
//! keeps per-item state across sweeps (first seen, consecutive sweeps
//! orphaned) for the grace period and the quarantine. The whole sweep is one
//! ledger transaction: a dry run is the same sweep rolled back, so what it
//! reports is exactly what `--execute` would do at that moment.
//!
//! Safety, in the order it is applied: an inventory that fails to load stops
//! the sweep (nothing is counted, nothing is touched); a side that comes back
//! empty while the other does not stops it; exclusions are never touched;
//! items younger than the grace period or seen orphaned in fewer consecutive
//! sweeps than the quarantine wait; more deletions than `max_count` or
//! `max_fraction` of the copy are refused unless forced.

pub mod cli;
pub mod inventory;
pub mod rules;
pub mod schedule;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, Transaction};

use crate::broker::{BrokerError, Names};
use crate::config::Settings;
use crate::ledger::{Ledger, LedgerError};
use crate::providers::Providers;
use inventory::Item;
pub use rules::{ActionSettings, Filter, ReconcileSettings, RuleSettings};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("no reconcile rule named {0:?}")]
    UnknownRule(String),
    #[error("rule {rule}: another sweep of it is running")]
    Busy { rule: String },
    #[error("rule {rule}: the {side} inventory failed to load, so nothing was touched: {message}")]
    Inventory { rule: String, side: &'static str, message: String },
    #[error("rule {rule}: {message}")]
    Sweep { rule: String, message: String },
    /// Asked in a way the rule does not allow: nothing was read or touched.
    #[error("rule {rule}: {message}")]
    Refused { rule: String, message: String },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The sweep's task panicked (its transaction rolled back).
    #[error("the sweep panicked; nothing it did was committed")]
    Panicked,
}

/// How a sweep was asked to run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mode {
    /// Act; otherwise report only (and change nothing, state included).
    pub execute: bool,
    /// Go past the max_count / max_fraction brakes.
    pub force: bool,
    /// This run's age for "old enough", in seconds, instead of the rule's
    /// `grace_secs` (`--older-than 48h`). Shorter than the rule's needs
    /// `force` to execute: the grace is what keeps a sweep off things being
    /// created right now.
    pub older_than: Option<f64>,
}

/// How a sweep ended (the JSON report and the metric label spell it in snake_case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Teardown events were published.
    Acted,
    /// Executed, and nothing (new) needed tearing down.
    NothingToDo,
    /// Reported only; nothing changed.
    DryRun,
    /// A safety rule said no; nothing was touched.
    Refused,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Acted => "acted",
            Outcome::NothingToDo => "nothing_to_do",
            Outcome::DryRun => "dry_run",
            Outcome::Refused => "refused",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a sweep found and did. Sample keys are the first few, in key order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub rule: String,
    pub dry_run: bool,
    pub outcome: Outcome,
    pub refused: Option<String>,
    pub sweep: i64,
    /// Distinct keys in the truth (None: the rule has no truth).
    pub truth: Option<u64>,
    /// Distinct keys in the copy, after the filters.
    pub copy: u64,
    /// Copy items left out by include/exclude.
    pub excluded: u64,
    pub orphans: u64,
    /// Orphans younger than the grace period.
    pub too_young: u64,
    /// Orphans not yet seen in enough consecutive sweeps.
    pub in_quarantine: u64,
    /// Orphans that pass every rule: what --execute tears down.
    pub actionable: u64,
    /// Teardown events published.
    pub published: u64,
    /// Actionable orphans whose teardown an earlier sweep already requested
    /// (running, done, or dead-lettered awaiting `reaper replay`).
    pub already_requested: u64,
    /// Actionable orphans whose id or attributes would change a request
    /// path (empty, `.`, `..`): never requested, reported here.
    #[serde(default)]
    pub unusable_values: u64,
    /// The age an orphan needed to be actionable in this sweep: the rule's
    /// grace, or the run's `--older-than`.
    #[serde(default)]
    pub grace_secs: f64,
    pub sample_actionable: Vec<String>,
    pub sample_waiting: Vec<String>,
    #[serde(with = "crate::contract::rfc3339")]
    pub started_at: DateTime<Utc>,
    pub seconds: f64,
}

/// What a sweep needs, borrowed from the application or the CLI.
pub struct Sweeper<'a> {
    pub settings: &'a Settings,
    pub ledger: &'a Ledger,
    pub providers: &'a Providers,
    pub metrics: Option<&'a crate::metrics::Metrics>,
}

const SAMPLES: i64 = 10;

impl crate::app::App {
    /// A reconcile sweeper over this process's ledger, providers and metrics.
    pub fn sweeper(&self) -> Sweeper<'_> {
        Sweeper {
            settings: &self.settings,
            ledger: &self.ledger,
            providers: &self.providers,
            metrics: Some(&self.metrics),
        }
    }
}

/// The rule as this run applies it: its grace replaced by `--older-than`.
fn with_age(name: &str, rule: &RuleSettings, mode: Mode) -> Result<RuleSettings, ReconcileError> {
    let Some(age) = mode.older_than else { return Ok(rule.clone()) };
    if !age.is_finite() || age < 0.0 {
        return Err(ReconcileError::Refused {
            rule: name.into(),
            message: format!("--older-than {age}s is not an age"),
        });
    }
    if age < rule.grace_secs && mode.execute && !mode.force {
        return Err(ReconcileError::Refused {
            rule: name.into(),
            message: format!(
                "--older-than {} is shorter than the rule's grace of {}, which keeps sweeps off what is being \
                 created right now; add --force to execute with it (a dry run needs nothing)",
                crate::domain::human(std::time::Duration::from_secs_f64(age)),
                crate::domain::human(std::time::Duration::from_secs_f64(rule.grace_secs))
            ),
        });
    }
    Ok(RuleSettings { grace_secs: age, ..rule.clone() })
}

impl Sweeper<'_> {
    pub async fn sweep(&self, name: &str, mode: Mode) -> Result<Report, ReconcileError> {
        let configured =
            self.settings.reconcile.rules.get(name).ok_or_else(|| ReconcileError::UnknownRule(name.into()))?;
        let rule = &with_age(name, configured, mode)?;
        if mode.execute {
            if let Some(p) = self.ledger.paused().await? {
                let message = format!(
                    "reaper is paused (since {}, by {}: {}); a dry run works, --execute waits for `reaper resume`",
                    p.since.to_rfc3339(),
                    p.by,
                    p.reason
                );
                return Err(ReconcileError::Refused { rule: name.into(), message });
            }
        }
        let started = std::time::Instant::now();
        let result = self.sweep_inner(name, rule, mode).await;
        if let Some(m) = self.metrics {
            let outcome = match &result {
                Ok(r) => r.outcome.as_str(),
                Err(ReconcileError::Busy { .. }) => "busy",
                Err(_) => "failed",
            };
            m.reconcile_runs.with_label_values(&[name, outcome]).inc();
            m.reconcile_seconds.with_label_values(&[name]).observe(started.elapsed().as_secs_f64());
            if let Ok(r) = &result {
                m.reconcile_orphans.with_label_values(&[name]).set(r.orphans as i64);
                m.reconcile_published.with_label_values(&[name]).inc_by(r.published);
            }
        }
        match &result {
            Ok(r) => tracing::info!(
                rule = name,
                outcome = %r.outcome,
                orphans = r.orphans,
                actionable = r.actionable,
                published = r.published,
                refused = r.refused.as_deref().unwrap_or(""),
                "reconcile sweep done"
            ),
            Err(e) => tracing::warn!(rule = name, error = %e, "reconcile sweep stopped; nothing was touched"),
        }
        result
    }

    /// One sweep in one ledger transaction, committed when it executed and
    /// rolled back otherwise. A sweep that fails ends its transaction here and
    /// now: a dropped one is rolled back only when the pool next uses its
    /// connection, and until then the rule's advisory lock would make every
    /// next sweep "busy".
    async fn sweep_inner(&self, name: &str, rule: &RuleSettings, mode: Mode) -> Result<Report, ReconcileError> {
        let clock = std::time::Instant::now();
        let fail = |message: String| ReconcileError::Sweep { rule: name.into(), message };
        let mut tx = self.ledger.pool().begin().await.map_err(|e| fail(format!("ledger: {e}")))?;
        let mut report = match self.sweep_in(name, rule, mode, &mut tx).await {
            Ok((report, true)) => {
                tx.commit().await.map_err(|e| fail(format!("ledger: {e}")))?;
                report
            }
            Ok((report, false)) => {
                tx.rollback().await.map_err(|e| fail(format!("ledger: {e}")))?;
                report
            }
            Err(e) => {
                if let Err(why) = tx.rollback().await {
                    tracing::warn!(rule = name, error = %why, "could not roll back a failed sweep");
                }
                return Err(e);
            }
        };
        report.seconds = clock.elapsed().as_secs_f64();
        Ok(report)
    }

    async fn sweep_in(
        &self,
        name: &str,
        rule: &RuleSettings,
        mode: Mode,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(Report, bool), ReconcileError> {
        let started_at = Utc::now();
        let fail = |message: String| ReconcileError::Sweep { rule: name.into(), message };
        let (locked,): (bool,) =
            sqlx::query_as("SELECT pg_try_advisory_xact_lock(hashtext('reaper.reconcile'), hashtext($1))")
                .bind(name)
                .fetch_one(&mut **tx)
                .await
                .map_err(|e| fail(format!("ledger: {e}")))?;
        if !locked {
            return Err(ReconcileError::Busy { rule: name.into() });
        }
        for ddl in [
            "CREATE TEMP TABLE rc_truth (key TEXT NOT NULL) ON COMMIT DROP",
            "CREATE TEMP TABLE rc_copy (key TEXT NOT NULL, created_at TIMESTAMPTZ, attrs JSONB NOT NULL) ON COMMIT DROP",
        ] {
            sqlx::query(ddl).execute(&mut **tx).await.map_err(|e| fail(format!("ledger: {e}")))?;
        }
        let (truth, copy, excluded) = self.load(name, rule, tx).await?;

        let mut report = Report {
            rule: name.into(),
            dry_run: !mode.execute,
            outcome: Outcome::DryRun,
            refused: None,
            sweep: 0,
            truth,
            copy,
            excluded,
            orphans: 0,
            too_young: 0,
            in_quarantine: 0,
            actionable: 0,
            published: 0,
            already_requested: 0,
            unusable_values: 0,
            grace_secs: rule.grace_secs,
            sample_actionable: Vec::new(),
            sample_waiting: Vec::new(),
            started_at,
            seconds: 0.0,
        };
        let empty = one_side_empty(truth, copy + excluded);
        if let Some(why) = empty {
            report.outcome = Outcome::Refused;
            report.refused = Some(format!("{why}; nothing was touched"));
            return Ok((report, false));
        }
        self.classify(name, rule, tx, &mut report).await.map_err(|e| fail(format!("ledger: {e}")))?;

        let brake = brake(rule, report.actionable, copy, truth.is_some());
        report.outcome = match (&brake, mode.force, mode.execute, report.actionable) {
            (Some(b), false, _, _) => {
                report.refused = Some(format!("{b}; rerun with --force if that is intended"));
                Outcome::Refused
            }
            (_, _, false, _) => Outcome::DryRun,
            (_, _, true, 0) => Outcome::NothingToDo,
            (_, _, true, _) => Outcome::Acted,
        };
        if report.outcome == Outcome::Acted {
            self.publish(name, rule, tx, &mut report).await?;
            if report.published == 0 {
                report.outcome = Outcome::NothingToDo;
            }
        }
        let stored = serde_json::to_value(&report).unwrap_or_default();
        if mode.execute {
            sqlx::query("UPDATE reconcile_rules SET last_report = $2 WHERE rule = $1")
                .bind(name)
                .bind(stored)
                .execute(&mut **tx)
                .await
                .map_err(|e| fail(format!("ledger: {e}")))?;
        }
        // An executed sweep is kept (its count, the orphans' state, what it
        // published), a refused one by the brakes included; a dry run is not.
        Ok((report, mode.execute))
    }

    /// Reads both inventories at once into the temporary tables. Returns the
    /// truth's size (None without a truth), the copy's kept and excluded counts.
    async fn load(
        &self,
        name: &str,
        rule: &RuleSettings,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(Option<u64>, u64, u64), ReconcileError> {
        let inv_err =
            |side: &'static str, message: String| ReconcileError::Inventory { rule: name.into(), side, message };
        let mut truth_rx = rule.truth.as_ref().map(|t| inventory::read(t, self.providers, self.ledger, true));
        let mut copy_rx = inventory::read(&rule.copy, self.providers, self.ledger, false);
        let mut excluded = 0u64;
        let (mut truth_done, mut copy_done) = (truth_rx.is_none(), false);
        while !(truth_done && copy_done) {
            tokio::select! {
                page = async { truth_rx.as_mut().expect("present until done").next().await }, if !truth_done => match page {
                    Ok(None) => truth_done = true,
                    Err(e) => return Err(inv_err("truth", e)),
                    Ok(Some(items)) => {
                        let keys: Vec<String> = items.into_iter().map(|i| i.key).collect();
                        sqlx::query("INSERT INTO rc_truth (key) SELECT * FROM unnest($1::text[])")
                            .bind(keys)
                            .execute(&mut **tx)
                            .await
                            .map_err(|e| inv_err("truth", format!("storing a page: {e}")))?;
                    }
                },
                page = copy_rx.next(), if !copy_done => match page {
                    Ok(None) => copy_done = true,
                    Err(e) => return Err(inv_err("copy", e)),
                    Ok(Some(items)) => {
                        let (kept, left): (Vec<Item>, Vec<Item>) = items.into_iter().partition(|i| {
                            rule.include.iter().all(|f| f.matches(i)) && !rule.exclude.iter().any(|f| f.matches(i))
                        });
                        excluded += left.len() as u64;
                        let mut keys = Vec::with_capacity(kept.len());
                        let mut created = Vec::with_capacity(kept.len());
                        let mut attrs = Vec::with_capacity(kept.len());
                        for i in kept {
                            keys.push(i.key);
                            created.push(i.created_at);
                            attrs.push(serde_json::to_value(i.attributes).unwrap_or_default());
                        }
                        sqlx::query(
                            "INSERT INTO rc_copy (key, created_at, attrs) \
                             SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::jsonb[])",
                        )
                        .bind(keys)
                        .bind(created)
                        .bind(attrs)
                        .execute(&mut **tx)
                        .await
                        .map_err(|e| inv_err("copy", format!("storing a page: {e}")))?;
                    }
                },
            }
        }
        // Distinct keys: a copy may hold many items per key (documents pointing at one owner).
        let (truth_keys, copy_keys): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(DISTINCT key) FROM rc_truth), (SELECT count(DISTINCT key) FROM rc_copy)",
        )
        .fetch_one(&mut **tx)
        .await
        .map_err(|e| inv_err("copy", format!("counting: {e}")))?;
        Ok((rule.truth.as_ref().map(|_| truth_keys as u64), copy_keys as u64, excluded))
    }

    /// Computes the orphans, advances their state and fills the counts.
    async fn classify(
        &self,
        name: &str,
        rule: &RuleSettings,
        tx: &mut Transaction<'static, Postgres>,
        report: &mut Report,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("ANALYZE rc_truth").execute(&mut **tx).await?;
        sqlx::query("ANALYZE rc_copy").execute(&mut **tx).await?;
        let (sweep,): (i64,) = sqlx::query_as(
            "INSERT INTO reconcile_rules (rule, sweeps) VALUES ($1, 1) \
             ON CONFLICT (rule) DO UPDATE SET sweeps = reconcile_rules.sweeps + 1 RETURNING sweeps",
        )
        .bind(name)
        .fetch_one(&mut **tx)
        .await?;
        report.sweep = sweep;
        sqlx::query(
            "CREATE TEMP TABLE rc_orphans ON COMMIT DROP AS \
             SELECT DISTINCT ON (c.key) c.key, c.created_at, c.attrs FROM rc_copy c \
             WHERE NOT EXISTS (SELECT 1 FROM rc_truth t WHERE t.key = c.key) ORDER BY c.key, c.created_at",
        )
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "INSERT INTO reconcile_state (rule, key, streak, last_sweep) SELECT $1, key, 1, $2 FROM rc_orphans \
             ON CONFLICT (rule, key) DO UPDATE SET \
               streak = CASE WHEN reconcile_state.last_sweep = $2 - 1 THEN reconcile_state.streak + 1 ELSE 1 END, \
               last_sweep = $2",
        )
        .bind(name)
        .bind(sweep)
        .execute(&mut **tx)
        .await?;
        sqlx::query("DELETE FROM reconcile_state WHERE rule = $1 AND last_sweep < $2")
            .bind(name)
            .bind(sweep)
            .execute(&mut **tx)
            .await?;
        // `ready` = old enough and seen often enough; rc_ready is what --execute acts on.
        sqlx::query(
            "CREATE TEMP TABLE rc_ready ON COMMIT DROP AS \
             SELECT o.key, o.attrs, (extract(epoch FROM s.first_seen) * 1000000)::bigint AS episode, \
                    coalesce(o.created_at, s.first_seen) <= now() - make_interval(secs => $3) AS old_enough, \
                    s.streak >= $4 AS seen_enough \
             FROM rc_orphans o JOIN reconcile_state s ON s.rule = $1 AND s.key = o.key AND s.last_sweep = $2",
        )
        .bind(name)
        .bind(sweep)
        .bind(rule.grace_secs)
        .bind(rule.quarantine_sweeps as i32)
        .execute(&mut **tx)
        .await?;
        let (orphans, young, waiting, ready): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE NOT old_enough), \
                    count(*) FILTER (WHERE old_enough AND NOT seen_enough), \
                    count(*) FILTER (WHERE old_enough AND seen_enough) FROM rc_ready",
        )
        .fetch_one(&mut **tx)
        .await?;
        report.orphans = orphans as u64;
        report.too_young = young as u64;
        report.in_quarantine = waiting as u64;
        report.actionable = ready as u64;
        report.sample_actionable =
            sqlx::query_scalar("SELECT key FROM rc_ready WHERE old_enough AND seen_enough ORDER BY key LIMIT $1")
                .bind(SAMPLES)
                .fetch_all(&mut **tx)
                .await?;
        report.sample_waiting =
            sqlx::query_scalar("SELECT key FROM rc_ready WHERE NOT (old_enough AND seen_enough) ORDER BY key LIMIT $1")
                .bind(SAMPLES)
                .fetch_all(&mut **tx)
                .await?;
        Ok(())
    }

    /// Publishes one teardown event per actionable orphan, with confirms,
    /// a page at a time.
    async fn publish(
        &self,
        name: &str,
        rule: &RuleSettings,
        tx: &mut Transaction<'static, Postgres>,
        report: &mut Report,
    ) -> Result<(), ReconcileError> {
        let fail = |message: String| ReconcileError::Sweep { rule: name.into(), message };
        let names = Names::new(&self.settings.broker.prefix);
        let catalog = crate::catalog::validate(self.settings).map_err(|e| fail(e.to_string()))?;
        let (conn, publisher) = crate::broker::link::open(self.settings, &names).await?;
        let mut after = String::new();
        let result: Result<(), ReconcileError> = async {
            loop {
                let page: Vec<(String, serde_json::Value, i64)> = sqlx::query_as(
                    "SELECT key, attrs, episode FROM rc_ready WHERE old_enough AND seen_enough AND key > $1 \
                     ORDER BY key LIMIT 500",
                )
                .bind(&after)
                .fetch_all(&mut **tx)
                .await
                .map_err(|e| fail(format!("ledger: {e}")))?;
                let Some((last, _, _)) = page.last() else { return Ok(()) };
                after = last.clone();
                let ids: Vec<String> = page.iter().map(|(key, _, episode)| event_id(name, key, *episode)).collect();
                // An orphan whose teardown for this episode already exists (running,
                // done, or dead-lettered awaiting a replay) is not requested again.
                let known: std::collections::HashSet<String> =
                    sqlx::query_scalar("SELECT event_id FROM jobs WHERE event_id = ANY($1)")
                        .bind(&ids)
                        .fetch_all(&mut **tx)
                        .await
                        .map_err(|e| fail(format!("ledger: {e}")))?
                        .into_iter()
                        .collect();
                let mut events = Vec::new();
                for ((key, attrs, _), id) in page.iter().zip(ids) {
                    if known.contains(&id) {
                        report.already_requested += 1;
                    } else {
                        match event_for(name, rule, key, attrs, id, &catalog).map_err(fail)? {
                            Some(event) => events.push(event),
                            None => report.unusable_values += 1,
                        }
                    }
                }
                let sends = events.iter().map(|(id, rk, body)| publisher.publish(&names.events, rk, body, id, &[]));
                for r in futures_util::future::join_all(sends).await {
                    r?;
                    report.published += 1;
                }
            }
        }
        .await;
        publisher.close().await;
        let _ = conn.close(200, "sent".into()).await;
        result
    }
}

/// An empty side next to a full one is what an outage, a wrong filter or an
/// expired token looks like: never a reason to delete everything.
fn one_side_empty(truth: Option<u64>, copy: u64) -> Option<String> {
    match truth {
        Some(0) if copy > 0 => Some(format!("the truth inventory came back empty while the copy holds {copy}")),
        Some(t) if t > 0 && copy == 0 => Some(format!("the copy inventory came back empty while the truth holds {t}")),
        _ => None,
    }
}

/// Why `actionable` deletions are too many for the rule, if they are. The
/// fraction applies only with a truth: without one, every copy item is a candidate.
fn brake(rule: &RuleSettings, actionable: u64, copy: u64, has_truth: bool) -> Option<String> {
    let limit = if has_truth { (rule.max_fraction * copy as f64).floor() as u64 } else { u64::MAX };
    if actionable > rule.max_count {
        Some(format!("{actionable} deletions exceed max_count {}", rule.max_count))
    } else if actionable > limit {
        Some(format!("{actionable} deletions exceed max_fraction {} of the copy's {copy} items", rule.max_fraction))
    } else {
        None
    }
}

/// One orphan's event id: the same for every sweep of one episode (from when
/// the item was first seen orphaned until it is not), so the sweep can tell
/// that its teardown was already requested. The key is hashed to keep the id short.
fn event_id(rule: &str, key: &str, episode: i64) -> String {
    fn fnv1a(basis: u64, bytes: &[u8]) -> u64 {
        bytes.iter().fold(basis, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
    }
    let (a, b) = (fnv1a(0xcbf2_9ce4_8422_2325, key.as_bytes()), fnv1a(0x6c62_272e_07bb_0142, key.as_bytes()));
    format!("reconcile:{rule}:{episode}:{a:016x}{b:016x}")
}

/// One teardown event to publish: event id, routing key, body.
type Outgoing = (String, &'static str, Vec<u8>);

/// The teardown event for one orphan: its event id, routing key and body;
/// `None` when its values would change a request path of the action's kind
/// (the door would refuse the event; better not to send it at all).
fn event_for(
    rule_name: &str,
    rule: &RuleSettings,
    key: &str,
    attrs: &serde_json::Value,
    event_id: String,
    catalog: &crate::catalog::Catalog,
) -> Result<Option<Outgoing>, String> {
    let template = rule.action.owner.clone().unwrap_or_else(|| format!("reconcile.{rule_name}/{{key}}"));
    let owner = template.replace("{key}", key);
    crate::contract::check_owner(&owner).map_err(|e| format!("orphan {key:?}: {e}"))?;
    let reason = format!("reconcile rule {rule_name}");
    let attributes: BTreeMap<String, String> = serde_json::from_value(attrs.clone()).unwrap_or_default();
    let event = crate::contract::OutgoingTeardown {
        event_id: &event_id,
        owner: &owner,
        reason: &reason,
        requested_by: None,
        dry_run: false,
        occurred_at: Utc::now(),
        error: None,
        failed_step: None,
        resources: Vec::new(),
    };
    let (rk, body) = match &rule.action.kind {
        Some(kind) => {
            let id = match &rule.action.id {
                Some(a) => {
                    attributes.get(a).cloned().ok_or_else(|| format!("orphan {key:?} has no attribute {a:?}"))?
                }
                None => key.to_string(),
            };
            if let Some(why) = catalog.kind(kind).and_then(|k| k.path_values_refused(&id, &attributes)) {
                tracing::warn!(
                    rule = rule_name,
                    orphan = key,
                    why,
                    "orphan not requested: its values cannot be used in a request path"
                );
                return Ok(None);
            }
            let resources = vec![crate::contract::OutgoingResource { kind, id: &id, attributes: &attributes }];
            let body = crate::contract::OutgoingTeardown {
                error: Some("orphan found by reconcile"),
                failed_step: Some(rule_name),
                resources,
                ..event
            };
            (crate::contract::PROVISIONING_FAILED, body.to_bytes())
        }
        None => {
            let rk = match rule.action.event.as_deref() {
                Some(crate::contract::PROVISIONING_FAILED) => crate::contract::PROVISIONING_FAILED,
                _ => crate::contract::DELETION_REQUESTED,
            };
            (rk, crate::contract::OutgoingTeardown { requested_by: Some("reaper-reconcile"), ..event }.to_bytes())
        }
    };
    Ok(Some((event_id, rk, body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_brakes_and_the_emptiness_rule() {
        let rule: RuleSettings = toml_rule("max_count = 10\nmax_fraction = 0.5");
        assert_eq!(brake(&rule, 10, 20, true), None);
        assert!(brake(&rule, 11, 100, true).unwrap().contains("exceed max_count 10"));
        assert!(brake(&rule, 6, 11, true).unwrap().contains("max_fraction 0.5 of the copy's 11 items"));
        assert_eq!(brake(&rule, 6, 11, false), None, "no truth, no fraction");
        assert!(one_side_empty(Some(0), 3).unwrap().contains("truth inventory came back empty"));
        assert!(one_side_empty(Some(3), 0).unwrap().contains("copy inventory came back empty"));
        assert_eq!(one_side_empty(Some(0), 0), None);
        assert_eq!(one_side_empty(None, 0), None);
    }

    fn toml_rule(extra: &str) -> RuleSettings {
        let text = format!("copy = {{ provider = \"ledger\", kind = \"k\" }}\naction = {{ kind = \"k\" }}\n{extra}");
        use figment::providers::Format;
        figment::Figment::from(figment::providers::Toml::string(&text)).extract().unwrap()
    }

    #[test]
    fn event_ids_are_stable_per_episode_and_short() {
        let a = event_id("rule", "projects/p/locations/l/models/1", 1_700_000_000_000_000);
        assert_eq!(a, event_id("rule", "projects/p/locations/l/models/1", 1_700_000_000_000_000));
        assert_ne!(a, event_id("rule", "projects/p/locations/l/models/2", 1_700_000_000_000_000));
        assert_ne!(a, event_id("rule", "projects/p/locations/l/models/1", 1_700_000_000_000_001));
        assert!(event_id(&"r".repeat(64), &"k".repeat(5000), i64::MAX).len() <= 128);
    }
}
