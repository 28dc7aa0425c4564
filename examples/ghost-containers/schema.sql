-- The app database of the report (SQLite there), with its UNIQUE constraints.
CREATE TABLE apps (
    id             serial PRIMARY KEY,
    lxc_id         integer NOT NULL UNIQUE,
    hostname       text NOT NULL UNIQUE,
    public_port    integer NOT NULL UNIQUE,
    internal_port  integer NOT NULL UNIQUE,
    status         text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now() - interval '3 days',
    updated_at     timestamptz NOT NULL DEFAULT now() - interval '3 days'
);
-- Six running apps whose containers exist (101-106).
INSERT INTO apps (lxc_id, hostname, public_port, internal_port, status)
SELECT n, 'app-' || n, 20000 + n, 30000 + n, 'running' FROM generate_series(101, 106) AS n;
-- Forty-one failed deployments that never got a container (140-180).
INSERT INTO apps (lxc_id, hostname, public_port, internal_port, status)
SELECT n, 'app-' || n, 20000 + n, 30000 + n, 'error' FROM generate_series(140, 180) AS n;
-- A deployment in progress: its container is being created right now.
INSERT INTO apps (lxc_id, hostname, public_port, internal_port, status, created_at, updated_at)
VALUES (190, 'app-190', 20190, 30190, 'deploying', now() - interval '1 minute', now() - interval '1 minute');
-- A container that exists but whose app failed two days ago.
INSERT INTO apps (lxc_id, hostname, public_port, internal_port, status, updated_at)
VALUES (107, 'app-107', 20107, 30107, 'error', now() - interval '2 days');
