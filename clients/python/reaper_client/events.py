"""The event bodies of docs/contract.md, built and checked in one place for
both clients. Every event gets an `event_id` (a UUID unless given): reaper
treats a second event with the same id as the same event, so publishing
again after a lost connection is safe."""

from __future__ import annotations

import datetime as _dt
import json
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

TRACKED = "resource.tracked"
DELETION = "deletion.requested"
FAILED = "provisioning.failed"


class ReaperError(Exception):
    """An event could not be published (the broker refused or could not be reached)."""


def check_owner(owner: str) -> None:
    """An owner is "type/id": both parts non-empty, at most 256 characters, no NUL."""
    if not isinstance(owner, str) or not 0 < len(owner) <= 256 or "\0" in owner:
        raise ValueError(f"owner must be 1..256 characters without NUL, got {owner!r}")
    kind, _, ident = owner.partition("/")
    if not kind or not ident:
        raise ValueError(f'owner {owner!r} is not of the form "type/id"')


def _text(name: str, value: str) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError(f"{name} must be a non-empty string without NUL, got {value!r}")
    return value


def _time(t: Optional[_dt.datetime]) -> str:
    t = t or _dt.datetime.now(_dt.timezone.utc)
    if t.tzinfo is None:
        raise ValueError("times must be timezone-aware (datetime.now(timezone.utc))")
    return t.astimezone(_dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _resource(kind: str, ident: str, attributes: Optional[Mapping[str, str]] = None,
              parent: Optional[tuple[str, str]] = None) -> dict[str, Any]:
    r: dict[str, Any] = {"kind": _text("kind", kind), "id": _text("id", ident)}
    if attributes:
        r["attributes"] = {str(k): str(v) for k, v in attributes.items()}
    if parent:
        r["parent"] = {"kind": _text("parent kind", parent[0]), "id": _text("parent id", parent[1])}
    return r


def tracked(owner: str, kind: str, ident: str, attributes: Optional[Mapping[str, str]] = None,
            parent: Optional[tuple[str, str]] = None, created_at: Optional[_dt.datetime] = None,
            event_id: Optional[str] = None) -> dict[str, Any]:
    check_owner(owner)
    body = {"event_id": event_id or str(uuid.uuid4()), "owner": owner, **_resource(kind, ident, attributes, parent)}
    body["created_at"] = _time(created_at)
    return body


@dataclass(frozen=True)
class Resource:
    """One resource of a bulk track (:meth:`Reaper.track_many`)."""

    kind: str
    id: str
    attributes: Optional[Mapping[str, str]] = None
    parent: Optional[tuple[str, str]] = None
    created_at: Optional[_dt.datetime] = None


def tracked_many(owner: str, resources: Iterable[Resource], generation: Optional[int] = None,
                 event_id: Optional[str] = None) -> dict[str, Any]:
    check_owner(owner)
    listed = []
    for r in resources:
        one = _resource(r.kind, r.id, r.attributes, r.parent)
        # Only when known: a list sent long after its resources were made
        # would otherwise date them to the send (see "owner lives" in docs/contract.md).
        if r.created_at is not None:
            one["created_at"] = _time(r.created_at)
        listed.append(one)
    if not listed:
        raise ValueError("track_many needs at least one resource")
    body: dict[str, Any] = {"event_id": event_id or str(uuid.uuid4()), "owner": owner, "resources": listed}
    if generation is not None:
        body["generation"] = int(generation)
    return body


def deletion(owner: str, reason: str = "", requested_by: Optional[str] = None, dry_run: bool = False,
             occurred_at: Optional[_dt.datetime] = None, event_id: Optional[str] = None) -> dict[str, Any]:
    check_owner(owner)
    body: dict[str, Any] = {"event_id": event_id or str(uuid.uuid4()), "owner": owner, "reason": reason,
                            "occurred_at": _time(occurred_at)}
    if requested_by:
        body["requested_by"] = requested_by
    if dry_run:
        body["dry_run"] = True
    return body


def failed(owner: str, error: str, failed_step: Optional[str] = None,
           resources: Iterable[tuple[str, str]] = (), occurred_at: Optional[_dt.datetime] = None,
           event_id: Optional[str] = None) -> dict[str, Any]:
    check_owner(owner)
    body: dict[str, Any] = {"event_id": event_id or str(uuid.uuid4()), "owner": owner, "error": str(error)[:4096],
                            "occurred_at": _time(occurred_at)}
    if failed_step:
        body["failed_step"] = failed_step
    listed = [_resource(k, i) for k, i in resources]
    if listed:
        body["resources"] = listed
    return body


class HookState:
    """What a failure hook keeps, sync or async: the owner, the step running
    now (reported as `failed_step`), what it tracked, and the failure's id."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.current_step: Optional[str] = None
        self.tracked: list[tuple[str, str]] = []
        self.failure_event_id: Optional[str] = None

    def step(self, name: str) -> None:
        """Names what runs now; a failure reports it as `failed_step`."""
        self.current_step = name


def encode(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def describe(exc: BaseException) -> str:
    """What a failure hook says of an exception: its type and message."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
