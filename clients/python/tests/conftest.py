"""Fixtures that run the real thing: RabbitMQ in a vhost of these tests' own,
PostgreSQL in a database of their own, the simulated cloud and a reaper
worker (the binary `cargo build` made; REAPER_BIN to point elsewhere). All
of it is removed at the end, passed or not."""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pika
import pytest

REPO = Path(__file__).resolve().parents[3]
BIN = os.environ.get("REAPER_BIN", str(REPO / "target" / "debug" / "reaper"))
PG = os.environ.get("REAPER_TEST_PG", "postgres://postgres@127.0.0.1:5432")
RUN = secrets.token_hex(4)


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=60).stdout


def lines(stream) -> "queue.Queue[str]":
    q: "queue.Queue[str]" = queue.Queue()

    def pump() -> None:
        for line in stream:
            q.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return q


def wait_line(q: "queue.Queue[str]", pattern: str, what: str, seconds: float = 30) -> re.Match:
    deadline = time.monotonic() + seconds
    seen = []
    while time.monotonic() < deadline:
        try:
            line = q.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    raise AssertionError(f"{what}: no line matching {pattern!r} within {seconds}s; saw: {seen[-10:]}")


@pytest.fixture(scope="session")
def amqp_url():
    vhost = f"reaper-py-{RUN}"
    sh("rabbitmqctl", "-q", "add_vhost", vhost)
    sh("rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    sh("rabbitmqctl", "-q", "delete_vhost", vhost)


@pytest.fixture(scope="session")
def database():
    name = f"reaper_py_{RUN}"
    sh("psql", f"{PG}/postgres", "-qc", f'CREATE DATABASE "{name}"')
    yield f"{PG}/{name}"
    sh("psql", f"{PG}/postgres", "-qc", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Sim:
    def __init__(self, url: str) -> None:
        self.url = url

    def put(self, path: str, depends_on: tuple[str, ...] = ()) -> None:
        body = json.dumps({"depends_on": list(depends_on)}).encode()
        req = urllib.request.Request(self.url + path, data=body, method="PUT")
        assert urllib.request.urlopen(req, timeout=10).status == 201

    def resources(self) -> list[str]:
        return json.load(urllib.request.urlopen(self.url + "/_sim/resources", timeout=10))


@pytest.fixture(scope="session")
def sim():
    proc = subprocess.Popen([BIN, "sim", "--port", "0"], stdout=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if not k.startswith("REAPER_")})
    try:
        m = wait_line(lines(proc.stdout), r"on (http://127\.0\.0\.1:\d+)", "reaper sim")
        yield Sim(m.group(1))
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def worker(amqp_url, database, sim, tmp_path_factory):
    """`reaper run` on the VPC example's kinds, pointed at the simulated cloud."""
    config = (REPO / "config" / "vpc-node.toml").read_text().replace("http://127.0.0.1:8089", sim.url)
    config += f"""
[broker]
url = "{amqp_url}"
[database]
url = "{database}"
[admin]
listen = "127.0.0.1:0"
[log]
format = "json"
[worker]
# A failure hook publishes provisioning.failed right behind its tracks, and
# the worker takes them in parallel: a track recorded after the failure's job
# began is a late track with a job of its own, and the failure's job, blocked
# by it (409), succeeds on its next run. The delays give that next run time,
# as production's (10 s and up) do; sub-second ones ran out of retries first.
retry_delays_secs = [1, 3]
step_min_backoff_ms = 10
step_max_backoff_ms = 100
"""
    path = tmp_path_factory.mktemp("reaper") / "reaper.toml"
    path.write_text(config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REAPER_")}
    env["REAPER_CLOUD_TOKEN"] = "py-test-token"
    proc = subprocess.Popen([BIN, "run", "--config", str(path)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=env)
    try:
        m = wait_line(lines(proc.stderr), r'"addr":"(127\.0\.0\.1:\d+)"', "reaper run: admin API address")
        base = f"http://{m.group(1)}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if urllib.request.urlopen(base + "/readyz", timeout=2).status == 200:
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline, "reaper run did not become ready within 30s"
            time.sleep(0.05)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


class Tap:
    """A queue of this test's own on an exchange, read with a deadline."""

    def __init__(self, url: str, exchange: str) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        self.ch = self.conn.channel()
        self.queue = self.ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        self.ch.queue_bind(self.queue, exchange, "#")

    def next(self, seconds: float = 30):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            method, props, body = self.ch.basic_get(self.queue, auto_ack=True)
            if method is not None:
                return method, props, body
            self.conn.sleep(0.05)
        raise AssertionError(f"nothing on the tap within {seconds}s")

    def empty(self) -> bool:
        return self.ch.queue_declare(self.queue, passive=True).method.message_count == 0

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def results(amqp_url, worker):
    tap = Tap(amqp_url, "reaper.results")
    yield tap
    tap.close()


@pytest.fixture
def published(amqp_url, worker):
    """What reaches `reaper.events`, as the worker sees it."""
    tap = Tap(amqp_url, "reaper.events")
    yield tap
    tap.close()


def owner(name: str) -> str:
    return f"node/{name}-{secrets.token_hex(4)}"


def node(sim: Sim, name: str) -> tuple[str, str, str]:
    """A server, its network interface and a DNS record in zone-1."""
    bm, vni, dns = f"{name}-bm", f"{name}-vni", f"{name}-dns"
    sim.put(f"/v1/bare_metal_servers/{bm}")
    sim.put(f"/v1/virtual_network_interfaces/{vni}", (f"/v1/bare_metal_servers/{bm}",))
    sim.put(f"/v1/dns_zones/zone-1/resource_records/{dns}", (f"/v1/bare_metal_servers/{bm}",))
    return bm, vni, dns


def gone(sim: Sim, ids: tuple[str, ...], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(i in p for p in sim.resources() for i in ids):
            return
        time.sleep(0.05)
    raise AssertionError(f"still in the cloud after {seconds}s: {[p for p in sim.resources() if any(i in p for i in ids)]}")
