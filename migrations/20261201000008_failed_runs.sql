-- A job's deliveries and its failed runs are counted apart. `attempts` counts
-- deliveries (a crash, a rolling restart or an OOM kill makes one more);
-- `failed_runs` counts runs that ended unfinished and were sent to a broker
-- retry. "Out of retries" is decided from failed_runs alone, so crashes do
-- not spend a job's retry schedule; poison detection keeps using deliveries.
ALTER TABLE jobs ADD COLUMN failed_runs INTEGER NOT NULL DEFAULT 0;

-- Running jobs from before this column: every delivery but the current one
-- counted against the schedule; keep their budget as it was (never larger).
UPDATE jobs SET failed_runs = GREATEST(attempts - 1, 0) WHERE status = 'running';
