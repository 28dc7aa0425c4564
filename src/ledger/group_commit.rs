//! Group commit. Every job that ends hands its terminal write to one task,
//! which writes all the jobs that ended meanwhile in one statement and one
//! commit, then answers each; the same for the steps a job records after each
//! level. A job publishes its result only after that answer, i.e. after the
//! commit that holds its own rows.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sqlx::{PgPool, Row};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{Finished, LedgerError, StepRecord};

/// Most jobs written by one statement.
const MAX_BATCH: usize = 256;

/// One job's terminal write, owned so it can wait in the queue.
pub(super) struct FinishReq {
    pub job_id: Uuid,
    pub owner: String,
    pub status: &'static str,
    pub reason: Option<String>,
    pub error_class: Option<String>,
    pub result: Vec<u8>,
    pub traceparent: Option<String>,
    pub steps: Vec<StepRecord>,
    pub outbox: Vec<super::OutboxMessage>,
    pub holder: Uuid,
    pub reply: oneshot::Sender<Result<Finished, LedgerError>>,
}

/// One job's steps after a level (not its last), for crash resume.
pub(super) struct StepsReq {
    pub job_id: Uuid,
    pub owner: String,
    pub steps: Vec<StepRecord>,
    pub reply: oneshot::Sender<Result<(), LedgerError>>,
}

/// A first delivery of a teardown that lists no resources (see reaper_begin_job).
pub(super) struct BeginReq {
    pub job_id: Uuid,
    pub event_id: String,
    pub owner: String,
    pub trigger: &'static str,
    pub generation: Option<i64>,
    pub occurred_at: chrono::DateTime<chrono::Utc>,
    pub body: Vec<u8>,
    pub routing_key: String,
    pub holder: Uuid,
    pub reply: oneshot::Sender<Result<serde_json::Value, LedgerError>>,
}

/// A track in the usual case (see reaper_tracks); answered `true` when
/// recorded, `false` when it needs the general path.
pub(super) struct TrackReq {
    /// Only to tell requests apart in a batch.
    pub key: Uuid,
    pub tracked: crate::domain::Tracked,
    pub reply: oneshot::Sender<Result<bool, LedgerError>>,
}

/// The four group-commit queues.
pub(super) struct Batchers {
    pub finish: mpsc::UnboundedSender<FinishReq>,
    pub steps: mpsc::UnboundedSender<StepsReq>,
    pub begin: mpsc::UnboundedSender<BeginReq>,
    pub track: mpsc::UnboundedSender<TrackReq>,
    /// What the finish queue did: how often it wrote, how much at once, how
    /// often a refused batch was split.
    pub finish_counts: Arc<Counts>,
    /// The same for the track queue.
    pub track_counts: Arc<Counts>,
}

/// What one group-commit queue has done so far.
#[derive(Debug, Default)]
pub struct Counts {
    statements: AtomicU64,
    largest: AtomicU64,
    splits: AtomicU64,
}

/// A reading of `Counts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchCounts {
    /// Batches written (a split batch's one-by-one writes are not counted).
    pub statements: u64,
    /// The most requests one batch held.
    pub largest: u64,
    /// Batches the database refused that were written one by one instead.
    pub splits: u64,
}

impl Counts {
    pub fn read(&self) -> BatchCounts {
        BatchCounts {
            statements: self.statements.load(Ordering::Relaxed),
            largest: self.largest.load(Ordering::Relaxed),
            splits: self.splits.load(Ordering::Relaxed),
        }
    }
}

