//! The ledger in PostgreSQL: tracked resources per owner, one job per event_id,
//! and the outcome of each resource step.
//!
//! Which life of a reused owner name a resource belongs to (the SQL function
//! `reaper_belongs`, migrations/*_one_life_rule.sql, used by every query here): if both
//! the resource and the teardown carry a `generation`, they must be equal; else,
//! if the resource has a provider `created_at`, it must be no later than the
//! teardown's `occurred_at`; else it must have been tracked no later than
//! `occurred_at` plus the late-track window. The same rule claims resources when
//! a teardown starts and decides, when a track arrives after one, that it is late.

pub mod archive;
pub mod cancel;
mod console;
pub mod control;
mod group_commit;
pub use group_commit::BatchCounts;
mod leases;
pub mod outbox;
pub mod replay;
mod retention;
mod tracks;
pub use tracks::TrackOutcome;
pub mod views;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::config::DatabaseSettings;
use crate::domain::{JobStatus, Outcome, Resource, ResourceRef, Trigger};
use crate::domain::{TeardownRequest, TrackedResource};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub use outbox::{OutboxMessage, OutboxRow, Target};

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger: {op}: {source}")]
    Db {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("ledger: migrating: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("ledger: writing a group-commit batch: {message}")]
    Batch { message: String, code: Option<String> },
    #[error("ledger: the group-commit task is gone")]
    FinisherGone,
    #[error("ledger: job {0} has a corrupt row: {1}")]
    Corrupt(Uuid, String),
    /// The pool could not open a connection: where, and the server's (or the
    /// network's) own reason, not only "pool timed out".
    #[error("ledger: cannot reach PostgreSQL at {at}: {why}; check database.url and that the server is up")]
    Unreachable { at: String, why: String },
}

/// SQLSTATE classes that say the server (or its setup) is in trouble, not the
/// message: read-only after a failover (25), credentials (28), the database
/// missing while it is restored (3D), connection (08), rollback on conflict
/// (40), a revoked grant (42501), resources (53), lock not available (55),
/// shutting down or starting up (57), system and internal errors (58, XX).
/// Such failures wait in the retry queue without limit: an outage must not
/// dead-letter good messages.
const TRANSIENT_CLASSES: &[&str] = &["08", "25", "28", "3D", "40", "42501", "53", "55", "57", "58", "XX"];

/// How a ledger failure bears on the message that met it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerFailure {
    /// The database could not be reached (or a task of ours is gone): the
    /// same message may well succeed later.
    Unreachable,
    /// The database answered with an error. Repeated for one message, it is
    /// the message (or a bug), not the weather.
    Refused,
    /// SQLSTATE classes 21 (cardinality), 22 (data exception), 23 (integrity
    /// constraint): this message's data can never be written.
    Data,
}

impl LedgerError {
    pub fn failure(&self) -> LedgerFailure {
        let code = match self {
            LedgerError::Db { source, .. } => {
                source.as_database_error().map(|d| d.code().unwrap_or_default().into_owned())
            }
            LedgerError::Batch { code, .. } => code.clone(),
            LedgerError::Corrupt(..) => return LedgerFailure::Refused,
            LedgerError::Migrate(_) | LedgerError::FinisherGone | LedgerError::Unreachable { .. } => None,
        };
        let class = |classes: &[&str]| code.as_deref().is_some_and(|c| classes.iter().any(|k| c.starts_with(k)));
        if code.is_none() || class(TRANSIENT_CLASSES) {
            LedgerFailure::Unreachable
        } else if class(&["21", "22", "23"]) {
            LedgerFailure::Data
        } else {
            LedgerFailure::Refused
        }
    }
}

fn db(op: &'static str) -> impl FnOnce(sqlx::Error) -> LedgerError {
    move |source| LedgerError::Db { op, source }
}

/// `r` is tracked_resources; $A = teardown occurred_at, $B = teardown generation,
/// $C = window in seconds. The rule itself is the SQL function
/// `reaper_belongs` (migrations/*_one_life_rule.sql), the one place it lives.
macro_rules! belongs {
    ($a:literal, $b:literal, $c:literal) => {
        concat!(
            "reaper_belongs(r.generation, r.created_at, r.tracked_at, ",
            $a,
            "::timestamptz, ",
            $b,
            "::bigint, ",
            $c,
            "::double precision)"
        )
    };
}

#[derive(Clone)]
pub struct Ledger {
    pool: PgPool,
    window: Duration,
    lease_ttl: Duration,
    /// The group-commit task that writes finished jobs (see finish.rs).
    /// The group-commit queues (finish.rs).
    batchers: Arc<group_commit::Batchers>,
}

