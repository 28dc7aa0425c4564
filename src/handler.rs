//! One event end to end: decode → ledger → plan and execute → a [`Disposition`].
//! Knows nothing about AMQP; the consumer publishes and acks as told.

use chrono::Utc;
use tracing::Instrument;
use uuid::Uuid;

use crate::app::App;
use crate::contract::{self, Envelope, Event, ResourceReport, TeardownResult};
use crate::disposition::{self, DeadLetter, Disposition, ErrorClass, RetryReason, Verdict};
use crate::domain::JobStatus;
use crate::execute::{Executor, RunEnd};
use crate::ledger::{Begin, JobEnd, JobStart, LedgerError, TrackOutcome};

/// Handles one message. `ledger_refusals` is how many times in a row the
/// ledger refused this message before (read from its retry hop).
pub async fn handle(app: &App, env: &Envelope<'_>, ledger_refusals: u32) -> Disposition {
    let event = match contract::decode(env, &app.catalog, &contract::Limits::of(&app.settings.worker)) {
        Ok(e) => e,
        Err(m) => {
            tracing::warn!(routing_key = env.routing_key, reason = %m, "malformed message; dead-lettering it");
            return Disposition::Reject { reason: m.0, class: ErrorClass::Malformed };
        }
    };
    #[cfg(debug_assertions)]
    panic_if_asked(&event);
    let ctx = Ctx { app, body: env.body, ledger_refusals, traceparent: env.traceparent };
    let holder = app.holders.register();
    let busy = || Disposition::RetryAfter {
        delay: app.settings.worker.busy_delay(),
        why: "another job of the owner is running".into(),
        reason: RetryReason::OwnerBusy,
    };
    // Paused: a teardown goes back to the retry queue before anything is
    // recorded, so it counts as no attempt (the ledger never saw it) and,
    // being a new message there, as no delivery towards the queue's limit.
    // `None` while not paused.
    let held = || {
        app.paused().map(|p| Disposition::RetryAfter {
            delay: app.settings.worker.busy_delay(),
            why: format!("reaper is paused ({})", p.reason),
            reason: RetryReason::Paused,
        })
    };
    let refused = |why: String| {
        tracing::warn!(reason = %why, "event refused; dead-lettering it");
        Disposition::Reject { reason: why, class: ErrorClass::Malformed }
    };
    match event {
        Event::Tracked(t) => match app.ledger.track(&t, env.body, env.routing_key, holder.id).await {
            Ok(TrackOutcome::Recorded) => {
                tracing::debug!(owner = %t.owner, resources = %t.describe(), "tracked");
                Disposition::Ack
            }
            // Tracks are recorded while paused (held back, an undated one
            // would be dated by its arrival after the pause and miss its
            // teardown); a late one's job waits, its attempt given back.
            Ok(TrackOutcome::Late(start)) => match held() {
                Some(wait) => {
                    let _ = app.ledger.uncount_attempt(start.job.job_id).await;
                    let _ = app.ledger.release(&start.job.owner, holder.id).await;
                    wait
                }
                None => {
                    tracing::info!(owner = %t.owner, resources = %t.describe(), "late track: the owner's teardown already started");
                    run_job(&ctx, *start, holder.id).await
                }
            },
            Ok(TrackOutcome::Busy) => busy(),
            Ok(TrackOutcome::Conflict(why)) => refused(why),
            Err(e) => ctx.on_ledger_error(&e),
        },
        Event::Teardown(req) => match held() {
            Some(wait) => wait,
            None => teardown(&ctx, &req, env, holder.id, busy, refused).await,
        },
    }
}

