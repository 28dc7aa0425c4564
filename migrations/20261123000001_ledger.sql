-- The ledger: what was created for whom, one job per event, and what each job did.

-- One row per job; event_id is the producer's idempotency key.
CREATE TABLE jobs (
    job_id       UUID PRIMARY KEY,
    event_id     TEXT NOT NULL UNIQUE,
    owner        TEXT NOT NULL,
    -- deletion.requested | provisioning.failed | late_track
    trigger      TEXT NOT NULL,
    dry_run      BOOLEAN NOT NULL,
    -- Which life of a reused owner name this teardown ends, when the producer said.
    generation   BIGINT,
    -- When the producer says the owner was deleted or failed; decides late tracks.
    occurred_at  TIMESTAMPTZ NOT NULL,
    status       TEXT NOT NULL DEFAULT 'running'
                 CHECK (status IN ('running', 'completed', 'dead_lettered')),
    -- Deliveries of this job so far; the broker retry schedule is indexed by it.
    attempts     INTEGER NOT NULL DEFAULT 1,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at  TIMESTAMPTZ,
    reason       TEXT,
    -- The exact TeardownResult bytes published; duplicates re-publish these.
    result       BYTEA,
    -- The event as received, for replay.
    event_body   BYTEA NOT NULL,
    routing_key  TEXT NOT NULL
);
CREATE INDEX jobs_owner_idx ON jobs (owner, occurred_at);
CREATE INDEX jobs_status_idx ON jobs (status) WHERE status <> 'completed';

-- Resources created for an owner, as the provisioner tracked them.
CREATE TABLE tracked_resources (
    owner          TEXT NOT NULL,
    kind           TEXT NOT NULL,
    resource_id    TEXT NOT NULL,
    attributes     JSONB NOT NULL DEFAULT '{}'::jsonb,
    parent_kind    TEXT,
    parent_id      TEXT,
    generation     BIGINT,
    -- Creation time at the provider, when the producer sent it.
    created_at     TIMESTAMPTZ,
    -- When reaper first (or, after a re-track, last) recorded it.
    tracked_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- live until a job proves it gone.
    state          TEXT NOT NULL DEFAULT 'live'
                   CHECK (state IN ('live', 'deleted', 'already_gone')),
    -- The teardown job that claimed it; NULL while it belongs to a living owner.
    job_id         UUID REFERENCES jobs (job_id),
    PRIMARY KEY (owner, kind, resource_id)
);
CREATE INDEX tracked_resources_job_idx ON tracked_resources (job_id) WHERE job_id IS NOT NULL;

-- What each job did to each resource. Written per level, so a redelivered job
-- resumes without redoing finished steps.
CREATE TABLE job_steps (
    job_id       UUID NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    kind         TEXT NOT NULL,
    resource_id  TEXT NOT NULL,
    outcome      TEXT NOT NULL
                 CHECK (outcome IN ('deleted', 'already_gone', 'would_delete', 'blocked', 'failed')),
    attempts     INTEGER NOT NULL,
    error        TEXT,
    finished_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, kind, resource_id)
);
