"""The embedded engine of the job store: one bridge, one SQLite file in data_dir, zero set-up.

WAL mode, synchronous=NORMAL (a commit survives kill -9; an OS crash may lose the last ones, never
corrupt the file), autocommit with short explicit transactions. The async methods run their statements
directly on the event loop's thread: each takes microseconds, and a thread hop would cost more.
The generation count lives in data_dir/current_state.json, as it always has."""
from __future__ import annotations

import asyncio
import json
import logging
import math
import sqlite3
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

from . import sqlite_schema
from .gencount import GenerationCounter
from .jobs import Job, Output, State
from .jobstore import CANCEL, PROGRESS, REQUEUED, JobEvent, QueueFull
from .sqlite_outbox import SqliteOutbox
from .sqlite_records import COLS, IDS, guarded, states_sql
from .sqlite_schema import OPEN

log = logging.getLogger(__name__)

PROGRESS_WRITE = 1.0  # seconds a running job's stored progress may lag its events
_NEW = ("id", "client_id", "workflow", "inputs", "prompt", "files", "timeout", "state", "created_at", "owner",
        "cancel_reason", "webhook")

# a new job, inserted only while both caps allow it (the two counts read the partial indexes of waiting
# jobs); its round: one past its client's last waiting one, else the lowest waiting round (else 0)
SQL_INSERT = (f"INSERT INTO jobs ({', '.join(_NEW)}, round) SELECT {', '.join('?' * len(_NEW))},"
              f" COALESCE((SELECT MAX(round) + 1 FROM jobs WHERE {OPEN} AND client_id = ? AND state = 'queued'),"
              " (SELECT MIN(round) FROM jobs WHERE state = 'queued'), 0)"
              " WHERE (SELECT COUNT(*) FROM jobs WHERE state = 'queued') < ?"
              " AND (? = '' OR (SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND owner = ?) < ?)"
              " RETURNING seq, round")
SQL_WAITING = "SELECT COUNT(*) FROM jobs WHERE state = 'queued'"
# the first waiting job in fair order among a JSON list of workflows (bound twice; NULL: any workflow)
SQL_FIRST = ("SELECT id FROM jobs WHERE state = 'queued' AND (? IS NULL OR workflow IN (SELECT value FROM json_each(?)))"
             " ORDER BY round, seq LIMIT 1")
SQL_CLAIM = ("UPDATE jobs SET state = 'dispatching', backend = ?, attempts = attempts + 1, progress = 0,"
             f" prompt_id = NULL WHERE id = ({SQL_FIRST}) RETURNING {COLS}")
SQL_PEEK = f"SELECT {COLS} FROM jobs WHERE id = ({SQL_FIRST})"
SQL_PLACE = ("SELECT COUNT(*) FROM jobs AS j, jobs AS me WHERE me.id = ? AND me.state = 'queued'"
             " AND j.state = 'queued' AND (j.round, j.seq) <= (me.round, me.seq)")
# back at the head of the line: one round before the lowest waiting one
SQL_REQUEUE = ("UPDATE jobs SET state = 'queued', backend = NULL, prompt_id = NULL, progress = 0,"
               " round = COALESCE((SELECT MIN(round) FROM jobs WHERE state = 'queued'), 1) - 1"
               f" WHERE id = ? AND state IN {{}} RETURNING {COLS}")
SQL_ADD_OUTPUT = ("INSERT OR REPLACE INTO outputs (job_id, idx, node_id, filename, content_type, path, size, meta)"
                  " VALUES (?, ?, ?, ?, ?, ?, ?, ?)")


