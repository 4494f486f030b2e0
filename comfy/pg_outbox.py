"""The PostgreSQL store's webhook outbox: rows written with the changes of jobs, claimed by one bridge at a
time, settled, listed and pruned.

A claim is `UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED)` that sets holder and held_until:
of several bridges claiming at once each row goes to one, and a row whose holder died (killed mid-delivery)
is free again when its hold ends, for any bridge to send again with the same id. Every time in the
outbox is the database's clock, so bridges with clocks a little apart agree on what is due."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Collection, Iterable

from .jobs import Job
from .jobstore import JobStore
from .outbox import STATES, Delivery, newest

if TYPE_CHECKING:
    from asyncpg import Record
    from asyncpg.pool import PoolConnectionProxy

    from .pg_link import PgLink

NOW = "extract(epoch from now())::float8"
# new rows from arrays; a row's time is now, or a hair after its job's last row to the same endpoint (the
# job's row is locked by the change, so that is exact), which keeps each job's rows to an endpoint in order
SQL_ADD = ("INSERT INTO deliveries (id, job_id, endpoint, event, body, created_at, next_at)"
           " SELECT r.id, r.job_id, r.endpoint, r.event, r.body, t.at, t.at"
           " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])"
           " AS r (id, job_id, endpoint, event, body),"
           " LATERAL (SELECT GREATEST(extract(epoch from clock_timestamp())::float8, COALESCE((SELECT max(d.created_at)"
           " FROM deliveries d WHERE d.job_id = r.job_id AND d.endpoint = r.endpoint), 0) + 0.000001) AS at) AS t")
SQL_CLAIM = (f"UPDATE deliveries d SET holder = $1, held_until = {NOW} + $2, attempts = d.attempts + 1"
             " WHERE d.id IN (SELECT c.id FROM deliveries c WHERE c.state = 'pending'"
             f" AND c.next_at <= {NOW} AND (c.held_until IS NULL OR c.held_until <= {NOW})"
             " AND NOT (c.endpoint = ANY($3::text[])) AND NOT EXISTS (SELECT 1 FROM deliveries e"
             " WHERE e.job_id = c.job_id AND e.endpoint = c.endpoint AND e.state = 'pending'"
             " AND (e.created_at, e.id) < (c.created_at, c.id))"
             " ORDER BY c.next_at LIMIT $4 FOR UPDATE SKIP LOCKED)"
             " RETURNING d.id, d.job_id, d.endpoint, d.event, d.body, d.created_at, d.attempts")
SQL_NEXT = f"SELECT min(next_at) FROM deliveries WHERE state = 'pending' AND next_at > {NOW}"
SQL_DELIVERED = (f"UPDATE deliveries d SET state = 'delivered', delivered_at = {NOW}, last_status = u.status,"
                 " last_error = NULL, holder = NULL, held_until = NULL FROM unnest($1::text[], $2::int[]) AS u (id, status)"
                 " WHERE d.id = u.id AND d.state = 'pending' RETURNING d.delivered_at - d.created_at")
# a failed attempt: retry after $4 seconds, never later than retry_for ($5) after the event, or give up; the
# rows of its job to its endpoint that wait behind it wait until then too (so a claim never scans them)
SQL_UNDELIVERED = (f"WITH failed AS (UPDATE deliveries SET state = CASE WHEN {NOW} - created_at >= $5 THEN 'failed'"
                   f" ELSE 'pending' END, next_at = LEAST({NOW} + $4, created_at + $5), last_status = $2,"
                   " last_error = $3, holder = NULL, held_until = NULL"
                   " WHERE id = $1 AND state = 'pending' AND holder = $6 RETURNING job_id, endpoint, state, next_at),"
                   " behind AS (UPDATE deliveries d SET next_at = GREATEST(d.next_at, f.next_at) FROM failed f"
                   " WHERE f.state = 'pending' AND d.job_id = f.job_id AND d.endpoint = f.endpoint"
                   " AND d.state = 'pending' AND d.id <> $1)"
                   " SELECT state FROM failed")
LISTED = ("id, job_id, endpoint, event, attempts, state, last_status, last_error, created_at, next_at,"
          " delivered_at")
PRUNE_BATCH = 5000


class PgOutbox(JobStore):
    """The outbox part of the PostgreSQL store (a base of PgRecords, which owns the link)."""

    link: PgLink
    instance: str

    async def _add_deliveries(self, conn: PoolConnectionProxy[Record], kind: str, jobs: Iterable[Job]) -> None:
        """Write the deliveries the outbox rule makes for a change, in the caller's transaction."""
        assert self.outbox is not None
        rows = self.outbox.rows(kind, jobs)
        if rows:
            await conn.execute(SQL_ADD, *(list(column) for column in zip(*rows)))

    async def claim_deliveries(self, limit: int, hold: float,
                               skip: Collection[str]) -> tuple[list[Delivery], float | None]:
        """Hold up to `limit` due deliveries for this bridge (no other bridge gets them), in order per job and
        endpoint; and when the next one falls due."""
        async with self.link.connection() as conn:
            rows = await conn.fetch(SQL_CLAIM, self.instance, hold, list(skip), limit)
            upcoming = await conn.fetchval(SQL_NEXT)
        claimed = sorted((Delivery(*row) for row in rows), key=lambda d: (d.created_at, d.id))
        return claimed, upcoming

    async def delivered(self, done: dict[str, int]) -> list[float]:
        """Done (2xx), in one statement; the seconds from each one's event to now."""
        async with self.link.connection() as conn:
            rows = await conn.fetch(SQL_DELIVERED, list(done), list(done.values()))
        return [float(row[0]) for row in rows]

    async def undelivered(self, delivery_id: str, status: int | None, error: str, delay: float,
                          retry_for: float) -> str | None:
        """A failed attempt: retry later, or give up once retry_for has passed (only while this bridge holds it)."""
        async with self.link.connection() as conn:
            state = await conn.fetchval(SQL_UNDELIVERED, delivery_id, status, error[:1000], delay, retry_for,
                                        self.instance)
        return str(state) if state is not None else None

    async def deliveries(self, state: str | None, job_id: str | None, limit: int,
                         offset: int) -> tuple[list[dict[str, Any]], int]:
        """A page of deliveries, newest first, and the total matching."""
        where = "WHERE state = $1 AND ($2::text IS NULL OR job_id = $2)"
        rows: list[dict[str, Any]] = []
        total = 0
        async with self.link.connection() as conn:
            for one in (state,) if state else STATES:  # each state through its index (state, created_at)
                total += int(await conn.fetchval(f"SELECT count(*) FROM deliveries {where}", one, job_id))
                rows += map(dict, await conn.fetch(f"SELECT {LISTED} FROM deliveries {where}"
                                                   " ORDER BY created_at DESC LIMIT $3", one, job_id, offset + limit))
        return newest(rows, offset, limit), total

    async def pending_deliveries(self) -> int:
        """Deliveries not yet delivered or given up, by every bridge."""
        async with self.link.connection() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM deliveries WHERE state = 'pending'"))

    async def prune_deliveries(self, delivered_before: float, failed_before: float) -> int:
        """Forget old delivered and failed deliveries, a batch at a time."""
        gone = 0
        async with self.link.connection() as conn:
            for state, before in (("delivered", delivered_before), ("failed", failed_before)):
                done = await conn.execute("DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries"
                                          " WHERE state = $1 AND created_at < $2 LIMIT $3)", state, before, PRUNE_BATCH)
                gone += int(done.split()[-1])
        return gone
