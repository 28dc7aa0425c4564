-- Group commit for tracks (Ledger::track's usual case): many tracks of
-- concurrent deliveries in one round trip and one commit. Owners are locked
-- up front in the order of their lock keys, so two replicas' batches cannot
-- deadlock; then each track goes through reaper_track, whose statements each
-- see what the ones before them wrote. Resources of track i are the slice
-- p_starts[i] .. p_starts[i] + p_counts[i] - 1 of the resource arrays.
CREATE FUNCTION reaper_tracks(
    p_event_ids text[], p_owners text[], p_generations bigint[], p_starts integer[], p_counts integer[],
    p_kinds text[], p_ids text[], p_attrs jsonb[], p_pkinds text[], p_pids text[], p_created timestamptz[]
) RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    v_out text[] := '{}';
    v_lock bigint;
    v_from integer;
    v_to integer;
BEGIN
    FOR v_lock IN SELECT DISTINCT hashtextextended(o, 0) FROM unnest(p_owners) AS o ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(v_lock);
    END LOOP;
    FOR i IN 1 .. coalesce(array_length(p_event_ids, 1), 0) LOOP
        v_from := p_starts[i];
        v_to := p_starts[i] + p_counts[i] - 1;
        v_out := v_out || reaper_track(
            p_event_ids[i], p_owners[i], p_generations[i], p_kinds[v_from:v_to], p_ids[v_from:v_to],
            p_attrs[v_from:v_to], p_pkinds[v_from:v_to], p_pids[v_from:v_to], p_created[v_from:v_to]);
    END LOOP;
    RETURN v_out;
END
$$;
