"""Backend health: a cheap periodic probe per ComfyUI server, with hysteresis between up and down."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from tornado.ioloop import PeriodicCallback

from .backend import Backend, BackendError
from .config import Config

log = logging.getLogger(__name__)


class HealthMonitor:
    """Probes every backend with GET /queue; down after `down_after` failures, up after `up_after` successes."""

    def __init__(self, config: Config, backends: list[Backend], on_change: Callable[[Backend], None]) -> None:
        self.config = config
        self.backends = backends
        self.on_change = on_change
        self._timer = PeriodicCallback(self._tick, config.probe_interval * 1000, jitter=0.1)
        self._round: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Probe everything once now (so a healthy backend is usable at once), then periodically."""
        await self.probe_all()
        self._timer.start()

    async def stop(self) -> None:
        """Stop probing and wait for a round in flight."""
        self._timer.stop()
        if self._round is not None:
            self._round.cancel()
            await asyncio.gather(self._round, return_exceptions=True)

    def _tick(self) -> None:
        if self._round is None or self._round.done():
            self._round = asyncio.create_task(self.probe_all())

    async def probe_all(self) -> None:
        """One probe of every backend, concurrently."""
        await asyncio.gather(*(self.probe(b) for b in self.backends))

    async def probe(self, backend: Backend) -> None:
        """Probe one backend and move its health with hysteresis."""
        started = time.monotonic()
        try:
            await backend.probe(timeout=max(1.0, min(5.0, self.config.probe_interval * 2)))
        except BackendError as exc:
            backend.probe_failures += 1
            backend.probe_successes = 0
            backend.last_error = str(exc)
            first = backend.healthy is None
            if backend.healthy is not False and (first or backend.probe_failures >= self.config.down_after):
                self._set(backend, False, f"{backend.probe_failures} failed probe(s): {exc}")
            return
        backend.probe_latency_ms = (time.monotonic() - started) * 1000
        backend.probe_successes += 1
        backend.probe_failures = 0
        first = backend.healthy is None
        if backend.healthy is not True and (first or backend.probe_successes >= self.config.up_after):
            self._set(backend, True, f"{backend.probe_successes} good probe(s)")

    def mark_down(self, backend: Backend, why: str) -> None:
        """A call to this backend failed at the transport level: stop sending it work until probes pass again."""
        backend.probe_successes = 0
        self._set(backend, False, why)

    def _set(self, backend: Backend, healthy: bool, why: str) -> None:
        was = backend.healthy
        backend.healthy = healthy
        backend.down_since = None if healthy else time.monotonic()
        if was is not None or not healthy:
            log.warning("backend %s: %s (%s)", backend.label, "up" if healthy else "DOWN", why)
        self.on_change(backend)
