"""The PostgreSQL store's shared part: its link, events, and everything that reads or keeps records
(jobs, take-once, the log and the count, uploads and quota, callers' sockets, shared values).
The queue, the changes of a job and the leases are in store_pg.py."""
from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from .jobs import Job
from .jobstore import FETCHED, JobEvent
from .pg_leases import lifetime
from .pg_link import SENDER, PgLink
from .pg_outbox import PgOutbox
from .pg_rows import ACTIVE, DETAIL, HAS_OUTPUTS, JOB, UNTAKEN, emitting, job_of

if TYPE_CHECKING:
    from asyncpg import Record
    from asyncpg.pool import PoolConnectionProxy

    Conn = PoolConnectionProxy[Record]

log = logging.getLogger(__name__)


class PgRecords(PgOutbox):
    """What every PostgreSQL store method shares, and the methods that read or keep records."""

    def __init__(self, url: str, bridge: str, *, timeout: float = 5.0, pool_max: int = 8,
                 lease_ttl: float = 10.0) -> None:
        super().__init__()
        self.bridge = bridge
        self.instance = f"{bridge}#{secrets.token_hex(3)}"
        self.lease_ttl = lease_ttl  # bounds how long a silent bridge's presence rows still count
        self.link = PgLink(url, self.instance, self._remote, timeout=timeout, pool_max=pool_max)
        self._progress_written: dict[str, float] = {}  # job id -> when its progress column was last written

    def _remote(self, data: dict[str, Any]) -> None:
        if data.get(SENDER) == self.instance:
            return  # our own event, already delivered right after its commit
        try:
            event = JobEvent.from_dict(data)
        except (TypeError, ValueError):
            log.warning("job store: ignored an event of an unknown shape: %.200r", data)
            return
        self.fanout.publish(event)

    @contextlib.asynccontextmanager
    async def _tx(self, atomic: bool = True) -> AsyncIterator[tuple[Conn, list[JobEvent]]]:
        """One transaction (or, not `atomic`, statements that commit one by one); the events its statements
        sent (see _changed) go to this bridge's subscribers once it committed."""
        events: list[JobEvent] = []
        async with self.link.connection() as conn:
            async with conn.transaction() if atomic else contextlib.nullcontext():
                yield conn, events
        for event in events:
            self.fanout.publish(event)

    async def _changed(self, conn: Conn, change: str, args: list[Any], kind: str, detail: str | None = None,
                       size: int | None = None, detail_sql: str = DETAIL, also: str = "") -> list[tuple[Job, JobEvent]]:
        """Run one change of jobs that sends the event `kind` of each changed row (see pg_rows.emitting);
        the changed jobs and their events, which the caller publishes after the commit."""
        rows = await conn.fetch(emitting(change, len(args) + 1, detail_sql, also), *args,
                                kind, detail, self.bridge, time.time(), size, self.instance)
        return [(job_of(r), JobEvent.from_dict(json.loads(r["payload"]))) for r in rows]

    async def _change(self, change: str, args: list[Any], kind: str, detail: str | None = None) -> list[Job]:
        """One change of jobs in one statement (its own transaction, or one with the deliveries it makes), its
        events published after it."""
        if kind in self.outbox_kinds:
            async with self._tx() as (conn, events):
                changed = await self._changed(conn, change, args, kind, detail)
                events += [event for _, event in changed]
                await self._add_deliveries(conn, kind, [job for job, _ in changed])
            return [job for job, _ in changed]
        async with self.link.connection() as conn:
            changed = await self._changed(conn, change, args, kind, detail)
        for _, event in changed:
            self.fanout.publish(event)
        return [job for job, _ in changed]

    # reading jobs ---------------------------------------------------------------------------------
    async def job(self, job_id: str) -> Job | None:
        """One job by id, outputs still on record loaded; None if unknown."""
        return await self._one(f"SELECT {JOB} FROM jobs WHERE id = $1", job_id)

    async def client_jobs(self, client_id: str) -> list[Job]:
        """The client's jobs that wait, run or hold untaken results, oldest first."""
        return await self._many(f"SELECT {JOB} FROM jobs WHERE client_id = $1 AND (state IN ('queued', 'dispatching',"
                                f" 'running') OR ({UNTAKEN})) ORDER BY seq", client_id)

    async def status_job(self, client_id: str) -> Job | None:
        """The client's latest active job, else its latest job."""
        return await self._one(f"SELECT {JOB} FROM jobs WHERE client_id = $1 ORDER BY state IN ('queued', 'dispatching',"
                               " 'running') DESC, seq DESC LIMIT 1", client_id)

    async def known_client(self, client_id: str) -> bool:
        """True if this clientId ever submitted a job."""
        async with self.link.connection() as conn:
            return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM jobs WHERE client_id = $1)", client_id))

    async def latest_backend(self, client_id: str) -> str | None:
        """The backend of the client's newest dispatched job."""
        async with self.link.connection() as conn:
            value = await conn.fetchval("SELECT backend FROM jobs WHERE client_id = $1 AND backend IS NOT NULL"
                                        " ORDER BY seq DESC LIMIT 1", client_id)
        return str(value) if value is not None else None

    async def active_on(self, backend: str) -> list[Job]:
        """Jobs dispatching or running on a backend, oldest first."""
        return await self._many(f"SELECT {JOB} FROM jobs WHERE backend = $1 AND state IN {ACTIVE} ORDER BY seq", backend)

    async def active_elsewhere(self, backends: list[str]) -> list[Job]:
        """Jobs dispatching or running on a backend not in `backends`, oldest first."""
        return await self._many(f"SELECT {JOB} FROM jobs WHERE NOT (backend = ANY($1::text[]))"
                                f" AND state IN {ACTIVE} ORDER BY seq", backends)

    async def _one(self, query: str, *args: Any) -> Job | None:
        async with self.link.connection() as conn:
            row = await conn.fetchrow(query, *args)
        return job_of(row) if row is not None else None

    async def _many(self, query: str, *args: Any) -> list[Job]:
        async with self.link.connection() as conn:
            rows = await conn.fetch(query, *args)
        return [job_of(r) for r in rows]

    # take-once ------------------------------------------------------------------------------------
    async def claim_results(self, client_id: str, hold: float) -> list[Job] | None:
        """Reserve the client's untaken results for `hold` seconds: [] if none, None if all are reserved."""
        async with self._tx() as (conn, _):
            rows = await conn.fetch(f"SELECT id, COALESCE(delivering_until > now(), false) AS held FROM jobs"
                                    f" WHERE client_id = $1 AND {UNTAKEN} ORDER BY seq FOR UPDATE", client_id)
            if not rows:
                return []
            free = [r["id"] for r in rows if not r["held"]]
            if not free:
                return None
            taken = await conn.fetch(f"UPDATE jobs SET delivering_until = now() + make_interval(secs => $2)"
                                     f" WHERE id = ANY($1::text[]) RETURNING {JOB}", free, hold)
        return sorted(map(job_of, taken), key=lambda j: j.seq)

    async def release_results(self, job_ids: list[str]) -> None:
        """An answer did not go out whole: its results can be taken again."""
        async with self.link.connection() as conn:
            await conn.execute("UPDATE jobs SET delivering_until = NULL WHERE id = ANY($1::text[])", job_ids)

    async def mark_fetched(self, job_ids: list[str], expired: bool = False) -> list[str]:
        """The results were taken (or expired untaken); emits fetched; returns paths to delete now."""
        fetched = ("UPDATE jobs SET fetched = true, expired = $2, fetched_at = $3, delivering_until = NULL"
                   " WHERE id = ANY($1::text[]) AND NOT fetched")
        if not expired:
            await self._change(fetched, [job_ids, False, time.time()], FETCHED)
            return []
        async with self._tx() as (conn, events):
            changed = await self._changed(conn, fetched, [job_ids, True, time.time()], FETCHED)
            events += [event for _, event in changed]
            if not changed:
                return []
            rows = await conn.fetch("DELETE FROM outputs WHERE job_id = ANY($1::text[]) RETURNING path",
                                    [job.id for job, _ in changed])
        return [r[0] for r in rows]

    async def taken_jobs(self, client_id: str, since: float) -> list[Job]:
        """The client's results taken at or after `since` whose outputs are still on record."""
        return await self._many(f"SELECT {JOB} FROM jobs WHERE client_id = $1 AND fetched_at >= $2 AND NOT expired"
                                f" AND {HAS_OUTPUTS} ORDER BY seq", client_id, since)

    async def expired_results(self, before: float) -> list[str]:
        """Ids of completed jobs with untaken, unreserved results finished before `before`."""
        async with self.link.connection() as conn:
            rows = await conn.fetch(f"SELECT id FROM jobs WHERE {UNTAKEN} AND finished_at < $1"
                                    " AND (delivering_until IS NULL OR delivering_until <= now()) ORDER BY seq", before)
        return [r[0] for r in rows]

    async def purge_taken(self, before: float) -> list[str]:
        """Forget outputs of results taken before `before`; returns their paths."""
        async with self.link.connection() as conn:
            rows = await conn.fetch("DELETE FROM outputs o USING jobs j WHERE j.id = o.job_id AND j.fetched_at < $1"
                                    " RETURNING o.path", before)
        return [r[0] for r in rows]

    async def log_page(self, limit: int, offset: int, owner: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """One page of the generation log, newest first, and its total (one owner's, or all)."""
        where = "WHERE $1::text IS NULL OR owner = $1"
        async with self.link.connection() as conn:
            total = await conn.fetchval(f"SELECT count(*) FROM jobs {where}", owner)
            rows = await conn.fetch(
                "SELECT id, workflow, state, error, created_at, finished_at, fetched::int AS fetched,"
                f" expired::int AS expired, {HAS_OUTPUTS}::int AS stored FROM jobs {where}"
                " ORDER BY seq DESC LIMIT $2 OFFSET $3", owner, limit, offset)
        return [dict(r) for r in rows], int(total)

    async def generation_count(self) -> int:
        """The persistent count of jobs that started running, kept in the database."""
        async with self.link.connection() as conn:
            return int(await conn.fetchval("SELECT value FROM counters WHERE name = 'generation'"))

    # uploads and quota ----------------------------------------------------------------------------
    async def add_upload(self, name: str, sha256: str, size: int, content_type: str, original: str,
                         owner: str = "") -> None:
        """Record a stored upload and whose it is."""
        async with self.link.connection() as conn:
            await conn.execute("INSERT INTO uploads (name, sha256, size, content_type, original, created_at, owner)"
                               " VALUES ($1, $2, $3, $4, $5, $6, $7)",
                               name, sha256, size, content_type, original, time.time(), owner)

    async def upload(self, name: str, owner: str | None = None) -> dict[str, Any] | None:
        """A stored upload by name (only if `owner` holds it, when given)."""
        async with self.link.connection() as conn:
            row = await conn.fetchrow("SELECT name, sha256, size, content_type, original, created_at, owner"
                                      " FROM uploads WHERE name = $1 AND ($2::text IS NULL OR owner = $2)", name, owner)
        return dict(row) if row is not None else None

    async def expire_uploads(self, before: float) -> list[str]:
        """Forget uploads made before `before` that no waiting, running or untaken job refers to."""
        async with self.link.connection() as conn:
            rows = await conn.fetch(
                "DELETE FROM uploads WHERE created_at < $1 AND name NOT IN (SELECT f.value ->> 'name'"
                " FROM jobs, jsonb_each(jobs.files::jsonb) AS f WHERE (state IN ('queued', 'dispatching', 'running')"
                " OR (state = 'completed' AND NOT fetched)) AND jsonb_typeof(f.value) = 'object'"
                " AND f.value ->> 'name' IS NOT NULL) RETURNING name", before)
        return sorted(r[0] for r in rows)

    async def usage(self, owner: str) -> int:
        """Bytes an owner has stored: uploads plus untaken results."""
        async with self.link.connection() as conn:
            return int(await conn.fetchval(
                "SELECT (SELECT COALESCE(sum(size), 0) FROM uploads WHERE owner = $1)"
                " + (SELECT COALESCE(sum(o.size), 0) FROM outputs o JOIN jobs j ON j.id = o.job_id"
                " WHERE j.owner = $1 AND NOT j.fetched)", owner))

    # callers' sockets, across bridges ------------------------------------------------------------
    async def attach(self, client_id: str, delta: int) -> None:
        """This bridge opened (+1) or closed (-1) a socket or event stream of the client (one statement;
        rows down to 0 are swept by the lease rounds)."""
        async with self.link.connection() as conn:
            await conn.execute("INSERT INTO presence (client_id, instance, count) VALUES ($1, $2, $3)"
                               " ON CONFLICT (client_id, instance) DO UPDATE SET count = presence.count + $3",
                               client_id, self.instance, delta)

    async def attached(self, client_id: str) -> bool:
        """True if this bridge, or another live one, holds an open socket or event stream of the client."""
        async with self.link.connection() as conn:
            return bool(await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM presence p WHERE p.client_id = $1 AND p.count > 0 AND (p.instance = $2"
                " OR EXISTS (SELECT 1 FROM bridges b WHERE b.instance = p.instance"
                " AND b.heartbeat > now() - make_interval(secs => $3))))", client_id, self.instance,
                lifetime(self.lease_ttl)))

    async def meta(self, key: str, make: Callable[[], str]) -> str:
        """A persistent value shared by every bridge, created by make() the first time."""
        async with self.link.connection() as conn:
            value = await conn.fetchval("SELECT value FROM meta WHERE key = $1", key)
            if value is None:
                await conn.execute("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                                   key, str(make()))
                value = await conn.fetchval("SELECT value FROM meta WHERE key = $1", key)
        return str(value)
