"""Dispatch: claim waiting jobs from the store for the backends this bridge drives, run them, record outcomes."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from tornado.ioloop import PeriodicCallback

from .comfyclient import BackendError, BackendRejected, BackendUnavailable
from .config import Config
from .jobs import Job, Output, State
from .jobstore import CANCEL, FREE, REQUEUED, JobEvent, JobStore, StoreUnavailable
from .pool import BackendPool, Member
from .runner import Gone, Requeue, Runner
from .protocol import outcome

log = logging.getLogger(__name__)

ON_BACKEND = (State.DISPATCHING, State.RUNNING)
SAFETY_POLL = 2.0  # seconds between looks at the queue that no event asked for (an event may be lost)
STORE_RETRY = 0.5  # seconds between looks at whether an unreachable store is back


class Dispatcher:
    """Gives waiting jobs to free backends (late binding), follows them, and moves them to their outcome."""

    def __init__(self, config: Config, store: JobStore, pool: BackendPool) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        self.runner = Runner(config, store, pool)
        self.live: dict[str, Job] = {}  # the working copies of the jobs this bridge runs now
        self._attempts: dict[str, tuple[asyncio.Task[None], Member]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._recovering: set[str] = set()  # backends whose jobs are being picked up again: no new work yet
        self._stranded: set[str] = set()  # backends with jobs left as recorded while the store was away
        self._last_pick: dict[str, float] = {}
        self._recheck: asyncio.TimerHandle | None = None
        self._recheck_when = 0.0
        self._pumping = False
        self._again = False
        # queued/requeued events seen, and how many of them a claim that found nothing had seen: while the
        # two are equal nothing new waits, and a slot that frees asks the store nothing
        self._arrivals = 0
        self._arrivals_when_empty = -1
        self.draining = False  # shutting down: no new job starts
        self._poll = PeriodicCallback(self._look, SAFETY_POLL * 1000, jitter=0.1)
        store.subscribe(self.on_event)
        pool.observers.append(self)

    # lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start dispatching (jobs on backends are recovered as their leases are taken)."""
        if not self.store.shared:  # with several bridges, another one may know a backend this one does not
            for job in await self.store.active_elsewhere([m.label for m in self.pool.members]):
                log.warning("job %s: its backend %s is no longer configured; it waits again", job.id, job.backend)
                await self.store.requeue(job.id, ON_BACKEND, f"backend {job.backend} is no longer configured")
        self._poll.start()
        self.wake()

    async def stop(self) -> None:
        """Stop following jobs; their records stay as they are, for the next start or another bridge."""
        self._poll.stop()
        if self._recheck is not None:
            self._recheck.cancel()
        tasks = [*self._tasks, *(t for t, _ in self._attempts.values())]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def drain(self, timeout: float) -> int:
        """Start no new job; wait up to timeout for running ones to end. Returns how many still run."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while (running := self.running()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return running

    def running(self) -> int:
        """Jobs this bridge has on backends now."""
        return sum(len(m.running) for m in self.pool.members)

    # what others tell us -------------------------------------------------------------------------
    def on_event(self, event: JobEvent) -> None:
        """Store events from every bridge: new work, cancels of jobs run here, commands for our backends."""
        if event.kind in (State.QUEUED.value, REQUEUED):
            self._arrivals += 1
            self.wake()
        elif event.kind == CANCEL:
            job = self.live.get(event.job_id)
            if job is not None:
                self.runner.cancel(job, event.detail or "cancelled")
        elif event.kind == FREE:
            member = self.pool.member(event.backend)
            if member is not None and member.leased:
                self._spawn(self._free(member))

    async def _free(self, member: Member) -> None:
        try:
            await member.client.free()
        except BackendError as exc:
            log.warning("backend %s: /free asked by another bridge failed: %s", member.label, exc)

    def backend_changed(self, member: Member) -> None:
        """A backend came up, went down, or was drained or resumed."""
        self.wake()

    def lease_changed(self, member: Member, held: bool) -> None:
        """Took a backend: pick up its jobs as a restart would. Lost it: stop following them, change nothing."""
        if held:
            self._recovering.add(member.label)
            self._spawn(self._recover(member))
            return
        for job_id, (task, m) in list(self._attempts.items()):
            if m is member:
                log.info("job %s: left to the bridge that now drives %s", job_id, member.label)
                task.cancel()

    async def _recover(self, member: Member) -> None:
        """Jobs the store has on this backend: finished -> collect, running -> re-attach, unknown -> re-queue."""
        try:
            jobs = await self.store.active_on(member.label)
            for job in jobs:
                if job.id in self.live:
                    continue
                if not job.prompt_id:  # never posted: it waits again, at the head of the line
                    await self.store.requeue(job.id, ON_BACKEND, "its bridge stopped before posting it")
                    continue
                self.pool.take_slot(member, job.id)  # its slot stays taken until we know what became of it
                if job.cancel_reason:
                    self.runner.cancel(job, job.cancel_reason)
                self._start_attempt(job, member, resume=True)
        except StoreUnavailable as exc:
            log.warning("backend %s: its jobs could not be recovered yet: %s", member.label, exc)
            self._recover_later(member)
        finally:
            self._recovering.discard(member.label)
            self.wake()

    def _recover_later(self, member: Member) -> None:
        """An attempt ended because the store was away: once it is back, pick the backend's jobs up again as
        a restart would (its outcome is collected then; nothing is lost)."""
        if member.label not in self._stranded:
            self._stranded.add(member.label)
            self._spawn(self._when_store_back(member))

    async def _when_store_back(self, member: Member) -> None:
        try:
            while not self.store.available:
                await asyncio.sleep(STORE_RETRY)
        finally:
            self._stranded.discard(member.label)
        if member.leased:  # else the bridge that drives it now recovers them
            self._recovering.add(member.label)
            await self._recover(member)

    # dispatch -----------------------------------------------------------------------------------
    def _look(self) -> None:
        """The safety poll: ask the store even if no event said a job arrived (one may have been lost)."""
        self._arrivals_when_empty = -1
        self.wake()

    def wake(self) -> None:
        """Something changed that may let waiting jobs run; one dispatch round runs at a time."""
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        self._spawn(self._pump())

    async def _pump(self) -> None:
        try:
            self._again = True
            while self._again:
                self._again = False
                await self._dispatch_round()
        except StoreUnavailable as exc:
            log.warning("dispatch paused: %s", exc)
        finally:
            self._pumping = False

    async def _dispatch_round(self) -> None:
        """Give waiting jobs to backends with free slots (late binding: only now is a backend chosen)."""
        tried: set[str] = set()
        while not self.draining and self._arrivals != self._arrivals_when_empty:
            free = [m for m in self.pool.members
                    if m.available and m.label not in tried and m.label not in self._recovering]
            if not free:
                return
            # most free capacity first, then weight, then the faster box; ties go to the least recently
            # used one, so work spreads
            free.sort(key=lambda m: (-m.free_slots / m.slots, -m.cfg.weight, m.job_seconds or 0.0,
                                     self._last_pick.get(m.label, 0.0)))
            member = free[0]
            seen = self._arrivals
            job = await self._claim_for(member)
            if job is None:
                if member.cfg.workflows is None and member.job_seconds is None:
                    self._arrivals_when_empty = seen
                    return  # nothing waits that any backend could take
                tried.add(member.label)
                continue
            self._last_pick[member.label] = time.monotonic()
            self.pool.take_slot(member, job.id)
            self._start_attempt(job, member)

    async def _claim_for(self, member: Member) -> Job | None:
        """The next waiting job for this backend, unless a faster busy one will finish it sooner."""
        workflows = frozenset(member.cfg.workflows) if member.cfg.workflows is not None else None
        if self._faster_exists(member):
            waiting = await self.store.queue_length()
            if waiting <= len(self.pool.members):
                job = await self.store.peek(workflows)
                if job is None or self._faster_soon(member, job, waiting):
                    return None
        return await self.store.claim(member.label, workflows)

    def _faster_exists(self, member: Member) -> bool:
        mine = member.job_seconds
        return mine is not None and any(o.job_seconds is not None and o.job_seconds < mine
                                        for o in self.pool.members if o is not member)

    def _faster_soon(self, member: Member, job: Job, waiting: int) -> bool:
        """True if a busy, faster backend will finish this job sooner than `member` could (tail of a batch).

        Only the last few waiting jobs are held back this way; a timer re-checks when that backend
        should be free, so an overdue box never blocks the queue."""
        mine = member.job_seconds
        assert mine is not None
        now = time.monotonic()
        better: list[float] = []
        for other in self.pool.members:
            speed = other.job_seconds
            if other is member or speed is None or speed >= mine or not other.up or other.draining \
                    or not other.leased or not other.cfg.accepts(job.workflow):
                continue
            ends = [began + speed for began in other.running.values() if began is not None]
            free_at = min(ends) if len(ends) >= other.slots else now
            if free_at >= now and free_at + speed < now + mine:
                better.append(free_at)
        if len(better) < waiting:
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
        self._recheck = asyncio.get_running_loop().call_later(max(0.0, when - time.monotonic()), self.wake)

    # one attempt --------------------------------------------------------------------------------
    def _start_attempt(self, job: Job, member: Member, resume: bool = False) -> None:
        self.live[job.id] = job
        task = asyncio.create_task(self._attempt(job, member, resume))
        self._attempts[job.id] = (task, member)

    async def _attempt(self, job: Job, member: Member, resume: bool) -> None:
        """One attempt of a job on a backend (or the rest of one after a restart or a takeover), ending in an
        outcome or a re-queue."""
        try:
            if resume:
                log.info("job %s: looking for its prompt on %s", job.id, member.label)
                entry = await self.runner.resume(job, member)
            else:
                entry = await self.runner.run(job, member)
            await self._conclude(job, member, entry)
        except Requeue as exc:
            self.pool.failed(member, str(exc))
            if exc.orphan:
                self.pool.orphan(member, exc.orphan)
            self.pool.mark_down(member, str(exc))
            if job.attempts >= self.config.max_attempts:
                await self._finish(job, member, State.FAILED, f"backend unavailable: {exc}")
            else:
                log.warning("job %s: re-queued after backend %s failed: %s", job.id, member.label, exc)
                if await self.store.requeue(job.id, ON_BACKEND, str(exc)) is None:
                    log.info("job %s: changed meanwhile; not re-queued here", job.id)
                job.state = State.QUEUED
        except Gone as exc:
            log.info("job %s: no longer followed here: %s", job.id, exc)
        except BackendRejected as exc:
            await self._finish(job, member, State.FAILED, str(exc))
        except StoreUnavailable as exc:
            log.warning("job %s: left as recorded until the store is back: %s", job.id, exc)
            self._recover_later(member)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must fail the one job, never the bridge
            log.exception("job %s: unexpected error", job.id)
            await self._finish(job, member, State.FAILED, f"internal error: {type(exc).__name__}")
        finally:
            self.pool.release_slot(member, job.id)
            self.runner.cancels.pop(job.id, None)
            self.runner.end(job.id)
            self.live.pop(job.id, None)
            self._attempts.pop(job.id, None)
            if job.prompt_id and not job.state.active:
                member.client.forget(job.prompt_id)
            self.wake()

    async def _conclude(self, job: Job, member: Member, entry: dict[str, Any]) -> None:
        if job.cancel_reason:
            state = State.FAILED if job.cancel_reason.startswith("time out") else State.CANCELLED
            return await self._finish(job, member, state, job.cancel_reason)
        kind, message = outcome(entry) if entry else ("error", "the backend did not report an outcome")
        if kind != "success":
            self.pool.failed(member)
            return await self._finish(job, member, State.FAILED, message)
        try:
            outputs = await self.runner.collect(job, member.client, entry)
        except BackendUnavailable as exc:
            raise Requeue(f"outputs could not be fetched: {exc}") from None
        self.pool.completed(member, job.id)
        await self._finish(job, member, State.COMPLETED, None, outputs)

    async def _finish(self, job: Job, member: Member, state: State, error: str | None,
                      outputs: list[Output] | None = None) -> None:
        """Record the outcome (compare-and-set: a job another bridge took over is left to it)."""
        done = await self.store.transition(job.id, ON_BACKEND, state, error=error, outputs=outputs)
        if done is None:
            log.info("job %s: changed meanwhile; its %s outcome is not recorded here", job.id, state.value)
            if outputs:
                for out in outputs:
                    (self.config.results_dir / out.path).unlink(missing_ok=True)
            return
        job.state, job.error, job.finished_at = done.state, done.error, done.finished_at
        took = (done.finished_at or time.time()) - (done.started_at or done.created_at)
        log.info("job %s: %s after %.2fs on %s%s", job.id, state.value, took, member.label,
                 f": {error}" if error else "")

    def _spawn(self, coro: Any) -> None:
        """Run a background task that stop() will cancel and wait for."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
