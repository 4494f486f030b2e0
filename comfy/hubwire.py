"""What the client hub speaks and listens through: the caller-facing status messages, their event ids, and
the interfaces of the hub's listeners (sockets, event streams) and of the job queries it asks."""
from __future__ import annotations

import json
from typing import Any, Protocol

from .jobs import Job, State
from .jobstore import JobEvent


class JobQueries(Protocol):
    """What the hub asks about jobs (the job service answers; with PostgreSQL, for every bridge)."""

    async def status_job(self, client_id: str) -> Job | None:
        """The job whose state the client sees."""

    async def client_active(self, client_id: str) -> bool:
        """True while the client has a job waiting or running."""

    async def position(self, job_id: str) -> int | None:
        """A waiting job's place in the line; None when it does not wait."""

    async def positions(self) -> dict[str, int]:
        """Every waiting job's place."""

    async def cancel_client(self, client_id: str, reason: str) -> int:
        """Cancel the client's waiting and running jobs; how many."""

    async def cancel_jobs(self, job_ids: list[str], reason: str) -> int:
        """Cancel these jobs if they still wait or run; how many."""

    async def attach(self, client_id: str, delta: int) -> None:
        """This bridge opened (+1) or closed (-1) the client's sockets."""

    async def attached(self, client_id: str) -> bool:
        """True if any bridge holds a socket of the client."""


class ClientSocket(Protocol):
    """What the hub needs of a caller's WebSocket (the /ws handler) or event stream (comfy/streams.py)."""

    client_id: str
    event_stream: bool  # True for an event stream, False for a WebSocket (the metrics tell them apart)

    def send_text(self, text: str, droppable: bool = False, eid: str = "") -> None:
        """Send one encoded message; a droppable one may be skipped for a listener that is not reading.
        `eid`: the message's event id (see event_id), "" for one about no job; only event streams send it."""

    def close(self, code: int | None = None, reason: str | None = None) -> None: ...


def message(status: str, details: str, **extra: Any) -> str:
    """One caller-facing status message as JSON text."""
    return json.dumps({"status": status, "details": details, **extra})


CONNECTED = message("connected", "server connected")
LISTENING = message("listening", "server is listening")


def event_id(job_id: str, state: State, attempts: int, progress: float = 0.0) -> str:
    """The id of the message a job in this stored state makes: "<job>:<run>:<state>:<progress in 1/10000>".
    Derived from the job's record alone, so every bridge gives the same id before and after a restart, and
    one job's ids grow with its life (a job put back in the line waits for its next run)."""
    run = attempts + 1 if state is State.QUEUED else attempts
    steps = round(progress * 10000) if state in (State.RUNNING, State.COMPLETED) else 0
    return f"{job_id}:{run}:{state.value}:{steps}"


def event_id_of(event: JobEvent, state: State | None = None) -> str:
    """The id of the message an event makes (as `state`, when given)."""
    return event_id(event.job_id, state or event.state or State.QUEUED, event.attempts, event.progress)