/// A teardown event, not paused: refused when it may be a purged job's, else
/// its job opened (or found again) and run.
async fn teardown(
    ctx: &Ctx<'_>,
    req: &crate::domain::TeardownRequest,
    env: &Envelope<'_>,
    holder: Uuid,
    busy: impl Fn() -> Disposition,
    refused: impl Fn(String) -> Disposition,
) -> Disposition {
    let app = ctx.app;
    if purged_maybe(app, req).await {
        return refused(format!(
            "the event occurred at {}, longer ago than ledger.retention_days ({}), and the ledger has no job of it: \
             its job may have run and been purged, and it is not run again; send a new event if this teardown is wanted",
            req.occurred_at.to_rfc3339(),
            app.settings.ledger.retention_days
        ));
    }
    match app.ledger.begin_job(req, env.body, env.routing_key, holder).await {
        Ok(Begin::Start(start)) => run_job(ctx, *start, holder).await,
        Ok(Begin::Busy) => busy(),
        Ok(Begin::Conflict(why)) => refused(why),
        Err(e) => ctx.on_ledger_error(&e),
    }
}

/// An event older than the retention whose job is not in the ledger: it may
/// have run and been purged, and its listed resources and lookups would be
/// claimed again as if new (the next life's among them). One lookup by
/// event id, for old events only.
async fn purged_maybe(app: &App, req: &crate::domain::TeardownRequest) -> bool {
    let retention = chrono::TimeDelta::seconds((app.settings.ledger.retention_days * 86_400.0) as i64);
    if Utc::now() - req.occurred_at <= retention {
        return false;
    }
    // Unreadable: the ledger is down, and opening the job will say so.
    !app.ledger.job_exists(&req.event_id).await.unwrap_or(true)
}

/// Debug builds only: `REAPER_DEBUG_PANIC_OWNER=<owner>` makes the handler
/// panic on every message about that owner, so a test can show what a panic
/// costs (retries, then a dead letter; never the worker or other messages).
/// Release builds have no such switch.
#[cfg(debug_assertions)]
fn panic_if_asked(event: &Event) {
    static OWNER: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let asked = OWNER.get_or_init(|| std::env::var("REAPER_DEBUG_PANIC_OWNER").ok());
    let owner = match event {
        Event::Teardown(r) => &r.owner,
        Event::Tracked(t) => &t.owner,
    };
    if asked.as_deref() == Some(owner.as_str()) {
        panic!("injected panic for {owner} (REAPER_DEBUG_PANIC_OWNER, a debug build)");
    }
}

/// What every step of one message's handling needs.
struct Ctx<'a> {
    app: &'a App,
    body: &'a [u8],
    ledger_refusals: u32,
    /// The producer's trace context: stored with the job when it ends, and
    /// set on its result.
    traceparent: Option<&'a str>,
}

impl Ctx<'_> {
    fn on_ledger_error(&self, e: &LedgerError) -> Disposition {
        disposition::on_ledger_error(e, self.ledger_refusals, self.app.settings.worker.max_ledger_refusals)
    }
}

