"""Publish events to reaper (https://github.com/…/reaper): what a provisioner
created, what a service deleted, and what failed half-way.

    from reaper_client import Reaper

    with Reaper("amqp://guest:guest@127.0.0.1:5672/%2f") as reaper:
        with reaper.provisioning("node/n1") as p:
            p.step("create_server")
            server = cloud.create_server()
            p.track("bare_metal_server", server.id)
            p.step("install_os")
            cloud.install_os(server)          # raises: provisioning.failed is published, then the error goes on
"""

from .events import ReaperError, Resource, check_owner
from .client import Provisioning, Reaper

__all__ = ["Reaper", "Provisioning", "ReaperError", "Resource", "check_owner"]

try:  # the asyncio client needs the `asyncio` extra (aio-pika)
    from .aio import AsyncProvisioning, AsyncReaper  # noqa: F401

    __all__ += ["AsyncReaper", "AsyncProvisioning"]
except ImportError:  # pragma: no cover - without aio-pika
    pass