pub(super) fn spawn(pool: PgPool, lease_secs: f64, window_secs: f64) -> Batchers {
    let (finish, finish_rx) = mpsc::unbounded_channel();
    let (steps, steps_rx) = mpsc::unbounded_channel();
    let (begin, begin_rx) = mpsc::unbounded_channel();
    let (track, track_rx) = mpsc::unbounded_channel();
    let (p1, p2, p3) = (pool.clone(), pool.clone(), pool.clone());
    let finish_counts = Arc::new(Counts::default());
    let counts = finish_counts.clone();
    tokio::spawn(batches(finish_rx, |r: &FinishReq| r.job_id, counts, async move |b| write(&p1, b).await));
    let counts = Arc::new(Counts::default());
    tokio::spawn(batches(steps_rx, |r: &StepsReq| r.job_id, counts, async move |b| write_steps(&p2, b).await));
    tokio::spawn(batches(
        begin_rx,
        |r: &BeginReq| r.job_id,
        Arc::new(Counts::default()),
        async move |b| write_begins(&pool, b, lease_secs, window_secs).await,
    ));
    let track_counts = Arc::new(Counts::default());
    let counts = track_counts.clone();
    tokio::spawn(batches(track_rx, |r: &TrackReq| r.key, counts, async move |b| write_tracks(&p3, b).await));
    Batchers { finish, steps, begin, track, finish_counts, track_counts }
}

async fn write_tracks(pool: &PgPool, batch: Vec<TrackReq>) -> Result<(), Failed<TrackReq>> {
    // Resource n belongs to track track_of[n] (1-based, as SQL arrays are).
    let track_of: Vec<i32> = batch
        .iter()
        .enumerate()
        .flat_map(|(i, r)| std::iter::repeat_n(i as i32 + 1, r.tracked.resources.len()))
        .collect();
    let resources: Vec<&crate::domain::TrackedResource> =
        batch.iter().flat_map(|r| r.tracked.resources.iter()).collect();
    let attrs: Vec<serde_json::Value> =
        resources.iter().map(|r| serde_json::to_value(&r.resource.attributes).expect("a string map")).collect();
    let answer: Result<Vec<String>, sqlx::Error> =
        sqlx::query_scalar("SELECT reaper_tracks($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)")
            .bind(batch.iter().map(|r| r.tracked.event_id.as_str()).collect::<Vec<_>>())
            .bind(batch.iter().map(|r| r.tracked.owner.as_str()).collect::<Vec<_>>())
            .bind(batch.iter().map(|r| r.tracked.generation).collect::<Vec<_>>())
            .bind(&track_of)
            .bind(resources.iter().map(|r| r.resource.kind.as_str()).collect::<Vec<_>>())
            .bind(resources.iter().map(|r| r.resource.id.as_str()).collect::<Vec<_>>())
            .bind(&attrs)
            .bind(resources.iter().map(|r| r.resource.parent.as_ref().map(|p| p.kind.as_str())).collect::<Vec<_>>())
            .bind(resources.iter().map(|r| r.resource.parent.as_ref().map(|p| p.id.as_str())).collect::<Vec<_>>())
            .bind(resources.iter().map(|r| r.created_at).collect::<Vec<_>>())
            .fetch_one(pool)
            .await;
    match answer {
        Ok(outcomes) if outcomes.len() == batch.len() => {
            for (r, outcome) in batch.into_iter().zip(outcomes) {
                let _ = r.reply.send(Ok(outcome == "recorded"));
            }
        }
        Ok(other) => {
            for r in batch {
                let _ = r.reply.send(Err(LedgerError::Batch {
                    message: format!("reaper_tracks answered {} outcomes", other.len()),
                    code: None,
                }));
            }
        }
        Err(e) => return Err(Failed::new(batch, e)),
    }
    Ok(())
}

async fn write_begins(
    pool: &PgPool,
    batch: Vec<BeginReq>,
    lease_secs: f64,
    window_secs: f64,
) -> Result<(), Failed<BeginReq>> {
    let answer: Result<serde_json::Value, sqlx::Error> =
        sqlx::query_scalar("SELECT reaper_begin_jobs($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)")
            .bind(batch.iter().map(|r| r.job_id).collect::<Vec<_>>())
            .bind(batch.iter().map(|r| r.event_id.as_str()).collect::<Vec<_>>())
            .bind(batch.iter().map(|r| r.owner.as_str()).collect::<Vec<_>>())
            .bind(batch.iter().map(|r| r.trigger).collect::<Vec<_>>())
            .bind(batch.iter().map(|r| r.generation).collect::<Vec<_>>())
            .bind(batch.iter().map(|r| r.occurred_at).collect::<Vec<_>>())
            .bind(batch.iter().map(|r| r.body.as_slice()).collect::<Vec<_>>())
            .bind(batch.iter().map(|r| r.routing_key.as_str()).collect::<Vec<_>>())
            .bind(batch.iter().map(|r| r.holder).collect::<Vec<_>>())
            .bind(lease_secs)
            .bind(window_secs)
            .fetch_one(pool)
            .await;
    match answer {
        Ok(serde_json::Value::Array(items)) if items.len() == batch.len() => {
            for (r, item) in batch.into_iter().zip(items) {
                let _ = r.reply.send(Ok(item));
            }
        }
        Ok(other) => {
            for r in batch {
                let _ =
                    r.reply.send(Err(LedgerError::Corrupt(r.job_id, format!("reaper_begin_jobs answered {other}"))));
            }
        }
        Err(e) => return Err(Failed::new(batch, e)),
    }
    Ok(())
}

