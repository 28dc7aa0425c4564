-- What archive-before-delete kept: rows and documents as JSON, with the job
-- that deleted them, so `reaper restore JOB` can put them back.
CREATE TABLE archived_records (
    id           BIGSERIAL PRIMARY KEY,
    job_id       UUID NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    kind         TEXT NOT NULL,
    resource_id  TEXT NOT NULL,
    -- json, not jsonb: a document's field order is kept as it was.
    record       JSON NOT NULL,
    archived_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    restored_at  TIMESTAMPTZ
);
CREATE INDEX archived_records_job_idx ON archived_records (job_id);
CREATE INDEX archived_records_age_idx ON archived_records (archived_at);

-- One row per reconcile rule: how many sweeps loaded both inventories (the
-- quarantine counts consecutive ones), when the schedule last started it, and
-- the last report.
CREATE TABLE reconcile_rules (
    rule             TEXT PRIMARY KEY,
    sweeps           BIGINT NOT NULL DEFAULT 0,
    last_started_at  TIMESTAMPTZ,
    last_report      JSONB
);

-- Items the last sweep of a rule found orphaned: since when, and for how many
-- consecutive sweeps. An item no longer orphaned loses its row.
CREATE TABLE reconcile_state (
    rule        TEXT NOT NULL,
    key         TEXT NOT NULL,
    first_seen  TIMESTAMPTZ NOT NULL DEFAULT now(),
    streak      INTEGER NOT NULL,
    last_sweep  BIGINT NOT NULL,
    PRIMARY KEY (rule, key)
);