/// A job as stored.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub job_id: Uuid,
    pub event_id: String,
    pub owner: String,
    pub trigger: Trigger,
    pub dry_run: bool,
    pub status: JobStatus,
    /// Deliveries of the job (poison detection counts these).
    pub attempts: u32,
    /// Runs that ended unfinished and went to a broker retry: what the retry
    /// schedule counts (a crash is a delivery, not a failed run).
    pub failed_runs: u32,
    pub started_at: DateTime<Utc>,
    pub reason: Option<String>,
    /// Set once the job is terminal.
    pub result: Option<Vec<u8>>,
    /// Times an operator replayed it; a replayed job re-checks before deleting.
    pub replays: u32,
    /// The routing key the event came with.
    pub routing_key: String,
    /// The kinds' lookups ran for this job (once; see `Ledger::adopt`).
    pub looked_up: bool,
    /// Why it was dead-lettered (`disposition::ErrorClass`), once it was.
    pub error_class: Option<String>,
    /// An operator cancelled it while a worker ran it (`reaper cancel`): its
    /// next run, or the running one at its next step, ends it cancelled.
    pub cancel_requested: Option<String>,
}

/// Everything a worker needs to run (or resume) a job.
#[derive(Debug, Clone)]
pub struct JobStart {
    pub job: JobRow,
    pub resources: Vec<Resource>,
    /// Steps finished by earlier deliveries of this job.
    pub done: HashMap<ResourceRef, StepRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRecord {
    pub resource: ResourceRef,
    pub outcome: Outcome,
    pub attempts: u32,
    pub error: Option<String>,
}

/// A dead-lettered job's event on its way to the dead queue: (queue, body,
/// headers from `broker::dead_letter_headers`).
pub type DeadCopy<'a> = (&'a str, &'a [u8], Vec<(&'static str, String)>);

/// How a job ends, as `finish` writes it.
pub struct JobEnd<'a> {
    pub status: JobStatus,
    pub reason: Option<&'a str>,
    pub error_class: Option<&'a str>,
    pub steps: &'a [StepRecord],
    pub result: &'a [u8],
    pub result_key: &'a str,
    /// (dead queue, event body, headers) when the job is dead-lettered.
    pub dead: Option<DeadCopy<'a>>,
    /// The producer's W3C trace context, stored with the job.
    pub traceparent: Option<&'a str>,
    /// The result message's headers (the trace context), in its outbox row too.
    pub result_headers: Vec<(&'static str, String)>,
}

/// What opening a teardown job led to.
#[derive(Debug)]
pub enum Begin {
    Start(Box<JobStart>),
    /// Another delivery (here or on another replica) is tearing the owner down.
    Busy,
    /// The event_id already names a job of another owner, trigger or dry-run
    /// value, or a track: refused, never run, with the reason.
    Conflict(String),
}

/// Why an event with this event_id is not the event `job` was opened for.
/// The job's own redeliveries and replays match it in owner, trigger and
/// dry_run; anything else reusing its id would run its deletes (or republish
/// its result) under the wrong name.
fn other_event(job: &JobRow, req: &TeardownRequest) -> Option<String> {
    let same = job.owner == req.owner && job.trigger == req.trigger && job.dry_run == req.dry_run;
    (!same).then(|| {
        format!(
            "event_id already names a job of {} ({}{})",
            job.owner,
            job.trigger.as_str(),
            if job.dry_run { ", dry run" } else { "" }
        )
    })
}

/// Why the ledger's pool could not connect. A pool that timed out hides the
/// cause; one connection of its own, within the same time, finds it.
async fn unreachable(opts: &PgConnectOptions, e: sqlx::Error, limit: Duration) -> LedgerError {
    use sqlx::ConnectOptions;
    let at = format!("{}:{}/{}", opts.get_host(), opts.get_port(), opts.get_database().unwrap_or(""));
    let said = |cause: sqlx::Error| {
        crate::tls::explain(&cause, opts.get_host(), "sslrootcert in database.url").unwrap_or_else(|| cause.to_string())
    };
    let why = match e {
        sqlx::Error::PoolTimedOut => match tokio::time::timeout(limit, opts.connect()).await {
            Ok(Err(cause)) => said(cause),
            Ok(Ok(_)) => "the pool timed out, though a connection opened now".to_string(),
            Err(_) => format!("no answer within {}", crate::domain::human(limit)),
        },
        other => said(other),
    };
    LedgerError::Unreachable { at, why }
}

