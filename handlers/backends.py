"""GET /backends: each ComfyUI server's state, load and record, without credentials."""
from __future__ import annotations

from typing import Any

from comfy.services import Services

from .base import BaseHandler, api_error


class BackendsHandler(BaseHandler):
    """What the bridge knows of every backend, and its own queue length."""

    def get(self) -> None:
        """List backends with state, slots, running jobs, done and failed counts, last error and probe latency."""
        backends = [b.describe() for b in self.services.backends]
        self.write_json({
            "backends": backends,
            "up": sum(1 for b in backends if b["state"] == "up"),
            "total": len(backends),
            "queue_length": len(self.services.scheduler.queue),
        })


class DrainHandler(BaseHandler):
    """POST /backends/drain?name=N and /backends/resume?name=N: stop or restart sending a backend new jobs."""

    def initialize(self, services: Services, drain: bool) -> None:  # type: ignore[override]
        """Receive the services and which way this route turns the switch."""
        super().initialize(services)
        self.drain = drain

    def post(self) -> None:
        """Drain lets the backend finish its running jobs while new ones go elsewhere (operators only)."""
        self.require_operator()
        name = self.get_query_argument("name", None)
        backend = next((b for b in self.services.backends if b.label == name), None)
        if backend is None:
            known = ", ".join(b.label for b in self.services.backends)
            raise api_error(400, f"no backend named {name!r} (known: {known})")
        backend.draining = self.drain
        if not self.drain:
            self.services.scheduler.wake()
        self.write_json(backend.describe())


def routes(services: Services) -> list[tuple[str, type, dict[str, Any]]]:
    """URL table of this module."""
    return [
        (r"/backends", BackendsHandler, {"services": services}),
        (r"/backends/drain", DrainHandler, {"services": services, "drain": True}),
        (r"/backends/resume", DrainHandler, {"services": services, "drain": False}),
    ]
