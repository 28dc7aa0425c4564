//! Runs a job's plan: each resource as soon as everything it waits for is
//! gone, independent ones concurrently (each provider caps its own
//! concurrency), every step retried in process a few times with exponential
//! backoff and full jitter. A failure holds back only what waits for it.
//! Finished steps are written to the ledger in batches as they finish, so a
//! redelivered job resumes.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};

use crate::catalog::Catalog;
use crate::config::WorkerSettings;
use crate::domain::{Outcome, Resource, ResourceRef};
use crate::ledger::{JobRow, JobStart, Ledger, StepRecord};
use crate::plan;
use crate::providers::{Archive, Deleted, Providers, StepError};

/// What the executor needs, borrowed from the application state.
pub struct Executor<'a> {
    pub catalog: &'a Catalog,
    pub providers: &'a Providers,
    pub ledger: &'a Ledger,
    pub worker: &'a WorkerSettings,
    pub metrics: Option<&'a crate::metrics::Metrics>,
}

/// How a run ended, before the retry policy decides what happens next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// Every resource is gone (or, in a dry run, was looked at).
    Completed,
    /// A step failed in a way retrying will not fix.
    Permanent(String),
    /// A step ran out of in-process attempts on an error that may pass.
    Unfinished(String),
    /// The resources cannot be ordered (their parent links form a cycle).
    Plan(String),
    /// A guard says a resource is in use: nothing was deleted.
    Blocked(String),
    /// Not run: the job came back more often than its failed runs explain.
    Poison(String),
}

