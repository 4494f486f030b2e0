"""The embedded store's webhook outbox: rows written with the changes of jobs, claimed, settled, listed, pruned.

One bridge owns the file, so a hold only matters within this process: rows held by an earlier run (killed
mid-delivery) are free at once after a restart, and are sent again with the same id."""
from __future__ import annotations

import contextlib
import json
import secrets
import time
from typing import Any, Collection, Iterable, Iterator

from .jobs import Job
from .outbox import STATES, Delivery, newest
from .sqlite_records import SqliteRecords, guarded

# a new row; its time is now, or a hair after the job's last row to the same endpoint, so each job's rows to
# an endpoint keep their order whatever the clock does
SQL_ADD = ("INSERT INTO deliveries (id, job_id, endpoint, event, body, created_at, next_at)"
           " SELECT ?1, ?2, ?3, ?4, ?5, t, t FROM (SELECT MAX(?6, COALESCE((SELECT MAX(created_at) FROM deliveries"
           " WHERE job_id = ?2 AND endpoint = ?3), 0) + 0.000001) AS t)")
# due rows not held by this process, none with an earlier pending row of its job to its endpoint
SQL_CLAIM = ("UPDATE deliveries SET holder = :me, held_until = :now + :hold, attempts = attempts + 1"
             " WHERE id IN (SELECT c.id FROM deliveries AS c INDEXED BY deliveries_due WHERE c.state = 'pending'"
             " AND c.next_at <= :now"
             " AND (c.holder IS NOT :me OR c.held_until <= :now)"
             " AND c.endpoint NOT IN (SELECT value FROM json_each(:skip))"
             " AND NOT EXISTS (SELECT 1 FROM deliveries AS e WHERE e.job_id = c.job_id AND e.endpoint = c.endpoint"
             " AND e.state = 'pending' AND (e.created_at < c.created_at OR (e.created_at = c.created_at AND e.id < c.id)))"
             " ORDER BY c.next_at LIMIT :limit)"
             " RETURNING id, job_id, endpoint, event, body, created_at, attempts")
SQL_NEXT = "SELECT MIN(next_at) FROM deliveries INDEXED BY deliveries_due WHERE state = 'pending' AND next_at > ?"
SQL_DELIVERED = ("UPDATE deliveries SET state = 'delivered', delivered_at = :now, last_status = :status,"
                 " last_error = NULL, holder = NULL, held_until = NULL WHERE id = :id AND state = 'pending'"
                 " RETURNING :now - created_at")
SQL_UNDELIVERED = ("UPDATE deliveries SET state = CASE WHEN :now - created_at >= :retry_for THEN 'failed'"
                   " ELSE 'pending' END, next_at = MIN(:now + :delay, created_at + :retry_for),"
                   " last_status = :status, last_error = :error, holder = NULL, held_until = NULL"
                   " WHERE id = :id AND state = 'pending' AND holder = :me RETURNING state, job_id, endpoint, next_at")
# the rows of its job to its endpoint that wait behind a retried one wait until its retry (a claim never scans them)
SQL_BEHIND = ("UPDATE deliveries SET next_at = MAX(next_at, ?) WHERE job_id = ? AND endpoint = ? AND state = 'pending'"
              " AND id != ?")
LISTED = ("id, job_id, endpoint, event, attempts, state, last_status, last_error, created_at, next_at,"
          " delivered_at")
PRUNE_BATCH = 5000