/// The outcome of making a job terminal.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The stored result: ours, or the one another delivery stored first.
    pub result: Vec<u8>,
    /// Whether this call wrote outbox rows (false when another delivery
    /// finished the job first); delete them with `outbox_done` after the confirms.
    pub outbox_written: bool,
    /// The stored job's status (ours, or the earlier delivery's): with
    /// `reason` and `error_class`, it says how the result is published.
    pub status: JobStatus,
    /// Why it was dead-lettered, when it was.
    pub reason: Option<String>,
    /// Its `disposition::ErrorClass`, when it was dead-lettered.
    pub error_class: Option<String>,
}

impl Ledger {
    /// Connects with the settings' database, the worker's late-track window
    /// and its lease time.
    pub async fn from_settings(s: &crate::config::Settings) -> Result<Ledger, LedgerError> {
        let w = &s.worker;
        let window = Duration::from_secs(w.late_track_window_secs);
        Ledger::connect(&s.database, window, Duration::from_secs_f64(w.lease_ttl_secs)).await
    }

    pub async fn connect(s: &DatabaseSettings, window: Duration, lease_ttl: Duration) -> Result<Ledger, LedgerError> {
        let opts: PgConnectOptions = crate::config::pg_options("database.url", s.url.expose())
            .map_err(|e| LedgerError::Unreachable { at: "database.url".into(), why: e.to_string() })?;
        let acquire = Duration::from_millis(s.acquire_timeout_ms);
        let pool = match PgPoolOptions::new()
            .max_connections(s.max_connections)
            .acquire_timeout(acquire)
            .connect_with(opts.clone())
            .await
        {
            Ok(pool) => pool,
            Err(e) => return Err(unreachable(&opts, e, acquire).await),
        };
        let batchers = Arc::new(group_commit::spawn(pool.clone(), lease_ttl.as_secs_f64(), window.as_secs_f64()));
        Ok(Ledger { pool, window, lease_ttl, batchers })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), LedgerError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    fn window_secs(&self) -> f64 {
        self.window.as_secs_f64()
    }

    /// Opens the job for a teardown event, or finds it again on redelivery.
    /// A new real teardown claims the owner's resources of the life it ends.
    pub async fn begin_job(
        &self,
        req: &TeardownRequest,
        body: &[u8],
        routing_key: &str,
        holder: Uuid,
    ) -> Result<Begin, LedgerError> {
        if !req.dry_run && req.resources.is_empty() {
            if let Some(begun) = self.begin_new_job(req, body, routing_key, holder).await? {
                return Ok(begun);
            }
        }
        let mut tx = self.pool.begin().await.map_err(db("begin"))?;
        lock_owner(&mut tx, &req.owner).await?;
        if let Some(stored) = tracks::track_by_event(&mut tx, &req.event_id).await? {
            return Ok(Begin::Conflict(format!("event_id already names {}", stored.describe())));
        }
        if let Some(job) = job_by_event(&mut tx, &req.event_id).await? {
            if let Some(why) = other_event(&job, req) {
                return Ok(Begin::Conflict(why));
            }
            if job.status != JobStatus::Running {
                let start = load_start(&mut tx, job, None).await?;
                tx.commit().await.map_err(db("commit"))?;
                return Ok(Begin::Start(Box::new(start)));
            }
        }
        if !req.dry_run && !self.acquire_lease(&mut tx, &req.owner, holder).await? {
            return Ok(Begin::Busy);
        }
        let row = sqlx::query(
            "INSERT INTO jobs (job_id, event_id, owner, trigger, dry_run, generation, occurred_at, event_body, routing_key)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (event_id) DO UPDATE
                SET attempts = jobs.attempts + CASE WHEN jobs.status = 'running' THEN 1 ELSE 0 END
             RETURNING (xmax = 0) AS inserted, job_id, event_id, owner, trigger, dry_run, status, attempts,
                       started_at, reason, result, replays, routing_key, looked_up, error_class, failed_runs,
                       cancel_requested",
        )
        .bind(Uuid::new_v4())
        .bind(&req.event_id)
        .bind(&req.owner)
        .bind(req.trigger.as_str())
        .bind(req.dry_run)
        .bind(req.generation)
        .bind(req.occurred_at)
        .bind(body)
        .bind(routing_key)
        .fetch_one(&mut *tx)
        .await
        .map_err(db("opening the job"))?;
        let inserted: bool = row.get("inserted");
        let job = job_row(&row)?;
        // Another owner's event with this id may have opened its job since we looked.
        if let Some(why) = other_event(&job, req).filter(|_| !inserted) {
            return Ok(Begin::Conflict(why));
        }
        if inserted && !job.dry_run {
            upsert_resources(&mut tx, &req.owner, req.generation, &req.resources, Some(job.job_id)).await?;
            let claimed = sqlx::query(concat!(
                "UPDATE tracked_resources r SET job_id = $1
                 WHERE r.owner = $2 AND r.job_id IS NULL AND r.state = 'live' AND ",
                belongs!("$3", "$4", "$5"),
                " RETURNING kind, resource_id, attributes, parent_kind, parent_id"
            ))
            .bind(job.job_id)
            .bind(&req.owner)
            .bind(req.occurred_at)
            .bind(req.generation)
            .bind(self.window_secs())
            .fetch_all(&mut *tx)
            .await
            .map_err(db("claiming the owner's resources"))?;
            // A new job has no steps yet, and without listed resources what it
            // just claimed is all it has: no need to read them back.
            if req.resources.is_empty() {
                let resources = claimed.iter().map(resource_row).collect();
                tx.commit().await.map_err(db("commit"))?;
                return Ok(Begin::Start(Box::new(JobStart { job, resources, done: HashMap::new() })));
            }
        }
        let dry = if job.dry_run { Some((req, self.window_secs())) } else { None };
        let start = load_start(&mut tx, job, dry).await?;
        tx.commit().await.map_err(db("commit"))?;
        Ok(Begin::Start(Box::new(start)))
    }

