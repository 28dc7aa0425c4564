"""The blocking client (pika), for Django, Flask, scripts and Celery tasks."""

from __future__ import annotations

import datetime as _dt
import time
from typing import Any, Iterable, Mapping, Optional

import pika
import pika.exceptions

from . import events
from .events import ReaperError

#: What a lost or refused connection raises; worth a reconnect and a retry.
_RETRYABLE = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.ConnectionClosed,
    pika.exceptions.StreamLostError,
    pika.exceptions.ChannelClosed,
    pika.exceptions.ChannelWrongStateError,
)


class Reaper:
    """Publishes to `<prefix>.events` with publisher confirms: a call returns
    the event's id once the broker has the message (persistent, with
    `message_id` = `event_id` and a timestamp), or raises :class:`ReaperError`.

    A lost connection is opened again and the same event (same id) published
    again, up to `attempts` times with backoff; reaper takes a repeated event
    as the same one. Not thread-safe: one per thread (pika's rule)."""

    def __init__(self, url: str = "amqp://guest:guest@127.0.0.1:5672/%2f", prefix: str = "reaper",
                 attempts: int = 5, backoff: float = 0.2, requested_by: Optional[str] = None) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self._params = pika.URLParameters(url)
        self._exchange = f"{prefix}.events"
        self._attempts = attempts
        self._backoff = backoff
        self._requested_by = requested_by
        self._conn: Optional[pika.BlockingConnection] = None
        self._channel: Any = None

    # -- the three events -------------------------------------------------

    def track(self, owner: str, kind: str, id: str, attributes: Optional[Mapping[str, str]] = None,
              parent: Optional[tuple[str, str]] = None, created_at: Optional[_dt.datetime] = None,
              event_id: Optional[str] = None) -> str:
        """`resource.tracked`: `owner` ("type/id") created resource `kind`/`id`."""
        return self._publish(events.TRACKED, events.tracked(owner, kind, id, attributes, parent, created_at, event_id))

    def track_many(self, owner: str, resources: Iterable[events.Resource], generation: Optional[int] = None,
                   event_id: Optional[str] = None) -> str:
        """One `resource.tracked` listing several of `owner`'s resources, recorded together.
        reaper refuses a list longer than its `worker.max_resources_per_event` (default 5,000)."""
        return self._publish(events.TRACKED, events.tracked_many(owner, resources, generation, event_id))

    def request_deletion(self, owner: str, reason: str = "", requested_by: Optional[str] = None,
                         dry_run: bool = False, occurred_at: Optional[_dt.datetime] = None,
                         event_id: Optional[str] = None) -> str:
        """`deletion.requested`: tear down everything tracked for `owner`."""
        body = events.deletion(owner, reason, requested_by or self._requested_by, dry_run, occurred_at, event_id)
        return self._publish(events.DELETION, body)

    def provisioning_failed(self, owner: str, error: str, failed_step: Optional[str] = None,
                            resources: Iterable[tuple[str, str]] = (),
                            occurred_at: Optional[_dt.datetime] = None, event_id: Optional[str] = None) -> str:
        """`provisioning.failed`: tear down what was tracked for `owner`, and `resources` ((kind, id) pairs) besides."""
        return self._publish(events.FAILED, events.failed(owner, error, failed_step, resources, occurred_at, event_id))

    def provisioning(self, owner: str) -> "Provisioning":
        """The failure hook: see :class:`Provisioning`."""
        events.check_owner(owner)
        return Provisioning(self, owner)

    # -- connection -------------------------------------------------------

    def close(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except Exception:  # already gone
                pass

    def __enter__(self) -> "Reaper":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> Any:
        if self._channel is None or not self._channel.is_open:
            self.close()
            self._conn = pika.BlockingConnection(self._params)
            self._channel = self._conn.channel()
            self._channel.confirm_delivery()
        return self._channel

    def _publish(self, routing_key: str, body: Mapping[str, Any]) -> str:
        props = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=body["event_id"],
            timestamp=int(time.time()),
        )
        data = events.encode(body)
        last: Optional[BaseException] = None
        for attempt in range(self._attempts):
            try:
                self._open().basic_publish(self._exchange, routing_key, data, props, mandatory=True)
                return body["event_id"]
            except pika.exceptions.UnroutableError as e:
                raise ReaperError(f"{self._exchange} routed {routing_key} nowhere: is reaper's topology declared "
                                  f"(a worker started once) and the prefix right?") from e
            except pika.exceptions.NackError as e:
                raise ReaperError(f"the broker refused {routing_key} {body['event_id']} (nack)") from e
            except pika.exceptions.ChannelClosedByBroker as e:
                self.close()
                if e.reply_code == 404:
                    raise ReaperError(f"the broker has no exchange {self._exchange}: is the prefix right, "
                                      f"and has a reaper worker run once (it declares the topology)?") from e
                last = e
                time.sleep(self._backoff * (2 ** attempt))
            except _RETRYABLE as e:
                last = e
                self.close()
                time.sleep(self._backoff * (2 ** attempt))
        raise ReaperError(f"could not publish {routing_key} {body['event_id']} in {self._attempts} attempts: "
                          f"{events.describe(last) if last else 'unknown'}") from last


class Provisioning(events.HookState):
    """The failure hook for one owner: each resource is tracked as soon as it
    is created, and when the block raises, a `provisioning.failed` naming the
    step and the error is published before the exception goes on. reaper then
    tears down what was tracked. A block that ends normally publishes nothing
    more::

        with reaper.provisioning("node/n1") as p:
            p.step("create_server")
            p.track("bare_metal_server", server_id)
    """

    def __init__(self, reaper: Reaper, owner: str) -> None:
        events.HookState.__init__(self, owner)
        self.reaper = reaper

    def track(self, kind: str, id: str, attributes: Optional[Mapping[str, str]] = None,
              parent: Optional[tuple[str, str]] = None) -> str:
        event_id = self.reaper.track(self.owner, kind, id, attributes, parent)
        self.tracked.append((kind, id))
        return event_id

    def __enter__(self) -> "Provisioning":
        return self

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> bool:
        if exc is not None:
            # If this publish fails too, its error is chained to the original.
            self.failure_event_id = self.reaper.provisioning_failed(
                self.owner, events.describe(exc), self.current_step)
        return False
