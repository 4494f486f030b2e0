"""The PostgreSQL store's schema: numbered migrations in `schema_version`, run once each, in order.

Several bridges may start at once against one database: `migrate` holds a transaction-level advisory
lock while it reads the version and applies what is missing, so exactly one of them does the work and
the others find it done. Times the bridges compare with each other (lease expiry, heartbeats, result
reservations) are `timestamptz` set from the database's clock; a job's own times are the bridges' Unix
times, as in the SQLite engine.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    AnyConn = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

log = logging.getLogger(__name__)

MIGRATE_LOCK = 0x636F6D66_0001  # pg_advisory_xact_lock key of migrations ("comf" + 1)

V1 = """
CREATE TABLE jobs (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT UNIQUE NOT NULL,
    client_id TEXT NOT NULL,
    workflow TEXT NOT NULL,
    inputs TEXT NOT NULL,
    prompt TEXT NOT NULL,
    files TEXT NOT NULL,
    timeout DOUBLE PRECISION NOT NULL,
    state TEXT NOT NULL,
    round BIGINT NOT NULL DEFAULT 0,
    backend TEXT,
    prompt_id TEXT,
    progress DOUBLE PRECISION NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    cancel_reason TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    counted BOOLEAN NOT NULL DEFAULT false,
    fetched BOOLEAN NOT NULL DEFAULT false,
    expired BOOLEAN NOT NULL DEFAULT false,
    owner TEXT NOT NULL DEFAULT '',
    fetched_at DOUBLE PRECISION,
    delivering_until TIMESTAMPTZ
);
CREATE INDEX jobs_fair ON jobs (round, seq) WHERE state = 'queued';
CREATE INDEX jobs_waiting_client ON jobs (client_id, round) WHERE state = 'queued';
CREATE INDEX jobs_waiting_owner ON jobs (owner) WHERE state = 'queued';
CREATE INDEX jobs_active ON jobs (backend, seq) WHERE state IN ('dispatching', 'running');
CREATE INDEX jobs_client ON jobs (client_id, seq);
CREATE INDEX jobs_owner ON jobs (owner, seq);
CREATE INDEX jobs_untaken ON jobs (client_id, seq) WHERE state = 'completed' AND NOT fetched;
CREATE INDEX jobs_taken ON jobs (fetched_at) WHERE fetched_at IS NOT NULL;
CREATE TABLE outputs (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    filename TEXT NOT NULL,
    content_type TEXT NOT NULL,
    path TEXT NOT NULL,
    size BIGINT NOT NULL,
    PRIMARY KEY (job_id, idx)
);
CREATE TABLE uploads (
    name TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    content_type TEXT NOT NULL,
    original TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    owner TEXT NOT NULL DEFAULT ''
);
CREATE INDEX uploads_owner ON uploads (owner);
CREATE INDEX uploads_age ON uploads (created_at);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO counters (name, value) VALUES ('generation', 0);
-- the generation count goes up in the transaction that first marks a job counted (its RUNNING transition)
CREATE FUNCTION count_generation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE counters SET value = value + 1 WHERE name = 'generation';
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_counted AFTER UPDATE OF counted ON jobs FOR EACH ROW
    WHEN (NEW.counted AND NOT OLD.counted) EXECUTE FUNCTION count_generation();
CREATE TABLE bridges (
    instance TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE leases (
    backend TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE presence (
    client_id TEXT NOT NULL,
    instance TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (client_id, instance)
);
CREATE INDEX presence_instance ON presence (instance);
CREATE TABLE events (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at TIMESTAMPTZ NOT NULL DEFAULT now(),
    job_id TEXT,
    payload TEXT NOT NULL
);
CREATE INDEX events_at ON events (at);
"""

# jobs as resources: each output's metadata, a job's own callback, and the webhook outbox (one row per
# event and endpoint, written in the transaction of the change it reports)
V2 = """
ALTER TABLE outputs ADD COLUMN meta TEXT NOT NULL DEFAULT '{}';
ALTER TABLE jobs ADD COLUMN webhook TEXT;
CREATE TABLE deliveries (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    event TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    next_at DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending',
    last_status INTEGER,
    last_error TEXT,
    holder TEXT,
    held_until DOUBLE PRECISION,
    delivered_at DOUBLE PRECISION
);
CREATE INDEX deliveries_due ON deliveries (next_at) WHERE state = 'pending';
CREATE INDEX deliveries_state ON deliveries (state, created_at);
CREATE INDEX deliveries_job ON deliveries (job_id);
"""
MIGRATIONS: tuple[str, ...] = (V1, V2)  # version n is MIGRATIONS[n - 1]
LATEST = len(MIGRATIONS)

VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"""


async def version(conn: AnyConn) -> int:
    """The schema version of a database (0: nothing of ours in it yet)."""
    if await conn.fetchval("SELECT to_regclass('schema_version')") is None:
        return 0
    return int(await conn.fetchval("SELECT COALESCE(max(version), 0) FROM schema_version"))


async def migrate(conn: AnyConn) -> list[int]:
    """Apply the pending migrations in one transaction under the migration lock; returns the versions
    applied (empty when another bridge, or an earlier start, already did)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATE_LOCK)
        await conn.execute(VERSION_TABLE)
        current = await version(conn)
        _not_newer(current)
        done = list(range(current + 1, LATEST + 1))
        for number in done:
            await conn.execute(MIGRATIONS[number - 1])
            await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", number)
    for number in done:
        log.info("store: schema migrated to version %d", number)
    return done


async def pending(url: str, timeout: float = 5.0) -> list[int]:
    """The migrations a database still needs (for --check); reads only. Raises RuntimeError when the
    database is of a newer release, OSError or asyncpg's errors when it cannot be reached."""
    import asyncpg  # the driver is optional: only PostgreSQL users install it

    conn = await asyncpg.connect(url, timeout=timeout)
    try:
        current = await version(conn)
    finally:
        await conn.close()
    _not_newer(current)
    return list(range(current + 1, LATEST + 1))


def _not_newer(current: int) -> None:
    if current > LATEST:
        raise RuntimeError(f"the store's schema is version {current}, newer than this bridge's {LATEST}: "
                           "upgrade this bridge")
