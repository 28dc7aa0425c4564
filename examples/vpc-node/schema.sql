-- The provisioner's tables (the field report's), keyed by node name.
CREATE TABLE nodes (
    node_name      text PRIMARY KEY,
    bare_metal_id  text,
    status         text NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    -- When this node (this life of the name) was created.
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE ip_reservations (id serial PRIMARY KEY, node_name text NOT NULL, reservation_id text NOT NULL, subnet_id text NOT NULL);
CREATE TABLE dns_records (id serial PRIMARY KEY, node_name text NOT NULL, record_id text NOT NULL, zone_id text NOT NULL);
CREATE TABLE vnic_info (id serial PRIMARY KEY, node_name text NOT NULL, vnic_id text NOT NULL);
