-- The operators' brake (`reaper pause`): one row, read by every replica every
-- worker.pause_poll_ms. While `paused`, no job starts and no sweep runs.
CREATE TABLE control (
    id         BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
    paused     BOOLEAN NOT NULL DEFAULT false,
    reason     TEXT,
    paused_by  TEXT,
    since      TIMESTAMPTZ
);
INSERT INTO control DEFAULT VALUES;
