-- `reaper cancel`: a job can end `cancelled`. A cancel asked of a job a
-- worker is running now is recorded in `cancel_requested`; the worker reads
-- it with its lease heartbeat and starts no further deletes.
ALTER TABLE jobs DROP CONSTRAINT jobs_status_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_status_check
    CHECK (status IN ('running', 'completed', 'dead_lettered', 'cancelled'));
ALTER TABLE jobs ADD COLUMN cancel_requested TEXT;
