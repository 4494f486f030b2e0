"""The job service: what the HTTP edge and the caller hub may ask of jobs (submit, status, take, log, cancel)."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tornado.ioloop import PeriodicCallback

from .catalog import Catalog, InputError, Workflow
from .comfyclient import BackendError
from .config import Config
from .identity import client_tag
from .jobs import Job, State
from .jobstore import FREE, JobStore, QueueFull  # noqa: F401  (QueueFull: raised by enqueue)
from .pool import BackendPool
from .webhook_config import callback_of

__all__ = ["JobService", "Submitted", "InputError", "QueueFull", "QuotaExceeded", "NoBackend"]

log = logging.getLogger(__name__)

TAKE_HOLD = 600.0  # seconds results stay reserved for an answer that neither finishes nor fails (a dead bridge)


class QuotaExceeded(Exception):
    """The caller stores as many bytes as its quota allows; it should take results first."""


class NoBackend(Exception):
    """No backend could do what was asked (all down, or none answered)."""


@dataclass(frozen=True)
class Submitted:
    """A queued job and where it stands in the line."""

    job: Job
    waiting: int
    position: int | None


class JobService:
    """Jobs as callers see them, on top of the store; the one place a submit is validated."""

    def __init__(self, config: Config, catalog: Catalog, store: JobStore, pool: BackendPool) -> None:
        self.config = config
        self.catalog = catalog
        self.store = store
        self.pool = pool
        self._asset_digests: dict[tuple[str, float], str] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        sweep = min(config.results_ttl, config.refetch_grace, config.upload_ttl) / 4
        self._sweeper = PeriodicCallback(self._sweep, min(max(sweep, 0.05), 60.0) * 1000, jitter=0.1)
        self._sweeping: asyncio.Task[int] | None = None

    async def start(self) -> None:
        """Sweep expired results and uploads now and periodically."""
        await self.expire()
        self._sweeper.start()

    async def stop(self) -> None:
        """Stop sweeping; wait for file deletions in flight."""
        self._sweeper.stop()
        pending = [*self._tasks, *([self._sweeping] if self._sweeping else [])]
        await asyncio.gather(*pending, return_exceptions=True)

    # submit -------------------------------------------------------------------------------------
    async def submit(self, client_id: str, body: dict[str, Any], owner: str, own_uploads: bool,
                     placed: bool = True) -> Submitted:
        """Validate a caller's request and queue it as `owner`'s. Raises InputError, QuotaExceeded, QueueFull.
        With own_uploads, a file input may only name one of the owner's uploads. The body's `webhook` key (a
        callback URL, or {"url", "events"}) is no input: it names the job's own webhook receiver. `placed`:
        also say how long the line is and where the job stands (the spec's answer; a waiting submit does not
        ask, sparing two reads of the store)."""
        callback = None
        if "webhook" in body:
            try:
                callback = callback_of(body["webhook"], self.config.webhook_allow_hosts)
            except ValueError as exc:
                raise InputError(str(exc)) from None
            body = {k: v for k, v in body.items() if k != "webhook"}
        workflow = self.catalog.get(body.get("workflow"))
        if workflow is None:
            name = body.get("workflow")
            if name is None:
                raise InputError("'workflow' is required")
            raise InputError(f"unknown workflow {name!r} (see /workflow-list)")
        if not any(b.accepts(workflow.alias) for b in self.config.backends):
            raise InputError(f"no backend is configured to run workflow {workflow.alias!r}")
        await self._check_file_inputs(workflow, body, owner if own_uploads else None)
        used, quota = await self.store.usage(owner), self.config.quota_bytes
        if used >= quota:
            raise QuotaExceeded(f"this caller stores {used} bytes of uploads and untaken results, its quota "
                                f"is {quota}; take results (GET /history?clientId=…) before submitting more")
        values = workflow.validate(body, self.config.max_string_length)
        files = await self._resolve_files(workflow, values)
        job = Job(client_id=client_id, workflow=workflow.alias, inputs=values, prompt=workflow.build(values),
                  files=files, timeout=workflow.timeout, owner=owner, webhook=callback)
        job = await self.store.enqueue(job, self.config.max_queue, self.config.max_queue_per_identity)
        log.info("job %s: queued (workflow %s, client %s)", job.id, job.workflow, client_tag(client_id))
        if not placed:
            return Submitted(job, 0, None)
        waiting = await self.store.queue_length()
        # alone in the line it is first: no second question
        return Submitted(job, waiting, 1 if waiting == 1 else await self.store.position(job.id))

    async def _check_file_inputs(self, workflow: Workflow, body: dict[str, Any], owner: str | None) -> None:
        """A file input names a saved upload (the owner's, when given) or keeps its default; never another
        file of the bridge's."""
        for key, value in body.items():
            spec = workflow.inputs.get(key)
            if spec is None or not spec.upload or not isinstance(value, str) or value == spec.default:
                continue
            if await self.store.upload(value, owner) is None:
                raise InputError(f"{key}: no uploaded file named {value!r} (upload it with POST /upload first)")

    async def _resolve_files(self, workflow: Workflow, values: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Each file input -> the local file to send: a caller's upload, or an asset in workflows_dir."""
        out: dict[str, dict[str, Any]] = {}
        for key, name in workflow.file_inputs(values).items():
            row = await self.store.upload(name) if isinstance(name, str) else None
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

    # reading ------------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """False while the store's database cannot be reached."""
        return self.store.available

    async def known_client(self, client_id: str) -> bool:
        """True if this clientId ever submitted a job."""
        return await self.store.known_client(client_id)

    async def status_job(self, client_id: str) -> Job | None:
        """The job whose state the client sees: its latest active job, else its latest job (a record of its state,
        see JobStore.status_job)."""
        return await self.store.status_job(client_id)

    async def client_active(self, client_id: str) -> bool:
        """True while the client has a job waiting or running."""
        job = await self.store.status_job(client_id)
        return job is not None and job.state.active

    async def position(self, job_id: str) -> int | None:
        """1-based place of a waiting job in the line; None when it does not wait."""
        return await self.store.position(job_id)

    async def positions(self) -> dict[str, int]:
        """Every waiting job's place."""
        return await self.store.positions()

    async def queue_length(self) -> int:
        """Jobs waiting."""
        return await self.store.queue_length()

    async def find_job(self, job_id: str) -> Job | None:
        """One job by id, with the outputs still on record."""
        return await self.store.job(job_id)

    async def generation_count(self) -> int:
        """The persistent count of jobs that ran."""
        return await self.store.generation_count()

    async def log_page(self, limit: int, offset: int, owner: str | None) -> tuple[list[dict[str, Any]], int]:
        """One page of the generation log, newest first, and its total."""
        return await self.store.log_page(limit, offset, owner)

    # taking results -----------------------------------------------------------------------------
    async def claim_results(self, client_id: str) -> list[Job] | None:
        """The client's untaken results reserved for one answer ([] if none); None while another answer
        holds them. release_results() or taken() ends the claim."""
        return await self.store.claim_results(client_id, TAKE_HOLD)

    async def release_results(self, jobs: list[Job]) -> None:
        """An answer did not go out whole: its results can be taken again."""
        await self.store.release_results([j.id for j in jobs])

    async def taken(self, jobs: list[Job]) -> None:
        """The caller received these results: their files stay for refetch_grace (?redeliver=1)."""
        self._delete_results(await self.store.mark_fetched([j.id for j in jobs]))

    async def taken_results(self, client_id: str) -> list[Job]:
        """Results of the client taken within refetch_grace, for a client whose download broke off."""
        return await self.store.taken_jobs(client_id, time.time() - self.config.refetch_grace)

    # steering -----------------------------------------------------------------------------------
    async def cancel_client(self, client_id: str, reason: str) -> int:
        """Cancel every waiting or running job of a client, wherever it runs; returns how many."""
        ids = [j.id for j in await self.store.client_jobs(client_id) if j.state.active and not j.cancel_reason]
        return len(await self.store.request_cancel(ids, reason)) if ids else 0

    async def cancel_jobs(self, job_ids: list[str], reason: str) -> int:
        """Cancel these jobs if they still wait or run, wherever they run; returns how many."""
        return len(await self.store.request_cancel(job_ids, reason)) if job_ids else 0

    async def drop(self, job: Job, reason: str) -> Job:
        """DELETE /jobs/{id}: cancel a waiting or running job wherever it runs (as /interrupt does for a
        client), or discard the untaken results of a completed one at once (files deleted, no longer counted
        against the quota, gone from /history; the store forgets them as it does expired ones). Results
        already taken stay for their refetch grace. Returns the job as it stands afterwards."""
        if job.state.active and not job.cancel_reason:
            await self.store.request_cancel([job.id], reason)
        elif job.state is State.COMPLETED and not job.fetched:
            self._delete_results(await self.store.mark_fetched([job.id], expired=True))
            log.info("job %s: results discarded by a DELETE", job.id)
        return await self.store.job(job.id) or job

    async def attach(self, client_id: str, delta: int) -> None:
        """This bridge opened (+1) or closed (-1) the client's last socket."""
        await self.store.attach(client_id, delta)

    async def attached(self, client_id: str) -> bool:
        """True if any bridge holds a socket of the client."""
        return await self.store.attached(client_id)

    async def free(self, client_id: str | None) -> tuple[str, int]:
        """Free the memory of the backend the client's latest job went to, or of every backend that is up.
        Returns (what was freed, how many). Raises NoBackend, or InputError for a client with no backend yet."""
        if client_id is None:
            members = [m for m in self.pool.members if m.up]
        else:
            label = await self.store.latest_backend(client_id)
            member = self.pool.member(label)
            if member is None:
                raise InputError("no backend has been assigned to that client yet")
            members = [member]
        if not members:
            raise NoBackend("no backend is reachable right now")
        here = [m for m in members if m.leased]
        for m in members:
            if not m.leased:  # driven by another bridge: it does the call
                await self.store.command(FREE, m.label)
        results = await asyncio.gather(*(m.client.free() for m in here), return_exceptions=True)
        failed = [m.label for m, r in zip(here, results) if isinstance(r, BackendError)]
        if here and len(failed) == len(members):
            raise NoBackend(f"the backend did not answer: {', '.join(failed)}")
        return ("ALL" if client_id is None else members[0].label), len(members) - len(failed)

    # uploads and quota --------------------------------------------------------------------------
    async def usage(self, owner: str) -> int:
        """Bytes an owner stores: uploads plus untaken results."""
        return await self.store.usage(owner)

    async def add_upload(self, name: str, sha256: str, size: int, content_type: str, original: str,
                         owner: str) -> None:
        """Record a stored upload as the owner's."""
        await self.store.add_upload(name, sha256, size, content_type, original, owner)

    # retention ----------------------------------------------------------------------------------
    def _sweep(self) -> None:
        if self._sweeping is None or self._sweeping.done():
            self._sweeping = asyncio.create_task(self.expire())

    async def expire(self, now: float | None = None) -> int:
        """Delete results nobody took within results_ttl, and taken ones whose refetch grace is over; drop
        uploads no job needs that are older than upload_ttl. Returns how many results expired."""
        now = now or time.time()
        try:
            old = await self.store.expired_results(now - self.config.results_ttl)
            if old:
                self._delete_results(await self.store.mark_fetched(old, expired=True))
                log.info("expired the untaken results of %d job(s)", len(old))
            self._delete_results(await self.store.purge_taken(now - self.config.refetch_grace))
            gone = await self.store.expire_uploads(now - self.config.upload_ttl)
        except Exception as exc:  # the next sweep tries again
            log.warning("retention sweep failed: %s", exc)
            return 0
        if gone:
            self._delete([self.config.uploads_dir / name for name in gone])
            log.info("deleted %d upload(s) older than %gs that no job uses", len(gone), self.config.upload_ttl)
        return len(old)

    def _delete_results(self, paths: list[str]) -> None:
        self._delete([self.config.results_dir / p for p in paths])

    def _delete(self, paths: list[Path]) -> None:
        if paths:  # off the event loop; the store already forgot them
            task = asyncio.create_task(asyncio.to_thread(_unlink_all, paths))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
