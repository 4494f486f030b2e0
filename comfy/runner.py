"""Running one job on one ComfyUI server: send its files, post it, follow it, collect its outputs."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from .comfyclient import BackendRejected, BackendUnavailable, ComfyClient
from .config import Config
from .jobs import Job, Output, State
from .jobstore import JobStore
from .fetches import OutputFetches
from .pool import BackendPool, Member
from .protocol import Message, Progress

log = logging.getLogger(__name__)


class Requeue(Exception):
    """The backend could not take or finish the job through no fault of the job: run it elsewhere."""

    def __init__(self, reason: str, orphan: str | None = None) -> None:
        super().__init__(reason)
        self.orphan = orphan  # a prompt of ours left on the backend, to stop there when it is back


class Gone(Exception):
    """The job changed under us (another bridge took it over): stop following it, change nothing."""


class _Watch:
    """What the backend's WebSocket tells about one prompt: progress, the end signal, reconnects."""

    def __init__(self, job: Job, graph: dict[str, Any], store: JobStore, fetches: OutputFetches) -> None:
        self.job = job
        self.store = store
        self.fetches = fetches
        self.progress = Progress(graph)
        self.done = asyncio.Event()
        self.poke = asyncio.Event()
        self.reconnected = False
        self.heard = time.monotonic()  # last message about this prompt: silence past a while means "poll"
        self._reporting: asyncio.Task[None] | None = None

    def on_message(self, msg: Message) -> None:
        """One message about our prompt."""
        self.heard = time.monotonic()
        if msg.ends_prompt:
            self.done.set()
            return
        if msg.kind == "executed":  # its files exist now: fetch them while ComfyUI finishes the prompt
            self.fetches.executed(str(msg.data.get("node")), msg.data.get("output"))
        if self.progress.feed(msg.kind, msg.data):
            self.job.progress = self.progress.value
            if self._reporting is None or self._reporting.done():
                self._reporting = asyncio.ensure_future(self._report())

    async def _report(self) -> None:
        """Publish progress; steps that arrive meanwhile go out as one (the latest value) after it."""
        sent = -1.0
        while self.job.progress != sent and self.job.state is State.RUNNING:
            sent = self.job.progress
            try:
                await self.store.progress(self.job, sent)
            except Exception as exc:  # a progress step is not worth a job: the next one may go through
                log.warning("job %s: progress not published: %s", self.job.id, exc)
                return

    def on_connection(self, up: bool) -> None:
        """The backend's socket opened or closed: a message about our prompt may have been lost."""
        self.heard = time.monotonic()
        self.reconnected = self.reconnected or up
        self.poke.set()


