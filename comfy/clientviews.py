"""What callers see of their jobs: the per-client views, and the bounded memory behind them."""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .jobs import Job, State

if TYPE_CHECKING:
    from .backend import Backend
    from .config import Config
    from .fairqueue import FairQueue
    from .store import Store

log = logging.getLogger(__name__)


class ClientViews:
    """Jobs by clientId: status for /ws and /execution-info, results for /history. Mixed into Scheduler.

    Memory holds only jobs that still wait, run, or have results nobody took; a client whose last such
    job is gone leaves nothing behind here. Everything older is read from the store when asked for."""

    config: Config
    store: Store
    queue: FairQueue
    backends: list[Backend]
    jobs: dict[str, Job]
    clients: dict[str, list[Job]]
    delivering: set[str]  # ids of jobs whose results a /history answer is being written with

    def _spawn(self, coro: Any) -> None:
        raise NotImplementedError

    def _remember(self, job: Job) -> None:
        self.jobs[job.id] = job
        jobs = self.clients.setdefault(job.client_id, [])
        if job not in jobs:
            jobs.append(job)
            jobs.sort(key=lambda j: j.seq)

    def _forget(self, job: Job) -> None:
        """Drop a job that needs nothing more from memory (the store keeps its record)."""
        self.jobs.pop(job.id, None)
        mine = self.clients.get(job.client_id)
        if mine is not None:
            if job in mine:
                mine.remove(job)
            if not mine:
                del self.clients[job.client_id]

    def known_client(self, client_id: str) -> bool:
        """True if this clientId ever submitted a job."""
        return client_id in self.clients or self.store.latest_job(client_id) is not None

    def client_jobs(self, client_id: str) -> list[Job]:
        """The client's jobs still waiting, running or holding results, oldest first."""
        return list(self.clients.get(client_id, ()))

    def status_job(self, client_id: str) -> Job | None:
        """The job whose state the client sees: its latest active job, else its latest job."""
        jobs = self.clients.get(client_id) or []
        active = [j for j in jobs if j.state.active]
        if active:
            return active[-1]
        latest = self.store.latest_job(client_id)
        if jobs and (latest is None or jobs[-1].seq >= latest.seq):
            return jobs[-1]
        return latest

    def position(self, job: Job) -> int | None:
        """Place in the bridge's queue of a waiting job."""
        return self.queue.position(job) if job.state is State.QUEUED else None

    def unfetched(self, client_id: str) -> list[Job]:
        """Completed jobs of the client whose outputs were not taken yet."""
        return [j for j in self.clients.get(client_id, ()) if j.state is State.COMPLETED and not j.fetched]

    def claim_results(self, client_id: str) -> list[Job] | None:
        """The client's untaken results, reserved for one answer: none for a concurrent request, which
        gets None when another answer is writing them (release() or mark_fetched() ends the claim)."""
        ready = [j for j in self.unfetched(client_id) if j.outputs]
        free = [j for j in ready if j.id not in self.delivering]
        if ready and not free:
            return None
        self.delivering.update(j.id for j in free)
        return free

    def release(self, jobs: list[Job]) -> None:
        """An answer did not go out whole: its results can be taken again."""
        self.delivering.difference_update(j.id for j in jobs)

    def expire_results(self, now: float | None = None) -> int:
        """Delete results nobody took within results_ttl, and taken ones whose refetch grace is over;
        drop uploads no job needs that are older than upload_ttl. Returns how many results expired."""
        now = now or time.time()
        cutoff = now - self.config.results_ttl
        old = [j for j in self.jobs.values() if j.state is State.COMPLETED and not j.fetched
               and j.id not in self.delivering and (j.finished_at or 0) < cutoff]
        if old:
            self.mark_fetched(old, expired=True)
            log.info("expired the untaken results of %d job(s)", len(old))
        paths = self.store.purge_taken(now - self.config.refetch_grace)
        self._delete_files([self.config.results_dir / p for p in paths])
        self.expire_uploads(now)
        return len(old)

    def expire_uploads(self, now: float) -> int:
        """Delete uploads older than upload_ttl that no waiting, running or untaken job refers to."""
        stale = self.store.stale_uploads(now - self.config.upload_ttl)
        if not stale:
            return 0
        used = {ref.get("name") for job in self.jobs.values() for ref in job.files.values()}
        gone = [name for name in stale if name not in used]
        self.store.delete_uploads(gone)
        self._delete_files([self.config.uploads_dir / name for name in gone])
        if gone:
            log.info("deleted %d upload(s) older than %gs that no job uses", len(gone), self.config.upload_ttl)
        return len(gone)

    def mark_fetched(self, jobs: list[Job], expired: bool = False) -> None:
        """The caller has received these outputs (or they expired): they leave memory; taken files stay
        on disk for refetch_grace, expired ones are deleted now."""
        paths = self.store.mark_fetched(jobs, expired)
        self._delete_files([self.config.results_dir / p for p in paths])
        now = time.time()
        for job in jobs:
            job.fetched, job.fetched_at, job.expired = True, now, expired
            self.delivering.discard(job.id)
            self._forget(job)

    def taken_results(self, client_id: str) -> list[Job]:
        """Results of the client taken within refetch_grace, for a client whose download broke off."""
        return self.store.taken_jobs(client_id, time.time() - self.config.refetch_grace)

    def find_job(self, job_id: str) -> Job | None:
        """A job by id: the live object while the bridge holds it, else the stored record."""
        return self.jobs.get(job_id) or self.store.job(job_id)

    def backend_for(self, client_id: str) -> Backend | None:
        """The backend the client's latest job is (or was last) assigned to."""
        label = next((j.backend for j in reversed(self.clients.get(client_id, [])) if j.backend), None)
        label = label or self.store.latest_backend(client_id)
        return next((b for b in self.backends if b.label == label), None) if label else None

    def _delete_files(self, paths: list[Path]) -> None:
        if paths:
            self._spawn(asyncio.to_thread(_unlink_all, paths))  # off the event loop; the store already forgot them


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
