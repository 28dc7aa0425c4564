-- no-transaction
-- Retention (ledger.retention_days): finished jobs are found by when they
-- started, an index written once per job (at its insert, never by its finish:
-- an index on finished_at or status would make every finish a non-HOT update
-- and could mislead the planner, see *_no_status_index.sql). Built
-- CONCURRENTLY: a large jobs table keeps taking inserts meanwhile.
CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_started_idx ON jobs (started_at);