impl RunEnd {
    /// The same end with NUL removed from its reason (PostgreSQL text cannot hold it).
    pub fn without_nul(self) -> RunEnd {
        let clean = |w: String| w.replace('\0', "");
        match self {
            RunEnd::Completed => RunEnd::Completed,
            RunEnd::Permanent(w) => RunEnd::Permanent(clean(w)),
            RunEnd::Unfinished(w) => RunEnd::Unfinished(clean(w)),
            RunEnd::Plan(w) => RunEnd::Plan(clean(w)),
            RunEnd::Blocked(w) => RunEnd::Blocked(clean(w)),
            RunEnd::Poison(w) => RunEnd::Poison(clean(w)),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Run {
    /// One record per resource of the job, in plan order.
    pub steps: Vec<StepRecord>,
    pub end: RunEnd,
}

impl Executor<'_> {
    /// Runs the job's plan. It cannot fail on the ledger: step writes that
    /// fail are retried with the next batch, and `finish` writes every step.
    pub async fn run(&self, start: &JobStart) -> Run {
        let resources = &start.resources;
        let graph = match plan::Graph::build(resources, self.catalog) {
            Ok(g) => g,
            Err(e) => {
                let steps = resources.iter().map(|r| blocked(r.reference(), e.to_string())).collect();
                return Run { steps, end: RunEnd::Plan(e.to_string()) };
            }
        };
        if let Some(run) = self.guards(start).await {
            return run;
        }
        let recheck = start.job.replays > 0;
        let mut walk = graph.walk();
        let mut records: Vec<Option<StepRecord>> = vec![None; resources.len()];
        let mut end = RunEnd::Completed;
        let mut recorder = Recorder::new(self.ledger, &start.job);
        let mut running = FuturesUnordered::new();
        let mut ready = walk.start();
        loop {
            while let Some(i) = ready.pop() {
                let r = &resources[i];
                match start.done.get(&r.reference()) {
                    Some(done) if done.outcome.is_gone() => {
                        records[i] = Some(done.clone());
                        ready.extend(walk.gone(i));
                    }
                    _ => running.push(async move { (i, self.step(r, start, recheck).await) }),
                }
            }
            let Some((i, (record, err))) = running.next().await else { break };
            match err {
                None => {
                    let released = walk.gone(i);
                    recorder.push(record.clone(), !released.is_empty());
                    ready.extend(released);
                }
                Some(err) => {
                    let why = format!("{}: {}", record.resource, err).replace('\0', "");
                    end = worse(end, why, err.is_retryable());
                }
            }
            records[i] = Some(record);
        }
        // An unfinished run goes back to the broker without a finish: what it
        // did must be written now, or its next attempt would redo it.
        recorder.settle(matches!(end, RunEnd::Unfinished(_))).await;
        // Whatever did not start waited for something that is not gone.
        let mut order: Vec<usize> = (0..resources.len()).collect();
        order.sort_by(|&a, &b| {
            (graph.level(a), resources[a].reference()).cmp(&(graph.level(b), resources[b].reference()))
        });
        let steps = order
            .into_iter()
            .map(|i| {
                records[i].take().unwrap_or_else(|| {
                    let holder = graph.waits_for(i).into_iter().find(|&w| !records_gone(&records, w));
                    let why = match holder {
                        Some(w) => {
                            format!("not attempted: it waits for {}, which is not gone", resources[w].reference())
                        }
                        None => "not attempted".to_string(),
                    };
                    blocked(resources[i].reference(), why)
                })
            })
            .collect();
        Run { steps, end }
    }

    /// Runs every guard before anything is deleted: one resource in use
    /// blocks the whole owner, so nothing is taken from under a user. `None`
    /// when the run may go on. A guard that cannot be asked counts as in use:
    /// for good (dead-lettered as blocked) when its error is permanent; for
    /// this run only (unfinished, retried on the schedule) when it may pass,
    /// such as a timeout, a 503 or a 429 past the step's budget.
    async fn guards(&self, start: &JobStart) -> Option<Run> {
        let mut blocked = Vec::new();
        let mut only_for_now = true;
        for r in &start.resources {
            let Some(guard) = self.catalog.kind(&r.kind).and_then(|k| k.guard.as_ref()) else { continue };
            if start.done.get(&r.reference()).is_some_and(|d| d.outcome.is_gone()) {
                continue;
            }
            let answer = match self.providers.get(&guard.provider) {
                Some(p) => self.retry(|| p.probe(&guard.action, r), &r.reference()).await.0,
                None => Err(StepError::Permanent(format!("guard provider {} is not configured", guard.provider))),
            };
            match answer {
                Ok(false) => {}
                Ok(true) => {
                    only_for_now = false;
                    blocked.push((r.reference(), format!("blocked: {}", guard.reason)));
                }
                Err(e) => {
                    only_for_now &= e.is_retryable();
                    blocked.push((r.reference(), format!("blocked: the guard could not be checked ({e})")));
                }
            }
        }
        if blocked.is_empty() {
            return None;
        }
        let why = blocked.iter().map(|(r, w)| format!("{r} {w}")).collect::<Vec<_>>().join("; ");
        let steps = start
            .resources
            .iter()
            .map(|r| match blocked.iter().find(|(b, _)| *b == r.reference()) {
                Some((b, w)) => self::blocked(b.clone(), w.clone()),
                None => match start.done.get(&r.reference()) {
                    Some(d) if d.outcome.is_gone() => d.clone(),
                    _ => self::blocked(r.reference(), "not attempted: another resource of the owner is in use".into()),
                },
            })
            .collect();
        let end = if only_for_now { RunEnd::Unfinished(why) } else { RunEnd::Blocked(why) };
        Some(Run { steps, end })
    }

    /// One resource: delete (or, in a dry run, look) with retries.
    async fn step(&self, r: &Resource, start: &JobStart, recheck: bool) -> (StepRecord, Option<StepError>) {
        let dry_run = start.job.dry_run;
        let reference = r.reference();
        let (Some(spec), Some(provider)) =
            (self.catalog.kind(&r.kind), self.catalog.kind(&r.kind).and_then(|k| self.providers.get(&k.provider)))
        else {
            let err = StepError::Permanent(format!("kind {:?} is not configured (any more)", r.kind));
            return (failed(reference, 0, &err), Some(err));
        };
        // Resources found by lookups (or listed by reconcile) did not pass the
        // door's checks: an empty id names nothing, whatever the provider.
        if r.id.is_empty() {
            let err = StepError::Permanent("an empty id names no resource; refusing to act on it".into());
            return (failed(reference, 0, &err), Some(err));
        }
        let started = std::time::Instant::now();
        let archive = spec.archive.as_ref().filter(|_| !dry_run).map(|_| JobArchive {
            ledger: self.ledger,
            job_id: start.job.job_id,
            kind: &r.kind,
            resource_id: &r.id,
        });
        let attempt = Attempt {
            provider,
            spec,
            resource: r,
            archive: archive.as_ref().map(|a| a as &dyn Archive),
            dry_run,
            // A replayed job looks before it acts: the world may have moved on
            // while the job sat dead-lettered.
            looked: AtomicBool::new(!recheck),
            deleted_once: AtomicBool::new(false),
            tries: AtomicU32::new(0),
        };
        let (result, waits) = self.retry(|| attempt.once(), &reference).await;
        let n = attempt.tries.load(Ordering::Relaxed).saturating_sub(waits);
        if let Some(m) = self.metrics {
            m.step_seconds
                .with_label_values(&[r.kind.as_str(), spec.provider.as_str()])
                .observe(started.elapsed().as_secs_f64());
            m.step_retries.with_label_values(&[r.kind.as_str()]).inc_by(u64::from(n.saturating_sub(1)));
        }
        match result {
            Ok(outcome) => (StepRecord { resource: reference, outcome, attempts: n, error: None }, None),
            Err(e) => (failed(reference, n, &e), Some(e)),
        }
    }
}

impl Executor<'_> {
    /// Runs `op` until it succeeds, fails permanently, has failed
    /// `step_attempts` times, or the step's time budget is spent. Failures wait
    /// an exponential backoff with full jitter (backon's schedule); a 429 waits
    /// its Retry-After (1 s without one) and is not a failed attempt: the API
    /// asked to wait. Returns the result and how many tries were such waits.
    async fn retry<F, Fut, T>(&self, mut op: F, reference: &ResourceRef) -> (Result<T, StepError>, u32)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StepError>>,
    {
        let w = self.worker;
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(w.step_min_backoff_ms))
            .with_max_delay(Duration::from_millis(w.step_max_backoff_ms))
            .with_max_times(w.step_attempts.saturating_sub(1) as usize)
            .build();
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(w.step_budget_secs);
        let mut waits = 0;
        loop {
            let e = match op().await {
                Ok(v) => return (Ok(v), waits),
                Err(e) if !e.is_retryable() => return (Err(e), waits),
                Err(e) => e,
            };
            let delay = match &e {
                // At least the backoff's floor, growing with each wait: a
                // `Retry-After: 0` must not become a loop of requests.
                StepError::RateLimited { retry_after } => {
                    waits += 1;
                    let floor = Duration::from_millis(w.step_min_backoff_ms).saturating_mul(waits.min(64));
                    Some(retry_after.unwrap_or(Duration::from_secs(1)).max(floor))
                }
                _ => backoff.next().map(|d| d.mul_f64(fastrand::f64())),
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(delay) = delay.filter(|d| *d < left) else {
                let e = match e {
                    StepError::RateLimited { .. } if delay.is_some() => StepError::Transient(format!(
                        "{e}, for longer than the step's budget of {}",
                        crate::domain::human(Duration::from_secs_f64(w.step_budget_secs))
                    )),
                    other => other,
                };
                return (Err(e), waits);
            };
            tracing::debug!(resource = %reference, error = %e, retry_in_ms = delay.as_millis() as u64, "step will be retried");
            tokio::time::sleep(delay).await;
        }
    }
}

/// One resource's step, tried again and again by `Executor::retry`: what
/// the tries so far have learnt is kept here.
struct Attempt<'a> {
    provider: &'a crate::providers::Provider,
    spec: &'a crate::catalog::KindSpec,
    resource: &'a Resource,
    archive: Option<&'a dyn Archive>,
    dry_run: bool,
    /// Whether the resource was looked at first (a replay looks before it acts).
    looked: AtomicBool,
    /// After an accepted delete only the check is repeated: a second DELETE
    /// would answer 404 and hide that we deleted it.
    deleted_once: AtomicBool,
    tries: AtomicU32,
}