/// Takes whatever is outbox_written (up to MAX_BATCH) and writes it at once, forever.
async fn batches<T: Answer>(
    mut rx: mpsc::UnboundedReceiver<T>,
    job: fn(&T) -> Uuid,
    counts: Arc<Counts>,
    mut write: impl AsyncFnMut(Vec<T>) -> Result<(), Failed<T>>,
) {
    let mut deferred: Vec<T> = Vec::new();
    loop {
        if deferred.is_empty() {
            match rx.recv().await {
                Some(r) => deferred.push(r),
                None => return,
            }
        }
        while deferred.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => deferred.push(r),
                Err(_) => break,
            }
        }
        // The same job twice in one statement would update its rows twice:
        // the second copy waits for the next batch.
        let mut seen = HashSet::new();
        let (batch, later): (Vec<_>, Vec<_>) = deferred.drain(..).partition(|r| seen.insert(job(r)));
        deferred = later;
        counts.statements.fetch_add(1, Ordering::Relaxed);
        counts.largest.fetch_max(batch.len() as u64, Ordering::Relaxed);
        match write(batch).await {
            Ok(()) => {}
            // The database refused the data: one job's rows may be at fault, so
            // write each alone rather than fail its batch-mates with it.
            Err(Failed { batch, message, code: Some(_) }) if batch.len() > 1 => {
                counts.splits.fetch_add(1, Ordering::Relaxed);
                for r in batch {
                    if let Err(one) = write(vec![r]).await {
                        one.answer();
                    }
                }
                tracing::warn!(message, "a group commit was refused; its jobs were written one by one");
            }
            Err(failed) => failed.answer(),
        }
    }
}

/// A batch the database did not take, handed back so it can be retried or answered.
struct Failed<T> {
    batch: Vec<T>,
    message: String,
    /// The server's SQLSTATE when it refused the data (none when it could
    /// not be reached).
    code: Option<String>,
}

impl<T: Answer> Failed<T> {
    fn new(batch: Vec<T>, e: sqlx::Error) -> Failed<T> {
        let code = e.as_database_error().map(|d| d.code().map(|c| c.into_owned()).unwrap_or_default());
        Failed { batch, code, message: e.to_string() }
    }

    fn answer(self) {
        for r in self.batch {
            r.fail(LedgerError::Batch { message: self.message.clone(), code: self.code.clone() });
        }
    }
}

/// Every outbox_written request can be told that its write failed.
trait Answer {
    fn fail(self, e: LedgerError);
}

impl Answer for FinishReq {
    fn fail(self, e: LedgerError) {
        let _ = self.reply.send(Err(e));
    }
}

impl Answer for StepsReq {
    fn fail(self, e: LedgerError) {
        let _ = self.reply.send(Err(e));
    }
}

impl Answer for TrackReq {
    fn fail(self, e: LedgerError) {
        let _ = self.reply.send(Err(e));
    }
}

impl Answer for BeginReq {
    fn fail(self, e: LedgerError) {
        let _ = self.reply.send(Err(e));
    }
}

