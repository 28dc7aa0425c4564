-- A teardown writes each of its owner's tracked_resources rows twice: the
-- claim (job_id) when it opens, the state when it finishes. Each was a new
-- row version with new entries in both indexes: the update of an indexed
-- column (job_id, in tracked_resources_job_idx) cannot be a heap-only (HOT)
-- update, and neither can any update on a full page (fillfactor 100).
-- Every query that looks rows up by job_id also knows the job's owner, and
-- the primary key (owner, kind, resource_id) finds an owner's few rows; so
-- the job_id index goes, and pages keep room for the updated versions, which
-- then touch no index at all. Existing pages get the room as they are
-- rewritten (VACUUM FULL or pg_repack if you want it at once).
-- (tracked_resources.job_id references jobs: deleting a job, which nothing
-- does today, would scan tracked_resources for references without that
-- index. A retention purge must delete by owner, or bring an index back.)
DROP INDEX IF EXISTS tracked_resources_job_idx;
ALTER TABLE tracked_resources SET (fillfactor = 70);
