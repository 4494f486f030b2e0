"""Operations: /health (alive), /ready (can take work), /metrics (Prometheus text format)."""
from __future__ import annotations

from typing import Any

from comfy.facade import Api

from .base import BaseHandler


class HealthHandler(BaseHandler):
    """GET /health: the process is alive and its event loop answers. Never touches a backend or the disk."""

    def get(self) -> None:
        """Always 200 while the bridge runs; lists workflow catalog entries that were left out, and why."""
        body: dict[str, Any] = {"status": "ok", "catalog_errors": dict(self.services.catalog.errors)}
        if self.services.demo is not None:
            body["demo"] = self.services.demo
        self.write_json(body)


class ReadyHandler(BaseHandler):
    """GET /ready: 200 when the job store answers, at least one backend is up and the queue is below its limit,
    else 503 with why."""

    async def get(self) -> None:
        """For load balancers and systemd: should traffic come here now?"""
        services = self.services
        members = services.pool.members
        up = sum(1 for m in members if m.up and not m.draining)
        body: dict[str, Any] = {"backends_up": up, "backends": len(members), "max_queue": services.config.max_queue}
        if services.shutting_down:
            return self.write_json({**body, "status": "not ready", "detail": "shutting down"}, 503)
        if not services.jobs.available:
            return self.write_json({**body, "status": "not ready", "detail": "the job store is unreachable"}, 503)
        waiting = await services.jobs.queue_length()
        body["queue_length"] = waiting
        if up == 0:
            self.write_json({**body, "status": "not ready", "detail": "no backend is up"}, 503)
        elif waiting >= services.config.max_queue:
            self.write_json({**body, "status": "not ready", "detail": "the queue is full"}, 503)
        else:
            self.write_json({**body, "status": "ready"})


class MetricsHandler(BaseHandler):
    """GET /metrics in the Prometheus text exposition format."""

    async def get(self) -> None:
        """Counters and histograms of jobs, gauges of queue, backends and sockets."""
        body = await self.services.metrics.exposition()
        # the classic text format, which every Prometheus version scrapes
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(body)


def routes(services: Api) -> list[tuple[str, type, dict[str, Any]]]:
    """URL table of this module."""
    kw = {"services": services}
    return [(r"/health", HealthHandler, kw), (r"/ready", ReadyHandler, kw), (r"/metrics", MetricsHandler, kw)]

