-- Two nodes whose provisioner failed half-way and died before it could send
-- provisioning.failed: node01 30 hours ago (past the rule's 24 hours),
-- node02 two hours ago (too young). sample-cloud.sh creates node01's cloud
-- resources in the simulated cloud; node02's were never created.
INSERT INTO nodes (node_name, bare_metal_id, status, updated_at, created_at) VALUES
    ('node01', 'node01-bm', 'failed', now() - interval '30 hours', now() - interval '31 hours'),
    ('node02', 'node02-bm', 'failed', now() - interval '2 hours', now() - interval '3 hours');
INSERT INTO ip_reservations (node_name, reservation_id, subnet_id) VALUES
    ('node01', 'node01-ip1', 'subnet-mgmt'), ('node01', 'node01-ip2', 'subnet-mgmt'),
    ('node02', 'node02-ip1', 'subnet-mgmt'), ('node02', 'node02-ip2', 'subnet-mgmt');
INSERT INTO dns_records (node_name, record_id, zone_id) VALUES
    ('node01', 'node01-dns', 'zone-1'), ('node02', 'node02-dns', 'zone-1');
INSERT INTO vnic_info (node_name, vnic_id) VALUES ('node01', 'node01-vni'), ('node02', 'node02-vni');