impl Attempt<'_> {
    async fn exists(&self) -> Result<Option<bool>, StepError> {
        self.provider.exists(self.spec.check.as_ref(), &self.spec.delete, self.resource).await
    }

    async fn once(&self) -> Result<Outcome, StepError> {
        self.tries.fetch_add(1, Ordering::Relaxed);
        if !self.looked.load(Ordering::Relaxed) {
            if self.exists().await? == Some(false) {
                return Ok(Outcome::AlreadyGone);
            }
            self.looked.store(true, Ordering::Relaxed);
        }
        if self.dry_run {
            return Ok(match self.exists().await? {
                Some(false) => Outcome::AlreadyGone,
                _ => Outcome::WouldDelete,
            });
        }
        if !self.deleted_once.load(Ordering::Relaxed) {
            match self.provider.delete(&self.spec.delete, self.resource, self.archive).await? {
                Deleted::AlreadyGone => return Ok(Outcome::AlreadyGone),
                Deleted::Now => self.deleted_once.store(true, Ordering::Relaxed),
            }
        }
        match self.exists().await? {
            Some(true) => Err(StepError::StillThere),
            _ => Ok(Outcome::Deleted),
        }
    }
}

/// A job's archive in the ledger, for one resource: what an archived kind's
/// provider keeps there before its delete commits.
struct JobArchive<'a> {
    ledger: &'a Ledger,
    job_id: uuid::Uuid,
    kind: &'a str,
    resource_id: &'a str,
}

