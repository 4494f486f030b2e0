"""The job store contract: the one owner of jobs, the fair queue, take-once, uploads, the log and the count.

Two engines implement it: `comfy/store_sqlite.py` (embedded, one bridge, zero set-up) and
`comfy/store_pg.py` (PostgreSQL, any number of bridges sharing one queue). Everything above the store
works on plain `Job` records and `JobEvent`s; no database row ever leaves an engine.

Rules every engine keeps:
- A change of a job is a compare-and-set: it names the states it expects the job to be in, and it does
  nothing (returns None) when the job is in another one. The caller handles that (another bridge, or a
  cancel, got there first).
- Every state change and progress step is published as one `JobEvent` *after* its transaction commits,
  to every subscriber of every bridge sharing the store (`subscribe`). Nothing else announces jobs.
- The queue's order is fair: round-robin across clientIds, first-in first-out within one. A job's place
  is the pair (round, seq): at enqueue its round is max(the client's last waiting round + 1, the lowest
  waiting round), so `ORDER BY round, seq` is the dispatch order and a SQL claim is fair by itself.
  A job put back after its backend failed goes to the head of the line (round = lowest waiting - 1).
- An engine that cannot reach its database raises `StoreUnavailable`; the HTTP edge answers 503 with a
  detail and Retry-After, and the engine's `available` is False until it can again.
- The webhook outbox: with an `Outbox` installed, every change of a job whose event kind is in its `kinds`
  also writes the rows its rule makes (one per endpoint) into `deliveries`, in the transaction of the change;
  a running job's progress gets rows when its stored progress is written (at most once a second per job).
  Rows are claimed for sending under a hold (holder, held_until), so one bridge at a time sends each.
"""
from __future__ import annotations

import abc
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Collection, Iterable

from .jobs import Job, Output, State
from .outbox import Delivery, Outbox

log = logging.getLogger(__name__)


class StoreUnavailable(Exception):
    """The job store's database cannot be reached right now; the request may be retried."""


class QueueFull(Exception):
    """The queue is at max_queue (or the identity's share of it); the caller should retry later."""


# kinds of JobEvent: the six states, plus
PROGRESS = "progress"    # a running job's progress moved (state stays running)
REQUEUED = "requeued"    # back in the line after its backend failed (state queued)
FETCHED = "fetched"      # its results were taken (or expired untaken)
CANCEL = "cancel"        # a request to stop a dispatching/running job: the bridge that runs it acts
FREE = "free"            # a request to the bridge holding `backend` to free that server's memory
EVENT_KINDS = frozenset({*(s.value for s in State), PROGRESS, REQUEUED, FETCHED, CANCEL, FREE})


@dataclass(frozen=True)
class JobEvent:
    """One thing that happened to a job, after the store committed it. Small enough for a NOTIFY."""

    kind: str
    job_id: str = ""
    client_id: str = ""
    owner: str = ""
    workflow: str = ""
    state: State | None = None
    progress: float = 0.0
    detail: str | None = None        # the error or cancel reason
    backend: str | None = None
    attempts: int = 0
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    result_bytes: int = 0
    origin: str = ""                 # the bridge whose action this was
    at: float = field(default_factory=time.time)

    @classmethod
    def of(cls, kind: str, job: Job, origin: str = "", detail: str | None = None) -> JobEvent:
        """The event for a job record as it now stands."""
        return cls(kind=kind, job_id=job.id, client_id=job.client_id, owner=job.owner, workflow=job.workflow,
                   state=job.state, progress=job.progress, detail=detail if detail is not None else job.error,
                   backend=job.backend, attempts=job.attempts, created_at=job.created_at,
                   started_at=job.started_at, finished_at=job.finished_at,
                   result_bytes=sum(o.size for o in job.outputs), origin=origin)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (for NOTIFY payloads)."""
        out = asdict(self)
        out["state"] = self.state.value if self.state is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobEvent:
        """The inverse of to_dict; unknown keys are ignored."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        state = known.get("state")
        known["state"] = State(state) if state else None
        return cls(**known)

    @property
    def percent(self) -> str:
        """Progress as the API shows it, e.g. "12.62%"."""
        return f"{self.progress * 100:.2f}%"


