#!/bin/bash
# Does purging 1,000,000 old jobs stall the worker? Seeds a throwaway ledger,
# measures a worker-like write load alone (pgbench: 4 clients opening and
# finishing a job each transaction), then the same load while the purge runs
# the statement of src/ledger/retention.rs (batch 1000, 20 ms apart, as
# `reaper run` does). Usage: bash tests/bench/purge/run.sh (from the repo,
# after `cargo build`); needs psql, pgbench and PostgreSQL on 127.0.0.1:5432.
set -euo pipefail
cd "$(dirname "$0")"
DB=reaper_purge_bench
PG="psql -h 127.0.0.1 -U postgres -qAt"
$PG -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
trap '$PG -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"' EXIT
printf '[database]\nurl = "postgres://postgres@127.0.0.1:5432/%s"\n' "$DB" > /tmp/$DB.toml
../../../target/debug/reaper migrate --config /tmp/$DB.toml >/dev/null
$PG -d $DB -f seed.sql
SQL=$(python3 -c '
import re; s = open("../../../src/ledger/retention.rs").read()
q = re.search(r"\"(WITH old AS \(.*?SELECT count\(\*\) FROM jobs)\"", s, re.S).group(1)
q = re.sub(r"--[^\n]*", "", q)  # its comments, before it becomes one line
print(re.sub(r"\s+", " ", q).replace("$1", "2592000").replace("$2", "1000"))')
load() { rm -f pgbench_log.*; pgbench -h 127.0.0.1 -U postgres -n -f probe.sql -c 4 -j 2 -T "$1" -l --aggregate-interval=10 $DB 2>&1 | grep -E "^(tps|latency average)"
         cat pgbench_log.* | awk '{ if ($2 > 0) { n += $2; s += $3; if ($6 > m) m = $6 } } END { printf "  max %.1f ms over %d transactions\n", m / 1000, n }'; rm -f pgbench_log.*; }
echo "write load alone:"; load 20
echo "write load while purging:"; load 70 & sleep 5
python3 - "$SQL" $DB <<'PY'
import subprocess, sys, time
sql, db = sys.argv[1], sys.argv[2]
p = subprocess.Popen(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-qAt", "-v", "ON_ERROR_STOP=1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
times, total, start = [], 0, time.monotonic()
while True:
    t = time.monotonic(); p.stdin.write(sql + ";\n"); p.stdin.flush(); line = p.stdout.readline()
    if not line.strip(): sys.exit("psql answered nothing: the purge statement failed (see above)")
    n = int(line)
    times.append(time.monotonic() - t); total += n
    if n < 1000: break
    time.sleep(0.02)
times.sort()
print(f"purge: {total} jobs in {len(times)} statements, {time.monotonic() - start:.0f} s; per statement median {times[len(times)//2]*1000:.0f} ms, p99 {times[int(len(times)*0.99)]*1000:.0f} ms, max {times[-1]*1000:.0f} ms")
PY
wait
