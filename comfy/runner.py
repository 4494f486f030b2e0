"""Running one job on one ComfyUI server: send its files, post it, follow it, collect its outputs."""
from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from .backend import Backend, BackendRejected, BackendUnavailable
from .wire import commit_file
from .config import Config
from .jobs import Job, Output
from .protocol import file_entries, outcome
from .store import Store

log = logging.getLogger(__name__)

error_text = outcome  # the name the scheduler imports


class Requeue(Exception):
    """The backend could not take or finish the job through no fault of the job: run it elsewhere."""


class Progress:
    """Overall progress of one prompt: nodes done plus the current node's fraction, never going back."""

    def __init__(self, graph: dict[str, Any]) -> None:
        self.total = max(1, len(graph))
        self.done: set[str] = set()
        self.current: str | None = None
        self.fraction = 0.0
        self.value = 0.0

    def feed(self, kind: str, data: dict[str, Any]) -> bool:
        """Take one WebSocket message; True when the overall value moved."""
        if kind == "execution_cached":
            self.done.update(str(n) for n in data.get("nodes") or [])
        elif kind == "executing" and data.get("node") is not None:
            if self.current is not None:
                self.done.add(self.current)
            self.current, self.fraction = str(data["node"]), 0.0
        elif kind == "progress":
            node = str(data.get("node")) if data.get("node") is not None else self.current
            if node != self.current:
                if self.current is not None:
                    self.done.add(self.current)
                self.current = node
            try:
                self.fraction = max(0.0, min(1.0, float(data["value"]) / float(data["max"])))
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                return False
        elif kind == "executed" and data.get("node") is not None:
            self.done.add(str(data["node"]))
        else:
            return False
        partial = self.fraction if self.current is not None and self.current not in self.done else 0.0
        value = min(0.99, (len(self.done) + partial) / self.total)
        if value > self.value:
            self.value = value
            return True
        return False


class _Watch:
    """What the backend's WebSocket tells about one prompt: progress, the end signal, reconnects."""

    def __init__(self, job: Job, graph: dict[str, Any], announce: Callable[[Job], None]) -> None:
        self.job = job
        self.announce = announce
        self.progress = Progress(graph)
        self.done = asyncio.Event()
        self.poke = asyncio.Event()
        self.reconnected = False
        self.heard = time.monotonic()  # last message about this prompt: silence past a while means "poll"

    def on_message(self, msg: dict[str, Any]) -> None:
        """One message about our prompt (or the connection's own bridge_* notices)."""
        kind, data = msg.get("type"), msg.get("data") or {}
        self.heard = time.monotonic()
        if kind in ("bridge_reconnected", "bridge_disconnected"):
            self.reconnected = self.reconnected or kind == "bridge_reconnected"
            self.poke.set()
        elif kind == "executing" and data.get("node") is None:
            self.done.set()
        elif isinstance(kind, str) and self.progress.feed(kind, data):
            self.job.progress = self.progress.value
            self.announce(self.job)


