"""The job engine: the bridge-owned queue, dispatch to free backends, outcomes, and per-client views."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Callable

from tornado.ioloop import PeriodicCallback

from .backend import Backend, BackendError, BackendRejected, BackendUnavailable
from .catalog import Catalog, InputError, Workflow
from .clientviews import ClientViews
from .config import Config
from .fairqueue import FairQueue
from .health import HealthMonitor
from .identity import client_tag
from .jobs import Job, State
from .runner import Requeue, Runner, error_text
from .store import GenerationCounter, Store

log = logging.getLogger(__name__)

class QueueFull(Exception):
    """The bridge's queue is at max_queue; the caller should retry later."""


class Scheduler(ClientViews):
    """Owns every job from submit to outcome; the only code that changes a job's state."""

    def __init__(self, config: Config, catalog: Catalog, store: Store, counter: GenerationCounter,
                 backends: list[Backend]) -> None:
        self.config = config
        self.catalog = catalog
        self.store = store
        self.counter = counter
        self.backends = backends
        self.queue = FairQueue()
        self.jobs: dict[str, Job] = {}
        self.clients: dict[str, list[Job]] = {}
        self.delivering: set[str] = set()
        self.listeners: list[Callable[[Job], None]] = []
        self.runner = Runner(config, store, self._announce, self._started)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._asset_digests: dict[tuple[str, float], str] = {}
        self._last_pick: dict[str, float] = {}
        self._recheck: asyncio.TimerHandle | None = None
        self._recheck_when = 0.0
        self.draining = False  # shutting down: no new job starts
        self.health = HealthMonitor(config, backends, self._backend_state)
        sweep = min(config.results_ttl, config.refetch_grace, config.upload_ttl) / 4
        self._sweeper = PeriodicCallback(self.expire_results, min(max(sweep, 0.05), 60.0) * 1000, jitter=0.1)
        for b in backends:
            b.on_state = self._backend_state

    # lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load what the store remembers, connect to every backend, start dispatching."""
        for job in self.store.unfetched_jobs():
            self._remember(job)
        resume: list[tuple[Job, Backend]] = []
        for job in self.store.unfinished_jobs():
            self._remember(job)
            backend = next((b for b in self.backends if b.label == job.backend), None)
            if job.state is not State.QUEUED and job.prompt_id and backend is not None:
                backend.running.add(job.id)  # its slot stays taken until we know what became of it
                resume.append((job, backend))
            else:
                job.state, job.backend, job.prompt_id, job.progress = State.QUEUED, None, None, 0.0
                self.store.save_job(job)
                self.queue.push(job)  # in their original order
        for b in self.backends:
            await b.start()
        for job, backend in resume:
            self._spawn(self._attempt(job, backend, resume=True))
        await self.health.start()
        self.expire_results()
        self._sweeper.start()
        self._pump()

    async def stop(self) -> None:
        """Stop following jobs and close backend connections (queued jobs stay in the store)."""
        await self.health.stop()
        self._sweeper.stop()
        if self._recheck is not None:
            self._recheck.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for b in self.backends:
            await b.stop()

    # submit -------------------------------------------------------------------------------------
    def submit(self, client_id: str, body: dict[str, Any], owner: str = "") -> Job:
        """Validate a caller's request, record it as `owner`'s and queue it. Raises InputError or QueueFull."""
        workflow = self.catalog.get(body.get("workflow"))
        if workflow is None:
            name = body.get("workflow")
            if name is None:
                raise InputError("'workflow' is required")
            raise InputError(f"unknown workflow {name!r} (see /workflow-list)")
        if not any(b.cfg.accepts(workflow.alias) for b in self.backends):
            raise InputError(f"no backend is configured to run workflow {workflow.alias!r}")
        values = workflow.validate(body, self.config.max_string_length)
        files = self._resolve_files(workflow, values)
        if len(self.queue) >= self.config.max_queue:
            raise QueueFull(f"the queue is full ({self.config.max_queue} jobs waiting); try again later")
        # clientIds cost nothing, so the line is shared fairly only if one identity cannot fill it alone
        if owner and sum(1 for j in self.queue if j.owner == owner) >= self.config.max_queue_per_identity:
            raise QueueFull(f"this caller already has {self.config.max_queue_per_identity} jobs waiting "
                            "(jobs.max_queue_per_identity); try again when some have started")
        job = Job(client_id=client_id, workflow=workflow.alias, inputs=values, prompt=workflow.build(values),
                  files=files, timeout=workflow.timeout, owner=owner)
        self.store.add_job(job)
        self._remember(job)
        self.queue.push(job)
        log.info("job %s: queued (workflow %s, client %s)", job.id, job.workflow, client_tag(client_id))
        self._announce(job)
        self._pump()
        return job

    def _resolve_files(self, workflow: Workflow, values: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Each file input -> the local file to send: a caller's upload, or an asset in workflows_dir."""
        out: dict[str, dict[str, Any]] = {}
        for key, name in workflow.file_inputs(values).items():
            row = self.store.upload(name) if isinstance(name, str) else None
            if row is not None:
                out[key] = {"name": name, "path": str(self.config.uploads_dir / name), "sha256": row["sha256"]}
                continue
            if key in values and values[key] != workflow.inputs[key].default:
                raise InputError(f"{key}: no uploaded file named {name!r} (upload it with POST /upload first)")
            # the workflow's own default: an asset beside the workflows if there is one, else the backend's file
            asset = self.catalog.root / name if isinstance(name, str) and "/" not in name else None
            if asset is not None and asset.is_file():
                out[key] = {"name": name, "path": str(asset), "sha256": self._asset_digest(asset)}
            else:
                out[key] = {"name": name, "path": None, "sha256": None}
        return out

    def _asset_digest(self, path: Path) -> str:
        key = (str(path), path.stat().st_mtime)
        if key not in self._asset_digests:
            self._asset_digests[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        return self._asset_digests[key]

    # dispatch -----------------------------------------------------------------------------------
    def _pump(self) -> None:
        """Give waiting jobs to backends with free slots (late binding: only now is a backend chosen)."""
        while len(self.queue) and not self.draining:
            free = [b for b in self.backends if b.available]
            if not free:
                return
            # most free capacity first, then weight, then the faster box; ties go to the least recently
            # used one, so work spreads
            free.sort(key=lambda b: (-b.free_slots / b.slots, -b.cfg.weight, b.job_seconds or 0.0,
                                     self._last_pick.get(b.url, 0.0)))
            for backend in free:
                job = self.queue.pop(lambda j, b=backend: b.cfg.accepts(j.workflow) and not self._faster_soon(b, j))
                if job is not None:
                    break
            else:
                return  # the waiting jobs are for backends that are busy or down, or a faster one frees soon
            self._last_pick[backend.url] = time.monotonic()
            backend.running.add(job.id)
            self._spawn(self._attempt(job, backend))

    def _faster_soon(self, backend: Backend, job: Job) -> bool:
        """True if a busy, faster backend will finish this job sooner than `backend` could (tail of a batch).

        Only the last few waiting jobs are held back this way; a timer re-checks when that backend
        should be free, so an overdue box never blocks the queue."""
        mine = backend.job_seconds
        if mine is None or len(self.queue) > len(self.backends):
            return False
        now = time.monotonic()
        better: list[float] = []
        for other in self.backends:
            speed = other.job_seconds
            if other is backend or speed is None or speed >= mine or not other.up or other.draining \
                    or not other.cfg.accepts(job.workflow):
                continue
            ends = [self.jobs[j].run_started + speed for j in other.running
                    if j in self.jobs and self.jobs[j].run_started is not None]
            free_at = min(ends) if len(ends) >= other.slots else now
            if free_at >= now and free_at + speed < now + mine:
                better.append(free_at)
        if len(better) < len(self.queue):
            return False
        if better:
            self._recheck_at(min(better) + 0.01)
        return bool(better)

    def _recheck_at(self, when: float) -> None:
        """One timer for the next re-check of held jobs (each hold would otherwise add a timer)."""
        if self._recheck is not None and not self._recheck.cancelled() and self._recheck_when <= when \
                and self._recheck_when > time.monotonic():
            return
        if self._recheck is not None:
            self._recheck.cancel()
        self._recheck_when = when
        self._recheck = asyncio.get_running_loop().call_later(max(0.0, when - time.monotonic()), self._pump)

    async def drain(self, timeout: float) -> int:
        """Start no new job; wait up to timeout for running ones to end. Returns how many still run."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while (running := sum(len(b.running) for b in self.backends)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return running

    def wake(self) -> None:
        """Something changed that may let waiting jobs run (a backend resumed)."""
        self._pump()

    def _spawn(self, coro: Any) -> None:
        """Run a background task that stop() will cancel and wait for."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _backend_state(self, backend: Backend) -> None:
        if backend.up:
            self._spawn(self._enrich_catalog(backend))
            if backend.orphans:
                self._spawn(self._stop_orphans(backend))
            self._pump()

    async def _stop_orphans(self, backend: Backend) -> None:
        """Prompts we gave up on while this backend was away must not run (or linger) there now."""
        orphans, backend.orphans = list(backend.orphans), set()
        try:
            await backend.delete_queued(orphans)
            for prompt_id in orphans:
                await backend.interrupt(prompt_id)
            await backend.delete_history(orphans)
            log.info("backend %s: stopped %d abandoned prompt(s)", backend.label, len(orphans))
        except BackendError:
            backend.orphans.update(orphans)

    async def _enrich_catalog(self, backend: Backend) -> None:
        """Learn input bounds and choices from a backend that answers (once per catalog version)."""
        wanted = self.catalog.classes() - set(backend.object_info or {})
        if backend.object_info is not None and not wanted:
            self.catalog.enrich(backend.object_info)
            return
        try:
            info = await backend.fetch_object_info(wanted)
        except BackendError as exc:
            log.warning("backend %s: /object_info unavailable: %s", backend.label, exc)
            return
        backend.object_info = {**(backend.object_info or {}), **info}
        self.catalog.enrich(backend.object_info)

    def refresh_catalog(self) -> None:
        """The catalog was reloaded: learn bounds for its inputs again."""
        up = next((b for b in self.backends if b.up), None)
        if up is not None:
            self._spawn(self._enrich_catalog(up))

    async def _attempt(self, job: Job, backend: Backend, resume: bool = False) -> None:
        """One attempt of a job on a backend (or the rest of one after a restart), ending in an outcome
        or a re-queue."""
        try:
            if resume:
                log.info("job %s: looking for its prompt on %s after the restart", job.id, backend.label)
                entry = await self.runner.resume(job, backend)
            else:
                job.state, job.backend, job.attempts = State.DISPATCHING, backend.label, job.attempts + 1
                job.progress = 0.0
                self.store.save_job(job)
                self._announce(job)
                if job.cancel_reason:
                    return self._finish(job, State.CANCELLED, job.cancel_reason)
                entry = await self.runner.run(job, backend)
            await self._conclude(job, backend, entry)
        except Requeue as exc:
            backend.failures += 1
            backend.last_error = str(exc)
            if backend.healthy:
                self.health.mark_down(backend, str(exc))
            if job.attempts >= self.config.max_attempts:
                self._finish(job, State.FAILED, f"backend unavailable: {exc}")
            else:
                log.warning("job %s: re-queued after backend %s failed: %s", job.id, backend.label, exc)
                job.state, job.backend, job.prompt_id, job.progress = State.QUEUED, None, None, 0.0
                self.store.save_job(job)
                self.queue.push(job, front=True)
                self._announce(job)
        except BackendRejected as exc:
            self._finish(job, State.FAILED, str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must fail the one job, never the bridge
            log.exception("job %s: unexpected error", job.id)
            self._finish(job, State.FAILED, f"internal error: {type(exc).__name__}")
        finally:
            backend.running.discard(job.id)
            self.runner.cancels.pop(job.id, None)
            if job.prompt_id and not job.state.active:
                backend.forget(job.prompt_id)
            self._pump()

    async def _conclude(self, job: Job, backend: Backend, entry: dict[str, Any]) -> None:
        if job.cancel_reason:
            state = State.FAILED if job.cancel_reason.startswith("time out") else State.CANCELLED
            return self._finish(job, state, job.cancel_reason)
        outcome, message = error_text(entry) if entry else ("error", "the backend did not report an outcome")
        if outcome != "success":
            backend.failures += 1
            return self._finish(job, State.FAILED, message)
        try:
            job.outputs = await self.runner.collect(job, backend, entry)
        except BackendUnavailable as exc:
            raise Requeue(f"outputs could not be fetched: {exc}") from None
        backend.jobs_done += 1
        self._finish(job, State.COMPLETED, None)

    def _started(self, job: Job) -> None:
        job.state, job.started_at = State.RUNNING, job.started_at or time.time()
        job.run_started = time.monotonic()
        if not job.counted:
            job.counted = True
            self.counter.increment()
        self.store.save_job(job)
        log.info("job %s: running on %s (attempt %d)", job.id, job.backend, job.attempts)
        self._announce(job)

    def _finish(self, job: Job, state: State, error: str | None) -> None:
        job.state, job.error, job.finished_at = state, error, time.time()
        if state is State.COMPLETED:
            job.progress = 1.0
            backend = next((b for b in self.backends if b.label == job.backend), None)
            if backend is not None and job.run_started is not None:
                took = time.monotonic() - job.run_started
                backend.job_seconds = took if backend.job_seconds is None else 0.7 * backend.job_seconds + 0.3 * took
            self.store.complete_job(job)
        else:
            self.store.save_job(job)
        took = job.finished_at - (job.started_at or job.created_at)
        log.info("job %s: %s after %.2fs on %s%s", job.id, state.value, took, job.backend or "-",
                 f": {error}" if error else "")
        self._announce(job)
        if not job.outputs:
            self._forget(job)  # nothing to hand over: the store answers for it from now on

    # cancel -------------------------------------------------------------------------------------
    def cancel_client(self, client_id: str, reason: str) -> int:
        """Cancel every waiting or running job of a client; returns how many."""
        count = 0
        for job in self.client_jobs(client_id):
            if not job.state.active or job.cancel_reason:
                continue
            count += 1
            job.cancel_reason = reason
            if job.state is State.QUEUED and self.queue.remove(job):
                self._finish(job, State.CANCELLED, reason)
            else:
                self.runner.cancels.setdefault(job.id, asyncio.Event()).set()
        return count

    def _announce(self, job: Job) -> None:
        for listener in self.listeners:
            try:
                listener(job)
            except Exception:
                log.exception("listener failed for job %s", job.id)
