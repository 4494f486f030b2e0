"""Callers' live status: each clientId's sockets, keep-alives, throttled progress, cancel on disconnect."""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Protocol

from tornado.ioloop import PeriodicCallback

from .config import Config
from .jobs import Job, State
from .scheduler import Scheduler

log = logging.getLogger(__name__)


class ClientSocket(Protocol):
    """What the hub needs of a caller's WebSocket (the /ws handler provides it)."""

    client_id: str

    def send(self, status: str, details: str, **extra: Any) -> None: ...

    def close(self, code: int | None = None, reason: str | None = None) -> None: ...


def message(status: str, details: str, **extra: Any) -> str:
    """One caller-facing status message as JSON text."""
    return json.dumps({"status": status, "details": details, **extra})


class ClientHub:
    """Fans job updates out to every socket of the job's clientId."""

    def __init__(self, config: Config, scheduler: Scheduler) -> None:
        self.config = config
        self.scheduler = scheduler
        self.sockets: dict[str, set[ClientSocket]] = {}
        self._pending: dict[str, Job] = {}          # clientId -> job with a progress update not yet sent
        self._last_sent: dict[str, str] = {}        # clientId -> last state or progress text sent
        self._grace: dict[str, asyncio.TimerHandle] = {}
        self._keepalive = PeriodicCallback(self._send_keepalive, config.keepalive_interval * 1000, jitter=0.1)
        self._flusher = PeriodicCallback(self._flush_progress, config.progress_interval * 1000)
        scheduler.listeners.append(self.on_job)

    async def start(self) -> None:
        """Start the keep-alive and progress timers."""
        self._keepalive.start()
        self._flusher.start()

    async def stop(self, reason: str = "server shutting down") -> None:
        """Stop the timers and close every caller socket with 1001 (going away)."""
        self._keepalive.stop()
        self._flusher.stop()
        for handle in self._grace.values():
            handle.cancel()
        self._grace.clear()
        for socks in list(self.sockets.values()):
            for sock in list(socks):
                sock.send("error", reason)
                sock.close(1001, reason)
        self.sockets.clear()

    @property
    def count(self) -> int:
        """Open caller sockets."""
        return sum(len(s) for s in self.sockets.values())

    def add(self, sock: ClientSocket) -> None:
        """A socket opened: greet it and tell it where the client's work stands."""
        cid = sock.client_id
        self.sockets.setdefault(cid, set()).add(sock)
        handle = self._grace.pop(cid, None)
        if handle is not None:
            handle.cancel()
            log.info("client %s… reconnected within the grace period; its jobs continue", cid[:8])
        sock.send("connected", "server connected")
        job = self.scheduler.status_job(cid)
        if job is not None and (job.state.active or not job.fetched):
            self._send_state(sock, job)
            if not job.state.active and not self._active(cid):
                sock.close(1000, "work finished")

    def remove(self, sock: ClientSocket) -> None:
        """A socket closed: if it was the client's last one while work is pending, cancel after a grace period."""
        cid = sock.client_id
        socks = self.sockets.get(cid)
        if socks is None:
            return
        socks.discard(sock)
        if socks:
            return
        del self.sockets[cid]
        if self._active(cid) and cid not in self._grace:
            loop = asyncio.get_running_loop()
            self._grace[cid] = loop.call_later(self.config.disconnect_grace, self._disconnected, cid)

    def _disconnected(self, cid: str) -> None:
        self._grace.pop(cid, None)
        if cid in self.sockets:
            return
        n = self.scheduler.cancel_client(cid, "cancelled: the client disconnected")
        if n:
            log.info("client %s… gone for %.1fs: cancelled %d job(s)", cid[:8], self.config.disconnect_grace, n)

    def _active(self, cid: str) -> bool:
        return any(j.state.active for j in self.scheduler.client_jobs(cid))

    # job updates --------------------------------------------------------------------------------
    def on_job(self, job: Job) -> None:
        """Scheduler callback on every change of a job."""
        cid = job.client_id
        if cid not in self.sockets:
            return
        if job.state is State.RUNNING:
            self._pending[cid] = job  # progress goes out at most every progress_interval
            return
        self._pending.pop(cid, None)
        if job.state.active:
            if self._last_sent.get(cid) == f"{job.id}:{job.state.value}":
                return  # queued -> dispatching reads the same to a caller
            self._last_sent[cid] = f"{job.id}:{job.state.value}"
            for sock in list(self.sockets.get(cid, ())):
                self._send_state(sock, job)
            return
        self._last_sent.pop(cid, None)
        status, details = job.client_status()
        done = not self._active(cid)
        for sock in list(self.sockets.get(cid, ())):
            if job.state is State.COMPLETED:
                sock.send("progress", job.percent, job_id=job.id)  # the bar ends at 100.00%
            sock.send(status, details, job_id=job.id)
            if done:
                sock.close(1000, "work finished")

    def _send_state(self, sock: ClientSocket, job: Job) -> None:
        status, details = job.client_status()
        extra: dict[str, Any] = {"job_id": job.id}
        pos = self.scheduler.position(job)
        if pos is not None:
            extra["queue_position"] = pos
        sock.send(status, details, **extra)

    def _flush_progress(self) -> None:
        pending, self._pending = self._pending, {}
        for cid, job in pending.items():
            if job.state is not State.RUNNING:
                continue
            text = job.percent
            if self._last_sent.get(cid) == text:
                continue
            self._last_sent[cid] = text
            for sock in list(self.sockets.get(cid, ())):
                sock.send("progress", text, job_id=job.id)

    def _send_keepalive(self) -> None:
        for socks in list(self.sockets.values()):
            for sock in list(socks):
                sock.send("listening", "server is listening")
