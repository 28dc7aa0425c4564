"""The Python client against the real RabbitMQ and a running reaper."""

from __future__ import annotations

import json
import time

import pytest

from reaper_client import AsyncReaper, Reaper, ReaperError, Resource

from conftest import gone, node, owner


def results_until(results, event_id: str, seconds: float = 30) -> dict:
    """Results, in order, until the one for `event_id`; none dead-lettered."""
    deadline = time.monotonic() + seconds
    while True:
        method, _, body = results.next(max(0.1, deadline - time.monotonic()))
        result = json.loads(body)
        assert method.routing_key == "teardown.completed", json.dumps(result)
        if result["event_id"] == event_id:
            return result


def test_the_failure_hook_reports_the_step_and_reaper_tears_down_what_was_tracked(amqp_url, sim, results):
    bm, vni, dns = node(sim, "hook")
    who = owner("hook")
    with Reaper(amqp_url) as reaper:
        with pytest.raises(RuntimeError, match="install_os timed out"):
            with reaper.provisioning(who) as p:
                p.step("create_server")
                p.track("bare_metal_server", bm)
                p.track("vni", vni)
                p.track("dns_record", dns, {"zone_id": "zone-1"})
                p.step("install_os")
                raise RuntimeError("install_os timed out")
    assert p.failure_event_id, "the failure was published"
    result = results_until(results, p.failure_event_id)
    assert (result["trigger"], result["status"], result["owner"]) == ("provisioning.failed", "completed", who)
    gone(sim, (bm, vni, dns))


def test_a_block_that_succeeds_publishes_only_its_tracks(amqp_url, sim, published):
    bm, _, _ = node(sim, "ok")
    with Reaper(amqp_url) as reaper:
        with reaper.provisioning(owner("ok")) as p:
            p.track("bare_metal_server", bm)
    method, _, _ = published.next()
    assert method.routing_key == "resource.tracked"
    time.sleep(0.3)  # a negative: nothing else may follow; 0.3 s is ample for a confirmed publish
    assert published.empty(), "no provisioning.failed for a block that ended well"


def test_events_are_persistent_confirmed_and_carry_their_id_and_time(amqp_url, sim, published, results):
    bm, vni, dns = node(sim, "del")
    who = owner("del")
    with Reaper(amqp_url, requested_by="billing") as reaper:
        track_id = reaper.track(who, "bare_metal_server", bm)
        reaper.track(who, "vni", vni)
        reaper.track(who, "dns_record", dns, {"zone_id": "zone-1"})
        deletion_id = reaper.request_deletion(who, reason="account closed")
    method, props, body = published.next()
    event = json.loads(body)
    assert (method.routing_key, event["event_id"], props.message_id) == ("resource.tracked", track_id, track_id)
    assert props.delivery_mode == 2 and props.content_type == "application/json"
    assert abs(props.timestamp - time.time()) < 60
    assert event["created_at"].endswith("Z")
    result = results_until(results, deletion_id)
    assert (result["trigger"], result["status"]) == ("deletion.requested", "completed"), result
    gone(sim, (bm, vni, dns))


def test_track_many_sends_one_message_and_reaper_tears_down_all_it_lists(amqp_url, sim, published, results):
    bm, vni, dns = node(sim, "many")
    who = owner("many")
    with Reaper(amqp_url) as reaper:
        track_id = reaper.track_many(who, [Resource("bare_metal_server", bm), Resource("vni", vni),
                                           Resource("dns_record", dns, {"zone_id": "zone-1"})])
        deletion_id = reaper.request_deletion(who, reason="done")
        with pytest.raises(ValueError, match="at least one"):
            reaper.track_many(who, [])
    method, props, body = published.next()
    event = json.loads(body)
    assert (method.routing_key, props.message_id) == ("resource.tracked", track_id)
    assert [r["kind"] for r in event["resources"]] == ["bare_metal_server", "vni", "dns_record"]
    result = results_until(results, deletion_id)
    assert (result["status"], len(result["resources"])) == ("completed", 3), result
    gone(sim, (bm, vni, dns))


def test_bad_input_is_refused_before_anything_is_sent(amqp_url, worker, published):
    with Reaper(amqp_url) as reaper:
        for bad in ["noslash", "/n1", "node/", ""]:
            with pytest.raises(ValueError):
                reaper.request_deletion(bad)
        with pytest.raises(ValueError):
            reaper.track("node/n1", "", "id")
        with pytest.raises(ValueError):
            reaper.provisioning("no-slash")
    time.sleep(0.3)  # a negative, as above
    assert published.empty()


def test_a_broker_that_cannot_be_reached_or_a_wrong_prefix_is_a_clear_error(amqp_url, worker):
    with Reaper("amqp://guest:guest@127.0.0.1:1/%2f", attempts=2, backoff=0.01) as reaper:
        with pytest.raises(ReaperError, match="in 2 attempts"):
            reaper.request_deletion("node/n1")
    with Reaper(amqp_url, prefix="no-such-prefix") as reaper:
        with pytest.raises(ReaperError, match="no exchange no-such-prefix.events"):
            reaper.request_deletion("node/n1")


@pytest.mark.asyncio
async def test_the_async_failure_hook_does_the_same(amqp_url, sim, results):
    bm, vni, dns = node(sim, "aio")
    who = owner("aio")
    async with AsyncReaper(amqp_url) as reaper:
        with pytest.raises(TimeoutError):
            async with reaper.provisioning(who) as p:
                p.step("create_server")
                await p.track("bare_metal_server", bm)
                await p.track("vni", vni)
                await p.track("dns_record", dns, {"zone_id": "zone-1"})
                p.step("install_os")
                raise TimeoutError("no answer from the BMC")
    result = results_until(results, p.failure_event_id)
    assert (result["trigger"], result["status"]) == ("provisioning.failed", "completed"), result
    gone(sim, (bm, vni, dns))
