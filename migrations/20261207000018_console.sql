-- What the operator console (and the CLI and API beside it) needs: replays
-- whose progress anyone can ask for, and the producer's trace context kept
-- with the job.

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
    -- was interrupted (its process died; what it reopened is in the outbox).
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at   TIMESTAMPTZ,
    reopened      UUID[] NOT NULL DEFAULT '{}',
    -- The summary (held back, skipped, failed) once it has finished.
    summary       JSONB
);
CREATE INDEX replays_started_idx ON replays (started_at);
