-- The foreign keys from tracked_resources.job_id and job_steps.job_id to jobs
-- cost a lookup of the job per claimed resource and per step row written
-- (about 14 per teardown), and each is a query PostgreSQL plans once per
-- connection and keeps: planned while `jobs` was empty (a new ledger, or one
-- analysed before its first job), it scans the whole jobs table, every time,
-- as the table grows. The end-to-end bench ran at 900 jobs/s instead of 1,650
-- that way (docs/performance.md). Every job_id written to these tables comes
-- from the statement or transaction that opened that job, so the check only
-- ever confirmed what the code had just done. What the cascade did (steps go
-- with their job) is now the job of whatever deletes jobs: nothing does
-- today; a retention purge must delete the steps, and clear the claims, of
-- the jobs it removes.
ALTER TABLE tracked_resources DROP CONSTRAINT IF EXISTS tracked_resources_job_id_fkey;
ALTER TABLE job_steps DROP CONSTRAINT IF EXISTS job_steps_job_id_fkey;
