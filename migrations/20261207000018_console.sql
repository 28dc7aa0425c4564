-- What the operator console (and the CLI and API beside it) needs: replays
-- whose progress anyone can ask for, the producer's trace context kept with
-- the job, and what console sessions need to be ended and not forged.

-- The W3C traceparent the producer's event carried, written when the job
-- ends (with its result), so a failed teardown leads back to its request.
ALTER TABLE jobs ADD COLUMN traceparent TEXT;

-- One row per replay, from the CLI, the API or the console: what it picked
-- and how far it got. The reopened jobs' own status is the rest of its progress.
CREATE TABLE replays (
    replay_id     UUID PRIMARY KEY,
    requested_by  TEXT NOT NULL,
    filter        JSONB NOT NULL,
    matched       INTEGER NOT NULL,
    started_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Moves with every job; a replay that stops moving without finishing
    -- was interrupted (its process stopped; what it reopened is in the
    -- outbox, which a worker drains; replaying again picks up the rest).
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at   TIMESTAMPTZ,
    -- The summary (held back, skipped, failed) once it has finished.
    summary       JSONB
);
CREATE INDEX replays_started_idx ON replays (started_at);

-- The jobs a replay reopened, each written in the transaction that reopens it.
CREATE TABLE replay_jobs (
    replay_id  UUID NOT NULL,
    job_id     UUID NOT NULL,
    PRIMARY KEY (replay_id, job_id)
);

-- Console sessions are signed cookies; the key is derived from the admin
-- token and this secret, made once, so a cookie that leaks cannot be used to
-- guess the token offline.
CREATE TABLE console_key (
    id      BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
    secret  BYTEA NOT NULL
);

-- Sessions ended by logging out, until they would have expired anyway.
CREATE TABLE console_logouts (
    session     TEXT PRIMARY KEY,
    expires_at  TIMESTAMPTZ NOT NULL
);
