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
put /v1/bare_metal_servers/node01-bm '{}'
put /v1/dns_zones/zone-1/resource_records/node01-dns \
    '{"depends_on": ["/v1/bare_metal_servers/node01-bm", "/v1/subnets/subnet-mgmt/reserved_ips/node01-ip1", "/v1/subnets/subnet-mgmt/reserved_ips/node01-ip2"]}'
put /v1/virtual_network_interfaces/node01-vni '{"depends_on": ["/v1/bare_metal_servers/node01-bm"]}'
echo "node01: 5 resources in $SIM"