    /// The common case in one round trip (migrations/..._begin_job_function.sql):
    /// a first delivery of a real teardown that lists no resources. `None`
    /// when the event already has a job; the general path then takes over.
    async fn begin_new_job(
        &self,
        req: &TeardownRequest,
        body: &[u8],
        routing_key: &str,
        holder: Uuid,
    ) -> Result<Option<Begin>, LedgerError> {
        #[derive(serde::Deserialize)]
        struct Opened {
            outcome: String,
            started_at: Option<DateTime<Utc>>,
            #[serde(default)]
            resources: Vec<ClaimedRow>,
        }
        #[derive(serde::Deserialize)]
        struct ClaimedRow {
            kind: String,
            resource_id: String,
            #[serde(default)]
            attributes: BTreeMap<String, String>,
            parent_kind: Option<String>,
            parent_id: Option<String>,
        }
        let job_id = Uuid::new_v4();
        let (reply, answer) = tokio::sync::oneshot::channel();
        let ask = group_commit::BeginReq {
            job_id,
            event_id: req.event_id.clone(),
            owner: req.owner.clone(),
            trigger: req.trigger.as_str(),
            generation: req.generation,
            occurred_at: req.occurred_at,
            body: body.to_vec(),
            routing_key: routing_key.to_string(),
            holder,
            reply,
        };
        self.batchers.begin.send(ask).map_err(|_| LedgerError::FinisherGone)?;
        let opened = answer.await.map_err(|_| LedgerError::FinisherGone)??;
        let opened: Opened = serde_json::from_value(opened)
            .map_err(|e| LedgerError::Corrupt(job_id, format!("reaper_begin_job answered: {e}")))?;
        match opened.outcome.as_str() {
            "busy" => Ok(Some(Begin::Busy)),
            "new" => {
                let job = JobRow {
                    job_id,
                    event_id: req.event_id.clone(),
                    owner: req.owner.clone(),
                    trigger: req.trigger,
                    dry_run: false,
                    status: JobStatus::Running,
                    attempts: 1,
                    failed_runs: 0,
                    started_at: opened.started_at.unwrap_or_else(Utc::now),
                    reason: None,
                    result: None,
                    replays: 0,
                    routing_key: routing_key.to_string(),
                    looked_up: false,
                    error_class: None,
                    cancel_requested: None,
                };
                let resources = opened
                    .resources
                    .into_iter()
                    .map(|r| Resource {
                        kind: r.kind,
                        id: r.resource_id,
                        attributes: r.attributes,
                        parent: r.parent_kind.zip(r.parent_id).map(|(kind, id)| ResourceRef { kind, id }),
                    })
                    .collect();
                Ok(Some(Begin::Start(Box::new(JobStart { job, resources, done: HashMap::new() }))))
            }
            _ => Ok(None),
        }
    }