async fn run_job(ctx: &Ctx<'_>, mut start: JobStart, holder: Uuid) -> Disposition {
    let app = ctx.app;
    let span = tracing::info_span!("job", event_id = %start.job.event_id, owner = %start.job.owner, job_id = %start.job.job_id);
    async move {
        let job = &start.job;
        if job.status != JobStatus::Running {
            tracing::info!("duplicate of a finished job; publishing its stored result again");
            // A cancelled job's claims were released after its finish; a crash
            // between the two left them held: released again (it is idempotent).
            if job.status == JobStatus::Cancelled {
                if let Err(e) = app.ledger.release_claims(job.job_id).await {
                    tracing::warn!(error = %e, "could not release a cancelled job's resources");
                }
            }
            let stored = Stored {
                result: job.result.clone().unwrap_or_default(),
                status: job.status,
                reason: job.reason.clone(),
                error_class: job.error_class.clone(),
            };
            return finished(job.event_id.clone(), job.job_id, stored, false);
        }
        // Deliveries that no failed run explains: crashes (or a message that
        // crashes the worker). As many as a whole schedule plus the delivery
        // limit are tolerated, so a burst of restarts never poisons a job.
        let poison_after = app.settings.worker.retry_delays().len() as u32 + 1 + app.settings.broker.delivery_limit;
        if job.attempts.saturating_sub(job.failed_runs) > poison_after {
            let why = format!(
                "poison: delivered {} times ({} of them after a failed run) without finishing; the worker may be crashing on it",
                job.attempts, job.failed_runs
            );
            tracing::error!(why, "dead-lettering a job that keeps coming back");
            let steps = not_run(&start, "not attempted: the job is poison");
            let run = crate::execute::Run { steps, end: RunEnd::Poison(why) };
            return conclude(ctx, &start, run, holder).await;
        }
        // Cancelled while a worker ran it, which then stopped (or crashed).
        if let Some(why) = job.cancel_requested.clone() {
            tracing::info!(why, "cancelled by an operator; ending the job without further deletes");
            let steps = not_run(&start, "not attempted: the job was cancelled");
            let run = crate::execute::Run { steps, end: RunEnd::Cancelled(why) };
            return conclude(ctx, &start, run, holder).await;
        }
        if let Err(why) = look_up(app, &mut start).await {
            let run = crate::execute::Run { steps: Vec::new(), end: RunEnd::Unfinished(why) };
            return conclude(ctx, &start, run, holder).await;
        }
        // The lease heartbeat reads cancels asked of the jobs in hand.
        let job_id = start.job.job_id;
        let _in_hand = app.hold_job(job_id);
        let cancelled = || app.cancel_reason(job_id);
        let exec = Executor {
            catalog: &app.catalog,
            providers: &app.providers,
            log: std::sync::Arc::new(app.ledger.clone()),
            worker: &app.settings.worker,
            metrics: Some(&app.metrics),
            cancelled: Some(&cancelled),
        };
        let run = exec.run(&start).await;
        conclude(ctx, &start, run, holder).await
    }
    .instrument(span)
    .await
}

