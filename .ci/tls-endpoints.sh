#!/usr/bin/env bash
# The TLS endpoints tests/it/tls.rs talks to, with a throwaway CA made here by
# the openssl CLI (no private key leaves this machine; every run of a fresh
# machine makes new ones):
#   - RabbitMQ: amqps on 127.0.0.1:5671, client certificate required;
#   - PostgreSQL: the machine's cluster serves our certificate and trusts our
#     CA for client certificates; role reaper_cert logs in by certificate only;
#   - MongoDB wire (secantusd-rs): TLS on 127.0.0.1:27019.
# The server certificate names `localhost` only, so a test reaching the same
# server as 127.0.0.1 sees a name mismatch. other-ca.pem signed nothing we
# serve: a test trusting it sees an unknown issuer.
# Run by .ci/run after PostgreSQL, RabbitMQ and secantusd-rs are installed.
set -euo pipefail

DIR="${REAPER_TEST_TLS_DIR:-/var/tmp/reaper-ci-tls}"
mkdir -p "$DIR"
chmod 755 "$DIR"

make_certs() {
    local d="$1"
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=reaper test CA" \
        -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=reaper other CA" \
        -keyout "$d/other-ca.key" -out "$d/other-ca.pem" 2>/dev/null
    issue() { # name subject extensions
        openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$d/$1.key" -out "$d/$1.csr" 2>/dev/null
        printf '%s\n' "$3" >"$d/$1.ext"
        openssl x509 -req -in "$d/$1.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
            -days 30 -extfile "$d/$1.ext" -out "$d/$1.pem" 2>/dev/null
        rm -f "$d/$1.csr" "$d/$1.ext"
    }
    issue server "/CN=localhost" "subjectAltName=DNS:localhost
extendedKeyUsage=serverAuth"
    issue client "/CN=reaper_cert" "extendedKeyUsage=clientAuth"
    chmod 644 "$d"/*.pem
    # libpq-style clients refuse keys others can read; RabbitMQ (its own
    # user) must read the server's.
    chmod 600 "$d"/*.key
    chown rabbitmq "$d/server.key"
}

# New certificates when there are none or they end within a day.
if ! openssl x509 -checkend 86400 -noout -in "$DIR/server.pem" >/dev/null 2>&1 \
    || ! openssl x509 -checkend 86400 -noout -in "$DIR/client.pem" >/dev/null 2>&1; then
    make_certs "$DIR"
    FRESH=1
else
    FRESH=0
fi

# --- RabbitMQ: a TLS listener beside the plain one (needs a node restart). ---
# The block between the markers is written anew each run, so it always names
# this run's directory.
RCONF=/etc/rabbitmq/rabbitmq.conf
BLOCK="# reaper-tls begin
listeners.ssl.default = 127.0.0.1:5671
ssl_options.cacertfile = $DIR/ca.pem
ssl_options.certfile = $DIR/server.pem
ssl_options.keyfile = $DIR/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
# reaper-tls end"
OLD_BLOCK="$(sed -n '/^# reaper-tls begin$/,/^# reaper-tls end$/p' "$RCONF" 2>/dev/null || true)"
if [ "$OLD_BLOCK" != "$BLOCK" ]; then
    sed -i -e '/^# reaper-tls begin$/,/^# reaper-tls end$/d' -e '/^listeners\.ssl\./d' -e '/^ssl_options\./d' "$RCONF" 2>/dev/null || true
    printf '%s\n' "$BLOCK" >>"$RCONF"
    FRESH=1
fi
tls_up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if [ "$FRESH" = 1 ] || ! tls_up 5671; then
    # With the pid file, stop waits until the node is gone.
    rabbitmqctl -q stop "${RABBITMQ_PID_FILE:-/var/lib/rabbitmq/mnesia/rabbit@localhost.pid}" >/dev/null 2>&1 || true
    rabbitmq-server -detached
    rabbitmqctl -q await_startup --timeout 120 >/dev/null 2>&1 || true
    for _ in $(seq 1 100); do tls_up 5671 && break; sleep 0.2; done
fi
tls_up 5671 || { echo "RabbitMQ has no TLS listener on 5671" >&2; exit 1; }

# --- PostgreSQL: our server certificate, our CA for client certificates. ---
PGV="$(ls /etc/postgresql | head -n1)"
PGETC="/etc/postgresql/$PGV/main"
install -d -o postgres -g postgres -m 700 "$PGETC/reaper-tls"
install -o postgres -g postgres -m 600 "$DIR/server.pem" "$DIR/server.key" "$DIR/ca.pem" "$PGETC/reaper-tls/"
cat >"$PGETC/conf.d/reaper-tls.conf" <<EOF
ssl = on
ssl_cert_file = '$PGETC/reaper-tls/server.pem'
ssl_key_file = '$PGETC/reaper-tls/server.key'
ssl_ca_file = '$PGETC/reaper-tls/ca.pem'
EOF
if ! grep -q "reaper_cert ::1/128 reject" "$PGETC/pg_hba.conf"; then
    sed -i '/reaper_cert/d' "$PGETC/pg_hba.conf"
    # First match wins: the certificate role never gets the trust lines below.
    sed -i '1i hostssl all reaper_cert 127.0.0.1/32 cert\nhostssl all reaper_cert ::1/128 cert\nhost all reaper_cert 127.0.0.1/32 reject\nhost all reaper_cert ::1/128 reject' "$PGETC/pg_hba.conf"
fi
psql -h 127.0.0.1 -U postgres -qAtc "SELECT pg_reload_conf()" >/dev/null
psql -h 127.0.0.1 -U postgres -qAt <<'EOF' >/dev/null
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'reaper_cert') THEN
    CREATE ROLE reaper_cert LOGIN SUPERUSER;
  END IF;
END $$;
EOF

# --- MongoDB wire: a second secantusd-rs, over TLS. ---
if [ "$FRESH" = 1 ] && tls_up 27019; then
    pkill -f "secantusd-rs .*--port 27019" || true
    for _ in $(seq 1 50); do tls_up 27019 || break; sleep 0.2; done
    pkill -9 -f "secantusd-rs .*--port 27019" || true
fi
if ! tls_up 27019; then
    MDB_DIR="${TMPDIR:-/tmp}/reaper-ci-mongodb-tls"
    mkdir -p "$MDB_DIR"
    setsid secantusd-rs --host 127.0.0.1 --port 27019 --storage-path "$MDB_DIR" \
        --tls-cert-file "$DIR/server.pem" --tls-key-file "$DIR/server.key" \
        --log-file-max 16MB --cache-size 128M >"$MDB_DIR.log" 2>&1 </dev/null &
    for _ in $(seq 1 50); do tls_up 27019 && break; sleep 0.2; done
fi
tls_up 27019 || { echo "secantusd-rs over TLS did not start; see ${MDB_DIR:-}.log" >&2; exit 1; }
# Each endpoint serves this run's certificate (a reload that failed would
# leave the old one): checked by a handshake, not only a port.
handshake() { openssl s_client -verify_return_error -CAfile "$DIR/ca.pem" -verify_hostname localhost \
    -cert "$DIR/client.pem" -key "$DIR/client.key" "$@" </dev/null >/dev/null 2>&1; }
handshake -connect 127.0.0.1:5671 || { echo "RabbitMQ on 5671 does not serve this CA's certificate" >&2; exit 1; }
handshake -connect 127.0.0.1:27019 || { echo "secantusd-rs on 27019 does not serve this CA's certificate" >&2; exit 1; }
handshake -starttls postgres -connect 127.0.0.1:5432 || { echo "PostgreSQL does not serve this CA's certificate" >&2; exit 1; }
echo "TLS endpoints ready; certificates in $DIR"
