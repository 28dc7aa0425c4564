//! Scheduled sweeps inside `reaper run`. Every replica runs this loop; a rule
//! is claimed in the ledger (a conditional update of its last start), so each
//! interval runs it once across replicas, and the sweep's own advisory lock
//! keeps two from overlapping. Also purges archives and finished jobs past their retention.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Mode, ReconcileError};
use crate::app::App;

/// When a rule runs.
enum Timing {
    Every(f64),
    Cron(Box<croner::Cron>),
}

/// A cron slot is run when a replica sees it no later than this after its
/// time: a worker that was down at 04:00 catches up at 04:05, but a worker
/// first started at 10:00 does not run the 04:00 sweep.
const LATE: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

pub async fn run(app: Arc<App>, shutdown: CancellationToken) {
    let rules: Vec<(String, Timing, bool)> = app
        .settings
        .reconcile
        .rules
        .iter()
        .filter(|(_, r)| app.settings.reconcile.run_schedules && r.enabled)
        .filter_map(|(name, r)| {
            let timing = match (r.every_secs, &r.schedule) {
                (Some(e), _) => Timing::Every(e),
                // Checked at start-up (`rules.rs`).
                (None, Some(p)) => Timing::Cron(Box::new(super::rules::cron(p).ok()?)),
                (None, None) => return None,
            };
            Some((name.clone(), timing, r.execute_on_schedule))
        })
        .collect();
    let shortest = rules
        .iter()
        .filter_map(|r| match r.1 {
            Timing::Every(e) => Some(e),
            Timing::Cron(_) => None,
        })
        .fold(3_600.0_f64, f64::min);
    let tick = Duration::from_secs_f64((shortest / 4.0).clamp(0.2, 60.0));
    let mut last_purge: Option<std::time::Instant> = None;
    loop {
        // Paused: no sweep, and no purge either (an operator looking into an
        // incident needs the steps that say what was deleted).
        let paused = app.paused().is_some();
        if !paused && last_purge.is_none_or(|t| t.elapsed() > Duration::from_secs(3_600)) {
            last_purge = Some(std::time::Instant::now());
            match app.ledger.purge_archive(app.settings.archive.retention_days).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(records = n, "archived records past their retention purged"),
                Err(e) => tracing::warn!(error = %e, "could not purge old archives"),
            }
            purge_jobs(&app, &shutdown).await;
        }
        // Paused: no sweep runs (a cron slot that passes meanwhile is missed,
        // unless the resume comes within its ten minutes).
        for (name, timing, execute) in rules.iter().filter(|_| !paused) {
            if shutdown.is_cancelled() {
                return;
            }
            let mut slot = None;
            let claimed = match timing {
                Timing::Every(every) => claim(&app, name, *every).await,
                Timing::Cron(c) => match due_slot(c, chrono::Utc::now()) {
                    Some(s) => {
                        slot = Some(s);
                        claim_slot(&app, name, s).await
                    }
                    None => Ok(false),
                },
            };
            match claimed {
                Ok(true) => {
                    let sweeper = app.sweeper();
                    // The outcome is logged and counted by the sweep itself. A
                    // shutdown drops the sweep, which rolls its transaction back.
                    let ran = tokio::select! {
                        r = sweeper.sweep(name, Mode { execute: *execute, force: false, older_than: None }) => Some(r),
                        _ = shutdown.cancelled() => None,
                    };
                    // A cron slot whose sweep did not run (a shutdown, a pause
                    // this replica had not read yet) is given back: another
                    // replica, or this one after its restart, runs it within
                    // the slot's ten minutes. Not when a sweep by hand held
                    // the rule: that one counted, and a second minutes later
                    // would shorten the quarantine.
                    let not_run = matches!(ran, None | Some(Err(ReconcileError::Refused { .. })));
                    if let (Some(s), true) = (slot, not_run) {
                        if let Err(e) = unclaim_slot(&app, name, s).await {
                            tracing::warn!(rule = %name, error = %e, "could not give back a cron slot whose sweep did not run");
                        }
                    }
                    if ran.is_none() {
                        return;
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(rule = %name, error = %e, "could not claim the scheduled sweep"),
            }
        }
        // Until the next tick, or the next cron slot if that comes first.
        let now = chrono::Utc::now();
        let next_slot = rules
            .iter()
            .filter_map(|r| match &r.1 {
                Timing::Cron(c) => c.find_next_occurrence(&now, false).ok(),
                Timing::Every(_) => None,
            })
            .min()
            .and_then(|t| (t - now).to_std().ok());
        let wait = next_slot.map_or(tick, |n| n.min(tick));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Jobs past `ledger.retention_days`, a thousand a statement, with a pause
/// between statements so the worker's own writes go first.
async fn purge_jobs(app: &App, shutdown: &CancellationToken) {
    const BATCH: i64 = 1_000;
    let mut purged = 0;
    while !shutdown.is_cancelled() {
        match app.ledger.purge_jobs(app.settings.ledger.retention_days, BATCH).await {
            Ok(n) => {
                purged += n;
                if n < BATCH as u64 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not purge old jobs; trying again in an hour");
                break;
            }
        }
    }
    if purged > 0 {
        tracing::info!(jobs = purged, "finished jobs past their retention purged");
    }
    if let Err(e) = app.ledger.purge_replays(app.settings.ledger.retention_days).await {
        tracing::warn!(error = %e, "could not purge old replays; trying again in an hour");
    }
}

/// The slot a cron rule owes a sweep at `now`: its latest time, if that is
/// not more than [`LATE`] ago.
fn due_slot(c: &croner::Cron, now: chrono::DateTime<chrono::Utc>) -> Option<chrono::DateTime<chrono::Utc>> {
    // The search keeps the start's fraction of a second: two replicas would
    // each see "their" 04:00:00.3 and 04:00:00.4, and both win.
    let slot = c.find_previous_occurrence(&now, true).ok()?;
    let slot = chrono::DurationRound::duration_trunc(slot, chrono::TimeDelta::seconds(1)).ok()?;
    (now - slot <= LATE).then_some(slot)
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

/// True when this replica won `slot` of a cron rule: each slot is claimed
/// once, whatever the replicas' clocks and ticks.
async fn claim_slot(app: &App, rule: &str, slot: chrono::DateTime<chrono::Utc>) -> Result<bool, sqlx::Error> {
    let won: Option<(String,)> = sqlx::query_as(
        "INSERT INTO reconcile_rules (rule, last_started_at, last_slot) VALUES ($1, now(), $2) \
         ON CONFLICT (rule) DO UPDATE SET last_started_at = now(), last_slot = $2 \
         WHERE reconcile_rules.last_slot IS NULL OR reconcile_rules.last_slot < $2 \
         RETURNING rule",
    )
    .bind(rule)
    .bind(slot)
    .fetch_optional(app.ledger.pool())
    .await?;
    Ok(won.is_some())
}

/// Gives `slot` back when its sweep did not run, so it can be claimed again.
async fn unclaim_slot(app: &App, rule: &str, slot: chrono::DateTime<chrono::Utc>) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE reconcile_rules SET last_slot = $2 - interval '1 second' WHERE rule = $1 AND last_slot = $2")
        .bind(rule)
        .bind(slot)
        .execute(app.ledger.pool())
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;

    #[test]
    fn a_slot_is_due_until_it_is_ten_minutes_late() {
        let c = crate::reconcile::rules::cron("0 4 * * *").unwrap();
        let at = |h, m| Utc.with_ymd_and_hms(2026, 12, 6, h, m, 0).unwrap();
        assert_eq!(due_slot(&c, at(4, 0)), Some(at(4, 0)), "on time");
        assert_eq!(due_slot(&c, at(4, 7)), Some(at(4, 0)), "a worker back at 04:07 catches up");
        assert_eq!(due_slot(&c, at(4, 11)), None, "too late: the next is tomorrow's");
        assert_eq!(due_slot(&c, at(3, 59)), None, "yesterday's is long past");
        assert_eq!(due_slot(&c, at(10, 0)), None, "a worker started at 10:00 waits for tomorrow");
        let a_moment_after = at(4, 0) + chrono::TimeDelta::milliseconds(300);
        assert_eq!(due_slot(&c, a_moment_after), Some(at(4, 0)), "a slot is its whole second, whenever it is seen");
    }
}
