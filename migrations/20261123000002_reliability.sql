-- Crash safety, replicas and replay.

-- Results (and dead-letter copies, and replayed events) to publish. Written in
-- the same statement that makes a job terminal; deleted once the broker
-- confirmed them. A drainer publishes whatever a crash left behind.
CREATE TABLE outbox (
    id           BIGSERIAL PRIMARY KEY,
    job_id       UUID NOT NULL,
    event_id     TEXT NOT NULL,
    -- result: on the results exchange; dead: on the dead queue; event: back on the events exchange.
    target       TEXT NOT NULL CHECK (target IN ('result', 'dead', 'event')),
    routing_key  TEXT NOT NULL,
    body         BYTEA NOT NULL,
    headers      JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX outbox_job_idx ON outbox (job_id);

-- One teardown per owner at a time, across every replica. A holder is one
-- delivery being handled; a live worker renews its leases, a dead one's expire.
CREATE TABLE owner_leases (
    owner   TEXT PRIMARY KEY,
    holder  UUID NOT NULL,
    until   TIMESTAMPTZ NOT NULL
);

ALTER TABLE jobs
    ADD COLUMN replays INTEGER NOT NULL DEFAULT 0,
    -- permanent | exhausted | plan: what kind of failure dead-lettered the job.
    ADD COLUMN error_class TEXT;
CREATE INDEX jobs_dead_idx ON jobs (finished_at) WHERE status = 'dead_lettered';
