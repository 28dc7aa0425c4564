//! Scheduled sweeps inside `reaper run`. Every replica runs this loop; a rule
//! is claimed in the ledger (a conditional update of its last start), so each
//! interval runs it once across replicas, and the sweep's own advisory lock
//! keeps two from overlapping. Also purges archives past their retention.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Mode;
use crate::app::App;

pub async fn run(app: Arc<App>, shutdown: CancellationToken) {
    let rules: Vec<(String, f64, bool)> = app
        .settings
        .reconcile
        .rules
        .iter()
        .filter(|_| app.settings.reconcile.run_schedules)
        .filter_map(|(name, r)| r.every_secs.map(|e| (name.clone(), e, r.execute_on_schedule)))
        .collect();
    let shortest = rules.iter().map(|r| r.1).fold(3_600.0_f64, f64::min);
    let tick = Duration::from_secs_f64((shortest / 4.0).clamp(0.2, 60.0));
    let mut last_purge: Option<std::time::Instant> = None;
    loop {
        if last_purge.is_none_or(|t| t.elapsed() > Duration::from_secs(3_600)) {
            last_purge = Some(std::time::Instant::now());
            match app.ledger.purge_archive(app.settings.archive.retention_days).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(records = n, "archived records past their retention purged"),
                Err(e) => tracing::warn!(error = %e, "could not purge old archives"),
            }
        }
        for (name, every, execute) in &rules {
            if shutdown.is_cancelled() {
                return;
            }
            match claim(&app, name, *every).await {
                Ok(true) => {
                    let sweeper = app.sweeper();
                    // The outcome is logged and counted by the sweep itself. A
                    // shutdown drops the sweep, which rolls its transaction back.
                    tokio::select! {
                        _ = sweeper.sweep(name, Mode { execute: *execute, force: false, older_than: None }) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(rule = %name, error = %e, "could not claim the scheduled sweep"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

/// True when this replica won the rule's run for the current interval.
async fn claim(app: &App, rule: &str, every_secs: f64) -> Result<bool, sqlx::Error> {
    let won: Option<(String,)> = sqlx::query_as(
        "INSERT INTO reconcile_rules (rule, last_started_at) VALUES ($1, now()) \
         ON CONFLICT (rule) DO UPDATE SET last_started_at = now() \
         WHERE reconcile_rules.last_started_at IS NULL \
            OR reconcile_rules.last_started_at <= now() - make_interval(secs => $2) \
         RETURNING rule",
    )
    .bind(rule)
    .bind(every_secs)
    .fetch_optional(app.ledger.pool())
    .await?;
    Ok(won.is_some())
}
