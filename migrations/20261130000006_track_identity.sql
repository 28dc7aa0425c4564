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

-- reaper_begin_job learns to send an event_id that names a track to the
-- general path (which refuses it) in the next migration, with the one rule.
