"""The PostgreSQL engine of the job store: any number of bridges share one queue, one log, one count.

The driver is asyncpg: a maintained asyncio driver with its own binary protocol implementation (the
fastest of the asyncio drivers), a connection pool with acquire and statement timeouts, and LISTEN
built in (`add_listener`), which is what cross-bridge events need; psycopg 3 would do too, with more
moving parts (a separate pool package, notifies through a generator). It is an optional dependency
(requirements-postgres.txt), imported only when a PostgreSQL store is opened, so SQLite users and the
single-file build never need it.

How the contract holds across bridges:
- The fair claim is one `UPDATE ... WHERE seq = (SELECT ... ORDER BY round, seq LIMIT 1 FOR UPDATE
  SKIP LOCKED)`: two bridges never get the same job and neither waits for the other. Enqueues take a
  transaction-level advisory lock, so the caps and the fair round are exact across bridges.
- Every transition is a compare-and-set `UPDATE ... WHERE state = ANY(expected)`.
- Take-once reserves rows with `delivering_until` (the database's clock) under `FOR UPDATE`: of
  concurrent claims on any bridges exactly one gets the results.
- Every change of a job is one statement that also builds its `JobEvent` from the changed row, keeps
  it in the events table and NOTIFYs it (PostgreSQL delivers it at commit): one round trip. Each bridge
  LISTENs on one connection and hands what other bridges did to its subscribers, while its own events
  go to them right after the commit (their echo is dropped: each payload names the store instance
  that sent it, the bridge's name plus a random suffix). A bridge that listens again after a dropped
  connection reads what it missed from the events table (pg_link.py).
- Progress steps are NOTIFY only; the row's progress is written at most once a second per job.
- Leases, heartbeats and presence: pg_leases.py; reading and keeping records: pg_records.py; the
  schema and its migrations: pg_schema.py.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from typing import Any, Iterable

from . import pg_leases, pg_schema
from .jobs import Job, Output, State
from .jobstore import CANCEL, PROGRESS, REQUEUED, JobEvent, QueueFull, StoreUnavailable
from .pg_link import KEEP_EVENTS, describe, payload, unavailable_errors
from .pg_records import PgRecords
from .pg_rows import ACTIVE, ENQUEUE, INSERTED, JOB, OUTPUTS, assignments, encode, job_of, names, states

log = logging.getLogger(__name__)

ENQUEUE_LOCK = 0x636F6D66_0003  # pg_advisory_xact_lock key of enqueues ("comf" + 3)
PROGRESS_WRITE_EVERY = 1.0  # seconds between writes of one job's progress column
TERMINAL = frozenset({State.COMPLETED, State.FAILED, State.CANCELLED})


class PostgresStore(PgRecords):
    """Jobs, the fair queue, take-once, uploads, leases and events in one PostgreSQL database.

    `PostgresStore(url, bridge)`: `bridge` is this bridge's name in events and leases; `timeout` bounds
    every wait on the database; `lease_ttl` is the lease TTL (each leases() call sets it), which also
    bounds how long a silent bridge's sockets still count (pg_leases.lifetime)."""

    # lifecycle ----------------------------------------------------------------------------------
    async def open(self) -> None:
        """Connect, run pending schema migrations (one bridge at a time), start listening."""
        await self.link.open()
        try:
            async with self.link.connection() as conn:
                await pg_schema.migrate(conn)
                await pg_leases.heartbeat(conn, self.instance, self.bridge)
            await self.link.listen()
        except BaseException:
            await self.link.close()
            raise

    async def close(self) -> None:
        """Stop listening and close the connections."""
        await self.link.close()

    @property
    def available(self) -> bool:
        """False while PostgreSQL cannot be reached."""
        return self.link.available

    @property
    def shared(self) -> bool:
        """Always True: other bridges may share this database."""
        return True

    @property
    def durable(self) -> bool:
        """True: a PostgreSQL commit outlives an OS crash of the bridge's machine."""
        return True

    async def pending_migrations(self) -> list[int]:
        """Migrations open() would run on this database (for --check; reads only, no open() needed)."""
        try:
            return await pg_schema.pending(self.link.url, self.link.timeout)
        except unavailable_errors() as exc:
            raise StoreUnavailable(f"cannot reach the job store's PostgreSQL: {describe(exc)}") from exc

    # the queue ----------------------------------------------------------------------------------
    async def enqueue(self, job: Job, max_queue: int, max_per_owner: int) -> Job:
        """Record a new QUEUED job at its fair place; raises QueueFull at a cap. Emits queued."""
        job.state = State.QUEUED
        values = list(encode({name: getattr(job, name) for name in INSERTED}).values())
        async with self._tx() as (conn, events):
            await conn.execute("SELECT pg_advisory_xact_lock($1)", ENQUEUE_LOCK)
            added = await self._changed(conn, ENQUEUE, [*values, job.owner, job.client_id, max_queue, max_per_owner],
                                        State.QUEUED.value)
            if not added:
                waiting = await conn.fetchval("SELECT count(*) FROM jobs WHERE state = 'queued'")
                if waiting >= max_queue:
                    raise QueueFull(f"the queue is full ({max_queue} jobs waiting); try again later")
                raise QueueFull(f"this caller already has {max_per_owner} jobs waiting "
                                "(jobs.max_queue_per_identity); try again when some have started")
            [(stored, event)] = added
            events.append(event)
            if State.QUEUED.value in self.outbox_kinds:
                await self._add_deliveries(conn, State.QUEUED.value, [stored])
        job.seq, job.round = stored.seq, stored.round
        return job

    async def claim(self, backend: str, workflows: frozenset[str] | None) -> Job | None:
        """Take the first waiting job in fair order whose workflow fits; None when none waits. Emits dispatching."""
        claimed = await self._change(
            "UPDATE jobs SET state = 'dispatching', backend = $1, attempts = attempts + 1, progress = 0,"
            " prompt_id = NULL WHERE state = 'queued' AND seq = (SELECT seq FROM jobs WHERE state = 'queued'"
            " AND ($2::text[] IS NULL OR workflow = ANY($2::text[])) ORDER BY round, seq LIMIT 1 FOR UPDATE SKIP LOCKED)",
            [backend, names(workflows)], State.DISPATCHING.value)
        return claimed[0] if claimed else None

    async def peek(self, workflows: frozenset[str] | None) -> Job | None:
        """The job claim() would take now, without taking it."""
        async with self.link.connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {JOB} FROM jobs WHERE state = 'queued' AND ($1::text[] IS NULL OR workflow = ANY($1::text[]))"
                " ORDER BY round, seq LIMIT 1", names(workflows))
        return job_of(row) if row is not None else None

    async def queue_length(self) -> int:
        """Jobs waiting."""
        async with self.link.connection() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM jobs WHERE state = 'queued'"))

    async def position(self, job_id: str) -> int | None:
        """1-based place of a waiting job in dispatch order; None when it is not waiting."""
        async with self.link.connection() as conn:
            place = await conn.fetchval(
                "SELECT (SELECT count(*) FROM jobs q WHERE q.state = 'queued' AND (q.round, q.seq) < (j.round, j.seq))"
                " + 1 FROM jobs j WHERE j.id = $1 AND j.state = 'queued'", job_id)
        return int(place) if place is not None else None

    async def positions(self) -> dict[str, int]:
        """Every waiting job's place, in one query."""
        async with self.link.connection() as conn:
            rows = await conn.fetch("SELECT id, row_number() OVER (ORDER BY round, seq) FROM jobs WHERE state = 'queued'")
        return {r[0]: int(r[1]) for r in rows}

    # changes of a job -----------------------------------------------------------------------------
    async def update(self, job_id: str, expect: Iterable[State], **fields: Any) -> Job | None:
        """Set fields of a job in one of the `expect` states, without a state change or event."""
        sets, values = assignments(fields, 3)
        if not sets:
            return await self._expected(job_id, expect)
        async with self.link.connection() as conn:
            row = await conn.fetchrow(f"UPDATE jobs SET {sets} WHERE id = $1 AND state = ANY($2::text[]) RETURNING {JOB}",
                                      job_id, states(expect), *values)
        return job_of(row) if row is not None else None

    async def _expected(self, job_id: str, expect: Iterable[State]) -> Job | None:
        async with self.link.connection() as conn:
            row = await conn.fetchrow(f"SELECT {JOB} FROM jobs WHERE id = $1 AND state = ANY($2::text[])",
                                      job_id, states(expect))
        return job_of(row) if row is not None else None

    async def transition(self, job_id: str, expect: Iterable[State], to: State, *,
                         error: str | None = None, outputs: list[Output] | None = None,
                         **fields: Any) -> Job | None:
        """Compare-and-set a job from one of `expect` to `to` and emit the event named after `to`."""
        changes: dict[str, Any] = {**fields, "state": to.value}
        if to in TERMINAL:
            changes.update(error=error, finished_at=time.time())
        elif error is not None:
            changes["error"] = error
        if to is State.COMPLETED:
            changes["progress"] = 1.0
        sets, values = assignments(changes, 3)
        if to is State.RUNNING:  # counted: the trigger jobs_counted adds it to the generation count once
            sets += f", counted = true, started_at = COALESCE(started_at, ${3 + len(values)})"
            values.append(time.time())
        change = f"UPDATE jobs SET {sets} WHERE id = $1 AND state = ANY($2::text[])"
        args = [job_id, states(expect), *values]
        if to is not State.RUNNING:
            self._progress_written.pop(job_id, None)
        if to is not State.COMPLETED or not outputs:
            moved = await self._change(change, args, to.value)
            return moved[0] if moved else None
        also = OUTPUTS.format(*range(len(args) + 1, len(args) + 7))
        args += [[o.node_id for o in outputs], [o.filename for o in outputs], [o.content_type for o in outputs],
                 [o.path for o in outputs], [o.size for o in outputs], [json.dumps(o.meta) for o in outputs]]
        wanted = to.value in self.outbox_kinds
        async with self._tx(atomic=wanted) as (conn, events):  # one statement, unless deliveries go with it
            changed = await self._changed(conn, change, args, to.value, size=sum(o.size for o in outputs), also=also)
            for job, event in changed:
                job.outputs = list(outputs)  # written by the same statement, so not in its own view of the outputs
                events.append(event)
            if wanted:
                await self._add_deliveries(conn, to.value, [job for job, _ in changed])
        return changed[0][0] if changed else None

    async def requeue(self, job_id: str, expect: Iterable[State], reason: str) -> Job | None:
        """Put a job back at the head of the line; emits requeued. None if not in `expect`."""
        self._progress_written.pop(job_id, None)
        moved = await self._change(
            "UPDATE jobs SET state = 'queued', backend = NULL, prompt_id = NULL, progress = 0,"
            " round = (SELECT COALESCE(min(round), 0) - 1 FROM jobs WHERE state = 'queued')"
            " WHERE id = $1 AND state = ANY($2::text[])", [job_id, states(expect)], REQUEUED, detail=reason)
        return moved[0] if moved else None

    async def progress(self, job: Job, value: float) -> None:
        """Emit a progress event to every bridge; the stored value is written at most once a second."""
        event = replace(JobEvent.of(PROGRESS, job, origin=self.bridge), progress=value)
        now = time.monotonic()
        write = now - self._progress_written.get(job.id, 0.0) >= PROGRESS_WRITE_EVERY
        if write:
            self._progress_written[job.id] = now
        if write and PROGRESS in self.outbox_kinds:  # the written progress and its deliveries, in one transaction
            async with self._tx() as (conn, _):
                await self.link.notify(conn, [payload(event, self.instance)], keep=False)
                row = await conn.fetchrow(f"UPDATE jobs SET progress = $1 WHERE id = $2 AND state = 'running'"
                                          f" RETURNING {JOB}", value, job.id)
                await self._add_deliveries(conn, PROGRESS, [job_of(row)] if row is not None else [])
        else:
            async with self.link.connection() as conn:
                await self.link.notify(conn, [payload(event, self.instance)], keep=False)
                if write:
                    await conn.execute("UPDATE jobs SET progress = $1 WHERE id = $2 AND state = 'running'",
                                       value, job.id)
        self.fanout.publish(event)

    async def request_cancel(self, job_ids: list[str], reason: str) -> list[Job]:
        """Cancel waiting jobs here; mark running ones and send a cancel event to the bridge running each."""
        async with self._tx() as (conn, events):
            changed = await self._changed(
                conn, "UPDATE jobs SET state = 'cancelled', error = $2, cancel_reason = $2, finished_at = $3"
                " WHERE id = ANY($1::text[]) AND state = 'queued'", [job_ids, reason, time.time()], State.CANCELLED.value)
            changed += await self._changed(
                conn, f"UPDATE jobs SET cancel_reason = COALESCE(cancel_reason, $2) WHERE id = ANY($1::text[])"
                f" AND state IN {ACTIVE}", [job_ids, reason], CANCEL, detail_sql="COALESCE({detail}::text, moved.cancel_reason)")
            if State.CANCELLED.value in self.outbox_kinds:
                await self._add_deliveries(conn, State.CANCELLED.value, [job for job, ev in changed
                                                                         if ev.kind == State.CANCELLED.value])
            changed.sort(key=lambda pair: pair[0].seq)
            events += [event for _, event in changed]
        return [job for job, _ in changed]

    # backends: leases and shared values -----------------------------------------------------------
    async def leases(self, backends: list[str], ttl: float) -> set[str]:
        """Heartbeat, renew, and take or give up leases towards an even spread; returns the backends held.
        Call it every ttl/3 even without backends: it is also this bridge's heartbeat for presence."""
        self.lease_ttl = ttl
        async with self._tx() as (conn, _):
            await conn.execute("DELETE FROM events WHERE at < now() - make_interval(secs => $1)", KEEP_EVENTS)
            return await pg_leases.round_of(conn, self.instance, self.bridge, list(backends), ttl,
                                            take_expired=time.monotonic() - self.link.recovered_at >= ttl)

    async def release_leases(self) -> None:
        """Give up every lease and leave the live bridges (clean shutdown)."""
        async with self._tx() as (conn, _):
            await pg_leases.release(conn, self.instance)

    async def command(self, kind: str, backend: str, detail: str = "") -> None:
        """Send an event of `kind` to whichever bridge drives `backend` (every bridge hears it)."""
        event = JobEvent(kind=kind, backend=backend, detail=detail, origin=self.bridge)
        async with self.link.connection() as conn:
            await self.link.notify(conn, [payload(event, self.instance)])
        self.fanout.publish(event)
