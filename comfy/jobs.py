"""The job model: one call of /generate-based-workflow, from queued to its outcome."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class State(str, Enum):
    """Where a job is in its life; only the job store moves it (compare-and-set)."""

    QUEUED = "queued"
    DISPATCHING = "dispatching"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        """True while the job still waits or runs."""
        return self in (State.QUEUED, State.DISPATCHING, State.RUNNING)


@dataclass
class Output:
    """One result file of a job, held by the bridge until the caller takes it."""

    node_id: str
    filename: str
    content_type: str
    path: str
    size: int
    meta: dict[str, Any] = field(default_factory=dict)  # what is known of it: width, height, frames, duration, ...


@dataclass(eq=False)
class Job:
    """A caller's request to run one workflow with some inputs."""

    client_id: str
    workflow: str
    inputs: dict[str, Any]
    prompt: dict[str, Any]
    # input key -> {"name": file name, "path": local copy to send or None, "sha256": digest}
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    timeout: float = 60.0
    id: str = field(default_factory=lambda: "gen_" + uuid.uuid4().hex[:16])
    state: State = State.QUEUED
    backend: str | None = None
    prompt_id: str | None = None
    progress: float = 0.0
    attempts: int = 0
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    outputs: list[Output] = field(default_factory=list)
    counted: bool = False
    fetched: bool = False
    owner: str = ""  # the key's name, or "@address" in open mode: whose results and quota these are
    fetched_at: float | None = None
    expired: bool = False  # its results were deleted untaken after results_ttl
    seq: int = 0
    round: int = 0  # its fair-queue round: dispatch order is (round, seq) among waiting jobs
    cancel_reason: str | None = None
    webhook: dict[str, Any] | None = None  # the caller's own callback: {"url": ..., "events": [...]}

    @property
    def percent(self) -> str:
        """Progress as the API shows it, e.g. "12.62%"."""
        return f"{self.progress * 100:.2f}%"

    def client_status(self) -> tuple[str, str]:
        """The (status, details) pair of the caller-facing vocabulary."""
        return client_status(self.state, self.percent, self.error)


def client_status(state: State, percent: str, error: str | None) -> tuple[str, str]:
    """The (status, details) pair callers see for a job in this state."""
    if state in (State.QUEUED, State.DISPATCHING):
        return "connected", "server connected"
    if state is State.RUNNING:
        return "progress", percent
    if state is State.COMPLETED:
        return "closed", "Execution is done"
    return "error", error or "failed"