impl Archive for JobArchive<'_> {
    fn keep<'a>(
        &'a self,
        records: &'a [serde_json::Value],
    ) -> futures_util::future::BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            self.ledger
                .archive_keep(self.job_id, self.kind, self.resource_id, records)
                .await
                .map_err(|e| StepError::Transient(format!("archiving before the delete: {e}")))
        })
    }
}

/// The first failure decides how a run ends, except that a permanent one
/// outranks one that may pass.
fn worse(end: RunEnd, why: String, retryable: bool) -> RunEnd {
    match (&end, retryable) {
        (RunEnd::Permanent(_) | RunEnd::Plan(_) | RunEnd::Blocked(_) | RunEnd::Poison(_), _) => end,
        (_, false) => RunEnd::Permanent(why),
        (RunEnd::Completed, true) => RunEnd::Unfinished(why),
        (RunEnd::Unfinished(_), true) => end,
    }
}

fn records_gone(records: &[Option<StepRecord>], i: usize) -> bool {
    records[i].as_ref().is_some_and(|r| r.outcome.is_gone())
}

/// Writes a job's finished steps while it runs, so a redelivery after a crash
/// does not redo them. A write starts when a finished step lets others start
/// and no write of the job is in flight; what finishes meanwhile goes in the
/// next one, and a failed write's steps go back in line. So a job has at most
/// one write in flight, and the writes of all jobs are group-committed
/// (ledger/finish.rs). What is still unwritten at the end is written by
/// `finish`, with the result, or, when the run goes back to the broker
/// unfinished, by `settle`. (A dependent may start before its prerequisite's
/// write commits: after a crash that prerequisite is redone, answered 404.)
struct Recorder {
    ledger: Ledger,
    job: Option<Arc<JobRow>>,
    pending: Vec<StepRecord>,
    /// The write in flight; it hands its steps back if it failed.
    in_flight: Option<tokio::task::JoinHandle<Option<Vec<StepRecord>>>>,
}

impl Recorder {
    fn new(ledger: &Ledger, job: &JobRow) -> Recorder {
        // A dry run records nothing.
        let job = (!job.dry_run).then(|| Arc::new(job.clone()));
        Recorder { ledger: ledger.clone(), job, pending: Vec::new(), in_flight: None }
    }

    /// `releases`: the step let other resources start.
    fn push(&mut self, step: StepRecord, releases: bool) {
        let Some(job) = self.job.clone() else { return };
        self.pending.push(step);
        if !releases || self.in_flight.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        if let Some(done) = self.in_flight.take() {
            // Finished: taking its answer does not wait.
            if let Some(Some(failed)) = done.now_or_never().and_then(Result::ok) {
                self.pending.extend(failed);
            }
        }
        let (ledger, steps) = (self.ledger.clone(), std::mem::take(&mut self.pending));
        self.in_flight = Some(tokio::spawn(async move {
            match ledger.record_steps(&job, &steps).await {
                Ok(()) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "could not record finished steps; trying again with the next ones");
                    Some(steps)
                }
            }
        }));
    }

    /// Waits for the write in flight, so none lands after the job's finish;
    /// with `flush`, also writes what is still pending.
    async fn settle(mut self, flush: bool) {
        if let Some(h) = self.in_flight.take() {
            if let Ok(Some(failed)) = h.await {
                self.pending.extend(failed);
            }
        }
        if let (true, Some(job)) = (flush && !self.pending.is_empty(), &self.job) {
            if let Err(e) = self.ledger.record_steps(job, &self.pending).await {
                tracing::warn!(error = %e, "could not record finished steps; the next attempt will redo them");
            }
        }
    }
}

/// PostgreSQL text cannot hold NUL; a provider's error must not make the
/// job's report unwritable (its finish would fail on every delivery).
fn failed(resource: ResourceRef, attempts: u32, e: &StepError) -> StepRecord {
    StepRecord { resource, outcome: Outcome::Failed, attempts, error: Some(e.to_string().replace('\0', "")) }
}

fn blocked(resource: ResourceRef, why: String) -> StepRecord {
    StepRecord { resource, outcome: Outcome::Blocked, attempts: 0, error: Some(why) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        use crate::domain::human;
        assert_eq!(human(Duration::from_millis(250)), "250ms");
        assert_eq!(human(Duration::from_secs(1)), "1s");
        assert_eq!(human(Duration::from_millis(1500)), "1.5s");
        assert_eq!(human(Duration::from_secs(120)), "2m");
        assert_eq!(human(Duration::from_secs(5400)), "1h 30m");
        let e = StepError::RateLimited { retry_after: Some(Duration::from_secs(1)) };
        assert_eq!(e.to_string(), "429 rate limited (retry after 1s)");
    }
}
