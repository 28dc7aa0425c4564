//! Recording `resource.tracked`: one resource or a list of one owner's, under
//! one identity (the event_id), and the late-track job when the owner's life
//! they belong to has already been torn down.
//!
//! The usual track (a first delivery, for an owner no real teardown was ever
//! opened for) is recorded by `reaper_tracks` (migrations/*_track_batches.sql):
//! one statement for the tracks of many concurrent deliveries (group commit).
//! Everything else takes the general path here, under the same owner lock.

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::{bump_attempts, db, job_by_event, load_start, lock_owner, upsert_resources};
use super::{JobRow, JobStart, Ledger, LedgerError};
use crate::domain::{Tracked, TrackedResource, Trigger};

/// A list longer than this is recorded in a transaction of its own (the
/// general path), so that one group-commit batch, which holds the locks of
/// all its owners, stays small.
const MAX_GROUPED_RESOURCES: usize = 64;

/// What recording a `resource.tracked` led to.
#[derive(Debug)]
pub enum TrackOutcome {
    /// Remembered for its owner's future teardown (or already in a running one).
    Recorded,
    /// The owner's teardown had started: this job tears the late resources down.
    Late(Box<JobStart>),
    /// Another delivery holds the owner: try again shortly.
    Busy,
    /// The track's event_id already names another track or a job: refused,
    /// with the reason.
    Conflict(String),
}

/// The teardown a late track belongs to: the life it ended.
struct EndedLife {
    occurred_at: DateTime<Utc>,
    generation: Option<i64>,
}

/// A track as stored under its event_id.
pub(super) struct StoredTrack {
    owner: String,
    kind: String,
    resource_id: String,
    count: i32,
    /// Whether the stored list is the one asked about (when one was).
    same_list: bool,
}

impl StoredTrack {
    /// "a track of node/a (vni/v-1)", "… (vni/v-1 and 4 more)".
    pub(super) fn describe(&self) -> String {
        let more = if self.count > 1 { format!(" and {} more", self.count - 1) } else { String::new() };
        format!("a track of {} ({}/{}{more})", self.owner, self.kind, self.resource_id)
    }
}

/// The columns of a list of resources, for `unnest`.
struct Columns<'a> {
    kinds: Vec<&'a str>,
    ids: Vec<&'a str>,
    created: Vec<Option<DateTime<Utc>>>,
}

fn columns<'a>(resources: impl Iterator<Item = &'a TrackedResource>) -> Columns<'a> {
    let mut c = Columns { kinds: Vec::new(), ids: Vec::new(), created: Vec::new() };
    for r in resources {
        c.kinds.push(&r.resource.kind);
        c.ids.push(&r.resource.id);
        c.created.push(r.created_at);
    }
    c
}

/// A query over a track's resources and the lives of its owner, bound the
/// same way for each: $1 the owner; $2, $3, $4 the resources' kinds, ids and
/// creation times; $5 the track's generation; $6 the late-track window.
fn lives_query<'q>(
    t: &'q Tracked,
    c: &'q Columns<'q>,
    window_secs: f64,
    sql: &'q str,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sql).bind(&t.owner).bind(&c.kinds).bind(&c.ids).bind(&c.created).bind(t.generation).bind(window_secs)
}

/// The track stored under `t`'s event_id, compared with `t`'s list.
async fn stored_track(conn: &mut sqlx::PgConnection, t: &Tracked) -> Result<Option<StoredTrack>, LedgerError> {
    let c = columns(t.resources.iter());
    let row = sqlx::query(
        "SELECT owner, kind, resource_id, resource_count,
                resources_digest IS NOT DISTINCT FROM reaper_track_digest($2, $3) AS same_list
         FROM tracks WHERE event_id = $1",
    )
    .bind(&t.event_id)
    .bind(&c.kinds)
    .bind(&c.ids)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("reading a track"))?;
    Ok(row.map(|r| StoredTrack {
        owner: r.get("owner"),
        kind: r.get("kind"),
        resource_id: r.get("resource_id"),
        count: r.get("resource_count"),
        same_list: r.get("same_list"),
    }))
}

/// The track stored under `event_id`, whatever it lists.
pub(super) async fn track_by_event(
    conn: &mut sqlx::PgConnection,
    event_id: &str,
) -> Result<Option<StoredTrack>, LedgerError> {
    let row = sqlx::query("SELECT owner, kind, resource_id, resource_count FROM tracks WHERE event_id = $1")
        .bind(event_id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db("reading a track"))?;
    Ok(row.map(|r| StoredTrack {
        owner: r.get("owner"),
        kind: r.get("kind"),
        resource_id: r.get("resource_id"),
        count: r.get("resource_count"),
        same_list: false,
    }))
}

