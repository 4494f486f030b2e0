"""Callers' live status: each clientId's sockets, keep-alives, throttled progress, cancel on disconnect."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Protocol

from tornado.ioloop import PeriodicCallback

from .config import Config
from .identity import client_tag
from .jobs import Job, State
from .scheduler import Scheduler

log = logging.getLogger(__name__)


class ClientSocket(Protocol):
    """What the hub needs of a caller's WebSocket (the /ws handler provides it)."""

    client_id: str

    def send_text(self, text: str, droppable: bool = False) -> None:
        """Send one encoded message; a droppable one may be skipped for a socket that is not reading."""

    def close(self, code: int | None = None, reason: str | None = None) -> None: ...


def message(status: str, details: str, **extra: Any) -> str:
    """One caller-facing status message as JSON text."""
    return json.dumps({"status": status, "details": details, **extra})


CONNECTED = message("connected", "server connected")
LISTENING = message("listening", "server is listening")
PLACES_DELAY = 0.2  # seconds: queue places are re-sent at most this often
KEEPALIVE_SLICES = 10  # each keep-alive interval is cut in this many ticks; a tick greets one slice of sockets


class ClientHub:
    """Fans job updates out to every socket of the job's clientId."""

    def __init__(self, config: Config, scheduler: Scheduler) -> None:
        self.config = config
        self.scheduler = scheduler
        self.sockets: dict[str, set[ClientSocket]] = {}
        self._pending: dict[str, Job] = {}          # clientId -> running job with progress not yet sent
        self._due: dict[str, asyncio.TimerHandle] = {}  # clientId -> when its held-back progress goes out
        self._sent_at: dict[str, float] = {}        # clientId -> when progress last went out
        self._last_sent: dict[str, str] = {}        # clientId -> last state, progress or queue place sent
        self._grace: dict[str, asyncio.TimerHandle] = {}
        self._places: asyncio.TimerHandle | None = None
        # a timing wheel: a socket hears `listening` one interval after it opened and every interval after
        # that, and each tick writes to one slice of the sockets, never to all of them in one go
        self._wheel: list[set[ClientSocket]] = [set() for _ in range(KEEPALIVE_SLICES)]
        self._slot: dict[ClientSocket, int] = {}
        self._tick = 0
        self._keepalive = PeriodicCallback(self._send_keepalive, config.keepalive_interval * 1000 / KEEPALIVE_SLICES)
        scheduler.listeners.append(self.on_job)

    async def start(self) -> None:
        """Start the keep-alive timer."""
        self._keepalive.start()

    async def stop(self, reason: str = "server shutting down") -> None:
        """Stop the timers and close every caller socket with 1001 (going away)."""
        self._keepalive.stop()
        for handle in [*self._grace.values(), *self._due.values(), *([self._places] if self._places else [])]:
            handle.cancel()
        self._grace.clear()
        self._due.clear()
        text = message("error", reason)
        for socks in list(self.sockets.values()):
            for sock in list(socks):
                sock.send_text(text)
                sock.close(1001, reason)
        self.sockets.clear()
        for ring in self._wheel:
            ring.clear()
        self._slot.clear()

    @property
    def count(self) -> int:
        """Open caller sockets."""
        return sum(len(s) for s in self.sockets.values())

    def add(self, sock: ClientSocket) -> None:
        """A socket opened: greet it and tell it where the client's work stands."""
        cid = sock.client_id
        self.sockets.setdefault(cid, set()).add(sock)
        slot = (self._tick - 1) % KEEPALIVE_SLICES  # the slice whose turn is furthest away
        self._wheel[slot].add(sock)
        self._slot[sock] = slot
        handle = self._grace.pop(cid, None)
        if handle is not None:
            handle.cancel()
            log.info("client %s reconnected within the grace period; its jobs continue", client_tag(cid))
        sock.send_text(CONNECTED)
        job = self.scheduler.status_job(cid)
        if job is not None and (job.state.active or not job.fetched):
            sock.send_text(self._state_text(job))
            if not job.state.active and not self._active(cid):
                sock.close(1000, "work finished")

    def remove(self, sock: ClientSocket) -> None:
        """A socket closed: if it was the client's last one while work is pending, cancel after a grace period."""
        cid = sock.client_id
        slot = self._slot.pop(sock, None)
        if slot is not None:
            self._wheel[slot].discard(sock)
        socks = self.sockets.get(cid)
        if socks is None:
            return
        socks.discard(sock)
        if socks:
            return
        del self.sockets[cid]
        for per_client in (self._sent_at, self._last_sent):  # nothing of a client without sockets stays here
            per_client.pop(cid, None)
        if self._active(cid) and cid not in self._grace:
            loop = asyncio.get_running_loop()
            self._grace[cid] = loop.call_later(self.config.disconnect_grace, self._disconnected, cid)

    def _disconnected(self, cid: str) -> None:
        self._grace.pop(cid, None)
        if cid in self.sockets:
            return
        n = self.scheduler.cancel_client(cid, "cancelled: the client disconnected")
        if n:
            log.info("client %s gone for %.1fs: cancelled %d job(s)", client_tag(cid), self.config.disconnect_grace, n)

    def _active(self, cid: str) -> bool:
        return any(j.state.active for j in self.scheduler.client_jobs(cid))

    def _send(self, cid: str, text: str, droppable: bool = False) -> None:
        """One message to every socket of a client, encoded once."""
        for sock in list(self.sockets.get(cid, ())):
            sock.send_text(text, droppable)

    # job updates --------------------------------------------------------------------------------
    def on_job(self, job: Job) -> None:
        """Scheduler callback on every change of a job."""
        if job.state is not State.QUEUED and self._places is None and len(self.scheduler.queue):
            # the line moved: waiting clients hear their new place, at most a few times a second
            self._places = asyncio.get_running_loop().call_later(PLACES_DELAY, self._send_places)
        cid = job.client_id
        if cid not in self.sockets:
            return
        if job.state is State.RUNNING:
            self._progress(cid, job)
            return
        self._pending.pop(cid, None)
        if job.state.active:
            if self._last_sent.get(cid) == f"{job.id}:{job.state.value}":
                return  # queued -> dispatching reads the same to a caller
            self._last_sent[cid] = f"{job.id}:{job.state.value}"
            self._send(cid, self._state_text(job))
            return
        self._last_sent.pop(cid, None)
        status, details = job.client_status()
        if job.state is State.COMPLETED:
            self._send(cid, message("progress", job.percent, job_id=job.id))  # the bar ends at 100.00%
        self._send(cid, message(status, details, job_id=job.id))
        if not self._active(cid):
            for sock in list(self.sockets.get(cid, ())):
                sock.close(1000, "work finished")

    def _state_text(self, job: Job) -> str:
        status, details = job.client_status()
        extra: dict[str, Any] = {"job_id": job.id}
        pos = self.scheduler.position(job)
        if pos is not None:
            extra["queue_position"] = pos
        return message(status, details, **extra)

    def _progress(self, cid: str, job: Job) -> None:
        """Progress goes out at once unless this client had one less than progress_interval ago."""
        self._pending[cid] = job
        if cid in self._due:
            return
        wait = self._sent_at.get(cid, 0.0) + self.config.progress_interval - time.monotonic()
        if wait <= 0:
            self._flush_progress(cid)
        else:
            self._due[cid] = asyncio.get_running_loop().call_later(wait, self._flush_progress, cid)

    def _flush_progress(self, cid: str) -> None:
        self._due.pop(cid, None)
        job = self._pending.pop(cid, None)
        if job is None or job.state is not State.RUNNING:
            return
        text = job.percent
        if self._last_sent.get(cid) == text:
            return
        self._last_sent[cid] = text
        self._sent_at[cid] = time.monotonic()
        self._send(cid, message("progress", text, job_id=job.id), droppable=True)

    def _send_places(self) -> None:
        self._places = None
        places = self.scheduler.queue.positions()
        for cid in list(self.sockets):
            job = self.scheduler.status_job(cid)
            if job is None or job.state is not State.QUEUED:
                continue
            key = f"{job.id}:queued:{places.get(job.id)}"
            if self._last_sent.get(cid) != key:
                self._last_sent[cid] = key
                self._send(cid, message("connected", "server connected", job_id=job.id,
                                        queue_position=places.get(job.id)))

    def _send_keepalive(self) -> None:
        slot, self._tick = self._tick, (self._tick + 1) % KEEPALIVE_SLICES
        for sock in list(self._wheel[slot]):
            sock.send_text(LISTENING, droppable=True)
