-- One definition of "a resource belongs to the life a teardown ends", called
-- by every path: claiming when a teardown opens (Ledger::begin_job and
-- reaper_begin_job), what a dry run would claim, the late-track check, and
-- whether a re-tracked resource still belongs to the job that claimed it.
--   1. both carry a generation: they are equal; else
--   2. the resource has a provider created_at: no later than occurred_at; else
--   3. it was tracked no later than occurred_at + the late-track window.
CREATE FUNCTION reaper_belongs(
    r_generation bigint, r_created_at timestamptz, r_tracked_at timestamptz,
    t_occurred_at timestamptz, t_generation bigint, p_window_secs double precision
) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN t_generation IS NOT NULL AND r_generation IS NOT NULL THEN r_generation = t_generation
                WHEN r_created_at IS NOT NULL THEN r_created_at <= t_occurred_at
                ELSE r_tracked_at <= t_occurred_at + make_interval(secs => p_window_secs) END
$$;

-- Lookups run once per job; retries and replays work from what they found.
-- Jobs from before this column ran theirs on their first delivery (or found
-- nothing to record): they must not look again on a retry or a replay, when
-- the owner's name may hold its next life. (At worst that leaks what an old
-- failed lookup never found; it never deletes a new life's resource.)
ALTER TABLE jobs ADD COLUMN looked_up BOOLEAN NOT NULL DEFAULT false;
UPDATE jobs SET looked_up = true;

-- reaper_begin_job as before, with two changes: an event_id that names a
-- track also goes to the general path (Ledger::begin_job), which refuses it
-- with a reason; and the claim calls reaper_belongs.
CREATE OR REPLACE FUNCTION reaper_begin_job(
    p_job_id uuid, p_event_id text, p_owner text, p_trigger text, p_generation bigint,
    p_occurred_at timestamptz, p_body bytea, p_routing_key text, p_holder uuid,
    p_lease_secs double precision, p_window_secs double precision
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_started timestamptz;
    v_resources jsonb;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_owner, 0));
    IF EXISTS (SELECT 1 FROM jobs WHERE event_id = p_event_id)
       OR EXISTS (SELECT 1 FROM tracks WHERE event_id = p_event_id) THEN
        RETURN jsonb_build_object('outcome', 'existing');
    END IF;
    INSERT INTO owner_leases (owner, holder, until)
    VALUES (p_owner, p_holder, now() + make_interval(secs => p_lease_secs))
    ON CONFLICT (owner) DO UPDATE SET holder = EXCLUDED.holder, until = EXCLUDED.until
    WHERE owner_leases.until < now() OR owner_leases.holder = EXCLUDED.holder;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('outcome', 'busy');
    END IF;
    INSERT INTO jobs (job_id, event_id, owner, trigger, dry_run, generation, occurred_at, event_body, routing_key)
    VALUES (p_job_id, p_event_id, p_owner, p_trigger, false, p_generation, p_occurred_at, p_body, p_routing_key)
    RETURNING started_at INTO v_started;
    WITH c AS (
        UPDATE tracked_resources r SET job_id = p_job_id
        WHERE r.owner = p_owner AND r.job_id IS NULL AND r.state = 'live'
          AND reaper_belongs(r.generation, r.created_at, r.tracked_at, p_occurred_at, p_generation, p_window_secs)
        RETURNING r.kind, r.resource_id, r.attributes, r.parent_kind, r.parent_id
    )
    SELECT coalesce(jsonb_agg(to_jsonb(c)), '[]'::jsonb) INTO v_resources FROM c;
    RETURN jsonb_build_object('outcome', 'new', 'started_at', v_started, 'resources', v_resources);
END
$$;