class SqliteStore(SqliteOutbox):
    """The JobStore of a single bridge, in data_dir/bridge.sqlite3."""

    def __init__(self, data_dir: Path, bridge: str = "") -> None:
        super().__init__(bridge)
        self.data_dir = data_dir
        self.path = data_dir / "bridge.sqlite3"
        self.counter: GenerationCounter | None = None
        self._progress_timer: asyncio.TimerHandle | None = None
        self._sql: dict[Any, str] = {}  # statement texts built once per shape of change
        self._listed: dict[frozenset[str], str] = {}  # backends' workflow sets as JSON lists
        self._columns: frozenset[str] = frozenset()  # of the jobs table, once open

    # lifecycle ----------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """False after the file failed a statement, until one succeeds again."""
        return self._ok and self._db is not None

    @property
    def shared(self) -> bool:
        """One bridge owns this file (data_dir is locked)."""
        return False

    @property
    def schema_version(self) -> int:
        """The schema version of the open file."""
        return sqlite_schema.version(self.db)

    async def pending_migrations(self) -> list[int]:
        """Migrations open() would run on this data_dir's file (the file is only read)."""
        return sqlite_schema.pending(self.path)

    async def open(self) -> None:
        """Open (or create) the file, run pending migrations, load the generation count."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, cached_statements=512)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        sqlite_schema.migrate(db)
        self._db = db
        self._columns = frozenset(row[1] for row in db.execute("PRAGMA table_info(jobs)"))
        floor = int(db.execute("SELECT COUNT(*) FROM jobs WHERE counted = 1").fetchone()[0])
        self.counter = GenerationCounter(self.data_dir / "current_state.json", floor=floor)

    async def close(self) -> None:
        """Write pending progress and the count, close the file."""
        if self._db is None:
            return
        self._write_progress()
        if self.counter is not None:
            self.counter.flush()
        self._db.close()
        self._db = None

    async def migrate(self) -> list[int]:
        """Run pending migrations on the open file (open() already does); returns the versions applied."""
        return sqlite_schema.migrate(self.db)

    @guarded
    async def generation_count(self) -> int:
        """The persistent count of jobs that started running."""
        assert self.counter is not None, "the store is not open"
        return self.counter.value

    def _assignments(self, names: Iterable[str]) -> str:
        """`col = ?, ...` for job fields (built once per set of names; a name that is no column is refused)."""
        names = list(names)
        unknown = set(names) - self._columns
        if unknown:
            raise TypeError(f"not a changeable job field: {', '.join(sorted(unknown))}")
        return ", ".join(f"{n} = ?" for n in names)

    # the queue ----------------------------------------------------------------------------------
    @guarded
    async def enqueue(self, job: Job, max_queue: int, max_per_owner: int) -> Job:
        """Record a new waiting job at its fair place; QueueFull at max_queue or the owner's cap."""
        job.state = State.QUEUED
        wanted = State.QUEUED.value in self.outbox_kinds
        with self._atomic(wanted):
            placed = self.db.execute(SQL_INSERT, (
                job.id, job.client_id, job.workflow, json.dumps(job.inputs), json.dumps(job.prompt),
                json.dumps(job.files), job.timeout, job.state.value, job.created_at, job.owner, job.cancel_reason,
                json.dumps(job.webhook) if job.webhook is not None else None, job.client_id, max_queue, job.owner,
                job.owner, max_per_owner)).fetchone()
            if placed is not None and wanted:
                self._add_deliveries(State.QUEUED.value, [job])
        if placed is None:  # a cap stopped it: say which
            if self.db.execute(SQL_WAITING).fetchone()[0] >= max_queue:
                raise QueueFull(f"the queue is full ({max_queue} jobs waiting); try again later")
            raise QueueFull(f"this caller already has {max_per_owner} jobs waiting "
                            "(jobs.max_queue_per_identity); try again when some have started")
        job.seq, job.round = placed
        self._emit(job.state.value, job)
        return job

    def _workflows(self, workflows: frozenset[str] | None) -> str | None:
        """A backend's workflows as the JSON list SQL_FIRST takes (made once per set)."""
        if workflows is None:
            return None
        listed = self._listed.get(workflows)
        if listed is None:
            listed = self._listed[workflows] = json.dumps(sorted(workflows))
        return listed

    @guarded
    async def claim(self, backend: str, workflows: frozenset[str] | None) -> Job | None:
        """Take the first waiting job in fair order a backend can run: QUEUED -> DISPATCHING, in one UPDATE."""
        allowed = self._workflows(workflows)
        row = self.db.execute(SQL_CLAIM, (backend, allowed, allowed)).fetchone()
        if row is None:
            return None
        self._progress.pop(row[1], None)
        job = self._job(row)
        self._emit(job.state.value, job)
        return job

    @guarded
    async def peek(self, workflows: frozenset[str] | None) -> Job | None:
        """The job claim() would take now."""
        allowed = self._workflows(workflows)
        row = self.db.execute(SQL_PEEK, (allowed, allowed)).fetchone()
        return self._job(row) if row is not None else None

    @guarded
    async def queue_length(self) -> int:
        """Jobs waiting."""
        return int(self.db.execute(SQL_WAITING).fetchone()[0])

    @guarded
    async def position(self, job_id: str) -> int | None:
        """1-based place of a waiting job in (round, seq) order."""
        place = int(self.db.execute(SQL_PLACE, (job_id,)).fetchone()[0])
        return place or None

    @guarded
    async def positions(self) -> dict[str, int]:
        """Every waiting job's place, in one ordered scan of the fair index."""
        rows = self.db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY round, seq")
        return {row[0]: place for place, row in enumerate(rows, 1)}

    # changes of a job -----------------------------------------------------------------------------
    @guarded
    async def update(self, job_id: str, expect: Iterable[State], **fields: Any) -> Job | None:
        """Set fields of a job in one of `expect`, no event. None if it is in another state."""
        names = tuple(sorted(fields))
        expect = tuple(expect)
        key = ("update", names, expect)
        sql = self._sql.get(key)
        if sql is None:
            sql = self._sql[key] = (f"UPDATE jobs SET {self._assignments(names) or 'id = id'}"
                                    f" WHERE id = ? AND state IN {states_sql(expect)} RETURNING {COLS}")
        row = self.db.execute(sql, (*(self._value(n, fields[n]) for n in names), job_id)).fetchone()
        if row is None:
            return None
        job = self._job(row)
        return self._with_outputs(job) if job.state is State.COMPLETED else job  # only results have outputs

    @guarded
    async def transition(self, job_id: str, expect: Iterable[State], to: State, *,
                         error: str | None = None, outputs: list[Output] | None = None,
                         **fields: Any) -> Job | None:
        """Compare-and-set a job from one of `expect` to `to`; publishes the event named after `to`."""
        expect = tuple(expect)
        now = time.time()
        terminal = not to.active
        if terminal or error is not None:
            fields["error"] = error
        if terminal:
            fields["finished_at"] = now
        if to is State.COMPLETED:
            fields["progress"] = 1.0
        pending = self._progress.pop(job_id, None)
        if pending is not None and "progress" not in fields and to is not State.QUEUED:
            fields["progress"] = pending
        names = tuple(sorted(fields))
        key = ("transition", names, expect, to)
        sql = self._sql.get(key)
        if sql is None:
            # the first start counts the job: the row says so by holding exactly this start time (a job
            # counted before keeps its start, or gets one a hair earlier if an old record had none)
            started = (", counted = 1, started_at = CASE WHEN counted = 0 THEN ? ELSE COALESCE(started_at, ?) END"
                       if to is State.RUNNING else "")
            sets = ", ".join(filter(None, [f"state = '{to.value}'", self._assignments(names)]))
            sql = self._sql[key] = (f"UPDATE jobs SET {sets}{started} WHERE id = ? AND state IN {states_sql(expect)}"
                                    f" RETURNING {COLS}")
        args = [self._value(n, fields[n]) for n in names]
        if to is State.RUNNING:
            args += [now, math.nextafter(now, 0.0)]
        args.append(job_id)
        db = self.db
        stored = bool(to is State.COMPLETED and outputs)
        wanted = to.value in self.outbox_kinds
        with self._atomic(stored or wanted):
            row = db.execute(sql, args).fetchone()
            job = self._job(row) if row is not None else None
            if job is not None and stored and outputs:
                db.executemany(SQL_ADD_OUTPUT, [(job_id, i, o.node_id, o.filename, o.content_type, o.path, o.size,
                                                 json.dumps(o.meta)) for i, o in enumerate(outputs)])
                job.outputs = list(outputs)
            if job is not None and wanted:
                self._add_deliveries(to.value, [job])
        if job is None:
            if pending is not None:
                self._progress[job_id] = pending
            return None
        if to is State.RUNNING and job.started_at == now and self.counter is not None:
            self.counter.increment()
        if stored:
            self._count(job.owner, sum(o.size for o in job.outputs))
        self._emit(to.value, job)
        return job

    @guarded
    async def requeue(self, job_id: str, expect: Iterable[State], reason: str) -> Job | None:
        """Back to the head of the line: round = the lowest waiting round - 1. Publishes requeued."""
        expect = tuple(expect)
        sql = self._sql.get(("requeue", expect))
        if sql is None:
            sql = self._sql[("requeue", expect)] = SQL_REQUEUE.format(states_sql(expect))
        wanted = REQUEUED in self.outbox_kinds
        with self._atomic(wanted):
            row = self.db.execute(sql, (job_id,)).fetchone()
            job = self._job(row) if row is not None else None
            if job is not None and wanted:
                self._add_deliveries(REQUEUED, [job])
        if job is None:
            return None
        self._progress.pop(job_id, None)
        self._emit(REQUEUED, job, reason)
        return job

    async def progress(self, job: Job, value: float) -> None:
        """Publish a progress event now; the row gets the value within PROGRESS_WRITE (or at the next change)."""
        self._progress[job.id] = value
        if self._progress_timer is None:
            self._progress_timer = asyncio.get_running_loop().call_later(PROGRESS_WRITE, self._write_progress)
        self.fanout.publish(replace(JobEvent.of(PROGRESS, job, self.bridge), progress=value, state=State.RUNNING))

    def _write_progress(self) -> None:
        """Store the progress values of running jobs in one transaction."""
        if self._progress_timer is not None:
            self._progress_timer.cancel()
            self._progress_timer = None
        pending, self._progress = self._progress, {}
        if not pending or self._db is None:
            return
        try:
            if PROGRESS in self.outbox_kinds:  # each running job's row, and its deliveries, in one transaction
                with self._atomic(True):
                    jobs = [self._job(row) for k, v in pending.items() if (row := self._db.execute(
                        f"UPDATE jobs SET progress = ? WHERE id = ? AND state = 'running' RETURNING {COLS}",
                        (v, k)).fetchone()) is not None]
                    added = self._add_deliveries(PROGRESS, jobs)
                if added and self.outbox is not None:
                    self.outbox.wake()
            else:
                self._db.executemany("UPDATE jobs SET progress = ? WHERE id = ? AND state = 'running'",
                                     [(v, k) for k, v in pending.items()])
        except sqlite3.DatabaseError as exc:  # progress is a hint; the next transition writes the state
            log.warning("store: progress not written: %s", exc)

    @guarded
    async def request_cancel(self, job_ids: list[str], reason: str) -> list[Job]:
        """A waiting job becomes CANCELLED now; a dispatching or running one gets cancel_reason and a
        CANCEL event for the bridge running it. Returns the jobs that were active."""
        ids = json.dumps(job_ids)
        db = self.db
        db.execute("BEGIN")
        try:
            stopped = db.execute(
                "UPDATE jobs SET state = 'cancelled', error = ?, cancel_reason = ?, finished_at = ?"
                f" WHERE id IN {IDS} AND state = 'queued' RETURNING {COLS}", (reason, reason, time.time(), ids)
            ).fetchall()
            flagged = db.execute(
                "UPDATE jobs SET cancel_reason = COALESCE(cancel_reason, ?)"
                f" WHERE id IN {IDS} AND state IN ('dispatching', 'running') RETURNING {COLS}", (reason, ids)
            ).fetchall()
            cancelled = [self._job(row) for row in stopped]
            if State.CANCELLED.value in self.outbox_kinds:
                self._add_deliveries(State.CANCELLED.value, cancelled)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        out: list[Job] = []
        for job in cancelled:
            self._emit(State.CANCELLED.value, job)
            out.append(job)
        for row in flagged:
            job = self._job(row)
            self._emit(CANCEL, job, job.cancel_reason)
            out.append(job)
        out.sort(key=lambda j: j.seq)
        return out
