"""GET /backends: each ComfyUI server's state, load and record, without credentials."""
from __future__ import annotations

from typing import Any

from comfy.services import Services

from .base import BaseHandler


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


def routes(services: Services) -> list[tuple[str, type, dict[str, Any]]]:
    """URL table of this module."""
    return [(r"/backends", BackendsHandler, {"services": services})]
