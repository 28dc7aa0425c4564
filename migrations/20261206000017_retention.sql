-- Retention (ledger.retention_days): finished jobs are found by when they
-- started, an index written once per job (at its insert, never by its finish:
-- an index on finished_at or status would make every finish a non-HOT update
-- and could mislead the planner, see *_no_status_index.sql). Not built
-- CONCURRENTLY: that waits for every transaction open in the database, and a
-- worker starting meanwhile (waiting on the migration lock) kept one open, so
-- the start-up hung (the chaos suite saw it). On a large jobs table, inserts
-- wait for the build, once, at the upgrade.
CREATE INDEX IF NOT EXISTS jobs_started_idx ON jobs (started_at);
