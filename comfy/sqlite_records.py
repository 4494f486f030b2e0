"""The embedded store's reading side: jobs as records, take-once, the log, uploads, quota, presence.

`SqliteRecords` is the base of `SqliteStore` (comfy/store_sqlite.py), which adds the queue and the
changes of jobs; both work on one autocommit connection in WAL mode."""
from __future__ import annotations

import functools
import json
import logging
import sqlite3
import time
from typing import Any, Callable, Coroutine, Iterable, ParamSpec, TypeVar

from .jobs import Job, Output, State
from .jobstore import FETCHED, JobEvent, JobStore, StoreUnavailable
from .sqlite_schema import OPEN

log = logging.getLogger(__name__)

COLUMNS = ("seq", "id", "client_id", "workflow", "inputs", "prompt", "files", "timeout", "state", "backend",
           "prompt_id", "attempts", "error", "created_at", "started_at", "finished_at", "counted", "fetched",
           "owner", "fetched_at", "expired", "round", "cancel_reason", "progress", "webhook")
COLS = ", ".join(COLUMNS)
SETTABLE = frozenset(COLUMNS) - {"seq", "id", "inputs", "prompt", "files", "webhook"}  # what a submit asked never changes
LIVE = "('queued', 'dispatching', 'running')"
LIVE_STATES = frozenset({"queued", "dispatching", "running"})
IDS = "(SELECT value FROM json_each(?))"  # a list of ids bound as one JSON parameter

SQL_OUTPUTS = ("SELECT job_id, node_id, filename, content_type, path, size, meta FROM outputs"
               f" WHERE job_id IN {IDS} ORDER BY job_id, idx")
HAS_OUTPUTS = "EXISTS (SELECT 1 FROM outputs WHERE job_id = jobs.id)"
SQL_UNTAKEN = (f"SELECT {COLS} FROM jobs INDEXED BY jobs_open WHERE {OPEN} AND client_id = ? AND state = 'completed' AND {HAS_OUTPUTS}"
               " ORDER BY seq")
SQL_CLIENT_JOBS = (f"SELECT {COLS} FROM jobs INDEXED BY jobs_open WHERE {OPEN} AND client_id = ?"
                   f" AND (state != 'completed' OR {HAS_OUTPUTS}) ORDER BY seq")
SQL_FETCHED = (f"UPDATE jobs SET fetched = 1, expired = ?, fetched_at = ? WHERE id IN {IDS} AND fetched = 0"
               f" RETURNING {COLS}")
SQL_EXPIRED = (f"SELECT id FROM jobs INDEXED BY jobs_open WHERE {OPEN} AND state = 'completed' AND finished_at < ?"
               f" AND {HAS_OUTPUTS} ORDER BY seq")
# names of uploads that a waiting or running job, or an untaken result, still refers to
SQL_UPLOADS_IN_USE = (f"SELECT json_extract(f.value, '$.name') FROM jobs INDEXED BY jobs_open, json_each(jobs.files) AS f"
                      f" WHERE {OPEN}")



def output_of(row: list[Any]) -> Output:
    """An Output from (node_id, filename, content_type, path, size, meta JSON)."""
    node_id, filename, content_type, path, size, meta = row
    return Output(node_id, filename, content_type, path, size, json.loads(meta))


P = ParamSpec("P")
R = TypeVar("R")


def states_sql(states: Iterable[State]) -> str:
    """A SQL list of state literals (states are an enum, never caller text)."""
    return "(" + ", ".join(f"'{State(s).value}'" for s in states) + ")"