class Runner:
    """Carries a job through one attempt on one backend."""

    def __init__(self, config: Config, store: Store, announce: Callable[[Job], None],
                 started: Callable[[Job], None]) -> None:
        self.config = config
        self.store = store
        self.announce = announce
        self.started = started
        self.cancels: dict[str, asyncio.Event] = {}
        # (backend url, sha256) -> the name that file has in that backend's input folder
        self.remote_files: dict[tuple[str, str], str] = {}

    async def run(self, job: Job, backend: Backend) -> dict[str, Any]:
        """Run the job; returns the history entry of the finished prompt. Raises Requeue or BackendError."""
        graph = await self._send_files(job, backend)
        prompt_id = str(uuid.uuid4())
        job.prompt_id = prompt_id
        self.store.save_job(job)  # before posting: a restart can then find the prompt on the backend
        watch = _Watch(job, graph, self.announce)
        backend.watch(prompt_id, watch.on_message)
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
            self.started(job)
            return await self._follow_or_orphan(job, backend, watch, time.monotonic() + job.timeout)
        finally:
            backend.unwatch(prompt_id)

    async def resume(self, job: Job, backend: Backend) -> dict[str, Any]:
        """Pick up a job that was running when the bridge stopped: collect it, re-attach to it, or re-queue."""
        prompt_id = job.prompt_id
        assert prompt_id is not None
        watch = _Watch(job, job.prompt, self.announce)
        backend.watch(prompt_id, watch.on_message)
        try:
            waited = 0.0
            while not backend.up:
                if waited >= self.config.failover_grace:
                    raise Requeue(f"backend {backend.label} did not come back after the restart")
                await asyncio.sleep(0.05)
                waited += 0.05
            try:
                entry = await self._still_known(job, backend)
            except BackendUnavailable as exc:
                raise Requeue(str(exc)) from None
            watch.reconnected = False  # this connection was just checked
            if entry is not None:
                log.info("job %s: finished on %s while the bridge was away; collecting it", job.id, backend.label)
                return entry
            ran = time.time() - (job.started_at or time.time())
            return await self._follow_or_orphan(job, backend, watch, time.monotonic() + job.timeout - ran)
        finally:
            backend.unwatch(prompt_id)

    async def _follow_or_orphan(self, job: Job, backend: Backend, watch: _Watch, deadline: float) -> dict[str, Any]:
        try:
            return await self._follow(job, backend, watch, deadline)
        except Requeue:
            assert job.prompt_id is not None
            backend.orphans.add(job.prompt_id)  # stop it there if that server comes back
            raise

    async def _follow(self, job: Job, backend: Backend, watch: _Watch, deadline: float) -> dict[str, Any]:
        """Wait for the end signal; after a silence, ask the backend where the prompt is (so a lost message
        never leaves a job hanging) and re-open a socket that stopped delivering; enforce timeout, cancels
        and failover."""
        assert job.prompt_id is not None
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
            if backend.healthy is False:
                down_for = now - (backend.down_since or now)
                if down_for >= grace:
                    raise Requeue(f"backend {backend.label} down for {down_for:.1f}s")
                wait = min(wait, grace - down_for)
            waiters = [asyncio.ensure_future(e.wait()) for e in (done, poke, cancel)]
            await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
            poke.clear()
            if cancel.is_set() or backend.healthy is False:
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
                log.warning("job %s: backend %s unavailable while running: %s", job.id, backend.label, exc)

    async def _still_known(self, job: Job, backend: Backend) -> dict[str, Any] | None:
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
        queue = await backend.queue()
        if job.prompt_id in queue["queue_running"] or job.prompt_id in queue["queue_pending"]:
            log.info("job %s: re-attached to its prompt on %s", job.id, backend.label)
            return None
        # checked after the queue: ComfyUI moves a prompt from the queue to history atomically
        entry = await backend.history(job.prompt_id)
        if entry is not None:
            return entry
        raise Requeue(f"backend {backend.label} no longer knows the prompt (restarted?)")

    async def _stop(self, job: Job, backend: Backend, done: asyncio.Event) -> dict[str, Any]:
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
    async def _cancel_job(backend: Backend, prompt_id: str) -> bool:
        """The jobs API's atomic cancel; False if the server refused the call (then the old calls are used)."""
        try:
            await backend.cancel_job(prompt_id)
            return True
        except BackendRejected as exc:
            log.warning("backend %s: jobs cancel refused, interrupting instead: %s", backend.label, exc)
            return False

    async def _history(self, backend: Backend, prompt_id: str, patient: bool) -> dict[str, Any] | None:
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

    async def _send_files(self, job: Job, backend: Backend) -> dict[str, Any]:
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

    def forget_files(self, backend: Backend) -> None:
        """Assume this backend has none of the files sent to it before."""
        for key in [k for k in self.remote_files if k[0] == backend.url]:
            del self.remote_files[key]

    async def collect(self, job: Job, backend: Backend, entry: dict[str, Any]) -> list[Output]:
        """Download every output of the finished prompt into the result store."""
        outputs: list[Output] = []
        folder = self.config.results_dir
        folder.mkdir(parents=True, exist_ok=True)
        for node_id, node_out in (entry.get("outputs") or {}).items():
            if not isinstance(node_out, dict):
                continue
            for item in file_entries(node_out):
                name = _safe_name(str(item["filename"]))
                dest = folder / f"{job.id}-{len(outputs)}{Path(name).suffix}"
                size, ctype = await backend.download(item, dest)
                outputs.append(Output(str(node_id), name, ctype, dest.name, size))
            for i, text in enumerate(node_out.get("text") or []):
                dest = folder / f"{job.id}-{len(outputs)}.txt"
                data = str(text).encode("utf-8")
                _write_file(dest, data)
                outputs.append(Output(str(node_id), f"node{node_id}_text{i}.txt", "text/plain", dest.name,
                                      len(data)))
        return outputs


def _safe_name(name: str) -> str:
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9._ ()-]", "_", name).strip(" .")
    return name[:120] or "output"


def _write_file(dest: Path, data: bytes) -> None:
    tmp = dest.with_name(dest.name + ".part")
    fh = open(tmp, "wb")
    fh.write(data)
    commit_file(fh, tmp, dest)
