//! One event end to end: decode → ledger → plan and execute → a [`Disposition`].
//! Knows nothing about AMQP; the consumer publishes and acks as told.

use chrono::Utc;
use tracing::Instrument;

use crate::app::App;
use crate::contract::{self, Event, ResourceReport, TeardownResult};
use crate::domain::JobStatus;
use crate::execute::{Executor, RunEnd};
use crate::ledger::{JobStart, TrackOutcome};
use crate::retry::{self, DeadLetter, Disposition};

pub async fn handle(app: &App, routing_key: &str, body: &[u8]) -> Disposition {
    let event = match contract::decode(routing_key, body, &app.catalog) {
        Ok(e) => e,
        Err(m) => {
            tracing::warn!(routing_key, reason = %m, "malformed message; dead-lettering it");
            return Disposition::Reject { reason: m.0 };
        }
    };
    match event {
        Event::Tracked(t) => match app.ledger.track(&t, body, routing_key).await {
            Ok(TrackOutcome::Recorded) => {
                tracing::debug!(owner = %t.owner, resource = %t.resource.resource.reference(), "tracked");
                Disposition::Ack
            }
            Ok(TrackOutcome::Late(start)) => {
                tracing::info!(owner = %t.owner, resource = %t.resource.resource.reference(), "late track: the owner's teardown already started");
                run_job(app, *start).await
            }
            Err(e) => retry::on_ledger_error(&e),
        },
        Event::Teardown(req) => match app.ledger.begin_job(&req, body, routing_key).await {
            Ok(start) => run_job(app, start).await,
            Err(e) => retry::on_ledger_error(&e),
        },
    }
}

async fn run_job(app: &App, start: JobStart) -> Disposition {
    let span = tracing::info_span!("job", event_id = %start.job.event_id, owner = %start.job.owner, job_id = %start.job.job_id);
    async move {
        let job = &start.job;
        if job.status != JobStatus::Running {
            tracing::info!("duplicate of a finished job; publishing its stored result again");
            let stored = job.result.clone().unwrap_or_default();
            return finished(job.event_id.clone(), job.job_id.to_string(), stored);
        }
        let exec = Executor {
            catalog: &app.catalog,
            providers: &app.providers,
            ledger: &app.ledger,
            worker: &app.settings.worker,
        };
        let run = match exec.run(&start).await {
            Ok(r) => r,
            Err(e) => return retry::on_ledger_error(&e),
        };
        let (status, reason) = match run.end {
            RunEnd::Completed => (JobStatus::Completed, None),
            RunEnd::Permanent(why) => (JobStatus::DeadLettered, Some(why)),
            RunEnd::Unfinished(why) => {
                match retry::next_delay(&app.settings.worker.retry_delays(), job.attempts) {
                    Some(delay) => {
                        tracing::info!(
                            attempt = job.attempts,
                            delay_ms = delay.as_millis() as u64,
                            why,
                            "job not finished; retrying through the broker"
                        );
                        return Disposition::RetryAfter { delay, why };
                    }
                    None => (
                        JobStatus::DeadLettered,
                        Some(format!(
                            "out of retries after {} attempts: {why}",
                            job.attempts
                        )),
                    ),
                }
            }
        };
        let result = TeardownResult {
            event_id: job.event_id.clone(),
            job_id: job.job_id,
            owner: job.owner.clone(),
            trigger: job.trigger.as_str().to_string(),
            status: status.as_str().to_string(),
            dry_run: job.dry_run,
            resources: run
                .steps
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
            reason: reason.clone(),
        };
        match app
            .ledger
            .finish(job, status, reason.as_deref(), &result.to_bytes())
            .await
        {
            Ok(stored) => {
                tracing::info!(
                    status = status.as_str(),
                    reason = reason.as_deref().unwrap_or(""),
                    "job finished"
                );
                finished(job.event_id.clone(), job.job_id.to_string(), stored)
            }
            Err(e) => retry::on_ledger_error(&e),
        }
    }
    .instrument(span)
    .await
}

/// The stored bytes decide the routing key and whether the event is dead-lettered,
/// so a duplicate is published exactly like the original.
fn finished(event_id: String, job_id: String, stored: Vec<u8>) -> Disposition {
    let parsed: Option<TeardownResult> = serde_json::from_slice(&stored).ok();
    let (routing_key, dead) = match parsed {
        Some(r) if r.status == JobStatus::DeadLettered.as_str() => (
            contract::TEARDOWN_DEAD_LETTERED,
            Some(DeadLetter {
                reason: r.reason.unwrap_or_default(),
                job_id,
            }),
        ),
        _ => (contract::TEARDOWN_COMPLETED, None),
    };
    Disposition::Finished {
        event_id,
        result: stored,
        routing_key,
        dead,
    }
}
