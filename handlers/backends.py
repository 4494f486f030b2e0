"""GET /backends: each ComfyUI server's state, load and record, without credentials."""
from __future__ import annotations

from typing import Any

from comfy.facade import Api

from .base import BaseHandler, api_error


class BackendsHandler(BaseHandler):
    """What the bridge knows of every backend, and its own queue length."""

    async def get(self) -> None:
        """List backends with state, slots, running jobs, done and failed counts, last error and probe latency."""
        backends = [m.describe() for m in self.services.pool.members]
        self.write_json({
            "backends": backends,
            "up": sum(1 for b in backends if b["state"] == "up"),
            "total": len(backends),
            "queue_length": await self.services.jobs.queue_length(),
        })


class DrainHandler(BaseHandler):
    """POST /backends/drain?name=N and /backends/resume?name=N: stop or restart sending a backend new jobs."""

    def initialize(self, services: Api, drain: bool) -> None:  # type: ignore[override]
        """Receive the services and which way this route turns the switch."""
        super().initialize(services)
        self.drain = drain

    def post(self) -> None:
        """Drain lets the backend finish its running jobs while new ones go elsewhere (operators only)."""
        self.require_operator()
        name = self.get_query_argument("name", None)
        pool = self.services.pool
        member = pool.member(name)
        if member is None:
            known = ", ".join(m.label for m in pool.members)
            raise api_error(400, f"no backend named {name!r} (known: {known})")
        pool.set_draining(member, self.drain)
        self.write_json(member.describe())


def routes(services: Api) -> list[tuple[str, type, dict[str, Any]]]:
    """URL table of this module."""
    return [
        (r"/backends", BackendsHandler, {"services": services}),
        (r"/backends/drain", DrainHandler, {"services": services, "drain": True}),
        (r"/backends/resume", DrainHandler, {"services": services, "drain": False}),
    ]
