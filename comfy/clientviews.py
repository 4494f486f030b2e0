"""What callers see of their jobs: the per-client views the scheduler keeps in memory."""
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
    """Jobs by clientId: status for /ws and /execution-info, results for /history. Mixed into Scheduler."""

    config: Config
    store: Store
    queue: FairQueue
    backends: list[Backend]
    jobs: dict[str, Job]
    clients: dict[str, list[Job]]

    def _spawn(self, coro: Any) -> None:
        raise NotImplementedError

    def _remember(self, job: Job) -> None:
        self.jobs[job.id] = job
        jobs = self.clients.setdefault(job.client_id, [])
        if job not in jobs:
            jobs.append(job)
            jobs.sort(key=lambda j: j.seq)

    def known_client(self, client_id: str) -> bool:
        """True if this clientId ever submitted a job."""
        return client_id in self.clients

    def client_jobs(self, client_id: str) -> list[Job]:
        """The client's jobs the bridge still holds, oldest first."""
        return list(self.clients.get(client_id, ()))

    def status_job(self, client_id: str) -> Job | None:
        """The job whose state the client sees: its latest active job, else its latest job."""
        jobs = self.clients.get(client_id) or []
        active = [j for j in jobs if j.state.active]
        return (active or jobs or [None])[-1]

    def position(self, job: Job) -> int | None:
        """Place in the bridge's queue of a waiting job."""
        return self.queue.position(job) if job.state is State.QUEUED else None

    def unfetched(self, client_id: str) -> list[Job]:
        """Completed jobs of the client whose outputs were not taken yet."""
        return [j for j in self.clients.get(client_id, ()) if j.state is State.COMPLETED and not j.fetched]

    def expire_results(self, now: float | None = None) -> int:
        """Delete results nobody took within results_ttl; the jobs stay in the log. Returns how many."""
        cutoff = (now or time.time()) - self.config.results_ttl
        old = [j for j in self.jobs.values()
               if j.state is State.COMPLETED and not j.fetched and (j.finished_at or 0) < cutoff]
        if old:
            self.mark_fetched(old, expired=True)
            log.info("expired the untaken results of %d job(s)", len(old))
        return len(old)

    def mark_fetched(self, jobs: list[Job], expired: bool = False) -> None:
        """The caller has received these outputs: delete them and forget the jobs (but the newest)."""
        self.store.mark_fetched([j.id for j in jobs], expired)
        paths = [self.config.results_dir / out.path for job in jobs for out in job.outputs]
        self._spawn(asyncio.to_thread(_unlink_all, paths))  # off the event loop; the store already forgot them
        for job in jobs:
            job.fetched = True
            job.outputs = []
            mine = self.clients.get(job.client_id, [])
            if mine and mine[-1] is not job:
                mine.remove(job)
                self.jobs.pop(job.id, None)

    def backend_for(self, client_id: str) -> Backend | None:
        """The backend the client's latest job is (or was last) assigned to."""
        for job in reversed(self.clients.get(client_id, [])):
            if job.backend:
                return next((b for b in self.backends if b.label == job.backend), None)
        return None


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