async fn write_steps(pool: &PgPool, batch: Vec<StepsReq>) -> Result<(), Failed<StepsReq>> {
    let (mut s_job, mut s_owner, mut s_kind, mut s_id, mut s_out, mut s_att, mut s_err) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for r in &batch {
        for s in &r.steps {
            s_job.push(r.job_id);
            s_owner.push(r.owner.as_str());
            s_kind.push(s.resource.kind.as_str());
            s_id.push(s.resource.id.as_str());
            s_out.push(s.outcome.as_str());
            s_att.push(s.attempts as i32);
            s_err.push(s.error.as_deref());
        }
    }
    let done = sqlx::query(
        "WITH u AS (
            SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[], $7::text[])
                AS u(job_id, owner, kind, resource_id, outcome, attempts, error)
         ),
         -- Only while the job runs: a late write must not touch a finished job.
         r AS (SELECT u.* FROM u JOIN jobs j ON j.job_id = u.job_id AND j.status = 'running'),
         s AS (
            INSERT INTO job_steps (job_id, kind, resource_id, outcome, attempts, error)
            SELECT job_id, kind, resource_id, outcome, attempts, error FROM r
            ON CONFLICT (job_id, kind, resource_id) DO UPDATE
               SET outcome = EXCLUDED.outcome, attempts = EXCLUDED.attempts, error = EXCLUDED.error, finished_at = now()
         )
         UPDATE tracked_resources t SET state = r.outcome FROM r
         WHERE t.owner = r.owner AND t.job_id = r.job_id AND t.kind = r.kind AND t.resource_id = r.resource_id
           AND r.outcome IN ('deleted', 'already_gone')",
    )
    .bind(&s_job)
    .bind(&s_owner)
    .bind(&s_kind)
    .bind(&s_id)
    .bind(&s_out)
    .bind(&s_att)
    .bind(&s_err)
    .execute(pool)
    .await;
    if let Err(e) = done {
        return Err(Failed::new(batch, e));
    }
    for r in batch {
        let _ = r.reply.send(Ok(()));
    }
    Ok(())
}