Subscriber = Callable[[JobEvent], None]

class EventFanout:
    """Delivers events to this process's subscribers; a failing subscriber never stops the others."""

    def __init__(self) -> None:
        self.subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> None:
        """Call fn with every event from now on."""
        self.subscribers.append(fn)

    def publish(self, event: JobEvent) -> None:
        """Hand one committed event to every subscriber."""
        for fn in self.subscribers:
            try:
                fn(event)
            except Exception:
                log.exception("event subscriber failed on %s of job %s", event.kind, event.job_id)


class JobStore(abc.ABC):
    """Jobs, the fair queue, take-once, uploads, leases, the log and the generation count.

    Every method may raise StoreUnavailable. Methods returning Job give a fresh record (outputs loaded
    where the docstring says so); changing it changes nothing stored."""

    bridge: str  # this bridge's name in leases and events

    def __init__(self) -> None:
        self.fanout = EventFanout()
        self.outbox: Outbox | None = None
        self.outbox_kinds: frozenset[str] = frozenset()  # checked on every change: kept apart, a plain set

    def install_outbox(self, outbox: Outbox | None) -> None:
        """Write webhook deliveries with the changes of jobs from now on (None: no more)."""
        self.outbox = outbox
        self.outbox_kinds = outbox.kinds if outbox is not None else frozenset()

    # lifecycle ----------------------------------------------------------------------------------
    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, run pending schema migrations, start listening for other bridges' events."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop listening and close the connection(s); flush the generation count."""

    @abc.abstractmethod
    async def pending_migrations(self) -> list[int]:
        """Numbers of the schema migrations open() would run now (reads only; works before open())."""

    @property
    @abc.abstractmethod
    def available(self) -> bool:
        """False while the database cannot be reached (/ready says so)."""

    @property
    @abc.abstractmethod
    def shared(self) -> bool:
        """True when other bridges may share this store (leases and cross-bridge events matter)."""

    @property
    def durable(self) -> bool:
        """True when a commit outlives an OS crash (PostgreSQL): result files a commit names are synced to disk
        before it. The embedded engine's commits, like its result files, outlive a killed process."""
        return False

    def subscribe(self, fn: Subscriber) -> None:
        """Receive every committed JobEvent of every bridge sharing this store."""
        self.fanout.subscribe(fn)

    # the queue ----------------------------------------------------------------------------------
    @abc.abstractmethod
    async def enqueue(self, job: Job, max_queue: int, max_per_owner: int) -> Job:
        """Record a new QUEUED job at its fair place; sets job.seq. Raises QueueFull when the queue holds
        max_queue jobs, or the job's owner (when not empty) already has max_per_owner waiting. Emits queued."""

    @abc.abstractmethod
    async def claim(self, backend: str, workflows: frozenset[str] | None) -> Job | None:
        """Atomically take the first waiting job in fair order whose workflow is in `workflows` (None: any):
        QUEUED -> DISPATCHING, backend set, attempts + 1, progress 0, prompt_id cleared. Two bridges
        never get the same job. Emits dispatching. None when no such job waits."""

    @abc.abstractmethod
    async def peek(self, workflows: frozenset[str] | None) -> Job | None:
        """The job claim() would take now, without taking it."""

    @abc.abstractmethod
    async def queue_length(self) -> int:
        """Jobs waiting."""

    @abc.abstractmethod
    async def position(self, job_id: str) -> int | None:
        """1-based place of a waiting job in dispatch order; None when it is not waiting."""

    @abc.abstractmethod
    async def positions(self) -> dict[str, int]:
        """Every waiting job's place (job id -> 1-based place), in one query."""

    # changes of a job -----------------------------------------------------------------------------
    @abc.abstractmethod
    async def update(self, job_id: str, expect: Iterable[State], **fields: Any) -> Job | None:
        """Set fields (prompt_id, error, ...) of a job in one of the `expect` states, without a state change
        and without an event (e.g. the prompt id, saved before posting). None if not in those states."""

    @abc.abstractmethod
    async def transition(self, job_id: str, expect: Iterable[State], to: State, *,
                         error: str | None = None, outputs: list[Output] | None = None,
                         **fields: Any) -> Job | None:
        """Compare-and-set: move a job from one of `expect` to `to`, with fields, and emit the event named
        after `to`. Moving to RUNNING sets started_at (first time) and counts the job in the generation
        count once (counted). A terminal state sets finished_at and error; COMPLETED stores `outputs`
        and progress 1 in the same transaction. Returns the job as stored (outputs loaded), or None."""

    @abc.abstractmethod
    async def requeue(self, job_id: str, expect: Iterable[State], reason: str) -> Job | None:
        """Put a job back at the head of the line (its backend failed under it): -> QUEUED, backend and
        prompt_id cleared, progress 0. Emits requeued. None if not in `expect`."""

    @abc.abstractmethod
    async def progress(self, job: Job, value: float) -> None:
        """A running job's progress moved: emit a progress event (the stored value may lag a little)."""

    @abc.abstractmethod
    async def request_cancel(self, job_ids: list[str], reason: str) -> list[Job]:
        """Cancel jobs wherever they are: a waiting one becomes CANCELLED here (event cancelled); a
        dispatching or running one keeps its state, gets cancel_reason, and a cancel event goes to the
        bridge running it. Returns the jobs that were active (finished ones are left alone)."""

    # reading jobs ---------------------------------------------------------------------------------
    @abc.abstractmethod
    async def job(self, job_id: str) -> Job | None:
        """One job by id, outputs still on record loaded; None if unknown."""

    @abc.abstractmethod
    async def client_jobs(self, client_id: str) -> list[Job]:
        """The client's jobs that wait, run or hold untaken results (outputs loaded), oldest first."""

    @abc.abstractmethod
    async def status_job(self, client_id: str) -> Job | None:
        """The job whose state the client sees: its latest active job, else its latest job. A record of its state:
        its outputs, inputs, prompt and files may be left out."""

    @abc.abstractmethod
    async def known_client(self, client_id: str) -> bool:
        """True if this clientId ever submitted a job."""

    @abc.abstractmethod
    async def latest_backend(self, client_id: str) -> str | None:
        """The backend label of the client's newest job that was dispatched."""

    @abc.abstractmethod
    async def active_on(self, backend: str) -> list[Job]:
        """Jobs DISPATCHING or RUNNING on a backend (recovery when its lease is taken), oldest first."""

    @abc.abstractmethod
    async def active_elsewhere(self, backends: list[str]) -> list[Job]:
        """Jobs DISPATCHING or RUNNING on a backend not in `backends` (one taken out of the settings)."""

    # take-once ------------------------------------------------------------------------------------
    @abc.abstractmethod
    async def claim_results(self, client_id: str, hold: float) -> list[Job] | None:
        """Reserve the client's untaken results for one answer, for at most `hold` seconds: [] when there
        are none, None when every one of them is reserved by another answer right now."""

    @abc.abstractmethod
    async def release_results(self, job_ids: list[str]) -> None:
        """An answer did not go out whole: its results can be taken again."""

    @abc.abstractmethod
    async def mark_fetched(self, job_ids: list[str], expired: bool = False) -> list[str]:
        """The results were taken (or expired untaken). Taken outputs stay on record for the refetch grace;
        expired ones are forgotten now. Emits fetched. Returns result paths to delete now."""

    @abc.abstractmethod
    async def taken_jobs(self, client_id: str, since: float) -> list[Job]:
        """The client's results taken at or after `since` whose outputs are still on record."""

    @abc.abstractmethod
    async def expired_results(self, before: float) -> list[str]:
        """Ids of completed jobs with untaken, unreserved results finished before `before`."""

    @abc.abstractmethod
    async def purge_taken(self, before: float) -> list[str]:
        """Forget outputs of results taken before `before`; returns their paths."""

    @abc.abstractmethod
    async def log_page(self, limit: int, offset: int, owner: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """One page of the generation log, newest first, and its total (one owner's, or all)."""

    @abc.abstractmethod
    async def generation_count(self) -> int:
        """The persistent count of jobs that started running."""

    # uploads and quota ----------------------------------------------------------------------------
    @abc.abstractmethod
    async def add_upload(self, name: str, sha256: str, size: int, content_type: str, original: str,
                         owner: str = "") -> None:
        """Record a stored upload and whose it is."""

    @abc.abstractmethod
    async def upload(self, name: str, owner: str | None = None) -> dict[str, Any] | None:
        """A stored upload by name (only if `owner` holds it, when given)."""

    @abc.abstractmethod
    async def expire_uploads(self, before: float) -> list[str]:
        """Forget uploads made before `before` that no waiting, running or untaken job refers to;
        returns their names (the files are the caller's to delete)."""

    @abc.abstractmethod
    async def usage(self, owner: str) -> int:
        """Bytes an owner has stored: uploads plus untaken results."""

    # callers' sockets, across bridges ------------------------------------------------------------
    @abc.abstractmethod
    async def attach(self, client_id: str, delta: int) -> None:
        """This bridge opened (+1) or closed (-1) a socket or event stream of the client."""

    @abc.abstractmethod
    async def attached(self, client_id: str) -> bool:
        """True if any live bridge holds an open socket or event stream of the client (the disconnect
        cancel waits for this to be False after its grace)."""

    # backends: leases and shared values -----------------------------------------------------------
    @abc.abstractmethod
    async def leases(self, backends: list[str], ttl: float) -> set[str]:
        """Renew this bridge's leases and take free or expired ones, spreading backends evenly over live
        bridges (a bridge over its share gives the extras up once they run nothing). Returns the backends
        this bridge drives now. One-bridge engines hold every backend."""

    @abc.abstractmethod
    async def release_leases(self) -> None:
        """Give up every lease (clean shutdown), so other bridges take them at once."""

    @abc.abstractmethod
    async def command(self, kind: str, backend: str, detail: str = "") -> None:
        """Send an event of `kind` (e.g. FREE) to the bridge that drives `backend`."""

    @abc.abstractmethod
    async def meta(self, key: str, make: Callable[[], str]) -> str:
        """A persistent value shared by every bridge, created by make() the first time."""

    # the webhook outbox ----------------------------------------------------------------------------
    @abc.abstractmethod
    async def claim_deliveries(self, limit: int, hold: float,
                               skip: Collection[str]) -> tuple[list[Delivery], float | None]:
        """Hold up to `limit` due deliveries for this bridge for `hold` seconds (attempts + 1), oldest due first,
        none to an endpoint in `skip`, and none while an earlier delivery of the same job to the same endpoint
        is pending (so each job's events reach an endpoint in order). Also returns when the next one falls due
        (a retry's time or the end of another bridge's hold), None when nothing waits for a time."""

    @abc.abstractmethod
    async def delivered(self, done: dict[str, int]) -> list[float]:
        """These deliveries got a 2xx (id -> status): they are done, all in one transaction. Returns the seconds
        from each one's event to now (of those still pending)."""

    @abc.abstractmethod
    async def undelivered(self, delivery_id: str, status: int | None, error: str, delay: float,
                          retry_for: float) -> str | None:
        """An attempt failed: try again after `delay` seconds (not later than `retry_for` after the event), or,
        once `retry_for` has passed, give up (state failed). Only while this bridge holds it; returns the new
        state, None when it was not ours any more."""

    @abc.abstractmethod
    async def deliveries(self, state: str | None, job_id: str | None, limit: int,
                         offset: int) -> tuple[list[dict[str, Any]], int]:
        """A page of deliveries, newest first, and the total matching (all of them, or one state or job's)."""

    @abc.abstractmethod
    async def pending_deliveries(self) -> int:
        """Deliveries not yet delivered or given up."""

    @abc.abstractmethod
    async def prune_deliveries(self, delivered_before: float, failed_before: float) -> int:
        """Forget delivered deliveries made before `delivered_before` and failed ones before `failed_before`, up
        to a batch of each (a short transaction); returns how many. Call it again while that is more than 0."""