/// Runs the kinds' lookups for the job's owner and adds what they find. An
/// inventory that failed to load stops the job (it is retried later): acting on
/// half a list would look like success while leaking the rest.
async fn look_up(app: &App, start: &mut JobStart) -> Result<(), String> {
    // A late track's job is the resources it tracked; a job looked up before works
    // from what that found (its next delivery may be days later, when the
    // owner's name may hold its next life).
    if start.job.trigger == crate::domain::Trigger::LateTrack || start.job.looked_up {
        return Ok(());
    }
    let Some(found) = find_by_lookups(app, &start.job.owner).await? else { return Ok(()) };
    tracing::info!(found = found.len(), "resources found by lookups");
    if start.job.dry_run {
        for r in found {
            if !start.resources.iter().any(|x| x.kind == r.kind && x.id == r.id) {
                start.resources.push(r);
            }
        }
    } else {
        let found = found.into_iter().map(|r| with_created_at(app, r)).collect::<Result<Vec<_>, _>>()?;
        // Not the first delivery (its lookups failed), or a replay: the owner's
        // name may hold its next life by now.
        let strict = start.job.attempts > 1 || start.job.replays > 0;
        if strict {
            tracing::warn!(
                "lookups run after the job's first delivery: only resources with a created_at of this life are claimed"
            );
        }
        start.resources = app.ledger.adopt(&start.job, &found, strict).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// What the kinds' lookups find for `owner` now, that is for its current
/// life; `None` when no lookup applies to the owner's type. One failed lookup
/// fails the answer: half a list would read as "nothing left". `plan` and
/// `validate` ask the same, so a node known only through the provisioner's
/// tables is not "nothing tracked" there.
pub(crate) async fn find_by_lookups(app: &App, owner: &str) -> Result<Option<Vec<crate::domain::Resource>>, String> {
    let mut found = Vec::new();
    let mut applies = false;
    for kind in app.catalog.lookups() {
        let Some(l) = kind.lookup.as_ref().filter(|l| l.applies_to(owner)) else { continue };
        applies = true;
        let Some(provider) = app.providers.get(&l.provider) else {
            return Err(format!("lookup for {}: provider {} is not configured", kind.name, l.provider));
        };
        let rows = provider.lookup(&kind.name, &l.query, owner).await;
        found.extend(rows.map_err(|e| format!("lookup for {} failed: {e}", kind.name))?);
    }
    // Two lookups (or one, twice) may name the same resource: it is one resource.
    let mut seen = std::collections::HashSet::new();
    found.retain(|r| seen.insert(r.reference()));
    Ok(applies.then_some(found))
}

/// Steps of a job that will not run: what earlier runs did, and `why` for the rest.
pub(crate) fn not_run(start: &JobStart, why: &str) -> Vec<crate::ledger::StepRecord> {
    start
        .resources
        .iter()
        .map(|r| {
            start.done.get(&r.reference()).cloned().unwrap_or(crate::ledger::StepRecord {
                resource: r.reference(),
                outcome: crate::domain::Outcome::Blocked,
                attempts: 0,
                error: Some(why.into()),
            })
        })
        .collect()
}

/// A found resource with the creation time its lookup returned (column or
/// field `created_at`), so that it is claimed only for the life it belongs
/// to. A kind whose ids come back must return one.
pub(crate) fn with_created_at(app: &App, r: crate::domain::Resource) -> Result<contract::TrackedResource, String> {
    let created_at = r.attributes.get("created_at").and_then(|t| crate::domain::parse_time(t));
    let reused = app.catalog.kind(&r.kind).is_some_and(|k| k.reused_ids);
    if reused && created_at.is_none() {
        return Err(format!(
            "lookup for {} found {:?} without a created_at it can read; a kind with reused_ids needs one to tell its lives apart",
            r.kind, r.id
        ));
    }
    Ok(contract::TrackedResource { resource: r, created_at })
}

/// Turns a run into the job's end: completed, dead-lettered, or back to the
/// broker for a later run (`disposition::judge` classifies; this carries it out).
async fn conclude(ctx: &Ctx<'_>, start: &JobStart, run: crate::execute::Run, holder: Uuid) -> Disposition {
    let (app, body) = (ctx.app, ctx.body);
    let job = &start.job;
    // Cancelled while it ran: the operator's cancel is its end, not a retry
    // later nor a dead letter (which a replay would then run).
    let end = match (run.end, app.cancel_reason(job.job_id)) {
        (RunEnd::Completed, _) => RunEnd::Completed,
        (_, Some(why)) => RunEnd::Cancelled(why),
        (end, None) => end,
    };
    let (status, class, reason) = match disposition::judge(end) {
        Verdict::Completed => (JobStatus::Completed, None, None),
        Verdict::Dead(class, why) => (JobStatus::DeadLettered, Some(class), Some(why)),
        Verdict::Cancelled(why) => (JobStatus::Cancelled, None, Some(why)),
        Verdict::Retry(why) => match retry_later(ctx, job, holder, why).await {
            Ok(d) => return d,
            Err((class, why)) => (JobStatus::DeadLettered, Some(class), Some(why)),
        },
    };
    let result = result_of(job, &run.steps, status, reason.clone());
    let bytes = result.to_bytes();
    let job_id = job.job_id.to_string();
    let dead = reason.as_deref().zip(class).filter(|_| status == JobStatus::DeadLettered).map(|(r, class)| {
        let headers = crate::broker::dead_letter_headers(&job.routing_key, r, class, Some(&job_id), ctx.traceparent);
        (app.names.dead.as_str(), body, headers)
    });
    let end = JobEnd {
        status,
        reason: reason.as_deref(),
        error_class: class.map(ErrorClass::as_str),
        steps: &run.steps,
        result: &bytes,
        result_key: result.routing_key(),
        dead,
        traceparent: ctx.traceparent,
        result_headers: ctx
            .traceparent
            .map(|t| (crate::broker::headers::TRACEPARENT, t.to_string()))
            .into_iter()
            .collect(),
    };
    match app.ledger.finish(job, &end, holder).await {
        Ok(f) => {
            tracing::info!(status = status.as_str(), reason = reason.as_deref().unwrap_or(""), "job finished");
            // What a cancelled job did not delete goes back to the owner's next teardown.
            if status == JobStatus::Cancelled {
                if let Err(e) = app.ledger.release_claims(job.job_id).await {
                    tracing::warn!(error = %e, "could not release a cancelled job's resources");
                }
            }
            if f.outbox_written {
                app.metrics.jobs.with_label_values(&[status.as_str()]).inc();
            }
            let stored = Stored { result: f.result, status: f.status, reason: f.reason, error_class: f.error_class };
            finished(job.event_id.clone(), job.job_id, stored, f.outbox_written)
        }
        Err(e) => {
            let _ = app.ledger.release(&job.owner, holder).await;
            ctx.on_ledger_error(&e)
        }
    }
}

/// An unfinished run: counted as a failed run, then back to the broker for
/// the schedule's next delay (the owner released), or, the schedule spent,
/// the dead letter it gets instead.
async fn retry_later(
    ctx: &Ctx<'_>,
    job: &crate::ledger::JobRow,
    holder: Uuid,
    why: String,
) -> Result<Disposition, (ErrorClass, String)> {
    let app = ctx.app;
    let failed_runs = match app.ledger.count_failed_run(job.job_id).await {
        Ok(n) => n,
        Err(e) => {
            let _ = app.ledger.release(&job.owner, holder).await;
            return Ok(ctx.on_ledger_error(&e));
        }
    };
    let delay = disposition::after_failed_run(&app.settings.worker.retry_delays(), failed_runs, why.clone())?;
    tracing::info!(
        failed_runs,
        deliveries = job.attempts,
        delay_ms = delay.as_millis() as u64,
        why,
        "job not finished; retrying through the broker"
    );
    if let Err(e) = app.ledger.release(&job.owner, holder).await {
        tracing::warn!(error = %e, "could not release the owner; its lease will expire");
    }
    Ok(Disposition::RetryAfter { delay, why, reason: RetryReason::Unfinished })
}

/// The job's result as it will be stored and published.
pub(crate) fn result_of(
    job: &crate::ledger::JobRow,
    steps: &[crate::ledger::StepRecord],
    status: JobStatus,
    reason: Option<String>,
) -> TeardownResult {
    TeardownResult {
        event_id: job.event_id.clone(),
        job_id: job.job_id,
        owner: job.owner.clone(),
        trigger: job.trigger.as_str().to_string(),
        status: status.as_str().to_string(),
        dry_run: job.dry_run,
        resources: steps
            .iter()
            .map(|s| ResourceReport {
                kind: s.resource.kind.clone(),
                id: s.resource.id.clone(),
                outcome: s.outcome.as_str().to_string(),
                attempts: s.attempts,
                error: s.error.clone(),
            })
            .collect(),
        attempts: job.attempts,
        started_at: job.started_at,
        finished_at: Utc::now(),
        reason,
    }
}

/// A finished job as the ledger holds it: published the same way every time.
struct Stored {
    result: Vec<u8>,
    status: JobStatus,
    reason: Option<String>,
    error_class: Option<String>,
}

/// The stored status (and class) decide the routing key and whether the
/// event is dead-lettered, so a duplicate is published exactly like the original.
fn finished(event_id: String, job_id: Uuid, stored: Stored, outbox_written: bool) -> Disposition {
    let (routing_key, dead) = match stored.status {
        JobStatus::DeadLettered => (
            contract::TEARDOWN_DEAD_LETTERED,
            Some(DeadLetter {
                // Every dead-lettered job has its class stored; an unreadable
                // one is the most careful class (no automatic retry).
                class: stored.error_class.as_deref().and_then(ErrorClass::parse).unwrap_or(ErrorClass::Permanent),
                reason: stored.reason.unwrap_or_default(),
                job_id: job_id.to_string(),
            }),
        ),
        JobStatus::Cancelled => (contract::TEARDOWN_CANCELLED, None),
        _ => (contract::TEARDOWN_COMPLETED, None),
    };
    Disposition::Finished { event_id, job_id, result: stored.result, routing_key, dead, outbox_written }
}