    /// Adds resources found by lookups to a running job (tracked and claimed
    /// like listed ones), marks the job looked up, and returns everything the
    /// job now owns. Lookups run once per job: a retry or a replay days later
    /// would find whatever the owner's name holds by then, possibly its next
    /// life, so they work from this record instead.
    ///
    /// `strict`: the lookups run later than the job's first delivery (the
    /// first failed, or a replay): only found resources with a `created_at`
    /// of the job's life are claimed; the rest stay tracked for the owner's
    /// next teardown rather than risk a new life's resource.
    pub async fn adopt(
        &self,
        job: &JobRow,
        found: &[TrackedResource],
        strict: bool,
    ) -> Result<Vec<Resource>, LedgerError> {
        let mut tx = self.pool.begin().await.map_err(db("begin"))?;
        lock_owner(&mut tx, &job.owner).await?;
        upsert_resources(&mut tx, &job.owner, None, found, None).await?;
        // Claimed for this job: what is not claimed yet, and, when the lookup
        // said when it was created, only if that is this job's life.
        let kinds: Vec<&str> = found.iter().map(|r| r.resource.kind.as_str()).collect();
        let ids: Vec<&str> = found.iter().map(|r| r.resource.id.as_str()).collect();
        sqlx::query(
            "UPDATE tracked_resources r SET job_id = j.job_id
             FROM jobs j, UNNEST($2::text[], $3::text[]) AS f(kind, id)
             WHERE j.job_id = $1 AND r.owner = j.owner AND r.kind = f.kind AND r.resource_id = f.id
               AND r.job_id IS NULL AND r.state = 'live'
               -- Nothing to date it by (no created_at, no generation on both
               -- sides): claimed as found on the first delivery, never later.
               AND CASE WHEN r.created_at IS NULL AND (r.generation IS NULL OR j.generation IS NULL) THEN NOT $5
                        ELSE reaper_belongs(r.generation, r.created_at, r.tracked_at, j.occurred_at, j.generation, $4) END",
        )
        .bind(job.job_id)
        .bind(&kinds)
        .bind(&ids)
        .bind(self.window_secs())
        .bind(strict)
        .execute(&mut *tx)
        .await
        .map_err(db("claiming what the lookups found"))?;
        sqlx::query("UPDATE jobs SET looked_up = true WHERE job_id = $1")
            .bind(job.job_id)
            .execute(&mut *tx)
            .await
            .map_err(db("marking a job looked up"))?;
        // By owner first: the primary key finds the owner's rows (there is
        // no index on job_id; see migrations/*_hot_claims.sql).
        let rows = sqlx::query(
            "SELECT kind, resource_id, attributes, parent_kind, parent_id FROM tracked_resources
             WHERE owner = $1 AND job_id = $2",
        )
        .bind(&job.owner)
        .bind(job.job_id)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("reading the job's resources"))?;
        tx.commit().await.map_err(db("commit"))?;
        Ok(rows.iter().map(resource_row).collect())
    }

    /// Which of `found` a later run of `job` would claim through `adopt`
    /// (strict, as a replay's lookups are), without changing anything: the
    /// rule of `adopt`'s claim applied to the rows its upsert would leave.
    /// A replay preview shows these as what the replay would delete too.
    pub async fn would_adopt(
        &self,
        job_id: Uuid,
        found: &[TrackedResource],
    ) -> Result<Vec<(String, String)>, LedgerError> {
        let kinds: Vec<&str> = found.iter().map(|r| r.resource.kind.as_str()).collect();
        let ids: Vec<&str> = found.iter().map(|r| r.resource.id.as_str()).collect();
        let created: Vec<Option<DateTime<Utc>>> = found.iter().map(|r| r.created_at).collect();
        let rows = sqlx::query(
            "SELECT f.kind, f.id FROM jobs j
             CROSS JOIN UNNEST($2::text[], $3::text[], $4::timestamptz[]) AS f(kind, id, created_at)
             LEFT JOIN tracked_resources r ON r.owner = j.owner AND r.kind = f.kind AND r.resource_id = f.id
             WHERE j.job_id = $1
               -- A live row some job holds stays that job's.
               AND NOT coalesce(r.state = 'live' AND r.job_id IS NOT NULL, false)
               AND CASE WHEN coalesce(f.created_at, r.created_at) IS NULL AND (r.generation IS NULL OR j.generation IS NULL)
                        THEN false
                        ELSE reaper_belongs(r.generation, coalesce(f.created_at, r.created_at),
                                            CASE WHEN r.state = 'live' THEN r.tracked_at ELSE now() END,
                                            j.occurred_at, j.generation, $5) END
             ORDER BY f.kind, f.id",
        )
        .bind(job_id)
        .bind(&kinds)
        .bind(&ids)
        .bind(&created)
        .bind(self.window_secs())
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading what a replay's lookups would claim"))?;
        Ok(rows.iter().map(|r| (r.get("kind"), r.get("id"))).collect())
    }

    /// What the finish queue's group commit has done: for tests and the
    /// benchmark, which show that finishes share statements.
    pub fn finish_batches(&self) -> group_commit::BatchCounts {
        self.batchers.finish_counts.read()
    }

    /// What the track queue's group commit has done so far.
    pub fn track_batches(&self) -> group_commit::BatchCounts {
        self.batchers.track_counts.read()
    }

    /// Remembers finished steps so a redelivered job does not redo them.
    pub async fn record_steps(&self, job: &JobRow, steps: &[StepRecord]) -> Result<(), LedgerError> {
        if steps.is_empty() || job.dry_run {
            return Ok(());
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let req = group_commit::StepsReq { job_id: job.job_id, owner: job.owner.clone(), steps: steps.to_vec(), reply };
        self.batchers.steps.send(req).map_err(|_| LedgerError::FinisherGone)?;
        answer.await.map_err(|_| LedgerError::FinisherGone)?
    }

    /// Makes the job terminal, in one statement shared with every job ending at
    /// the same moment (group commit, finish.rs): its steps, its resources'
    /// states, its result and the outbox rows that will carry the result (and,
    /// when dead-lettered, the event) out, and releases the owner. Returns
    /// after the commit. If another
    /// delivery finished the job first, nothing is written and that delivery's
    /// result is returned, so every result for one event_id is the same bytes.
    pub async fn finish(&self, job: &JobRow, end: &JobEnd<'_>, holder: Uuid) -> Result<Finished, LedgerError> {
        let mut outbox = vec![OutboxMessage {
            target: Target::Result,
            routing_key: end.result_key.to_string(),
            body: end.result.to_vec(),
            headers: end.result_headers.clone(),
        }];
        if let Some((dead_queue, body, headers)) = &end.dead {
            outbox.push(OutboxMessage {
                target: Target::Dead,
                routing_key: dead_queue.to_string(),
                body: body.to_vec(),
                headers: headers.clone(),
            });
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let req = group_commit::FinishReq {
            job_id: job.job_id,
            owner: job.owner.clone(),
            status: end.status.as_str(),
            reason: end.reason.map(str::to_string),
            error_class: end.error_class.map(str::to_string),
            result: end.result.to_vec(),
            traceparent: end.traceparent.map(str::to_string),
            steps: end.steps.to_vec(),
            outbox,
            holder,
            reply,
        };
        self.batchers.finish.send(req).map_err(|_| LedgerError::FinisherGone)?;
        answer.await.map_err(|_| LedgerError::FinisherGone)?
    }

    /// Counts a run that ended unfinished; returns the job's failed runs so
    /// far, which decide its next broker delay (or that the schedule is spent).
    /// A job another delivery finished meanwhile has no running row: that is
    /// an error, and the message comes back to find the stored result.
    pub async fn count_failed_run(&self, job_id: Uuid) -> Result<u32, LedgerError> {
        let n: i32 =
            sqlx::query_scalar("UPDATE jobs SET failed_runs = failed_runs + 1 WHERE job_id = $1 AND status = 'running' RETURNING failed_runs")
                .bind(job_id)
                .fetch_one(&self.pool)
                .await
                .map_err(db("counting a failed run"))?;
        Ok(n.max(0) as u32)
    }

    pub async fn job_by_event(&self, event_id: &str) -> Result<Option<JobRow>, LedgerError> {
        let mut conn = self.pool.acquire().await.map_err(db("acquire"))?;
        job_by_event(&mut conn, event_id).await
    }

    /// Tracked resources of an owner with their state, for status views and tests.
    pub async fn owner_resources(&self, owner: &str) -> Result<Vec<(ResourceRef, String, Option<Uuid>)>, LedgerError> {
        let rows = sqlx::query("SELECT kind, resource_id, state, job_id FROM tracked_resources WHERE owner = $1 ORDER BY kind, resource_id")
            .bind(owner)
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing an owner's resources"))?;
        Ok(rows
            .iter()
            .map(|r| (ResourceRef { kind: r.get("kind"), id: r.get("resource_id") }, r.get("state"), r.get("job_id")))
            .collect())
    }
}

/// Tracking and claiming for one owner take turns, so a track committed
/// alongside a starting teardown is either claimed by it or sees it and
/// becomes a late track: never neither.
async fn lock_owner(tx: &mut Transaction<'_, Postgres>, owner: &str) -> Result<(), LedgerError> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(owner)
        .execute(&mut **tx)
        .await
        .map_err(db("locking the owner"))?;
    Ok(())
}

async fn bump_attempts(tx: &mut Transaction<'_, Postgres>, job_id: Uuid) -> Result<(), LedgerError> {
    sqlx::query("UPDATE jobs SET attempts = attempts + 1 WHERE job_id = $1")
        .bind(job_id)
        .execute(&mut **tx)
        .await
        .map_err(db("counting an attempt"))?;
    Ok(())
}

async fn job_by_event(conn: &mut sqlx::PgConnection, event_id: &str) -> Result<Option<JobRow>, LedgerError> {
    let row = sqlx::query(
        "SELECT job_id, event_id, owner, trigger, dry_run, status, attempts, started_at, reason, result, replays, routing_key,
                looked_up, error_class, failed_runs, cancel_requested
         FROM jobs WHERE event_id = $1",
    )
    .bind(event_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("reading a job"))?;
    row.map(|r| job_row(&r)).transpose()
}

fn job_row(r: &sqlx::postgres::PgRow) -> Result<JobRow, LedgerError> {
    let job_id: Uuid = r.get("job_id");
    let trigger: String = r.get("trigger");
    let status: String = r.get("status");
    let attempts: i32 = r.get("attempts");
    let replays: i32 = r.get("replays");
    let failed_runs: i32 = r.get("failed_runs");
    Ok(JobRow {
        job_id,
        event_id: r.get("event_id"),
        owner: r.get("owner"),
        trigger: Trigger::parse(&trigger)
            .ok_or_else(|| LedgerError::Corrupt(job_id, format!("trigger {trigger:?}")))?,
        dry_run: r.get("dry_run"),
        status: JobStatus::parse(&status).ok_or_else(|| LedgerError::Corrupt(job_id, format!("status {status:?}")))?,
        attempts: attempts.max(0) as u32,
        failed_runs: failed_runs.max(0) as u32,
        started_at: r.get("started_at"),
        reason: r.get("reason"),
        result: r.get("result"),
        replays: replays.max(0) as u32,
        routing_key: r.get("routing_key"),
        looked_up: r.get("looked_up"),
        error_class: r.get("error_class"),
        cancel_requested: r.get("cancel_requested"),
    })
}

/// Inserts or refreshes tracked resources. `claim_for` claims them for a job
/// (the resources a provisioning.failed event lists belong to that teardown).
/// A resource already proven gone that is tracked again is live again.
/// `reaper_tracks` (migrations/*_track_batches.sql) repeats this SET list for
/// the rows it may write (never a claimed live one): change both together.
async fn upsert_resources(
    tx: &mut Transaction<'_, Postgres>,
    owner: &str,
    generation: Option<i64>,
    resources: &[TrackedResource],
    claim_for: Option<Uuid>,
) -> Result<(), LedgerError> {
    if resources.is_empty() {
        return Ok(());
    }
    let kinds: Vec<&str> = resources.iter().map(|r| r.resource.kind.as_str()).collect();
    let ids: Vec<&str> = resources.iter().map(|r| r.resource.id.as_str()).collect();
    let attrs: Vec<serde_json::Value> =
        resources.iter().map(|r| serde_json::to_value(&r.resource.attributes).expect("a string map")).collect();
    let pkinds: Vec<Option<&str>> =
        resources.iter().map(|r| r.resource.parent.as_ref().map(|p| p.kind.as_str())).collect();
    let pids: Vec<Option<&str>> = resources.iter().map(|r| r.resource.parent.as_ref().map(|p| p.id.as_str())).collect();
    let created: Vec<Option<DateTime<Utc>>> = resources.iter().map(|r| r.created_at).collect();
    sqlx::query(
        "INSERT INTO tracked_resources AS t (owner, kind, resource_id, attributes, parent_kind, parent_id, generation, created_at, job_id)
         SELECT $1, u.kind, u.id, u.attrs, u.pkind, u.pid, $2, u.created, $9
         FROM UNNEST($3::text[], $4::text[], $5::jsonb[], $6::text[], $7::text[], $8::timestamptz[])
              AS u(kind, id, attrs, pkind, pid, created)
         ON CONFLICT (owner, kind, resource_id) DO UPDATE SET
            attributes = EXCLUDED.attributes,
            parent_kind = COALESCE(EXCLUDED.parent_kind, t.parent_kind),
            parent_id = COALESCE(EXCLUDED.parent_id, t.parent_id),
            generation = COALESCE(EXCLUDED.generation, t.generation),
            created_at = COALESCE(EXCLUDED.created_at, t.created_at),
            tracked_at = CASE WHEN t.state = 'live' THEN t.tracked_at ELSE now() END,
            job_id = CASE WHEN t.state = 'live' AND t.job_id IS NOT NULL THEN t.job_id ELSE EXCLUDED.job_id END,
            state = 'live'
         -- A live row a job has claimed is that job's: a later track or lookup
         -- (of a name that came back) must not rewrite the attributes or the
         -- creation time its delete will use.
         WHERE t.job_id IS NULL OR t.state <> 'live'",
    )
    .bind(owner)
    .bind(generation)
    .bind(&kinds)
    .bind(&ids)
    .bind(&attrs)
    .bind(&pkinds)
    .bind(&pids)
    .bind(&created)
    .bind(claim_for)
    .execute(&mut **tx)
    .await
    .map_err(db("recording tracked resources"))?;
    Ok(())
}

/// A tracked_resources row (kind, resource_id, attributes, parent_kind, parent_id).
pub(super) fn resource_row(r: &sqlx::postgres::PgRow) -> Resource {
    let attrs: serde_json::Value = r.get("attributes");
    let pk: Option<String> = r.get("parent_kind");
    let pi: Option<String> = r.get("parent_id");
    Resource {
        kind: r.get("kind"),
        id: r.get("resource_id"),
        attributes: serde_json::from_value::<BTreeMap<String, String>>(attrs).unwrap_or_default(),
        parent: pk.zip(pi).map(|(kind, id)| ResourceRef { kind, id }),
    }
}

/// Loads what a job works on. A dry run claims nothing: it reads what a real
/// teardown would claim now, plus what the event itself lists.
async fn load_start(
    tx: &mut Transaction<'_, Postgres>,
    job: JobRow,
    dry: Option<(&TeardownRequest, f64)>,
) -> Result<JobStart, LedgerError> {
    if job.status != JobStatus::Running {
        return Ok(JobStart { job, resources: Vec::new(), done: HashMap::new() });
    }
    let rows = match dry {
        Some((req, window)) => sqlx::query(concat!(
            "SELECT kind, resource_id, attributes, parent_kind, parent_id FROM tracked_resources r
             WHERE r.owner = $1 AND r.job_id IS NULL AND r.state = 'live' AND ",
            belongs!("$2", "$3", "$4")
        ))
        .bind(&job.owner)
        .bind(req.occurred_at)
        .bind(req.generation)
        .bind(window)
        .fetch_all(&mut **tx)
        .await
        .map_err(db("reading what a dry run would claim"))?,
        None => sqlx::query(
            "SELECT kind, resource_id, attributes, parent_kind, parent_id FROM tracked_resources
             WHERE owner = $1 AND job_id = $2",
        )
        .bind(&job.owner)
        .bind(job.job_id)
        .fetch_all(&mut **tx)
        .await
        .map_err(db("reading the job's resources"))?,
    };
    let mut resources: Vec<Resource> = rows.iter().map(resource_row).collect();
    if let Some((req, _)) = dry {
        for r in &req.resources {
            if !resources.iter().any(|x| x.kind == r.resource.kind && x.id == r.resource.id) {
                resources.push(r.resource.clone());
            }
        }
    }
    let steps = sqlx::query("SELECT kind, resource_id, outcome, attempts, error FROM job_steps WHERE job_id = $1")
        .bind(job.job_id)
        .fetch_all(&mut **tx)
        .await
        .map_err(db("reading finished steps"))?;
    let mut done = HashMap::new();
    for s in steps {
        let outcome: String = s.get("outcome");
        let attempts: i32 = s.get("attempts");
        let resource = ResourceRef { kind: s.get("kind"), id: s.get("resource_id") };
        let outcome =
            Outcome::parse(&outcome).ok_or_else(|| LedgerError::Corrupt(job.job_id, format!("outcome {outcome:?}")))?;
        done.insert(
            resource.clone(),
            StepRecord { resource, outcome, attempts: attempts.max(0) as u32, error: s.get("error") },
        );
    }
    Ok(JobStart { job, resources, done })
}

impl Ledger {
    /// How many resources are tracked for these owners (any state).
    pub async fn count_tracked(&self, owners: &[String]) -> Result<i64, LedgerError> {
        let row = sqlx::query("SELECT count(*) AS n FROM tracked_resources WHERE owner = ANY($1)")
            .bind(owners)
            .fetch_one(&self.pool)
            .await
            .map_err(db("counting tracked resources"))?;
        Ok(row.get("n"))
    }
}