async fn write(pool: &PgPool, batch: Vec<FinishReq>) -> Result<(), Failed<FinishReq>> {
    let job_ids: Vec<Uuid> = batch.iter().map(|r| r.job_id).collect();
    let statuses: Vec<&str> = batch.iter().map(|r| r.status).collect();
    let reasons: Vec<Option<&str>> = batch.iter().map(|r| r.reason.as_deref()).collect();
    let classes: Vec<Option<&str>> = batch.iter().map(|r| r.error_class.as_deref()).collect();
    let results: Vec<&[u8]> = batch.iter().map(|r| r.result.as_slice()).collect();
    let owners: Vec<&str> = batch.iter().map(|r| r.owner.as_str()).collect();
    let holders: Vec<Uuid> = batch.iter().map(|r| r.holder).collect();
    let traces: Vec<Option<&str>> = batch.iter().map(|r| r.traceparent.as_deref()).collect();
    let (mut s_job, mut s_kind, mut s_id, mut s_out, mut s_att, mut s_err) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut o_job, mut o_target, mut o_key, mut o_body, mut o_headers) = (vec![], vec![], vec![], vec![], vec![]);
    for r in &batch {
        for s in &r.steps {
            s_job.push(r.job_id);
            s_kind.push(s.resource.kind.as_str());
            s_id.push(s.resource.id.as_str());
            s_out.push(s.outcome.as_str());
            s_att.push(s.attempts as i32);
            s_err.push(s.error.as_deref());
        }
        for m in &r.outbox {
            o_job.push(r.job_id);
            o_target.push(m.target.as_str());
            o_key.push(m.routing_key.as_str());
            o_body.push(m.body.as_slice());
            o_headers.push(m.headers_json());
        }
    }
    let rows = sqlx::query(
        "WITH input AS (
            SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::text[], $7::uuid[], $19::text[])
                AS i(job_id, status, reason, error_class, result, owner, holder, traceparent)
         ),
         f AS (
            UPDATE jobs j SET status = i.status, reason = i.reason, error_class = i.error_class, result = i.result, finished_at = now(),
                              traceparent = coalesce(i.traceparent, j.traceparent)
            FROM input i WHERE j.job_id = i.job_id AND j.status = 'running'
            RETURNING j.job_id, j.event_id, j.result
         ),
         steps AS (
            SELECT * FROM UNNEST($8::uuid[], $9::text[], $10::text[], $11::text[], $12::int[], $13::text[])
                AS u(job_id, kind, resource_id, outcome, attempts, error)
         ),
         s AS (
            INSERT INTO job_steps (job_id, kind, resource_id, outcome, attempts, error)
            SELECT u.job_id, u.kind, u.resource_id, u.outcome, u.attempts, u.error FROM steps u JOIN f ON f.job_id = u.job_id
            ON CONFLICT (job_id, kind, resource_id) DO UPDATE
               SET outcome = EXCLUDED.outcome, attempts = EXCLUDED.attempts, error = EXCLUDED.error, finished_at = now()
         ),
         r AS (
            UPDATE tracked_resources t SET state = u.outcome
            FROM steps u JOIN f ON f.job_id = u.job_id JOIN input i ON i.job_id = u.job_id
            WHERE t.owner = i.owner AND t.job_id = u.job_id AND t.kind = u.kind AND t.resource_id = u.resource_id
              AND u.outcome IN ('deleted', 'already_gone')
         ),
         o AS (
            INSERT INTO outbox (job_id, event_id, target, routing_key, body, headers)
            SELECT x.job_id, f.event_id, x.target, x.routing_key, x.body, x.headers
            FROM UNNEST($14::uuid[], $15::text[], $16::text[], $17::bytea[], $18::jsonb[]) AS x(job_id, target, routing_key, body, headers)
            JOIN f ON f.job_id = x.job_id
            RETURNING job_id
         ),
         l AS (DELETE FROM owner_leases ol USING input i WHERE ol.owner = i.owner AND ol.holder = i.holder)
         SELECT i.job_id, f.result AS mine, j.result AS earlier, j.status AS earlier_status,
                j.reason AS earlier_reason, j.error_class AS earlier_class, EXISTS (SELECT 1 FROM o WHERE o.job_id = i.job_id) AS outbox_written
         FROM input i LEFT JOIN f ON f.job_id = i.job_id LEFT JOIN jobs j ON j.job_id = i.job_id",
    )
    .bind(&job_ids)
    .bind(&statuses)
    .bind(&reasons)
    .bind(&classes)
    .bind(&results)
    .bind(&owners)
    .bind(&holders)
    .bind(&s_job)
    .bind(&s_kind)
    .bind(&s_id)
    .bind(&s_out)
    .bind(&s_att)
    .bind(&s_err)
    .bind(&o_job)
    .bind(&o_target)
    .bind(&o_key)
    .bind(&o_body)
    .bind(&o_headers)
    .bind(&traces)
    .fetch_all(pool)
    .await;
    match rows {
        Err(e) => return Err(Failed::new(batch, e)),
        Ok(rows) => {
            for r in batch {
                let row = rows.iter().find(|row| row.get::<Uuid, _>("job_id") == r.job_id);
                let answer = match row {
                    None => Err(LedgerError::Corrupt(r.job_id, "missing from its batch's answer".into())),
                    Some(row) => {
                        let mine: Option<Vec<u8>> = row.get("mine");
                        let earlier: Option<Vec<u8>> = row.get("earlier");
                        let outbox_written: bool = row.get("outbox_written");
                        // Ours, or (another delivery finished it first) the stored one.
                        let (status, reason, error_class) = if mine.is_some() {
                            (r.status.to_string(), r.reason.clone(), r.error_class.clone())
                        } else {
                            let status: Option<String> = row.get("earlier_status");
                            (status.unwrap_or_default(), row.get("earlier_reason"), row.get("earlier_class"))
                        };
                        let status = crate::domain::JobStatus::parse(&status)
                            .ok_or_else(|| LedgerError::Corrupt(r.job_id, format!("status {status:?}")));
                        status.and_then(|status| {
                            mine.or(earlier)
                                .map(|result| Finished { result, outbox_written, status, reason, error_class })
                                .ok_or_else(|| LedgerError::Corrupt(r.job_id, "terminal without a result".into()))
                        })
                    }
                };
                let _ = r.reply.send(answer);
            }
        }
    }
    Ok(())
}
