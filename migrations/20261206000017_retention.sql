-- Retention (ledger.retention_days): finished jobs are found by when they
-- started, an index written once per job (at its insert, never by its finish:
-- an index on finished_at or status would make every finish a non-HOT update
-- and could mislead the planner, see *_no_status_index.sql). Built in the
-- migration's transaction rather than CONCURRENTLY, which waits for every
-- open transaction in the database (a worker starting meanwhile included):
-- on a large jobs table, inserts wait for the build once, at the upgrade.
CREATE INDEX IF NOT EXISTS jobs_started_idx ON jobs (started_at);
