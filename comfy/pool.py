"""The backend pool: the one owner of each ComfyUI server's health, slots, drain, statistics, orphans and lease."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol
from urllib.parse import urlsplit

from tornado.ioloop import PeriodicCallback

from .comfyclient import BackendError, ComfyClient, new_client_id
from .config import BackendConfig, Config
from .jobstore import JobStore, StoreUnavailable

log = logging.getLogger(__name__)

# Lease rounds run every lease_ttl / LEASE_ROUNDS seconds. The store makes a renewed lease count for part of
# lease_ttl (comfy/pg_leases.py: 0.6), so a bridge that dies is past its leases, and another bridge's next
# round has taken them, within lease_ttl (the promise) even with the rounds' jitter; a live bridge loses a
# lease only after missing three rounds in a row.
LEASE_ROUNDS = 5


class PoolObserver(Protocol):
    """Who acts on changes of the pool (the dispatcher, the catalog's enrichment)."""

    def backend_changed(self, member: Member) -> None:
        """The backend's health, socket or drain changed: it may take work now, or no longer."""

    def lease_changed(self, member: Member, held: bool) -> None:
        """This bridge took (held) or lost the backend's lease."""


@dataclass(eq=False)
class Member:
    """One backend as this bridge knows it. Only the pool writes these fields; everyone may read them."""

    client: ComfyClient
    healthy: bool | None = None  # None until the first probe
    down_since: float | None = None
    probe_failures: int = 0
    probe_successes: int = 0
    probe_latency_ms: float | None = None
    draining: bool = False
    leased: bool = False  # this bridge drives the backend (always, with a store of one bridge)
    running: dict[str, float | None] = field(default_factory=dict)  # job id -> monotonic start of its run
    jobs_done: int = 0
    failures: int = 0
    job_seconds: float | None = None  # moving average of a job's run time here (dispatch preference)
    last_error: str = ""
    orphans: set[str] = field(default_factory=set)  # our prompts abandoned here; stopped when it is back

    @property
    def cfg(self) -> BackendConfig:
        """The backend's settings."""
        return self.client.cfg

    @property
    def label(self) -> str:
        """Its name in logs, listings, leases and job records."""
        return self.client.label

    @property
    def slots(self) -> int:
        """Jobs it may run at once."""
        return self.client.cfg.slots

    @property
    def up(self) -> bool:
        """True while probes pass and, when this bridge drives it, its WebSocket is open."""
        return bool(self.healthy) and (self.client.connected.is_set() or not self.leased)

    @property
    def state(self) -> str:
        """"up", "down" or "draining" (finishing its jobs, taking no new ones)."""
        if self.draining:
            return "draining"
        return "up" if self.up else "down"

    @property
    def free_slots(self) -> int:
        """How many more jobs this bridge may give it now."""
        return self.slots - len(self.running)

    @property
    def available(self) -> bool:
        """True if this bridge may send it a new job now."""
        return self.leased and self.up and not self.draining and self.free_slots > 0

    def describe(self) -> dict[str, Any]:
        """The public view of this backend (its URL without any credentials)."""
        parts = urlsplit(self.client.url)
        host = parts.hostname or ""
        url = f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"
        caps = self.client.caps
        return {"name": self.label, "url": url, "state": self.state, "slots": self.slots,
                "running": len(self.running), "jobs_done": self.jobs_done, "failures": self.failures,
                "last_error": self.last_error or None, "weight": self.cfg.weight,
                "workflows": list(self.cfg.workflows) if self.cfg.workflows is not None else None,
                "probe_latency_ms": round(self.probe_latency_ms, 2) if self.probe_latency_ms is not None else None,
                "driven_here": self.leased, "comfyui_version": caps.version, "capabilities": caps.describe()}


class BackendPool:
    """Probes every backend, keeps its slots and record, holds its lease, and tells observers what changed."""

    def __init__(self, config: Config, store: JobStore) -> None:
        self.config = config
        self.store = store
        self.members: list[Member] = []  # one per configured backend, made at start
        self.observers: list[PoolObserver] = []
        self._probe_timer = PeriodicCallback(self._probe_tick, config.probe_interval * 1000, jitter=0.1)
        self._lease_round = config.lease_ttl / LEASE_ROUNDS
        self._lease_timer = PeriodicCallback(self._lease_tick, self._lease_round * 1000, jitter=0.1)
        self._round: asyncio.Task[None] | None = None
        self._leasing: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def member(self, label: str | None) -> Member | None:
        """The backend with this label, if configured."""
        return next((m for m in self.members if m.label == label), None)

    # lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Probe everything once (so a healthy backend is usable at once), take leases, then keep both going."""
        for cfg in self.config.backends:
            # the clientId a backend knows us by is the same for every bridge and restart, so our prompts can
            # be found again by whoever drives the backend next
            client_id = await self.store.meta(f"backend_client_id:{cfg.url}", new_client_id)
            member = Member(ComfyClient(cfg, self.config, client_id))
            member.client.on_connection = partial(self._connection, member)
            self.members.append(member)
        await self.probe_all()
        await self.renew_leases()
        self._probe_timer.start()
        self._lease_timer.start()

    async def stop(self) -> None:
        """Stop probing and leasing, give the leases up, close every client."""
        self._probe_timer.stop()
        self._lease_timer.stop()
        for task in (self._round, self._leasing, *self._tasks):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._round, self._leasing, *self._tasks) if t is not None),
                             return_exceptions=True)
        try:
            await self.store.release_leases()
        except StoreUnavailable:
            log.warning("could not give the backend leases up (the store is unreachable); they expire")
        for m in self.members:
            await m.client.stop()

    # leases -------------------------------------------------------------------------------------
    def _lease_tick(self) -> None:
        if self._leasing is None or self._leasing.done():
            self._leasing = asyncio.create_task(self.renew_leases())

    async def renew_leases(self) -> None:
        """Renew this bridge's leases and take free ones; connect to backends gained, let go of those lost."""
        try:
            held = await self.store.leases([m.label for m in self.members], self.config.lease_ttl)
        except StoreUnavailable as exc:
            log.warning("leases not renewed: %s", exc)
            return
        for m in self.members:
            now = m.label in held
            if now == m.leased:
                continue
            m.leased = now
            log.info("backend %s: %s", m.label, "driven by this bridge" if now else "now driven by another bridge")
            if now:
                await m.client.start()
            else:
                await m.client.close_socket()
            for obs in self.observers:
                obs.lease_changed(m, now)

    # health -------------------------------------------------------------------------------------
    def _probe_tick(self) -> None:
        if self._round is None or self._round.done():
            self._round = asyncio.create_task(self.probe_all())

    async def probe_all(self) -> None:
        """One probe of every backend, concurrently."""
        await asyncio.gather(*(self.probe(m) for m in self.members))

    async def probe(self, m: Member) -> None:
        """Probe one backend (GET /queue) and move its health with hysteresis."""
        started = time.monotonic()
        try:
            await m.client.probe(timeout=max(1.0, min(5.0, self.config.probe_interval * 2)))
        except BackendError as exc:
            m.probe_failures += 1
            m.probe_successes = 0
            m.last_error = str(exc)
            first = m.healthy is None
            if m.healthy is not False and (first or m.probe_failures >= self.config.down_after):
                self._set(m, False, f"{m.probe_failures} failed probe(s): {exc}")
            return
        m.probe_latency_ms = (time.monotonic() - started) * 1000
        m.probe_successes += 1
        m.probe_failures = 0
        first = m.healthy is None
        if m.healthy is not True and (first or m.probe_successes >= self.config.up_after):
            self._set(m, True, f"{m.probe_successes} good probe(s)")

    def mark_down(self, m: Member, why: str) -> None:
        """A call to this backend failed at the transport level: stop sending it work until probes pass again."""
        m.probe_successes = 0
        if m.healthy:
            self._set(m, False, why)

    def _set(self, m: Member, healthy: bool, why: str) -> None:
        was = m.healthy
        m.healthy = healthy
        m.down_since = None if healthy else time.monotonic()
        if was is not None or not healthy:
            log.warning("backend %s: %s (%s)", m.label, "up" if healthy else "DOWN", why)
        self._changed(m)

    def _connection(self, m: Member, up: bool, why: str | None) -> None:
        if why is not None:
            m.last_error = why
        self._changed(m)

    def _changed(self, m: Member) -> None:
        if m.up and m.orphans and m.leased:
            self._spawn(self._stop_orphans(m))
        for obs in self.observers:
            obs.backend_changed(m)

    def set_draining(self, m: Member, draining: bool) -> None:
        """Drain (finish running jobs, take no new ones) or resume a backend."""
        m.draining = draining
        self._changed(m)

    # slots and statistics -------------------------------------------------------------------------
    def take_slot(self, m: Member, job_id: str) -> None:
        """A job of this bridge is being given to the backend."""
        m.running[job_id] = None

    def started(self, m: Member, job_id: str) -> None:
        """The job began running there (its run time counts from now)."""
        if job_id in m.running:
            m.running[job_id] = time.monotonic()

    def release_slot(self, m: Member, job_id: str) -> None:
        """The job left the backend (finished, re-queued, or no longer followed here)."""
        m.running.pop(job_id, None)

    def completed(self, m: Member, job_id: str) -> None:
        """A job completed there: count it and learn how long a job takes on this box."""
        m.jobs_done += 1
        began = m.running.get(job_id)
        if began is not None:
            took = time.monotonic() - began
            m.job_seconds = took if m.job_seconds is None else 0.7 * m.job_seconds + 0.3 * took

    def failed(self, m: Member, error: str | None = None) -> None:
        """An attempt failed there (the job's fault or the backend's); `error` is the backend's, if it was."""
        m.failures += 1
        if error is not None:
            m.last_error = error

    def orphan(self, m: Member, prompt_id: str) -> None:
        """A prompt of ours was given up while the backend was away: stop it there when it is back."""
        m.orphans.add(prompt_id)

    async def _stop_orphans(self, m: Member) -> None:
        """Prompts we gave up on while this backend was away must not run (or linger) there now."""
        orphans, m.orphans = list(m.orphans), set()
        try:
            await m.client.delete_queued(orphans)
            for prompt_id in orphans:
                await m.client.interrupt(prompt_id)
            await m.client.delete_history(orphans)
            log.info("backend %s: stopped %d abandoned prompt(s)", m.label, len(orphans))
        except BackendError:
            m.orphans.update(orphans)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
