-- Every resource.tracked has an identity of its own: its event_id, stored with
-- what it tracked. A redelivered track is recognised as itself; an event that
-- reuses a track's event_id (another track, or a teardown) is refused instead
-- of being taken for it. Jobs and tracks share one namespace of event ids.
CREATE TABLE tracks (
    event_id     TEXT PRIMARY KEY,
    owner        TEXT NOT NULL,
    kind         TEXT NOT NULL,
    resource_id  TEXT NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Late tracks from before this table: the job carries the track's event_id
-- and its stored body is the track (which decoded as JSON to be accepted).
INSERT INTO tracks (event_id, owner, kind, resource_id, received_at)
SELECT j.event_id, j.owner, b.body->>'kind', b.body->>'id', j.started_at
FROM jobs j, LATERAL (SELECT convert_from(j.event_body, 'UTF8')::jsonb AS body) b
WHERE j.trigger = 'late_track' AND b.body->>'kind' IS NOT NULL AND b.body->>'id' IS NOT NULL
ON CONFLICT (event_id) DO NOTHING;

-- reaper_begin_job as before, but an event_id that names a track also goes to
-- the general path (Ledger::begin_job), which refuses it with a reason.
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
          AND (CASE WHEN p_generation IS NOT NULL AND r.generation IS NOT NULL THEN r.generation = p_generation
                    WHEN r.created_at IS NOT NULL THEN r.created_at <= p_occurred_at
                    ELSE r.tracked_at <= p_occurred_at + make_interval(secs => p_window_secs) END)
        RETURNING r.kind, r.resource_id, r.attributes, r.parent_kind, r.parent_id
    )
    SELECT coalesce(jsonb_agg(to_jsonb(c)), '[]'::jsonb) INTO v_resources FROM c;
    RETURN jsonb_build_object('outcome', 'new', 'started_at', v_started, 'resources', v_resources);
END
$$;
