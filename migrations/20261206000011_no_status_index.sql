-- jobs_status_idx (status, for rows not completed) served no query that
-- needs it (status counts read the whole table anyway), and it misled the
-- planner: the finish and step statements (ledger/group_commit.rs) chose it
-- to find their jobs, "WHERE job_id = ... AND status = 'running'", from a
-- plan cached while the table was small. Every finished job leaves a dead
-- entry in it until a vacuum, so that scan grew with the jobs done since:
-- 30 to 60 ms per batch after 20,000 jobs, against well under 1 ms by the
-- primary key. Without it they go by job_id, and opening a job writes one
-- index entry less.
DROP INDEX IF EXISTS jobs_status_idx;
