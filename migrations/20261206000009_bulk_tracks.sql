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
