-- Group commit for tracks (Ledger::track's usual case): the tracks of
-- concurrent deliveries in one round trip, one statement and one commit.
-- Owners are locked up front in the order of their lock keys, so two
-- replicas' batches cannot deadlock, and teardowns (which take the same
-- lock) either committed before or wait until after.
--
-- The usual track: a first delivery, for an owner no real teardown was ever
-- opened for, of resources no job holds. Then nothing can be late and nothing
-- needs detaching: the track and its resources are recorded, and the answer
-- is 'recorded'. Anything else writes nothing and answers 'general'. A track takes the general path
-- (Ledger::track, which decides under the same lock) when its event_id is
-- already used, when a real teardown was ever opened for its owner, when one
-- of its resources is live and claimed by a job, and when an earlier track
-- of the same batch has its event_id or one of its resources (one statement
-- cannot write a row twice; the general path, a moment later, sees the
-- first). p_track_of[n] is the track (1-based) resource n belongs to; a
-- track's resources come in (kind, id) order, so its first is the identity's.
CREATE FUNCTION reaper_tracks(
    p_event_ids text[], p_owners text[], p_generations bigint[], p_track_of integer[],
    p_kinds text[], p_ids text[], p_attrs jsonb[], p_pkinds text[], p_pids text[], p_created timestamptz[]
) RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    v_out text[];
    v_lock bigint;
BEGIN
    FOR v_lock IN SELECT DISTINCT hashtextextended(o, 0) FROM unnest(p_owners) AS o ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(v_lock);
    END LOOP;
    -- first_i, first_track: the earliest track of the batch with the same
    -- event_id, or naming the same resource (window functions, so a batch
    -- costs n log n, not n squared).
    WITH t AS MATERIALIZED (
        SELECT u.i::integer AS i, u.e, u.o, u.g, min(u.i::integer) OVER (PARTITION BY u.e) AS first_i
        FROM unnest(p_event_ids, p_owners, p_generations) WITH ORDINALITY AS u(e, o, g, i)
    ), r AS MATERIALIZED (
        SELECT u.n::integer AS n, u.track, t.o, t.g, u.k, u.id, u.a, u.pk, u.pid, u.cr,
               min(u.track) OVER (PARTITION BY t.o, u.k, u.id) AS first_track
        FROM unnest(p_track_of, p_kinds, p_ids, p_attrs, p_pkinds, p_pids, p_created)
             WITH ORDINALITY AS u(track, k, id, a, pk, pid, cr, n)
        JOIN t ON t.i = u.track
    ), general AS (
        -- Scalar subqueries, not EXISTS: PostgreSQL may run an EXISTS as one
        -- hashed scan of the whole table, which a plan cached while the table
        -- was small keeps doing as it grows (a batch took 5 times longer at
        -- 130,000 tracks). A scalar subquery on an indexed column is an index
        -- probe per row.
        SELECT t.i FROM t
        WHERE (SELECT true FROM tracks x WHERE x.event_id = t.e LIMIT 1)
           OR (SELECT true FROM jobs j WHERE j.event_id = t.e LIMIT 1)
           OR (SELECT true FROM jobs j WHERE j.owner = t.o AND NOT j.dry_run
                                          AND j.trigger IN ('deletion.requested', 'provisioning.failed') LIMIT 1)
           OR t.first_i < t.i
        UNION
        SELECT r.track FROM r
        WHERE (SELECT true FROM tracked_resources x
               WHERE x.owner = r.o AND x.kind = r.k AND x.resource_id = r.id
                 AND x.job_id IS NOT NULL AND x.state = 'live' LIMIT 1)
           OR r.first_track < r.track
    ), identity AS (
        SELECT r.track, (array_agg(r.k ORDER BY r.n))[1] AS k1, (array_agg(r.id ORDER BY r.n))[1] AS id1,
               count(*)::integer AS c, reaper_track_digest(array_agg(r.k ORDER BY r.n), array_agg(r.id ORDER BY r.n)) AS d
        FROM r WHERE r.track NOT IN (SELECT i FROM general)
        GROUP BY r.track
    ), ins AS (
        INSERT INTO tracks (event_id, owner, kind, resource_id, resource_count, resources_digest)
        SELECT t.e, t.o, identity.k1, identity.id1, identity.c, identity.d
        FROM identity JOIN t ON t.i = identity.track
        -- Another owner's event may have taken this id since we looked.
        ON CONFLICT (event_id) DO NOTHING
        RETURNING event_id
    ), recorded AS (
        SELECT t.i FROM t JOIN ins ON ins.event_id = t.e WHERE t.i NOT IN (SELECT i FROM general)
    ), upsert AS (
        INSERT INTO tracked_resources AS x (owner, kind, resource_id, attributes, parent_kind, parent_id, generation, created_at)
        SELECT r.o, r.k, r.id, r.a, r.pk, r.pid, r.g, r.cr
        FROM r JOIN recorded ON recorded.i = r.track
        -- As upsert_resources in src/ledger/mod.rs, for rows no job holds
        -- (the checks above): change both together.
        ON CONFLICT (owner, kind, resource_id) DO UPDATE SET
            attributes = EXCLUDED.attributes,
            parent_kind = COALESCE(EXCLUDED.parent_kind, x.parent_kind),
            parent_id = COALESCE(EXCLUDED.parent_id, x.parent_id),
            generation = COALESCE(EXCLUDED.generation, x.generation),
            created_at = COALESCE(EXCLUDED.created_at, x.created_at),
            tracked_at = CASE WHEN x.state = 'live' THEN x.tracked_at ELSE now() END,
            job_id = NULL,
            state = 'live'
    )
    SELECT array_agg(CASE WHEN t.i IN (SELECT i FROM recorded) THEN 'recorded' ELSE 'general' END ORDER BY t.i)
    INTO v_out FROM t;
    RETURN v_out;
END
$$;