class Runner:
    """Carries a job through one attempt on one backend; the job is this bridge's working copy."""

    def __init__(self, config: Config, store: JobStore, pool: BackendPool) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        self.cancels: dict[str, asyncio.Event] = {}
        # (backend url, sha256) -> the name that file has in that backend's input folder
        self.remote_files: dict[tuple[str, str], str] = {}
        self.fetches: dict[str, OutputFetches] = {}  # job id -> its outputs being fetched in this attempt

    def cancel(self, job: Job, reason: str) -> None:
        """Stop this running job (a cancel request reached the bridge that runs it)."""
        job.cancel_reason = job.cancel_reason or reason
        self.cancels.setdefault(job.id, asyncio.Event()).set()

    async def run(self, job: Job, m: Member) -> dict[str, Any]:
        """Run the job; returns the history entry of the finished prompt. Raises Requeue, Gone or BackendError."""
        backend = m.client
        graph = await self._send_files(job, backend)
        prompt_id = str(uuid.uuid4())
        # saved before posting: whoever recovers the job (a restart, another bridge) can find the prompt
        stored = await self.store.update(job.id, [State.DISPATCHING], prompt_id=prompt_id)
        if stored is None:
            raise Gone("it changed before it was posted")
        job.prompt_id = prompt_id
        if stored.cancel_reason:  # cancelled while its files went out: it never starts
            job.cancel_reason = job.cancel_reason or stored.cancel_reason
            return {}
        watch = _Watch(job, graph, self.store, self._fetches(job, backend))
        backend.watch(prompt_id, watch)
        try:
            try:
                try:
                    await backend.post_prompt(graph, prompt_id)
                except BackendRejected as exc:
                    if not (job.files and "Invalid image file" in str(exc)):
                        raise
                    # the server lost files we sent it before (a wiped input folder): send them again
                    self.forget_files(backend)
                    await backend.post_prompt(await self._send_files(job, backend), prompt_id)
            except BackendUnavailable as exc:
                raise Requeue(str(exc)) from None
            running = await self.store.transition(job.id, [State.DISPATCHING], State.RUNNING)
            if running is None:
                raise Gone("it changed while it was posted")
            job.state, job.started_at, job.counted = State.RUNNING, running.started_at, True
            self.pool.started(m, job.id)
            log.info("job %s: running on %s (attempt %d)", job.id, m.label, job.attempts)
            return await self._follow_or_orphan(job, m, watch, time.monotonic() + job.timeout)
        finally:
            backend.unwatch(prompt_id)

    async def resume(self, job: Job, m: Member) -> dict[str, Any]:
        """Pick up a job whose bridge stopped (or lost the backend) while it ran: collect it, re-attach to it,
        or re-queue it."""
        prompt_id = job.prompt_id
        assert prompt_id is not None
        backend = m.client
        watch = _Watch(job, job.prompt, self.store, self._fetches(job, backend))
        backend.watch(prompt_id, watch)
        try:
            waited = 0.0
            while not m.up:
                if waited >= self.config.failover_grace:
                    raise Requeue(f"backend {m.label} did not come back after the restart")
                await asyncio.sleep(0.05)
                waited += 0.05
            try:
                entry = await self._still_known(job, backend)
            except BackendUnavailable as exc:
                raise Requeue(str(exc)) from None
            watch.reconnected = False  # this connection was just checked
            if entry is not None:
                log.info("job %s: finished on %s while the bridge was away; collecting it", job.id, m.label)
                return entry
            if job.state is State.DISPATCHING:  # posted, and running there now: say so
                running = await self.store.transition(job.id, [State.DISPATCHING], State.RUNNING)
                if running is None:
                    raise Gone("it changed while it was recovered")
                job.state, job.started_at, job.counted = State.RUNNING, running.started_at, True
            self.pool.started(m, job.id)
            ran = time.time() - (job.started_at or time.time())
            return await self._follow_or_orphan(job, m, watch, time.monotonic() + job.timeout - ran)
        finally:
            backend.unwatch(prompt_id)

    async def _follow_or_orphan(self, job: Job, m: Member, watch: _Watch, deadline: float) -> dict[str, Any]:
        try:
            return await self._follow(job, m, watch, deadline)
        except Requeue as exc:
            raise Requeue(str(exc), orphan=job.prompt_id) from None  # stop it there if that server comes back

    async def _follow(self, job: Job, m: Member, watch: _Watch, deadline: float) -> dict[str, Any]:
        """Wait for the end signal; after a silence, ask the backend where the prompt is (so a lost message
        never leaves a job hanging) and re-open a socket that stopped delivering; enforce timeout, cancels
        and failover."""
        assert job.prompt_id is not None
        backend = m.client
        done, poke = watch.done, watch.poke
        cancel = self.cancels.setdefault(job.id, asyncio.Event())
        poll = self.config.history_poll_interval
        grace = self.config.failover_grace
        while True:
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                job.cancel_reason = f"time out error: exceed {job.timeout:g}s"
                return await self._stop(job, backend, done)
            if cancel.is_set():
                return await self._stop(job, backend, done)
            wait = min(max(0.0, watch.heard + poll - now), remaining)
            if m.healthy is False:
                down_for = now - (m.down_since or now)
                if down_for >= grace:
                    raise Requeue(f"backend {m.label} down for {down_for:.1f}s")
                wait = min(wait, grace - down_for)
            waiters = [asyncio.ensure_future(e.wait()) for e in (done, poke, cancel)]
            await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
            poke.clear()
            if cancel.is_set() or m.healthy is False:
                continue
            silent = time.monotonic() - watch.heard >= poll
            if not (done.is_set() or silent or watch.reconnected):
                continue
            try:
                entry = await self._history(backend, job.prompt_id, patient=done.is_set())
                mute = time.monotonic() - backend.last_frame >= poll
                if entry is not None:
                    if not done.is_set() and mute:
                        backend.reconnect("the end of a prompt never arrived over it", poll, certain=True)
                    return entry
                if watch.reconnected and not done.is_set():
                    watch.reconnected = False
                    entry = await self._still_known(job, backend)
                    if entry is not None:
                        return entry
                if silent:
                    watch.heard = time.monotonic()  # the next poll after another silent interval
                    if time.monotonic() - backend.last_frame >= 3 * poll:
                        backend.reconnect(f"silent for {time.monotonic() - backend.last_frame:.1f}s "
                                          "while our prompt is there", 3 * poll)
            except BackendUnavailable as exc:
                log.warning("job %s: backend %s unavailable while running: %s", job.id, m.label, exc)

    async def _still_known(self, job: Job, backend: ComfyClient) -> dict[str, Any] | None:
        """After a reconnect: is our prompt still queued or running there? A restarted ComfyUI forgets it."""
        assert job.prompt_id is not None
        if backend.caps.jobs_api:  # a definite answer: 404 means the server does not know the prompt
            found = await backend.status(job.prompt_id)
            if found.finished:
                return found.entry
            if not found.known:
                raise Requeue(f"backend {backend.label} no longer knows the prompt (restarted?)")
            if found.state in ("pending", "in_progress"):
                log.info("job %s: re-attached to its prompt on %s", job.id, backend.label)
                return None
        if job.prompt_id in await backend.queue():
            log.info("job %s: re-attached to its prompt on %s", job.id, backend.label)
            return None
        # checked after the queue: ComfyUI moves a prompt from the queue to history atomically
        entry = await backend.history(job.prompt_id)
        if entry is not None:
            return entry
        raise Requeue(f"backend {backend.label} no longer knows the prompt (restarted?)")

    async def _stop(self, job: Job, backend: ComfyClient, done: asyncio.Event) -> dict[str, Any]:
        """Stop our prompt on the backend (never anyone else's) and wait, bounded, for it to end."""
        assert job.prompt_id is not None
        try:
            if not (backend.caps.job_cancel and await self._cancel_job(backend, job.prompt_id)):
                await backend.delete_queued([job.prompt_id])
                await backend.interrupt(job.prompt_id)
        except BackendUnavailable as exc:
            log.warning("job %s: could not interrupt on %s: %s", job.id, backend.label, exc)
            return {}
        try:
            await asyncio.wait_for(done.wait(), self.config.interrupt_wait)
        except asyncio.TimeoutError:
            log.warning("job %s: backend %s did not confirm the interrupt", job.id, backend.label)
        try:
            return await self._history(backend, job.prompt_id, patient=True) or {}
        except BackendUnavailable:
            return {}

    @staticmethod
    async def _cancel_job(backend: ComfyClient, prompt_id: str) -> bool:
        """The jobs API's atomic cancel; False if the server refused the call (then the old calls are used)."""
        try:
            await backend.cancel_job(prompt_id)
            return True
        except BackendRejected as exc:
            log.warning("backend %s: jobs cancel refused, interrupting instead: %s", backend.label, exc)
            return False

    async def _history(self, backend: ComfyClient, prompt_id: str, patient: bool) -> dict[str, Any] | None:
        """The finished prompt's history entry; when the end signal came, wait briefly for ComfyUI to write it."""
        delay = 0.005
        for _ in range(12 if patient else 1):
            found = await backend.status(prompt_id)
            if found.finished:
                return found.entry
            if not patient:
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
        return None

    async def _send_files(self, job: Job, backend: ComfyClient) -> dict[str, Any]:
        """Copy the job's input files to this backend (once per content) and name them in the graph."""
        graph = job.prompt
        if not job.files:
            return graph
        graph = {nid: {**node, "inputs": dict(node["inputs"])} for nid, node in graph.items()}
        for key, ref in job.files.items():
            if not ref.get("path"):
                continue  # the workflow's own default, expected to be on the backend already
            digest = ref["sha256"]
            remote = self.remote_files.get((backend.url, digest))
            if remote is None:
                try:
                    remote = await backend.upload(Path(ref["path"]), ref["name"])
                except BackendUnavailable as exc:
                    raise Requeue(str(exc)) from None
                self.remote_files[(backend.url, digest)] = remote
            node_id, input_name = key.split("/", 1)
            graph[node_id]["inputs"][input_name] = remote
        return graph

    def forget_files(self, backend: ComfyClient) -> None:
        """Assume this backend has none of the files sent to it before."""
        for key in [k for k in self.remote_files if k[0] == backend.url]:
            del self.remote_files[key]

    def _fetches(self, job: Job, backend: ComfyClient) -> OutputFetches:
        self.end(job.id)
        fetches = self.fetches[job.id] = OutputFetches(job.id, backend, self.config.results_dir, self.store.durable)
        return fetches

    async def collect(self, job: Job, backend: ComfyClient, entry: dict[str, Any]) -> list[Output]:
        """Every output of the finished prompt in the result store, each with its type and what is known of it
        (ComfyUI's numbers, the file's headers, a text inline): those fetched since ComfyUI named them, the
        rest now."""
        fetches = self.fetches.pop(job.id, None)
        if fetches is None or fetches.backend is not backend:
            fetches = OutputFetches(job.id, backend, self.config.results_dir, self.store.durable)
        return await fetches.collect(entry)

    def end(self, job_id: str) -> None:
        """The attempt is over: files fetched for it that no outcome took are deleted."""
        fetches = self.fetches.pop(job_id, None)
        if fetches is not None:
            fetches.discard()
