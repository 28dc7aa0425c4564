-- Opening many new jobs in one round trip and one commit (group commit for
-- Ledger::begin_job's common case). Owners are locked up front in a fixed
-- order, so two replicas' batches cannot deadlock; then each job goes through
-- reaper_begin_job, whose statements each see what committed before them.
CREATE FUNCTION reaper_begin_jobs(
    p_job_ids uuid[], p_event_ids text[], p_owners text[], p_triggers text[], p_generations bigint[],
    p_occurred_ats timestamptz[], p_bodies bytea[], p_routing_keys text[], p_holders uuid[],
    p_lease_secs double precision, p_window_secs double precision
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_out jsonb := '[]'::jsonb;
    v_lock bigint;
BEGIN
    FOR v_lock IN SELECT DISTINCT hashtextextended(o, 0) FROM unnest(p_owners) AS o ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(v_lock);
    END LOOP;
    FOR i IN 1 .. coalesce(array_length(p_job_ids, 1), 0) LOOP
        v_out := v_out || jsonb_build_array(reaper_begin_job(
            p_job_ids[i], p_event_ids[i], p_owners[i], p_triggers[i], p_generations[i],
            p_occurred_ats[i], p_bodies[i], p_routing_keys[i], p_holders[i], p_lease_secs, p_window_secs));
    END LOOP;
    RETURN v_out;
END
$$;
