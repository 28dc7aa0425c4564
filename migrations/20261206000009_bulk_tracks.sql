-- A resource.tracked may list several resources of one owner. Its identity is
-- still one row in `tracks`: the first resource in (kind, id) order, how many
-- there are, and a digest of the whole list, so that a redelivery (in any
-- order) is recognised as itself and another list under its event_id is
-- refused. A one-resource track has no digest: rows from before stay valid.
ALTER TABLE tracks
    ADD COLUMN resource_count INTEGER NOT NULL DEFAULT 1,
    ADD COLUMN resources_digest TEXT;

-- Length-prefixed, so no kind or id can make two lists read the same.
CREATE FUNCTION reaper_track_digest(p_kinds text[], p_ids text[]) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN cardinality(p_kinds) = 1 THEN NULL
                ELSE encode(sha256(convert_to(string_agg(
                         octet_length(k) || ':' || k || octet_length(i) || ':' || i, ',' ORDER BY k COLLATE "C", i COLLATE "C"),
                     'UTF8')), 'hex') END
    FROM unnest(p_kinds, p_ids) AS u(k, i)
$$;

-- The common case of a track in one statement (Ledger::track): a first
-- delivery, for an owner no real teardown was ever opened for, of resources no job
-- holds. Then nothing can be late and nothing needs detaching: record the
-- track and its resources. Anything else writes nothing and answers
-- 'general', and Ledger::track's general path decides (it takes the same
-- owner lock and looks again).
CREATE FUNCTION reaper_track(
    p_event_id text, p_owner text, p_generation bigint, p_kinds text[], p_ids text[],
    p_attrs jsonb[], p_pkinds text[], p_pids text[], p_created timestamptz[]
) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_owner, 0));
    IF EXISTS (SELECT 1 FROM tracks WHERE event_id = p_event_id)
       OR EXISTS (SELECT 1 FROM jobs WHERE event_id = p_event_id)
       OR EXISTS (SELECT 1 FROM jobs WHERE owner = p_owner AND NOT dry_run
                                      AND trigger IN ('deletion.requested', 'provisioning.failed'))
       OR EXISTS (SELECT 1 FROM tracked_resources r, unnest(p_kinds, p_ids) AS u(k, i)
                  WHERE r.owner = p_owner AND r.kind = u.k AND r.resource_id = u.i
                    AND r.job_id IS NOT NULL AND r.state = 'live') THEN
        RETURN 'general';
    END IF;
    INSERT INTO tracks (event_id, owner, kind, resource_id, resource_count, resources_digest)
    VALUES (p_event_id, p_owner, p_kinds[1], p_ids[1], cardinality(p_kinds), reaper_track_digest(p_kinds, p_ids))
    ON CONFLICT (event_id) DO NOTHING;
    IF NOT FOUND THEN
        -- Another owner's event took this id a moment ago: the general path refuses it.
        RETURN 'general';
    END IF;
    INSERT INTO tracked_resources AS t (owner, kind, resource_id, attributes, parent_kind, parent_id, generation, created_at)
    SELECT p_owner, u.kind, u.id, u.attrs, u.pkind, u.pid, p_generation, u.created
    FROM unnest(p_kinds, p_ids, p_attrs, p_pkinds, p_pids, p_created) AS u(kind, id, attrs, pkind, pid, created)
    ON CONFLICT (owner, kind, resource_id) DO UPDATE SET
        attributes = EXCLUDED.attributes,
        parent_kind = COALESCE(EXCLUDED.parent_kind, t.parent_kind),
        parent_id = COALESCE(EXCLUDED.parent_id, t.parent_id),
        generation = COALESCE(EXCLUDED.generation, t.generation),
        created_at = COALESCE(EXCLUDED.created_at, t.created_at),
        tracked_at = CASE WHEN t.state = 'live' THEN t.tracked_at ELSE now() END,
        job_id = NULL,
        state = 'live';
    RETURN 'recorded';
END
$$;
