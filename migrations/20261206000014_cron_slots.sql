-- A rule with a cron `schedule` claims each slot (its time) once across
-- replicas: the last slot claimed, beside `last_started_at` of `every_secs`.
ALTER TABLE reconcile_rules ADD COLUMN last_slot TIMESTAMPTZ;