class SqliteOutbox(SqliteRecords):
    """The outbox part of the embedded store (its base for SqliteStore)."""

    def __init__(self, bridge: str = "") -> None:
        super().__init__(bridge)
        self._holder = f"{bridge}#{secrets.token_hex(4)}"  # this run: holds of an earlier one are void

    @contextlib.contextmanager
    def _atomic(self, on: bool) -> Iterator[None]:
        """The statements inside as one transaction when `on` (a change that writes deliveries); else each
        commits by itself, as it always has."""
        if not on:
            yield
            return
        self.db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _add_deliveries(self, kind: str, jobs: Iterable[Job]) -> bool:
        """Write the deliveries the outbox rule makes for a change (inside the caller's transaction)."""
        assert self.outbox is not None
        rows = self.outbox.rows(kind, jobs)
        if rows:
            now = time.time()
            self.db.executemany(SQL_ADD, [(*row, now) for row in rows])
        return bool(rows)

    @guarded
    async def claim_deliveries(self, limit: int, hold: float,
                               skip: Collection[str]) -> tuple[list[Delivery], float | None]:
        """Hold up to `limit` due deliveries, in order per job and endpoint; and when the next one falls due."""
        now = time.time()
        rows = self.db.execute(SQL_CLAIM, {"me": self._holder, "now": now, "hold": hold, "limit": limit,
                                           "skip": json.dumps(list(skip))}).fetchall()
        upcoming = self.db.execute(SQL_NEXT, (now,)).fetchone()[0]
        claimed = sorted((Delivery(*row) for row in rows), key=lambda d: (d.created_at, d.id))
        return claimed, upcoming

    @guarded
    async def delivered(self, done: dict[str, int]) -> list[float]:
        """Done (2xx), in one transaction; the seconds from each one's event to now."""
        now = time.time()
        with self._atomic(len(done) > 1):
            rows = [self.db.execute(SQL_DELIVERED, {"now": now, "status": status, "id": delivery_id}).fetchone()
                    for delivery_id, status in done.items()]
        return [float(row[0]) for row in rows if row is not None]

    @guarded
    async def undelivered(self, delivery_id: str, status: int | None, error: str, delay: float,
                          retry_for: float) -> str | None:
        """A failed attempt: retry later, or give up once retry_for has passed."""
        row = self.db.execute(SQL_UNDELIVERED, {"now": time.time(), "retry_for": retry_for, "delay": delay,
                                                "status": status, "error": error[:1000], "id": delivery_id,
                                                "me": self._holder}).fetchone()
        if row is None:
            return None
        state, job_id, endpoint, next_at = row
        if state == "pending":
            self.db.execute(SQL_BEHIND, (next_at, job_id, endpoint, delivery_id))
        return str(state)

    @guarded
    async def deliveries(self, state: str | None, job_id: str | None, limit: int,
                         offset: int) -> tuple[list[dict[str, Any]], int]:
        """A page of deliveries, newest first; each state is read through its own index and merged."""
        queries: list[list[Any]]
        if job_id is not None:
            where = "WHERE job_id = ?" + (" AND state = ?" if state else "")
            queries = [[job_id, *([state] if state else [])]]
        else:
            where = "WHERE state = ?"
            queries = [[s] for s in ((state,) if state else STATES)]
        rows: list[dict[str, Any]] = []
        total = 0
        for params in queries:
            total += int(self.db.execute(f"SELECT COUNT(*) FROM deliveries {where}", params).fetchone()[0])
            cur = self.db.execute(f"SELECT {LISTED} FROM deliveries {where} ORDER BY created_at DESC LIMIT ?",
                                  [*params, offset + limit])
            names = [d[0] for d in cur.description]
            rows += [dict(zip(names, r)) for r in cur]
        return newest(rows, offset, limit), total

    @guarded
    async def pending_deliveries(self) -> int:
        """Deliveries not yet delivered or given up."""
        return int(self.db.execute("SELECT COUNT(*) FROM deliveries WHERE state = 'pending'").fetchone()[0])

    @guarded
    async def prune_deliveries(self, delivered_before: float, failed_before: float) -> int:
        """Forget old delivered and failed deliveries, a batch at a time (the loop is never held long)."""
        gone = 0
        for state, before in (("delivered", delivered_before), ("failed", failed_before)):
            gone += self.db.execute("DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries WHERE state = ?"
                                    " AND created_at < ? LIMIT ?)", (state, before, PRUNE_BATCH)).rowcount
        return gone
