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
use futures_util::future::BoxFuture;
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
    /// Where finished steps (and archived records) are written as the run goes.
    pub log: Arc<dyn StepLog>,
    pub worker: &'a WorkerSettings,
    pub metrics: Option<&'a crate::metrics::Metrics>,
    /// Asked before each step starts: `Some(reason)` when the job was
    /// cancelled, and no further step starts.
    pub cancelled: Option<&'a (dyn Fn() -> Option<String> + Send + Sync)>,
}

/// Where a run writes what it did while it runs: the ledger in the worker;
/// in the unit tests a list in memory, so the executor's logic runs without
/// a database.
pub trait StepLog: Send + Sync + 'static {
    /// Finished steps, so a redelivery after a crash does not redo them.
    fn record_steps<'a>(&'a self, job: &'a JobRow, steps: &'a [StepRecord]) -> BoxFuture<'a, Result<(), String>>;
    /// What an archived kind is about to delete, kept for `reaper restore`.
    fn archive_keep<'a>(
        &'a self,
        job_id: uuid::Uuid,
        kind: &'a str,
        resource_id: &'a str,
        records: &'a [serde_json::Value],
    ) -> BoxFuture<'a, Result<(), String>>;
}

impl StepLog for Ledger {
    fn record_steps<'a>(&'a self, job: &'a JobRow, steps: &'a [StepRecord]) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { Ledger::record_steps(self, job, steps).await.map_err(|e| e.to_string()) })
    }

    fn archive_keep<'a>(
        &'a self,
        job_id: uuid::Uuid,
        kind: &'a str,
        resource_id: &'a str,
        records: &'a [serde_json::Value],
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            Ledger::archive_keep(self, job_id, kind, resource_id, records).await.map_err(|e| e.to_string())
        })
    }
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
    /// An operator cancelled it: no further step started (those in flight finished).
    Cancelled(String),
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
            RunEnd::Cancelled(w) => RunEnd::Cancelled(clean(w)),
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
        let mut recorder = Recorder::new(self.log.clone(), &start.job);
        let mut running = FuturesUnordered::new();
        let mut ready = walk.start();
        let mut cancelled = None;
        loop {
            while let Some(i) = ready.pop() {
                if cancelled.is_none() {
                    cancelled = self.cancelled.and_then(|asked| asked());
                }
                if cancelled.is_some() {
                    ready.clear();
                    break;
                }
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
        if let Some(why) = cancelled {
            end = RunEnd::Cancelled(why);
        }
        // An unfinished run goes back to the broker without a finish: what it
        // did must be written now, or its next attempt would redo it.
        recorder.settle(matches!(end, RunEnd::Unfinished(_))).await;
        // Whatever did not start waited for something that is not gone.
        let mut order: Vec<usize> = (0..resources.len()).collect();
        order.sort_by(|&a, &b| {
            (graph.level(a), resources[a].reference()).cmp(&(graph.level(b), resources[b].reference()))
        });
        // Read before the records are taken below: a taken one reads as not gone.
        let gone: Vec<bool> = records.iter().map(|r| r.as_ref().is_some_and(|r| r.outcome.is_gone())).collect();
        let steps = order
            .into_iter()
            .map(|i| {
                records[i].take().unwrap_or_else(|| {
                    let holder = graph.waits_for(i).into_iter().find(|&w| !gone[w]);
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
            log: self.log.as_ref(),
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
    log: &'a dyn StepLog,
    job_id: uuid::Uuid,
    kind: &'a str,
    resource_id: &'a str,
}

impl Archive for JobArchive<'_> {
    fn keep<'a>(&'a self, records: &'a [serde_json::Value]) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            self.log
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
        (RunEnd::Permanent(_) | RunEnd::Plan(_) | RunEnd::Blocked(_) | RunEnd::Poison(_) | RunEnd::Cancelled(_), _) => {
            end
        }
        (_, false) => RunEnd::Permanent(why),
        (RunEnd::Completed, true) => RunEnd::Unfinished(why),
        (RunEnd::Unfinished(_), true) => end,
    }
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
    log: Arc<dyn StepLog>,
    job: Option<Arc<JobRow>>,
    pending: Vec<StepRecord>,
    /// The write in flight; it hands its steps back if it failed.
    in_flight: Option<tokio::task::JoinHandle<Option<Vec<StepRecord>>>>,
}

impl Recorder {
    fn new(log: Arc<dyn StepLog>, job: &JobRow) -> Recorder {
        // A dry run records nothing.
        let job = (!job.dry_run).then(|| Arc::new(job.clone()));
        Recorder { log, job, pending: Vec::new(), in_flight: None }
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
        let (log, steps) = (self.log.clone(), std::mem::take(&mut self.pending));
        self.in_flight = Some(tokio::spawn(async move {
            match log.record_steps(&job, &steps).await {
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
            if let Err(e) = self.log.record_steps(job, &self.pending).await {
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
    //! The executor's logic over the simulated cloud (a real HTTP server in
    //! this process, which answers 409 to a delete out of order) and a step
    //! log in memory: no database, no broker, milliseconds per case.
    use super::*;
    use crate::devtools::sim::{Faults, Sim};
    use std::collections::{BTreeMap, HashMap};
    use std::sync::Mutex;
    use tokio_util::sync::CancellationToken;

    /// The steps a run wrote while it ran.
    #[derive(Default)]
    struct MemoryLog {
        steps: Mutex<Vec<StepRecord>>,
    }

    impl StepLog for MemoryLog {
        fn record_steps<'a>(&'a self, _: &'a JobRow, steps: &'a [StepRecord]) -> BoxFuture<'a, Result<(), String>> {
            self.steps.lock().unwrap().extend_from_slice(steps);
            Box::pin(async { Ok(()) })
        }

        fn archive_keep<'a>(
            &'a self,
            _: uuid::Uuid,
            _: &'a str,
            _: &'a str,
            _: &'a [serde_json::Value],
        ) -> BoxFuture<'a, Result<(), String>> {
            Box::pin(async { Err("this log keeps no archive".into()) })
        }
    }

    /// A node's cloud resources: the server goes after its VNI and DNS
    /// record, the IP reservation after the DNS record.
    const KINDS: &str = r#"
        [kinds.vni]
        provider = "cloud"
        delete = "DELETE /v1/vnis/{id}"
        check = "GET /v1/vnis/{id}"
        [kinds.dns_record]
        provider = "cloud"
        delete = "DELETE /v1/zones/{attr.zone_id}/records/{id}"
        check = "GET /v1/zones/{attr.zone_id}/records/{id}"
        [kinds.server]
        provider = "cloud"
        delete = "DELETE /v1/servers/{id}"
        check = "GET /v1/servers/{id}"
        after = ["vni", "dns_record"]
        [kinds.ip]
        provider = "cloud"
        delete = "DELETE /v1/ips/{id}"
        check = "GET /v1/ips/{id}"
        after = ["dns_record"]
        [kinds.model]
        provider = "cloud"
        delete = "DELETE /v1/models/{id}"
        check = "GET /v1/models/{id}"
        guard = { provider = "cloud", query = "GET /v1/usages/{id}", reason = "a deployment uses it" }
    "#;

    struct Cloud {
        sim: Sim,
        catalog: Catalog,
        providers: Providers,
        worker: WorkerSettings,
        log: Arc<MemoryLog>,
        stop: CancellationToken,
    }

    impl Drop for Cloud {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    async fn cloud(step_attempts: u32) -> Cloud {
        let sim = Sim::new();
        let stop = CancellationToken::new();
        let addr = sim.spawn(0, stop.clone()).await.expect("the simulated cloud listens");
        let settings = crate::config::Settings::from_toml_layers(&[
            &format!("[providers.cloud]\ntype = \"http\"\nbase_url = \"http://{addr}\"\n"),
            KINDS,
            &format!("[worker]\nstep_attempts = {step_attempts}\nstep_min_backoff_ms = 1\nstep_max_backoff_ms = 5\n"),
        ])
        .expect("settings");
        let catalog = crate::catalog::validate(&settings).expect("catalog");
        let providers = Providers::build(&settings.providers).await.expect("providers");
        let worker = settings.worker.clone();
        Cloud { sim, catalog, providers, worker, log: Arc::default(), stop }
    }

    impl Cloud {
        async fn run(&self, resources: Vec<Resource>, dry_run: bool) -> Run {
            let exec = Executor {
                catalog: &self.catalog,
                providers: &self.providers,
                log: self.log.clone(),
                worker: &self.worker,
                metrics: None,
                cancelled: None,
            };
            exec.run(&job(resources, dry_run)).await
        }

        /// The paths of the DELETEs the cloud received, in the order they came.
        fn deletes(&self) -> Vec<String> {
            self.sim.requests().into_iter().filter(|(m, _)| m == "DELETE").map(|(_, p)| p).collect()
        }
    }

    fn job(resources: Vec<Resource>, dry_run: bool) -> JobStart {
        let job = JobRow {
            job_id: uuid::Uuid::new_v4(),
            event_id: "e1".into(),
            owner: "node/n1".into(),
            trigger: crate::domain::Trigger::DeletionRequested,
            dry_run,
            status: crate::domain::JobStatus::Running,
            attempts: 1,
            failed_runs: 0,
            started_at: chrono::Utc::now(),
            reason: None,
            result: None,
            replays: 0,
            routing_key: "deletion.requested".into(),
            looked_up: true,
            error_class: None,
            cancel_requested: None,
        };
        JobStart { job, resources, done: HashMap::new() }
    }

    fn res(kind: &str, id: &str) -> Resource {
        let attributes = match kind {
            "dns_record" => BTreeMap::from([("zone_id".to_string(), "z1".to_string())]),
            _ => BTreeMap::new(),
        };
        Resource { kind: kind.into(), id: id.into(), attributes, parent: None }
    }

    /// A node: VNI, DNS record, server and IP, created in the cloud with the
    /// dependencies the kinds' `after` describes.
    /// (In the cloud, the VNI and the record depend on the server, and the
    /// record on the IP: the cloud refuses to delete those first.)
    fn node(sim: &Sim) -> Vec<Resource> {
        sim.create("/v1/servers/s1", &[]);
        sim.create("/v1/ips/i1", &[]);
        sim.create("/v1/vnis/v1", &["/v1/servers/s1"]);
        sim.create("/v1/zones/z1/records/r1", &["/v1/servers/s1", "/v1/ips/i1"]);
        vec![res("server", "s1"), res("ip", "i1"), res("vni", "v1"), res("dns_record", "r1")]
    }

    fn outcome(run: &Run, kind: &str) -> Outcome {
        run.steps.iter().find(|s| s.resource.kind == kind).unwrap_or_else(|| panic!("no step for {kind}")).outcome
    }

    #[tokio::test]
    async fn children_go_before_what_waits_for_them_and_each_resource_once() {
        let c = cloud(3).await;
        let run = c.run(node(&c.sim), false).await;
        assert_eq!(run.end, RunEnd::Completed, "{:?}", run.steps);
        assert!(run.steps.iter().all(|s| s.outcome == Outcome::Deleted), "{:?}", run.steps);
        let deletes = c.deletes();
        let at = |p: &str| deletes.iter().position(|d| d == p).unwrap_or_else(|| panic!("no DELETE {p}: {deletes:?}"));
        assert!(at("/v1/servers/s1") > at("/v1/vnis/v1") && at("/v1/servers/s1") > at("/v1/zones/z1/records/r1"));
        assert!(at("/v1/ips/i1") > at("/v1/zones/z1/records/r1"), "{deletes:?}");
        assert_eq!(deletes.len(), 4, "one DELETE per resource: {deletes:?}");
        assert_eq!(c.sim.stats().refused_for_order, 0);
        assert!(c.sim.paths().is_empty(), "left in the cloud: {:?}", c.sim.paths());
        // The steps that let others start were written while the run went on.
        let logged: Vec<String> = c.log.steps.lock().unwrap().iter().map(|s| s.resource.kind.clone()).collect();
        assert!(logged.contains(&"dns_record".to_string()), "written during the run: {logged:?}");
    }

    #[tokio::test]
    async fn a_failed_step_holds_back_only_what_waits_for_it() {
        let c = cloud(3).await;
        let mut resources = node(&c.sim);
        // A zone id of ".." would make the path another one: refused, for good.
        resources[3].attributes.insert("zone_id".into(), "..".into());
        let run = c.run(resources, false).await;
        assert!(matches!(&run.end, RunEnd::Permanent(w) if w.contains("dns_record/r1")), "{:?}", run.end);
        assert_eq!(outcome(&run, "dns_record"), Outcome::Failed);
        assert_eq!(outcome(&run, "vni"), Outcome::Deleted, "the VNI waits for nothing");
        for held in ["server", "ip"] {
            let s = run.steps.iter().find(|s| s.resource.kind == held).unwrap();
            assert_eq!(s.outcome, Outcome::Blocked, "{held}");
            assert!(s.error.as_deref().unwrap_or_default().contains("waits for dns_record/r1"), "{s:?}");
        }
        assert_eq!(c.deletes(), ["/v1/vnis/v1"], "nothing else was asked to go");
    }

    #[tokio::test]
    async fn a_429_is_waited_out_and_does_not_spend_the_steps_attempts() {
        let c = cloud(2).await;
        c.sim.create("/v1/vnis/v1", &[]);
        c.sim.set_faults(Faults { fail_next: 4, fail_status: 429, retry_after_secs: 0.01, ..Faults::default() });
        let run = c.run(vec![res("vni", "v1")], false).await;
        assert_eq!(run.end, RunEnd::Completed, "four 429s with two attempts: {:?}", run.steps);
        assert_eq!(run.steps[0].attempts, 1, "the waits are not attempts");
        assert_eq!(c.sim.stats().injected_rate_limits, 4);
    }

    #[tokio::test]
    async fn transient_errors_are_retried_then_leave_the_run_unfinished() {
        let c = cloud(3).await;
        c.sim.create("/v1/vnis/v1", &[]);
        c.sim.set_faults(Faults { fail_next: 2, fail_status: 503, ..Faults::default() });
        let run = c.run(vec![res("vni", "v1")], false).await;
        assert_eq!(run.end, RunEnd::Completed);
        assert_eq!((run.steps[0].outcome, run.steps[0].attempts), (Outcome::Deleted, 3));

        c.sim.create("/v1/vnis/v2", &[]);
        c.sim.set_faults(Faults { fail_next: 100, fail_status: 503, ..Faults::default() });
        let run = c.run(vec![res("vni", "v2")], false).await;
        assert!(matches!(&run.end, RunEnd::Unfinished(w) if w.contains("503")), "{:?}", run.end);
        assert_eq!((run.steps[0].outcome, run.steps[0].attempts), (Outcome::Failed, 3));
        assert!(c.sim.exists("/v1/vnis/v2"));
    }

    #[tokio::test]
    async fn a_guard_in_use_blocks_the_owner_before_anything_is_deleted() {
        let c = cloud(3).await;
        let mut resources = node(&c.sim);
        c.sim.create("/v1/models/m1", &[]);
        c.sim.create("/v1/usages/m1", &[]);
        resources.push(res("model", "m1"));
        let run = c.run(resources, false).await;
        assert!(matches!(&run.end, RunEnd::Blocked(w) if w.contains("a deployment uses it")), "{:?}", run.end);
        assert!(run.steps.iter().all(|s| s.outcome == Outcome::Blocked), "{:?}", run.steps);
        assert!(c.deletes().is_empty(), "nothing deleted: {:?}", c.deletes());
    }

    #[tokio::test]
    async fn a_dry_run_sends_no_delete_and_writes_nothing() {
        let c = cloud(3).await;
        let mut resources = node(&c.sim);
        resources.push(res("vni", "gone-already"));
        let run = c.run(resources, true).await;
        assert_eq!(run.end, RunEnd::Completed);
        assert_eq!(outcome(&run, "server"), Outcome::WouldDelete);
        let gone = run.steps.iter().find(|s| s.resource.id == "gone-already").unwrap();
        assert_eq!(gone.outcome, Outcome::AlreadyGone);
        assert!(c.deletes().is_empty(), "{:?}", c.deletes());
        assert_eq!(c.sim.paths().len(), 4);
        assert!(c.log.steps.lock().unwrap().is_empty(), "a dry run records nothing");
    }

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
