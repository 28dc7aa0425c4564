-- A ledger with 1,000,000 jobs that completed 40 days ago, two steps and two
-- deleted resources each (what retention purges), on top of the migrations.
INSERT INTO jobs (job_id, event_id, owner, trigger, dry_run, occurred_at, event_body, routing_key, status, started_at, finished_at, attempts)
SELECT gen_random_uuid(), 'old-' || n, 'node/old-' || n, 'deletion.requested', false, now() - interval '40 days', '{}'::bytea,
       'deletion.requested', 'completed', now() - interval '40 days' + n * interval '1 ms', now() - interval '40 days' + n * interval '1 ms', 1
FROM generate_series(1, 1000000) AS n;
INSERT INTO job_steps (job_id, kind, resource_id, outcome, attempts)
SELECT job_id, k, owner || '-' || k, 'deleted', 1 FROM jobs, unnest(ARRAY['vni', 'server']) AS k;
INSERT INTO tracked_resources (owner, kind, resource_id, job_id, state)
SELECT owner, k, owner || '-' || k, job_id, 'deleted' FROM jobs, unnest(ARRAY['vni', 'server']) AS k;
VACUUM ANALYZE;
