"""Event streams (text/event-stream): the /ws messages as events with ids, resumed from a Last-Event-ID.

An event's id is the state of its job as stored, "<job id>:<run>:<state>:<progress in 1/10000>" (see
hubwire.event_id), so any bridge, before or after a restart, can tell from a job's record what happened after
a given id. A stream keeps, per job, the last event it told and never tells an older or equal one again: what
it rebuilds from the store on (re)connecting and what the hub sends live meanwhile interleave in order.
"""
from __future__ import annotations

import re
from typing import Any, Protocol

from .hubwire import LISTENING, event_id, message
from .jobs import Job, State

KEEPALIVE = b": keep-alive\n\n"
NO_ID = "0"  # the id of an event about no job (the greeting) before any job's event was told
FINAL_RUN = 1 << 62  # a final state comes after every run of its job
ENDED_KEPT = 256  # ended jobs a long-lived stream remembers (nothing is told of a job after its end anyway)
RANKS = {State.QUEUED.value: 0, State.DISPATCHING.value: 1, State.RUNNING.value: 2,
         State.COMPLETED.value: 3, State.FAILED.value: 3, State.CANCELLED.value: 3}
Key = tuple[int, int, int]
JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what a job id may be made of (the bridge's are gen_ and 16 hex digits)


def position(eid: str) -> tuple[str, Key] | None:
    """(job id, a sortable key of its state) of an event id; None when it is not one of ours."""
    parts = eid.rsplit(":", 3)
    if len(parts) != 4:
        return None
    job_id, run, state, steps = parts
    rank = RANKS.get(state)
    if rank is None or not JOB_ID.fullmatch(job_id) or not (run.isdigit() and len(run) < 10
                                                            and steps.isdigit() and len(steps) < 6):
        return None
    return job_id, (FINAL_RUN if rank == 3 else int(run), rank, int(steps))


def frame(eid: str, text: str) -> bytes:
    """One server-sent event (the JSON text has no newline in it)."""
    return f"id: {eid}\ndata: {text}\n\n".encode()


def state_messages(job: Job, place: int | None) -> list[tuple[str, str]]:
    """(id, message) of what /ws tells about a job in its stored state: a completed job's bar ends at 100.00%
    before `closed`, as it does live."""
    extra: dict[str, Any] = {"job_id": job.id}
    if job.state is State.COMPLETED:
        return [(event_id(job.id, State.RUNNING, job.attempts, 1.0), message("progress", "100.00%", **extra)),
                (event_id(job.id, job.state, job.attempts, 1.0), message("closed", "Execution is done", **extra))]
    if job.state is State.QUEUED and place is not None:
        extra["queue_position"] = place
    status, details = job.client_status()
    return [(event_id(job.id, job.state, job.attempts, job.progress), message(status, details, **extra))]


class Cursor:
    """Where a stream stands: per job, the last event told. `job_id` limits a stream to one job's events."""

    def __init__(self, job_id: str | None = None, last_event_id: str | None = None) -> None:
        self.job_id = job_id
        self.last_id = NO_ID
        self.resumed_job: str | None = None  # the job the caller's Last-Event-ID names (its own, when it is)
        self._told: dict[str, tuple[Key, str]] = {}
        given = position(last_event_id) if last_event_id else None
        if given is not None and last_event_id and (job_id is None or given[0] == job_id):
            self.resumed_job = given[0]
            self._told[given[0]] = (given[1], "")
            self.last_id = last_event_id

    def admit(self, eid: str, text: str) -> bool:
        """True if the event is news to this stream (and note it as told): later than the last one of its job,
        or, while the job waits, a new place in the line."""
        given = position(eid)
        if given is None or (self.job_id is not None and given[0] != self.job_id):
            return False
        job_id, key = given
        told = self._told.get(job_id)
        if told is not None and (key < told[0] or (key == told[0] and (key[1] != 0 or text == told[1]))):
            return False
        self._told[job_id] = (key, text)
        self.last_id = eid
        if key[1] == 3 and len(self._told) > ENDED_KEPT:
            ended = [j for j, (k, _) in self._told.items() if k[1] == 3 and j != job_id]
            for old in ended[:len(self._told) - ENDED_KEPT]:
                del self._told[old]
        return True

    def ended(self, job_id: str) -> bool:
        """True once the job's final event was told (or the Last-Event-ID was it)."""
        told = self._told.get(job_id)
        return told is not None and told[0][1] == 3


class Sink(Protocol):
    """Where a stream's bytes go (the HTTP handler)."""

    def write_event(self, data: bytes, droppable: bool) -> None:
        """Send bytes now; a droppable event may be skipped for a reader that is behind."""

    def end(self) -> None:
        """Finish the response."""


class EventStream:
    """One event stream as a listener of the hub (a ClientSocket): every message with its id, keep-alives as
    comments. It holds what the hub sends until resume() has told what the store says."""

    event_stream = True

    def __init__(self, client_id: str, cursor: Cursor, sink: Sink) -> None:
        self.client_id = client_id
        self.cursor = cursor
        self.sink = sink
        self.ended = False
        self._held: list[tuple[str, bool, str]] | None = []
        self._closing = False

    def send_text(self, text: str, droppable: bool = False, eid: str = "") -> None:
        """A message from the hub: told now, or after resume()."""
        if self._held is not None:
            self._held.append((text, droppable, eid))
        elif not self.ended:
            self._tell(text, droppable, eid)

    def resume(self, messages: list[tuple[str, str]]) -> None:
        """Tell these (id, message) pairs rebuilt from the store, then what the hub sent meanwhile; each only if
        it is news. A one-job stream ends after its job's final event."""
        held, self._held = self._held or [], None
        greeting = 0  # the greeting (about no job) still comes first, as on /ws
        while greeting < len(held) and not held[greeting][2]:
            greeting += 1
        for text, droppable, eid in held[:greeting]:
            self._tell(text, droppable, eid)
        for eid, text in messages:
            self._tell(text, False, eid)
        for text, droppable, eid in held[greeting:]:
            self._tell(text, droppable, eid)
        if self._closing:
            self.close()

    def _tell(self, text: str, droppable: bool, eid: str) -> None:
        if self.ended:
            return
        if text is LISTENING:
            self.sink.write_event(KEEPALIVE, True)
            return
        if eid and not self.cursor.admit(eid, text):
            return
        self.sink.write_event(frame(self.cursor.last_id, text), droppable)
        job_id = self.cursor.job_id
        if job_id is not None and self.cursor.ended(job_id):
            self.close()

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """End the stream (the hub: the client's work is done, or the bridge stops)."""
        if self._held is not None:
            self._closing = True
        elif not self.ended:
            self.ended = True
            self.sink.end()
