\set n random(1, 2000000000)
INSERT INTO jobs (job_id, event_id, owner, trigger, dry_run, occurred_at, event_body, routing_key) VALUES (gen_random_uuid(), 'probe-' || :n || '-' || clock_timestamp(), 'node/probe-' || :n, 'deletion.requested', false, now(), '\x7b7d', 'deletion.requested');
UPDATE jobs SET status = 'completed', finished_at = now(), result = '\x7b7d' WHERE event_id = (SELECT event_id FROM jobs WHERE owner = 'node/probe-' || :n LIMIT 1);
