"""The PostgreSQL store's link to its database: a small pool, one listening connection, and outages.

Every call is bounded (`timeout` seconds for acquiring a connection and for each statement). A
connection error marks the link unavailable and starts one background task that reconnects with
capped, jittered backoff; until it succeeds, calls fail at once with StoreUnavailable instead of
waiting. Events of other bridges arrive on the listening connection, which the same task re-opens.

Events are also kept for a while in the `events` table, numbered, written in the transaction that
NOTIFYs them. A NOTIFY sent while this bridge was not listening is lost, so after re-listening the
link reads the events it may have missed from the table (ids already delivered are skipped): a
bridge whose connection dropped while others went on still hears every change. Progress steps are
NOTIFY only (number 0): a missed one is overtaken by the next.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import deque
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from .jobstore import JobEvent, StoreUnavailable

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

log = logging.getLogger(__name__)

CHANNEL = "comfy_bridge_events"
SENDER = "sender"  # the payload's extra key naming the store instance that sent it (JobEvent ignores it)
MAX_PAYLOAD = 7900  # NOTIFY payloads must stay under 8000 bytes
BACKOFF_FIRST = 0.05
BACKOFF_CAP = 1.0
KEEP_EVENTS = 600.0   # seconds events stay in the table for bridges that reconnect
REPLAY_OVERLAP = 256  # a reconnect reads again this many ids below the last delivered (commits land out of id order)
REPLAY_MAX = 20_000   # events read at most after one reconnect
SEEN = 4096           # ids of delivered events remembered, so none is delivered twice
NOTIFY_MANY = ("WITH e AS (INSERT INTO events (payload) SELECT p FROM unnest($2::text[]) WITH ORDINALITY AS u (p, n)"
               " ORDER BY n RETURNING id, payload) SELECT pg_notify($1, e.id || ' ' || e.payload) FROM e ORDER BY e.id")


def payload(event: JobEvent, sender: str) -> str:
    """An event as a NOTIFY payload from the store instance `sender`; a very long detail is cut to fit."""
    data = {**event.to_dict(), SENDER: sender}
    text = json.dumps(data, separators=(",", ":"))
    if len(text.encode()) > MAX_PAYLOAD and data.get("detail"):
        over = len(text.encode()) - MAX_PAYLOAD
        data["detail"] = data["detail"].encode()[:max(0, len(data["detail"].encode()) - over - 16)].decode(
            errors="ignore") + "…"
        text = json.dumps(data, separators=(",", ":"))
    return text


class PgLink:
    """A pool of at most `pool_max` connections plus one LISTEN connection to one database."""

    def __init__(self, url: str, name: str, on_event: Callable[[dict[str, Any]], None], *, timeout: float = 5.0,
                 pool_max: int = 8) -> None:
        self.url = url
        self.name = name  # application_name of the connections (pg_stat_activity shows whose they are)
        self.timeout = timeout
        self.pool_max = pool_max
        self.on_event = on_event
        self.available = False
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._closing = False
        self._seen: deque[int] = deque(maxlen=SEEN)
        self._seen_set: set[int] = set()
        self._last = 0  # the highest event id delivered (or present when listening began)
        self.recovered_at = float("-inf")  # time.monotonic() when the link last came back after a loss

    async def open(self) -> None:
        """Connect the pool; raises StoreUnavailable when the database cannot be reached."""
        import asyncpg  # the driver is optional: only PostgreSQL users install it

        try:
            # min_size 0: no floor of connections for asyncpg to restore (with tracebacks) while the database is away
            self._pool = await asyncpg.create_pool(self.url, min_size=0, max_size=self.pool_max,
                                                   timeout=self.timeout, command_timeout=self.timeout,
                                                   server_settings={"application_name": self.name},
                                                   reset=_nothing_to_reset)
        except unavailable_errors() as exc:
            await self.close()
            raise StoreUnavailable(f"cannot reach the job store's PostgreSQL: {describe(exc)}") from exc
        self.available = True

    async def listen(self) -> None:
        """Start hearing other bridges' events from now on (the schema must be in place)."""
        try:
            await self._listen()
            assert self._listener is not None
            self._last = int(await self._listener.fetchval("SELECT COALESCE(max(id), 0) FROM events"))
        except unavailable_errors() as exc:
            self.lost(exc)
            raise StoreUnavailable(f"cannot reach the job store's PostgreSQL: {describe(exc)}") from exc

    async def notify(self, conn: PoolConnectionProxy[Any], payloads: list[str], keep: bool = True) -> None:
        """Send events in the caller's transaction (delivered at its commit); kept ones are also stored
        for bridges that reconnect."""
        if keep:
            await conn.execute(NOTIFY_MANY, CHANNEL, payloads)
        else:
            await conn.execute("SELECT pg_notify($1, '0 ' || p) FROM unnest($2::text[]) AS p", CHANNEL, payloads)

    async def close(self) -> None:
        """Stop reconnecting, and close the listener and the pool."""
        self._closing = True
        self.available = False
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery
        listener, pool, self._listener, self._pool = self._listener, self._pool, None, None
        try:  # politely when the database answers, at once when it does not
            async with asyncio.timeout(self.timeout):
                if listener is not None:
                    await listener.close()
                if pool is not None:
                    await pool.close()
        except unavailable_errors():
            if listener is not None:
                listener.terminate()
            if pool is not None:
                pool.terminate()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[PoolConnectionProxy[Any]]:
        """A pooled connection for one bounded piece of work; connection trouble raises StoreUnavailable.
        Waiting too long for a free connection (all busy) raises it too, but is no sign of an outage."""
        if not self.available or self._pool is None:
            raise StoreUnavailable("the job store's PostgreSQL is unreachable; reconnecting")
        pool = self._pool
        try:
            conn = await pool.acquire(timeout=self.timeout)
        except TimeoutError as exc:
            raise StoreUnavailable(f"all {self.pool_max} connections to the job store are busy") from exc
        except unavailable_errors() as exc:
            self.lost(exc)
            raise StoreUnavailable(f"the job store's PostgreSQL is unreachable: {describe(exc)}") from exc
        try:
            async with asyncio.timeout(self.timeout):
                yield conn
        except unavailable_errors() as exc:
            if isinstance(exc, broken_connection_error()):
                conn.terminate()  # never back into the pool in a state no statement can follow
            self.lost(exc)
            raise StoreUnavailable(f"the job store's PostgreSQL is unreachable: {describe(exc)}") from exc
        finally:
            with contextlib.suppress(*unavailable_errors()):
                await pool.release(conn, timeout=self.timeout)

    def lost(self, exc: BaseException | None = None) -> None:
        """The database went away (or a connection to it did): unavailable until the recovery task is back."""
        if self._closing:
            return
        if self.available:
            log.warning("job store: lost PostgreSQL (%s); reconnecting", describe(exc) if exc else "listener closed")
        self.available = False
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        delay = BACKOFF_FIRST
        missed = False  # events may have been sent while no listener heard them
        while not self._closing:
            try:
                if self._listener is None or self._listener.is_closed():
                    await self._listen()
                    missed = True
                if missed:
                    await self._replay()
                    missed = False
                assert self._pool is not None
                await self._pool.expire_connections()  # connections opened before the loss may be dead
                async with asyncio.timeout(self.timeout):
                    await self._pool.fetchval("SELECT 1")
                if self._listener is None or self._listener.is_closed():
                    continue  # the new listener was lost too while this task was still on its way back
            except unavailable_errors() as exc:
                log.debug("job store: PostgreSQL still unreachable (%s)", describe(exc))
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, BACKOFF_CAP)
                continue
            self.available = True
            self.recovered_at = time.monotonic()
            log.warning("job store: PostgreSQL is reachable again")
            return

    async def _listen(self) -> None:
        import asyncpg

        if self._listener is not None:
            self._listener.terminate()
            self._listener = None
        conn = await asyncpg.connect(self.url, timeout=self.timeout, command_timeout=self.timeout,
                                     server_settings={"application_name": f"{self.name} listen"})
        try:
            await conn.add_listener(CHANNEL, self._notified)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(lambda _conn: self.lost())
        self._listener = conn

    async def _replay(self) -> None:
        assert self._listener is not None
        rows = await self._listener.fetch("SELECT id, payload FROM events WHERE id > $1 ORDER BY id LIMIT $2",
                                          self._last - REPLAY_OVERLAP, REPLAY_MAX)
        for row in rows:
            self._deliver(int(row[0]), str(row[1]))

    def _notified(self, _conn: object, _pid: int, _channel: str, text: object) -> None:
        number, _, body = str(text).partition(" ")
        self._deliver(int(number) if number.isdigit() else 0, body)

    def _deliver(self, number: int, body: str) -> None:
        try:
            data = json.loads(body)
        except ValueError:
            log.warning("job store: ignored a malformed event %.200r", body)
            return
        if number:
            if number in self._seen_set:
                return
            if len(self._seen) == SEEN:
                self._seen_set.discard(self._seen[0])
            self._seen.append(number)
            self._seen_set.add(number)
            self._last = max(self._last, number)
        self.on_event(data)


async def _nothing_to_reset(_conn: object) -> None:
    """The store leaves no session state on a pooled connection (its advisory locks end with their
    transactions; it LISTENs and SETs nothing there), so a connection goes back to the pool without
    asyncpg's reset statement: one round trip less per call. (asyncpg still rolls back a transaction
    left open.)"""


def unavailable_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the database cannot be reached", not "the statement is wrong"."""
    from asyncpg import exceptions as pg

    return (OSError, TimeoutError, pg.PostgresConnectionError, pg.OperatorInterventionError,
            pg.InsufficientResourcesError, pg.InterfaceError, broken_connection_error())


def broken_connection_error() -> type[BaseException]:
    """What the driver raises for a connection it can no longer use: the server ended it while it sat idle
    (a restart, pg_terminate_backend, an idle timeout), and its FATAL message arrived a turn of the event
    loop before the socket's end, which leaves the connection looking open but refusing every statement."""
    from asyncpg import exceptions as pg

    return pg.InternalClientError


def describe(exc: BaseException) -> str:
    """A one-line description of a connection error."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
