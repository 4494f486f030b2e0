"""Submits that wait for their job's end (Prefer: wait=N): woken by the store's job events, never by polling."""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from enum import Enum

from .jobs import State
from .jobstore import JobEvent

FINAL = frozenset({State.COMPLETED.value, State.FAILED.value, State.CANCELLED.value})
REMEMBER = 1024  # ends of recent jobs kept, for a wait that begins after its job already ended


class Outcome(Enum):
    """How a wait ended."""

    ENDED = "ended"          # the job completed, failed or was cancelled
    TIMED_OUT = "timed out"  # the wait's time was up first
    GONE = "gone"            # the caller hung up


class JobWaiters:
    """Futures of waiting submits by job id, settled by the job's final event (from any bridge)."""

    def __init__(self) -> None:
        self._waiting: dict[str, list[asyncio.Future[Outcome]]] = {}
        # with PostgreSQL a submit reads the store after it queued its job, and the job may end meanwhile
        self._ended: OrderedDict[str, None] = OrderedDict()

    def expect(self, job_id: str) -> asyncio.Future[Outcome]:
        """A future settled with ENDED when the job ends (at once when it already has); forget() it after."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        if job_id in self._ended:
            future.set_result(Outcome.ENDED)
        else:
            self._waiting.setdefault(job_id, []).append(future)
        return future

    @staticmethod
    def settle(future: asyncio.Future[Outcome], outcome: Outcome) -> None:
        """End a wait (time up, caller gone) unless it has ended already."""
        if not future.done():
            future.set_result(outcome)

    def forget(self, job_id: str, future: asyncio.Future[Outcome]) -> None:
        """The wait is over: drop its future."""
        futures = self._waiting.get(job_id)
        if futures is not None and future in futures:
            futures.remove(future)
            if not futures:
                del self._waiting[job_id]

    def on_event(self, event: JobEvent) -> None:
        """A committed job event: a final one wakes every submit waiting for that job."""
        if event.kind not in FINAL:
            return
        self._ended[event.job_id] = None
        if len(self._ended) > REMEMBER:
            self._ended.popitem(last=False)
        for future in self._waiting.pop(event.job_id, ()):
            self.settle(future, Outcome.ENDED)

    def stop(self) -> None:
        """The bridge stops: every wait ends now (its submit answers 202 with where the job stands)."""
        for futures in self._waiting.values():
            for future in futures:
                self.settle(future, Outcome.TIMED_OUT)
        self._waiting.clear()

    @property
    def count(self) -> int:
        """Submits waiting right now."""
        return sum(len(f) for f in self._waiting.values())