def guarded(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """An error of the file itself (disk full, file gone, I/O) -> StoreUnavailable, and `available` is
    False until a call succeeds again. Programming errors (bad SQL, constraints) pass unchanged."""
    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        store = args[0]
        assert isinstance(store, SqliteRecords)
        try:
            result = await fn(*args, **kwargs)
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
            raise
        except sqlite3.DatabaseError as exc:
            store._ok = False
            log.error("store: %s failed: %s", fn.__name__, exc)
            raise StoreUnavailable(f"the job store cannot be used: {exc}") from exc
        store._ok = True
        return result
    return call


class SqliteRecords(JobStore):
    """Reading jobs, take-once, the log, uploads, quota, presence and meta over one SQLite connection."""

    def __init__(self, bridge: str) -> None:
        super().__init__()
        self.bridge = bridge
        self._db: sqlite3.Connection | None = None
        self._ok = True
        self._usage: dict[str, int] = {}        # owner -> stored bytes, summed from the tables when first asked
        self._reserved: dict[str, float] = {}   # job id -> monotonic end of its take-once hold
        self._progress: dict[str, float] = {}   # job id -> progress published but not yet written
        self._attached: dict[str, int] = {}     # clientId -> open sockets and event streams
        # job id -> decoded (inputs, prompt, files) of jobs still open; stored once, never changed
        self._bodies: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {}

    @property
    def db(self) -> sqlite3.Connection:
        """The open connection (StoreUnavailable before open() or after close())."""
        if self._db is None:
            raise StoreUnavailable("the job store is not open")
        return self._db

    # records -------------------------------------------------------------------------------------
    def _job(self, row: tuple[Any, ...], body: bool = True) -> Job:
        """A Job from a row of COLUMNS, with the progress published since the last write.

        A job's inputs, prompt and files are decoded once while it waits or runs and shared by the records
        made of it until its results are taken (they never change once stored): callers treat them as
        read-only. Without `body` they are left empty unless already decoded (a record of the job's state)."""
        (seq, job_id, client_id, workflow, inputs, prompt, files, timeout, state, backend, prompt_id, attempts,
         error, created_at, started_at, finished_at, counted, fetched, owner, fetched_at, expired, rnd,
         cancel_reason, progress, webhook) = row
        decoded = self._bodies.get(job_id)
        if decoded is None and not body:
            decoded = ({}, {}, {})
        elif decoded is None:
            decoded = (json.loads(inputs), json.loads(prompt), json.loads(files))
            if state in LIVE_STATES:
                self._bodies[job_id] = decoded
        return Job(id=job_id, client_id=client_id, workflow=workflow, inputs=decoded[0], prompt=decoded[1],
                   files=decoded[2], timeout=float(timeout), state=State(state),
                   backend=backend, prompt_id=prompt_id, attempts=attempts, error=error, created_at=created_at,
                   started_at=started_at, finished_at=finished_at, counted=bool(counted), fetched=bool(fetched),
                   owner=owner, fetched_at=fetched_at, expired=bool(expired), seq=seq, round=rnd,
                   cancel_reason=cancel_reason, progress=float(self._progress.get(job_id, progress)),
                   webhook=json.loads(webhook) if webhook else None)

    def _jobs(self, rows: Iterable[tuple[Any, ...]], outputs: bool = True) -> list[Job]:
        """Jobs from rows, their outputs loaded in one query."""
        jobs = [self._job(r) for r in rows]
        if outputs and jobs:
            by_id = {j.id: j for j in jobs}
            for job_id, *out in self.db.execute(SQL_OUTPUTS, (json.dumps(list(by_id)),)):
                by_id[job_id].outputs.append(output_of(out))
        return jobs

    def _with_outputs(self, job: Job) -> Job:
        job.outputs = [output_of(out) for _, *out in self.db.execute(SQL_OUTPUTS, (json.dumps([job.id]),))]
        return job

    @staticmethod
    def _value(name: str, value: Any) -> Any:
        """A field's value as stored."""
        if name not in SETTABLE:
            raise ValueError(f"{name!r} is not a field of a job that can change")
        if isinstance(value, State):
            return value.value
        return int(value) if isinstance(value, bool) else value

    def _emit(self, kind: str, job: Job, detail: str | None = None) -> None:
        """Publish a committed change to this process's subscribers (and forget the body of a closed job)."""
        if not (job.state.active or (job.state is State.COMPLETED and job.outputs and not job.fetched)):
            self._bodies.pop(job.id, None)
        self.fanout.publish(JobEvent.of(kind, job, self.bridge, detail))

    # reading jobs ---------------------------------------------------------------------------------
    @guarded
    async def job(self, job_id: str) -> Job | None:
        """One job by id, outputs still on record loaded."""
        row = self.db.execute(f"SELECT {COLS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._with_outputs(self._job(row)) if row is not None else None

    @guarded
    async def client_jobs(self, client_id: str) -> list[Job]:
        """The client's waiting, running and untaken jobs, oldest first."""
        return self._jobs(self.db.execute(SQL_CLIENT_JOBS, (client_id,)))

    @guarded
    async def status_job(self, client_id: str) -> Job | None:
        """The client's latest active job, else its latest job: a record of its state (no outputs; inputs, prompt
        and files only if at hand)."""
        row = (self.db.execute(f"SELECT {COLS} FROM jobs INDEXED BY jobs_open WHERE {OPEN} AND client_id = ? AND state IN {LIVE}"
                               " ORDER BY seq DESC LIMIT 1", (client_id,)).fetchone()
               or self.db.execute(f"SELECT {COLS} FROM jobs WHERE client_id = ? ORDER BY seq DESC LIMIT 1",
                                  (client_id,)).fetchone())
        return self._job(row, body=False) if row is not None else None

    @guarded
    async def known_client(self, client_id: str) -> bool:
        """True if this clientId ever submitted a job."""
        return self.db.execute("SELECT 1 FROM jobs WHERE client_id = ? LIMIT 1", (client_id,)).fetchone() is not None

    @guarded
    async def latest_backend(self, client_id: str) -> str | None:
        """The backend of the client's newest dispatched job."""
        row = self.db.execute("SELECT backend FROM jobs WHERE client_id = ? AND backend IS NOT NULL"
                              " ORDER BY seq DESC LIMIT 1", (client_id,)).fetchone()
        return str(row[0]) if row is not None else None

    @guarded
    async def active_on(self, backend: str) -> list[Job]:
        """Jobs dispatching or running on a backend, oldest first."""
        return self._jobs(self.db.execute(f"SELECT {COLS} FROM jobs INDEXED BY jobs_open WHERE {OPEN}"
                                          " AND state IN ('dispatching', 'running') AND backend = ? ORDER BY seq",
                                          (backend,)),
                          outputs=False)

    @guarded
    async def active_elsewhere(self, backends: list[str]) -> list[Job]:
        """Jobs dispatching or running on a backend not in `backends`, oldest first."""
        marks = ", ".join("?" * len(backends))
        return self._jobs(self.db.execute(f"SELECT {COLS} FROM jobs INDEXED BY jobs_open WHERE {OPEN}"
                                          " AND state IN ('dispatching', 'running')"
                                          f" AND backend NOT IN ({marks}) ORDER BY seq", backends),
                          outputs=False)

    # take-once ------------------------------------------------------------------------------------
    @guarded
    async def claim_results(self, client_id: str, hold: float) -> list[Job] | None:
        """Reserve the client's untaken results for one answer; None while another answer holds them all."""
        ready = self._jobs(self.db.execute(SQL_UNTAKEN, (client_id,)))
        now = time.monotonic()
        free = [j for j in ready if self._reserved.get(j.id, 0.0) <= now]
        if ready and not free:
            return None
        for job in free:
            self._reserved[job.id] = now + hold
        return free

    async def release_results(self, job_ids: list[str]) -> None:
        """The answer did not go out whole: these results can be taken again."""
        for job_id in job_ids:
            self._reserved.pop(job_id, None)

    @guarded
    async def mark_fetched(self, job_ids: list[str], expired: bool = False) -> list[str]:
        """Taken (or expired untaken): taken outputs stay for the grace, expired ones are forgotten now.
        Publishes fetched; returns the paths to delete now."""
        db = self.db
        paths: list[str] = []
        if expired:
            db.execute("BEGIN")
            try:
                jobs = self._jobs(db.execute(SQL_FETCHED, (1, time.time(), json.dumps(job_ids))).fetchall())
                paths = [str(r[0]) for r in db.execute(f"DELETE FROM outputs WHERE job_id IN {IDS} RETURNING path",
                                                       (json.dumps([j.id for j in jobs]),))]
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        else:  # one statement; the outputs (read after it) stay for the grace
            jobs = self._jobs(db.execute(SQL_FETCHED, (0, time.time(), json.dumps(job_ids))).fetchall())
        for job in jobs:
            self._reserved.pop(job.id, None)
            self._count(job.owner, -sum(o.size for o in job.outputs))  # no longer counts against the quota
            if expired:
                job.outputs = []
            self._emit(FETCHED, job)
        return paths

    @guarded
    async def taken_jobs(self, client_id: str, since: float) -> list[Job]:
        """The client's results taken at or after `since` whose outputs are still on record."""
        rows = self.db.execute(f"SELECT {COLS} FROM jobs WHERE client_id = ? AND fetched_at >= ? AND expired = 0"
                               " ORDER BY seq", (client_id, since))
        return [j for j in self._jobs(rows) if j.outputs]

    @guarded
    async def expired_results(self, before: float) -> list[str]:
        """Ids of completed jobs whose untaken, unreserved results finished before `before`."""
        now = time.monotonic()
        return [r[0] for r in self.db.execute(SQL_EXPIRED, (before,)) if self._reserved.get(r[0], 0.0) <= now]

    @guarded
    async def purge_taken(self, before: float) -> list[str]:
        """Forget the outputs of results taken before `before`; returns their paths."""
        rows = self.db.execute("DELETE FROM outputs WHERE job_id IN (SELECT id FROM jobs WHERE fetched_at IS NOT NULL"
                               " AND fetched_at < ?) RETURNING path", (before,)).fetchall()
        return [str(r[0]) for r in rows]

    @guarded
    async def log_page(self, limit: int, offset: int, owner: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """One page of the generation log, newest first, and its total (one owner's, or all)."""
        where, args = ("WHERE owner = ?", [owner]) if owner is not None else ("", [])
        total = int(self.db.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0])
        cur = self.db.execute(
            "SELECT id, workflow, state, error, created_at, finished_at, fetched, expired,"
            " EXISTS (SELECT 1 FROM outputs WHERE job_id = jobs.id) AS stored"
            f" FROM jobs {where} ORDER BY seq DESC LIMIT ? OFFSET ?", [*args, limit, offset])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur], total

    # uploads and quota ----------------------------------------------------------------------------
    @guarded
    async def add_upload(self, name: str, sha256: str, size: int, content_type: str, original: str,
                         owner: str = "") -> None:
        """Record a stored upload and whose it is."""
        self.db.execute("INSERT INTO uploads (name, sha256, size, content_type, original, created_at, owner)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)", (name, sha256, size, content_type, original, time.time(), owner))
        self._count(owner, size)

    @guarded
    async def upload(self, name: str, owner: str | None = None) -> dict[str, Any] | None:
        """A stored upload by name (only if `owner` holds it, when given)."""
        cur = self.db.execute("SELECT * FROM uploads WHERE name = ?", (name,))
        row = cur.fetchone()
        if row is None:
            return None
        found = dict(zip([d[0] for d in cur.description], row))
        return found if owner is None or found["owner"] == owner else None

    @guarded
    async def expire_uploads(self, before: float) -> list[str]:
        """Forget uploads older than `before` that no waiting, running or untaken job refers to."""
        rows = self.db.execute(f"DELETE FROM uploads WHERE created_at < ? AND name NOT IN ({SQL_UPLOADS_IN_USE})"
                               " RETURNING name, owner, size", (before,)).fetchall()
        for _, owner, size in rows:
            self._count(owner, -size)
        return [str(r[0]) for r in rows]

    @guarded
    async def usage(self, owner: str) -> int:
        """Bytes an owner has stored: uploads plus untaken results (cached, kept right on every change)."""
        if owner not in self._usage:
            uploads = self.db.execute("SELECT COALESCE(SUM(size), 0) FROM uploads WHERE owner = ?", (owner,)).fetchone()[0]
            results = self.db.execute(
                "SELECT COALESCE(SUM(o.size), 0) FROM outputs AS o JOIN jobs AS j ON j.id = o.job_id"
                " WHERE j.owner = ? AND j.fetched = 0", (owner,)).fetchone()[0]
            self._usage[owner] = int(uploads) + int(results)
        return self._usage[owner]

    def _count(self, owner: str, delta: int) -> None:
        if owner in self._usage:  # owners not asked about yet are summed from the tables when they are
            self._usage[owner] = max(0, self._usage[owner] + delta)

    # presence, leases, commands, meta -------------------------------------------------------------
    async def attach(self, client_id: str, delta: int) -> None:
        """Count this process's open sockets and event streams of a client."""
        left = self._attached.get(client_id, 0) + delta
        if left > 0:
            self._attached[client_id] = left
        else:
            self._attached.pop(client_id, None)

    async def attached(self, client_id: str) -> bool:
        """True while this process holds a socket or event stream of the client."""
        return client_id in self._attached

    async def leases(self, backends: list[str], ttl: float) -> set[str]:
        """The only bridge on this file drives every backend."""
        return set(backends)

    async def release_leases(self) -> None:
        """Nothing to give up: no other bridge shares this file."""

    async def command(self, kind: str, backend: str, detail: str = "") -> None:
        """Deliver a command to the bridge driving `backend`: this one."""
        self.fanout.publish(JobEvent(kind=kind, backend=backend, detail=detail, origin=self.bridge))

    @guarded
    async def meta(self, key: str, make: Callable[[], str]) -> str:
        """A persistent value, created by make() the first time."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is not None:
            return str(row[0])
        value = str(make())
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
        return value