/// Why a track with this event_id is not the track stored under it.
fn other_track(stored: &StoredTrack, t: &Tracked) -> Option<String> {
    let first = &t.resources[0].resource;
    let same = stored.owner == t.owner
        && stored.kind == first.kind
        && stored.resource_id == first.id
        && stored.count as usize == t.resources.len()
        && stored.same_list;
    (!same).then(|| format!("event_id already names {}", stored.describe()))
}

/// Stores the track's identity; false when its event_id was taken meanwhile.
async fn insert_track(conn: &mut sqlx::PgConnection, t: &Tracked) -> Result<bool, LedgerError> {
    let c = columns(t.resources.iter());
    let inserted = sqlx::query(
        "INSERT INTO tracks (event_id, owner, kind, resource_id, resource_count, resources_digest)
         VALUES ($1, $2, $3[1], $4[1], cardinality($3), reaper_track_digest($3, $4))
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(&t.event_id)
    .bind(&t.owner)
    .bind(&c.kinds)
    .bind(&c.ids)
    .execute(&mut *conn)
    .await
    .map_err(db("recording the track"))?
    .rows_affected();
    Ok(inserted == 1)
}

/// Whether a late-track job's stored event names the one resource `t` tracks.
async fn job_body_names(conn: &mut sqlx::PgConnection, job: &JobRow, t: &Tracked) -> Result<bool, LedgerError> {
    let [only] = t.resources.as_slice() else { return Ok(false) };
    let body: Vec<u8> = sqlx::query_scalar("SELECT event_body FROM jobs WHERE job_id = $1")
        .bind(job.job_id)
        .fetch_one(&mut *conn)
        .await
        .map_err(db("reading a job's event"))?;
    let named = serde_json::from_slice::<serde_json::Value>(&body).ok().is_some_and(|v| {
        v["kind"].as_str() == Some(only.resource.kind.as_str()) && v["id"].as_str() == Some(only.resource.id.as_str())
    });
    Ok(named)
}

/// The late-track job under `event_id`, read back and handed to the caller
/// to run once this transaction commits.
async fn late_job(mut tx: Transaction<'_, Postgres>, event_id: &str) -> Result<TrackOutcome, LedgerError> {
    let job = job_by_event(&mut tx, event_id).await?.expect("opened or found in this transaction");
    let start = load_start(&mut tx, job, None).await?;
    tx.commit().await.map_err(db("commit"))?;
    Ok(TrackOutcome::Late(Box::new(start)))
}

impl Ledger {
    /// Records a track; if its owner's life already ended, opens the
    /// late-track job (keyed by the track's own event_id) that tears down
    /// the resources that belonged to that life.
    pub async fn track(
        &self,
        t: &Tracked,
        body: &[u8],
        routing_key: &str,
        holder: Uuid,
    ) -> Result<TrackOutcome, LedgerError> {
        if t.resources.len() <= MAX_GROUPED_RESOURCES && self.track_new(t).await? {
            return Ok(TrackOutcome::Recorded);
        }
        self.track_general(t, body, routing_key, holder).await
    }

    /// The usual track, in one statement shared with the tracks of concurrent
    /// deliveries (group commit); false when it needs the general path.
    async fn track_new(&self, t: &Tracked) -> Result<bool, LedgerError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let ask = super::group_commit::TrackReq { key: Uuid::new_v4(), tracked: t.clone(), reply };
        self.batchers.track.send(ask).map_err(|_| LedgerError::FinisherGone)?;
        answer.await.map_err(|_| LedgerError::FinisherGone)?
    }

    async fn track_general(
        &self,
        t: &Tracked,
        body: &[u8],
        routing_key: &str,
        holder: Uuid,
    ) -> Result<TrackOutcome, LedgerError> {
        let mut tx = self.pool.begin().await.map_err(db("begin"))?;
        lock_owner(&mut tx, &t.owner).await?;
        if let Some(stored) = stored_track(&mut tx, t).await? {
            return self.track_again(tx, &stored, t, holder).await;
        }
        if let Some(job) = job_by_event(&mut tx, &t.event_id).await? {
            // A late track opened by a replica from before the `tracks` table
            // (a rolling upgrade) has a job but no row: recognise it by its body.
            if job.trigger == Trigger::LateTrack && job.owner == t.owner && job_body_names(&mut tx, &job, t).await? {
                insert_track(&mut tx, t).await?;
                tx.commit().await.map_err(db("commit"))?;
                return Box::pin(self.track(t, body, routing_key, holder)).await;
            }
            return Ok(TrackOutcome::Conflict(format!(
                "event_id already names a job of {} ({})",
                job.owner,
                job.trigger.as_str()
            )));
        }
        if !insert_track(&mut tx, t).await? {
            // Another owner's track took this event_id a moment ago.
            return Ok(TrackOutcome::Conflict("event_id already names another track".into()));
        }
        if !self.detach_from_ended_lives(&mut tx, t).await? {
            return Ok(TrackOutcome::Busy);
        }
        upsert_resources(&mut tx, &t.owner, t.generation, &t.resources, None).await?;
        match self.late_for_ended_lives(&mut tx, t).await? {
            None => {
                tx.commit().await.map_err(db("commit"))?;
                Ok(TrackOutcome::Recorded)
            }
            Some((late, ended)) => self.open_late_job(tx, t, &late, &ended, body, routing_key, holder).await,
        }
    }

    /// This very track again. Recorded on its first delivery; if it turned
    /// out late, resume (or republish) its job.
    async fn track_again(
        &self,
        mut tx: Transaction<'_, Postgres>,
        stored: &StoredTrack,
        t: &Tracked,
        holder: Uuid,
    ) -> Result<TrackOutcome, LedgerError> {
        if let Some(why) = other_track(stored, t) {
            return Ok(TrackOutcome::Conflict(why));
        }
        let Some(job) = job_by_event(&mut tx, &t.event_id).await? else {
            tx.commit().await.map_err(db("commit"))?;
            return Ok(TrackOutcome::Recorded);
        };
        if job.trigger != Trigger::LateTrack || job.owner != t.owner {
            return Ok(TrackOutcome::Conflict(format!("event_id already names a job of {}", job.owner)));
        }
        if job.status == crate::domain::JobStatus::Running {
            if !self.acquire_lease(&mut tx, &t.owner, holder).await? {
                return Ok(TrackOutcome::Busy);
            }
            bump_attempts(&mut tx, job.job_id).await?;
        }
        late_job(tx, &t.event_id).await
    }

    /// The just-tracked resources that belong to a life a real teardown
    /// already ended, with the earliest such teardown: `None` when there are
    /// none (the usual case). A resource a job already claimed is that job's.
    async fn late_for_ended_lives(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        t: &Tracked,
    ) -> Result<Option<(Vec<(String, String)>, EndedLife)>, LedgerError> {
        let c = columns(t.resources.iter());
        let rows = lives_query(
            t,
            &c,
            self.window_secs(),
            "SELECT u.kind, u.id, e.occurred_at, e.generation
             FROM UNNEST($2::text[], $3::text[], $4::timestamptz[]) AS u(kind, id, created)
             JOIN tracked_resources r ON r.owner = $1 AND r.kind = u.kind AND r.resource_id = u.id AND r.job_id IS NULL
             CROSS JOIN LATERAL (
                 SELECT j.occurred_at, j.generation FROM jobs j
                 WHERE j.owner = $1 AND NOT j.dry_run AND j.trigger IN ('deletion.requested', 'provisioning.failed')
                   -- A cancelled teardown ended nothing: what is tracked after it is not late.
                   AND j.status <> 'cancelled'
                   AND reaper_belongs($5::bigint, u.created, r.tracked_at, j.occurred_at, j.generation, $6::double precision)
                 ORDER BY j.occurred_at LIMIT 1) e
             ORDER BY e.occurred_at",
        )
        .fetch_all(&mut **tx)
        .await
        .map_err(db("finding the teardown a late track belongs to"))?;
        let Some(first) = rows.first() else { return Ok(None) };
        // One job per track, holding the facts of one life: the earliest
        // ended life names it and it claims that life's resources only. A
        // job's facts decide whether a resource tracked again later is still
        // its life (`detach_from_ended_lives`); with another life's facts, a
        // next life's resource could stay claimed and be deleted on a retry.
        // Late resources of a later ended life in the same list stay
        // unclaimed, for the owner's next teardown or a reconcile sweep.
        let ended = EndedLife { occurred_at: first.get("occurred_at"), generation: first.get("generation") };
        let late = rows
            .iter()
            .filter(|r| {
                r.get::<DateTime<Utc>, _>("occurred_at") == ended.occurred_at
                    && r.get::<Option<i64>, _>("generation") == ended.generation
            })
            .map(|r| (r.get("kind"), r.get("id")))
            .collect();
        Ok(Some((late, ended)))
    }

    /// Opens the late-track job that deletes resources tracked after their
    /// life's teardown began, and claims them for it.
    #[allow(clippy::too_many_arguments)]
    async fn open_late_job(
        &self,
        mut tx: Transaction<'_, Postgres>,
        t: &Tracked,
        late: &[(String, String)],
        ended: &EndedLife,
        body: &[u8],
        routing_key: &str,
        holder: Uuid,
    ) -> Result<TrackOutcome, LedgerError> {
        if !self.acquire_lease(&mut tx, &t.owner, holder).await? {
            return Ok(TrackOutcome::Busy);
        }
        let job_id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO jobs (job_id, event_id, owner, trigger, dry_run, generation, occurred_at, event_body, routing_key)
             VALUES ($1, $2, $3, 'late_track', false, $4, $5, $6, $7)",
        )
        .bind(job_id)
        .bind(&t.event_id)
        .bind(&t.owner)
        .bind(ended.generation)
        .bind(ended.occurred_at)
        .bind(body)
        .bind(routing_key)
        .execute(&mut *tx)
        .await
        .map_err(db("opening a late-track job"))?;
        let (kinds, ids): (Vec<&str>, Vec<&str>) = late.iter().map(|(k, i)| (k.as_str(), i.as_str())).unzip();
        sqlx::query(
            "UPDATE tracked_resources r SET job_id = $1
             FROM UNNEST($3::text[], $4::text[]) AS u(kind, id)
             WHERE r.owner = $2 AND r.kind = u.kind AND r.resource_id = u.id",
        )
        .bind(job_id)
        .bind(&t.owner)
        .bind(&kinds)
        .bind(&ids)
        .execute(&mut *tx)
        .await
        .map_err(db("claiming late-tracked resources"))?;
        late_job(tx, &t.event_id).await
    }

    /// Resources a job claimed, tracked again for a life that job does not
    /// end (the name came back: `node_record/n1`, a reused container id), are
    /// detached from that job, so the job's retry or replay never deletes the
    /// new life's resource. While such a job is running right now (its owner
    /// is leased), the track waits instead: `false`, and nothing changes.
    async fn detach_from_ended_lives(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        t: &Tracked,
    ) -> Result<bool, LedgerError> {
        // Only on evidence that it is another life: a resource without
        // generation or created_at proves nothing, and detaching it could
        // leak the old life's resource.
        let c = columns(t.resources.iter().filter(|r| t.generation.is_some() || r.created_at.is_some()));
        if c.kinds.is_empty() {
            return Ok(true);
        }
        let held = lives_query(
            t,
            &c,
            self.window_secs(),
            "SELECT u.kind, u.id,
                    reaper_belongs($5::bigint, u.created, now(), j.occurred_at, j.generation, $6::double precision)
                    AS same_life,
                    j.status = 'running' AND EXISTS (SELECT 1 FROM owner_leases l WHERE l.owner = r.owner AND l.until > now())
                    AS in_hand
             FROM UNNEST($2::text[], $3::text[], $4::timestamptz[]) AS u(kind, id, created)
             JOIN tracked_resources r ON r.owner = $1 AND r.kind = u.kind AND r.resource_id = u.id AND r.state = 'live'
             JOIN jobs j ON j.job_id = r.job_id",
        )
        .fetch_all(&mut **tx)
        .await
        .map_err(db("reading who holds a re-tracked resource"))?;
        let other_life: Vec<_> = held.iter().filter(|r| !r.get::<bool, _>("same_life")).collect();
        if other_life.iter().any(|r| r.get::<bool, _>("in_hand")) {
            return Ok(false);
        }
        if other_life.is_empty() {
            return Ok(true);
        }
        let kinds: Vec<String> = other_life.iter().map(|r| r.get("kind")).collect();
        let ids: Vec<String> = other_life.iter().map(|r| r.get("id")).collect();
        sqlx::query(
            "UPDATE tracked_resources r SET job_id = NULL, tracked_at = now()
             FROM UNNEST($2::text[], $3::text[]) AS u(kind, id)
             WHERE r.owner = $1 AND r.kind = u.kind AND r.resource_id = u.id",
        )
        .bind(&t.owner)
        .bind(&kinds)
        .bind(&ids)
        .execute(&mut **tx)
        .await
        .map_err(db("detaching re-tracked resources from an ended life"))?;
        Ok(true)
    }
}
