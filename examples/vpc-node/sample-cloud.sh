#!/bin/sh
# node01's five resources in the simulated cloud (`reaper sim`, default
# http://127.0.0.1:8089), dependencies first: the DNS record refers to the
# server and both IP reservations, the VNI to the server, so deleting them in
# the wrong order answers 409.
set -eu
SIM="${SIM:-http://127.0.0.1:8089}"
# A cloud that checks tokens gets REAPER_CLOUD_TOKEN, as reaper sends it.
put() {
    curl -fsS -X PUT "$SIM$1" -H 'Content-Type: application/json' -d "$2" \
        ${REAPER_CLOUD_TOKEN:+-H "Authorization: Bearer $REAPER_CLOUD_TOKEN"} >/dev/null
}
put /v1/subnets/subnet-mgmt/reserved_ips/node01-ip1 '{}'
put /v1/subnets/subnet-mgmt/reserved_ips/node01-ip2 '{}'
# A server is listed as IBM VPC lists it: its attributes are the item.
put /v1/bare_metal_servers/node01-bm '{"attributes": {"id": "node01-bm", "name": "node01", "created_at": "2026-01-05T10:00:00Z"}}'
# A server no node names: the provisioner died before it wrote the id.
put /v1/bare_metal_servers/stray-bm '{"attributes": {"id": "stray-bm", "name": "node03", "created_at": "2026-01-05T11:00:00Z"}}'
# Another team's server in the same account: never a candidate.
put /v1/bare_metal_servers/ci-runner-7 '{"attributes": {"id": "ci-runner-7", "name": "ci-runner-7", "created_at": "2026-01-02T09:00:00Z"}}'
put /v1/dns_zones/zone-1/resource_records/node01-dns \
    '{"depends_on": ["/v1/bare_metal_servers/node01-bm", "/v1/subnets/subnet-mgmt/reserved_ips/node01-ip1", "/v1/subnets/subnet-mgmt/reserved_ips/node01-ip2"]}'
put /v1/virtual_network_interfaces/node01-vni '{"depends_on": ["/v1/bare_metal_servers/node01-bm"]}'
echo "node01: 5 resources, a stray server and another team's, in $SIM"
