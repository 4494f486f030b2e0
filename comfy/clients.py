"""Callers' live status: each clientId's sockets and event streams, keep-alives, throttled progress, event ids,
waiting submits, and cancel on disconnect."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from tornado.ioloop import PeriodicCallback

from .config import Config
from .hubwire import CONNECTED, LISTENING, ClientSocket, JobQueries, event_id, event_id_of, message
from .identity import client_tag
from .jobs import Job, State, client_status
from .jobstore import PROGRESS, REQUEUED, JobEvent
from .waiters import JobWaiters

log = logging.getLogger(__name__)

ACTIVE_KINDS = frozenset({State.QUEUED.value, REQUEUED, State.DISPATCHING.value})
FINAL_KINDS = frozenset({State.COMPLETED.value, State.FAILED.value, State.CANCELLED.value})
PLACES_DELAY = 0.2  # seconds: queue places are re-sent at most this often
KEEPALIVE_SLICES = 10  # each keep-alive interval is cut in this many ticks; a tick greets one slice of sockets


class ClientHub:
    """Fans job events out to every socket and event stream of the job's clientId, and wakes waiting submits."""

    def __init__(self, config: Config, jobs: JobQueries) -> None:
        self.config = config
        self.jobs = jobs
        self.waiters = JobWaiters()
        self.sockets: dict[str, set[ClientSocket]] = {}  # clientId -> its sockets and event streams here
        self._watchers: set[ClientSocket] = set()   # listeners that do not keep the client's jobs alive
        self._present: dict[str, int] = {}          # clientId -> its listeners and waiting submits that do
        self._pending: dict[str, JobEvent] = {}     # clientId -> progress not yet sent
        self._due: dict[str, asyncio.TimerHandle] = {}  # clientId -> when its held-back progress goes out
        self._sent_at: dict[str, float] = {}        # clientId -> when progress last went out
        self._last_sent: dict[str, str] = {}        # clientId -> last state, progress or queue place sent
        self._waiting: dict[str, tuple[str, str]] = {}  # clientId -> (its job waiting in the line, event id)
        self._turn: dict[str, int] = {}             # clientId -> events seen: a slow lookup never overtakes
        # clientId -> its waiting and running jobs, when every one of them is known here (it had none when
        # its socket opened and events told the rest): then whether it is busy needs no question
        self._known_active: dict[str, set[str]] = {}
        self._grace: dict[str, asyncio.TimerHandle] = {}
        # clientId -> what its callers who went away left behind: None = all its work (a socket or stream
        # closed), else the jobs of waiting submits that hung up; cancelled after the grace unless it is back
        self._abandoned: dict[str, set[str] | None] = {}
        self._places: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # a timing wheel: a socket hears `listening` one interval after it opened and every interval after
        # that, and each tick writes to one slice of the sockets, never to all of them in one go
        self._wheel: list[set[ClientSocket]] = [set() for _ in range(KEEPALIVE_SLICES)]
        self._slot: dict[ClientSocket, int] = {}
        self._tick = 0
        self._keepalive = PeriodicCallback(self._send_keepalive, config.keepalive_interval * 1000 / KEEPALIVE_SLICES)

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
        self.waiters.stop()
        text = message("error", reason)
        for socks in list(self.sockets.values()):
            for sock in list(socks):
                sock.send_text(text)
                sock.close(1001, reason)
        self.sockets.clear()
        self._watchers.clear()
        for ring in self._wheel:
            ring.clear()
        self._slot.clear()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def count(self) -> int:
        """Open caller sockets and event streams."""
        return sum(len(s) for s in self.sockets.values())

    def streams(self) -> int:
        """Open event streams (the rest of count are WebSockets)."""
        return sum(sock.event_stream for socks in self.sockets.values() for sock in socks)

    def add(self, sock: ClientSocket, holds: bool = True) -> None:
        """A socket or stream opened: greet it, then tell it where the client's work stands. `holds`: it keeps
        the client's jobs alive as a socket does (False for a stream that only watches one job)."""
        cid = sock.client_id
        self.sockets.setdefault(cid, set()).add(sock)
        slot = (self._tick - 1) % KEEPALIVE_SLICES  # the slice whose turn is furthest away
        self._wheel[slot].add(sock)
        self._slot[sock] = slot
        if holds:
            self.hold(cid)
        else:
            self._watchers.add(sock)
        sock.send_text(CONNECTED)
        self._spawn(self._greet(sock))

    def hold(self, cid: str) -> None:
        """A socket, event stream or waiting submit of the client is here: no cancel for having left."""
        count = self._present.get(cid, 0)
        self._present[cid] = count + 1
        if count:
            return
        self._abandoned.pop(cid, None)
        handle = self._grace.pop(cid, None)
        if handle is not None:
            handle.cancel()
            log.info("client %s reconnected within the grace period; its jobs continue", client_tag(cid))
        self._spawn(self.jobs.attach(cid, 1))

    def release(self, cid: str, leaving: bool = True, job_id: str | None = None) -> None:
        """One of the client's holds ended. `leaving`: the caller went away, so pending work is cancelled after
        the grace unless the client comes back: all of it when a socket or stream closed, only `job_id` when a
        waiting submit hung up. False when the caller was answered and leaves its jobs on purpose (a submit
        that waited and answered 202)."""
        if leaving:
            left = self._abandoned.get(cid, set())
            if job_id is None or left is None:
                self._abandoned[cid] = None
            else:
                left.add(job_id)
                self._abandoned[cid] = left
        count = self._present.get(cid, 0) - 1
        if count > 0:
            self._present[cid] = count
            return
        self._present.pop(cid, None)
        leaving = cid in self._abandoned
        self._spawn(self._left(cid, self._known_active.get(cid) if leaving else None, leaving))

    async def _greet(self, sock: ClientSocket) -> None:
        cid = sock.client_id
        turn = self._turn.get(cid, 0)
        job = await self.jobs.status_job(cid)
        if self._turn.get(cid, 0) != turn or cid not in self.sockets:
            return  # an event told it meanwhile
        if (job is None or not job.state.active) and cid not in self._known_active:
            self._known_active[cid] = set()
        if job is None or not (job.state.active or not job.fetched):
            return  # nothing to tell
        eid = event_id(job.id, job.state, job.attempts, job.progress)
        if job.state is State.QUEUED:
            self._waiting[cid] = (job.id, eid)
        text = await self._state_text(job)
        if self._turn.get(cid, 0) != turn or sock not in self.sockets.get(cid, ()):
            return
        sock.send_text(text, eid=eid)
        if not job.state.active and not await self._busy(cid):
            sock.close(1000, "work finished")

    async def _busy(self, cid: str, known: set[str] | None = None) -> bool:
        """True while the client has a job waiting or running (asked of the store only when not known here)."""
        known = self._known_active.get(cid) if known is None else known
        return bool(known) if known is not None else await self.jobs.client_active(cid)

    def remove(self, sock: ClientSocket) -> None:
        """A socket or stream closed: if it was the client's last hold while work is pending, cancel after a
        grace period."""
        cid = sock.client_id
        slot = self._slot.pop(sock, None)
        if slot is not None:
            self._wheel[slot].discard(sock)
        socks = self.sockets.get(cid)
        if socks is None or sock not in socks:
            return
        socks.discard(sock)
        holds = sock not in self._watchers
        self._watchers.discard(sock)
        if not socks:
            del self.sockets[cid]
            # nothing of a client without listeners stays here (the hold below reads what is known first)
            for per_client in (self._sent_at, self._last_sent, self._waiting, self._turn, self._pending):
                per_client.pop(cid, None)
            due = self._due.pop(cid, None)
            if due is not None:
                due.cancel()
        if holds:
            self.release(cid)
        if cid not in self.sockets:
            self._known_active.pop(cid, None)

    async def _left(self, cid: str, known: set[str] | None, leaving: bool) -> None:
        """The client's last hold here ended: if it left with work pending, cancel that after a grace period."""
        await self.jobs.attach(cid, -1)
        if not leaving or cid in self._grace or not await self._busy(cid, known) or cid in self._present:
            if cid not in self._grace:
                self._abandoned.pop(cid, None)
            return
        loop = asyncio.get_running_loop()
        self._grace[cid] = loop.call_later(self.config.disconnect_grace, self._disconnected, cid)

    def _disconnected(self, cid: str) -> None:
        self._grace.pop(cid, None)
        if cid not in self._present:
            self._spawn(self._cancel_if_gone(cid))

    async def _cancel_if_gone(self, cid: str) -> None:
        left = self._abandoned.pop(cid, None)
        if cid in self._present or await self.jobs.attached(cid):
            return  # back here meanwhile, or a socket or stream on another bridge follows the work
        reason = "cancelled: the client disconnected"
        n = await (self.jobs.cancel_client(cid, reason) if left is None else self.jobs.cancel_jobs(sorted(left), reason))
        if n:
            log.info("client %s gone for %.1fs: cancelled %d job(s)", client_tag(cid), self.config.disconnect_grace, n)

    def _send(self, cid: str, text: str, eid: str, droppable: bool = False) -> None:
        """One message to every socket and stream of a client, encoded once."""
        for sock in list(self.sockets.get(cid, ())):
            sock.send_text(text, droppable, eid)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("client hub: %s", task.exception())

    # job events ---------------------------------------------------------------------------------
    def on_event(self, event: JobEvent) -> None:
        """Every committed job event, from every bridge: wake a submit waiting for it, tell the job's client if
        it listens here."""
        self.waiters.on_event(event)
        kind = event.kind
        if kind in (State.DISPATCHING.value, State.CANCELLED.value, REQUEUED) and self._waiting \
                and self._places is None:
            # the line moved: waiting clients hear their new place, at most a few times a second
            self._places = asyncio.get_running_loop().call_later(PLACES_DELAY, self._send_places)
        cid = event.client_id
        if cid not in self.sockets:
            return
        if kind == PROGRESS or kind == State.RUNNING.value:
            known = self._known_active.get(cid)
            if known is not None:
                known.add(event.job_id)
            self._waiting.pop(cid, None)
            self._progress(cid, event)
            return
        if kind not in ACTIVE_KINDS and kind not in FINAL_KINDS:
            return  # fetched, cancel requests, commands: nothing a caller is told
        self._turn[cid] = self._turn.get(cid, 0) + 1
        known = self._known_active.get(cid)
        if known is not None:
            (known.add if kind in ACTIVE_KINDS else known.discard)(event.job_id)
        self._pending.pop(cid, None)
        if kind in ACTIVE_KINDS:
            state = State.QUEUED if kind == REQUEUED else State(kind)
            if self._last_sent.get(cid) == f"{event.job_id}:{state.value}":
                return  # queued -> dispatching reads the same to a caller
            self._last_sent[cid] = f"{event.job_id}:{state.value}"
            eid = event_id_of(event, state)
            if state is State.QUEUED:
                self._waiting[cid] = (event.job_id, eid)
                self._spawn(self._send_queued(cid, event.job_id, eid, self._turn[cid]))
            else:
                self._waiting.pop(cid, None)
                self._send(cid, message("connected", "server connected", job_id=event.job_id), eid)
            return
        self._waiting.pop(cid, None)
        self._last_sent.pop(cid, None)
        status, details = client_status(State(kind), event.percent, event.detail)
        if kind == State.COMPLETED.value:  # the bar ends at 100.00%
            self._send(cid, message("progress", "100.00%", job_id=event.job_id),
                       event_id(event.job_id, State.RUNNING, event.attempts, 1.0))
        self._send(cid, message(status, details, job_id=event.job_id), event_id_of(event, State(kind)))
        self._spawn(self._close_if_done(cid))

    async def _send_queued(self, cid: str, job_id: str, eid: str, turn: int) -> None:
        """A job of the client entered the line: tell it with its place (unless a later event came first)."""
        pos = await self.jobs.position(job_id)
        if self._turn.get(cid) != turn:
            return
        extra: dict[str, Any] = {"job_id": job_id}
        if pos is not None:
            extra["queue_position"] = pos
        self._send(cid, message("connected", "server connected", **extra), eid)

    async def _close_if_done(self, cid: str) -> None:
        if cid in self.sockets and not await self._busy(cid):
            for sock in list(self.sockets.get(cid, ())):
                sock.close(1000, "work finished")

    async def _state_text(self, job: Job) -> str:
        status, details = job.client_status()
        extra: dict[str, Any] = {"job_id": job.id}
        pos = await self.jobs.position(job.id) if job.state is State.QUEUED else None
        if pos is not None:
            extra["queue_position"] = pos
        return message(status, details, **extra)

    def _progress(self, cid: str, event: JobEvent) -> None:
        """Progress goes out at once unless this client had one less than progress_interval ago."""
        self._pending[cid] = event
        if cid in self._due:
            return
        wait = self._sent_at.get(cid, 0.0) + self.config.progress_interval - time.monotonic()
        if wait <= 0:
            self._flush_progress(cid)
        else:
            self._due[cid] = asyncio.get_running_loop().call_later(wait, self._flush_progress, cid)

    def _flush_progress(self, cid: str) -> None:
        self._due.pop(cid, None)
        event = self._pending.pop(cid, None)
        if event is None:
            return
        text = event.percent
        if self._last_sent.get(cid) == text:
            return
        self._last_sent[cid] = text
        self._sent_at[cid] = time.monotonic()
        self._send(cid, message("progress", text, job_id=event.job_id), event_id_of(event, State.RUNNING),
                   droppable=True)

    def _send_places(self) -> None:
        self._places = None
        if self._waiting:
            self._spawn(self._places_now())

    async def _places_now(self) -> None:
        places = await self.jobs.positions()
        for cid, (job_id, eid) in list(self._waiting.items()):
            place = places.get(job_id)
            if place is None:
                continue
            key = f"{job_id}:queued:{place}"
            if self._last_sent.get(cid) != key:
                self._last_sent[cid] = key
                self._send(cid, message("connected", "server connected", job_id=job_id, queue_position=place), eid)

    def _send_keepalive(self) -> None:
        slot, self._tick = self._tick, (self._tick + 1) % KEEPALIVE_SLICES
        for sock in list(self._wheel[slot]):
            sock.send_text(LISTENING, droppable=True)
