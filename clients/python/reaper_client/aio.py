"""The asyncio client (aio-pika), for FastAPI and other asyncio services.
Same events, same guarantees as :class:`reaper_client.Reaper`."""

from __future__ import annotations

import asyncio
import datetime as _dt
import time
from typing import Any, Iterable, Mapping, Optional

import aio_pika
import aio_pika.exceptions
import aiormq.exceptions

from . import events
from .events import ReaperError


class AsyncReaper:
    """Publishes with publisher confirms; a lost connection is opened again
    and the same event (same id) published again, up to `attempts` times."""

    def __init__(self, url: str = "amqp://guest:guest@127.0.0.1:5672/%2f", prefix: str = "reaper",
                 attempts: int = 5, backoff: float = 0.2, requested_by: Optional[str] = None) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self._url = url
        self._exchange_name = f"{prefix}.events"
        self._attempts = attempts
        self._backoff = backoff
        self._requested_by = requested_by
        self._conn: Any = None
        self._exchange: Any = None
        self._lock = asyncio.Lock()

    async def track(self, owner: str, kind: str, id: str, attributes: Optional[Mapping[str, str]] = None,
                    parent: Optional[tuple[str, str]] = None, created_at: Optional[_dt.datetime] = None,
                    event_id: Optional[str] = None) -> str:
        return await self._publish(events.TRACKED,
                                   events.tracked(owner, kind, id, attributes, parent, created_at, event_id))

    async def track_many(self, owner: str, resources: Iterable[events.Resource],
                         generation: Optional[int] = None, event_id: Optional[str] = None) -> str:
        return await self._publish(events.TRACKED, events.tracked_many(owner, resources, generation, event_id))

    async def request_deletion(self, owner: str, reason: str = "", requested_by: Optional[str] = None,
                               dry_run: bool = False, occurred_at: Optional[_dt.datetime] = None,
                               event_id: Optional[str] = None) -> str:
        body = events.deletion(owner, reason, requested_by or self._requested_by, dry_run, occurred_at, event_id)
        return await self._publish(events.DELETION, body)

    async def provisioning_failed(self, owner: str, error: str, failed_step: Optional[str] = None,
                                  resources: Iterable[tuple[str, str]] = (),
                                  occurred_at: Optional[_dt.datetime] = None,
                                  event_id: Optional[str] = None) -> str:
        return await self._publish(events.FAILED,
                                   events.failed(owner, error, failed_step, resources, occurred_at, event_id))

    def provisioning(self, owner: str) -> "AsyncProvisioning":
        events.check_owner(owner)
        return AsyncProvisioning(self, owner)

    async def close(self) -> None:
        conn, self._conn, self._exchange = self._conn, None, None
        if conn is not None:
            try:
                await conn.close()
            except Exception:  # already gone
                pass

    async def __aenter__(self) -> "AsyncReaper":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _open(self) -> Any:
        async with self._lock:
            if self._exchange is None or self._conn is None or self._conn.is_closed:
                await self.close()
                self._conn = await aio_pika.connect(self._url)
                channel = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
                self._exchange = await channel.get_exchange(self._exchange_name, ensure=False)
            return self._exchange

    async def _publish(self, routing_key: str, body: Mapping[str, Any]) -> str:
        message = aio_pika.Message(
            events.encode(body),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=body["event_id"],
            timestamp=int(time.time()),
        )
        last: Optional[BaseException] = None
        for attempt in range(self._attempts):
            try:
                exchange = await self._open()
                await exchange.publish(message, routing_key=routing_key, mandatory=True)
                return body["event_id"]
            except aio_pika.exceptions.DeliveryError as e:
                raise ReaperError(f"{self._exchange_name} did not take {routing_key} {body['event_id']}: "
                                  f"unroutable or refused (is the prefix right?)") from e
            except (aio_pika.exceptions.AMQPConnectionError, aiormq.exceptions.AMQPError, ConnectionError,
                    OSError) as e:
                last = e
                await self.close()
                await asyncio.sleep(self._backoff * (2 ** attempt))
        raise ReaperError(f"could not publish {routing_key} {body['event_id']} in {self._attempts} attempts: "
                          f"{events.describe(last) if last else 'unknown'}") from last


class AsyncProvisioning(events.HookState):
    """`async with reaper.provisioning(owner) as p:` — see :class:`reaper_client.Provisioning`."""

    def __init__(self, reaper: AsyncReaper, owner: str) -> None:
        events.HookState.__init__(self, owner)
        self.reaper = reaper

    async def track(self, kind: str, id: str, attributes: Optional[Mapping[str, str]] = None,
                    parent: Optional[tuple[str, str]] = None) -> str:
        event_id = await self.reaper.track(self.owner, kind, id, attributes, parent)
        self.tracked.append((kind, id))
        return event_id

    async def __aenter__(self) -> "AsyncProvisioning":
        return self

    async def __aexit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> bool:
        if exc is not None:
            self.failure_event_id = await self.reaper.provisioning_failed(
                self.owner, events.describe(exc), self.current_step)
        return False
