"""The embedded store's schema: numbered migrations, each run once, in order, in its own transaction.

The version lives in `PRAGMA user_version` (0 = a file made before migrations were numbered, or a new
file). Version 1 is the schema the bridge used before the JobStore contract, reached from any earlier
file by adding the columns it gained over time; version 2 adds what the contract needs;
version 3 adds output metadata, per-job callbacks and the webhook outbox."""
from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

V1_TABLES = (
    """CREATE TABLE IF NOT EXISTS jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT UNIQUE NOT NULL,
        client_id TEXT NOT NULL,
        workflow TEXT NOT NULL,
        inputs TEXT NOT NULL,
        prompt TEXT NOT NULL,
        files TEXT NOT NULL,
        timeout REAL NOT NULL,
        state TEXT NOT NULL,
        backend TEXT,
        prompt_id TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        counted INTEGER NOT NULL DEFAULT 0,
        fetched INTEGER NOT NULL DEFAULT 0,
        expired INTEGER NOT NULL DEFAULT 0,
        owner TEXT NOT NULL DEFAULT '',
        fetched_at REAL)""",
    "CREATE INDEX IF NOT EXISTS jobs_client ON jobs (client_id, seq)",
    "CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state)",
    """CREATE TABLE IF NOT EXISTS outputs (
        job_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        node_id TEXT NOT NULL,
        filename TEXT NOT NULL,
        content_type TEXT NOT NULL,
        path TEXT NOT NULL,
        size INTEGER NOT NULL,
        PRIMARY KEY (job_id, idx))""",
    """CREATE TABLE IF NOT EXISTS uploads (
        name TEXT PRIMARY KEY,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        content_type TEXT NOT NULL,
        original TEXT NOT NULL,
        created_at REAL NOT NULL,
        owner TEXT NOT NULL DEFAULT '')""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
# columns files from the first releases lack (they were added one at a time before versions were numbered)
V1_ADDED_COLUMNS = {"jobs": {"expired": "INTEGER NOT NULL DEFAULT 0", "owner": "TEXT NOT NULL DEFAULT ''",
                             "fetched_at": "REAL"},
                    "uploads": {"owner": "TEXT NOT NULL DEFAULT ''"}}
V1_INDEXES = (
    "CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, seq)",
    "CREATE INDEX IF NOT EXISTS jobs_taken ON jobs (fetched_at) WHERE fetched_at IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS uploads_owner ON uploads (owner)",
    "CREATE INDEX IF NOT EXISTS uploads_age ON uploads (created_at)",
)


def _v1(db: sqlite3.Connection) -> None:
    """The pre-contract schema, created fresh or completed on a file of an earlier release."""
    for statement in V1_TABLES:
        db.execute(statement)
    for table, columns in V1_ADDED_COLUMNS.items():
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for column, decl in columns.items():
            if column not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
    for statement in V1_INDEXES:
        db.execute(statement)


# the jobs a client still has business with: waiting, running, or holding results it has not taken.
# A query names this condition literally to use the partial index jobs_open.
OPEN = "(state IN ('queued', 'dispatching', 'running') OR (state = 'completed' AND fetched = 0))"
V2_JOBS = """CREATE TABLE jobs_v2 (
    seq INTEGER PRIMARY KEY,
    id TEXT UNIQUE NOT NULL,
    client_id TEXT NOT NULL,
    workflow TEXT NOT NULL,
    inputs TEXT NOT NULL,
    prompt TEXT NOT NULL,
    files TEXT NOT NULL,
    timeout REAL NOT NULL,
    state TEXT NOT NULL,
    backend TEXT,
    prompt_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    counted INTEGER NOT NULL DEFAULT 0,
    fetched INTEGER NOT NULL DEFAULT 0,
    expired INTEGER NOT NULL DEFAULT 0,
    owner TEXT NOT NULL DEFAULT '',
    fetched_at REAL,
    round INTEGER NOT NULL DEFAULT 0,
    progress REAL NOT NULL DEFAULT 0,
    cancel_reason TEXT)"""
V1_JOB_COLUMNS = ("seq, id, client_id, workflow, inputs, prompt, files, timeout, state, backend, prompt_id, attempts,"
                  " error, created_at, started_at, finished_at, counted, fetched, expired, owner, fetched_at")


def _v2(db: sqlite3.Connection) -> None:
    """The store owns the queue: each job's fair round, its stored progress and cancel reason, and indexes
    for the fair claim, the per-owner waiting count and each client's open jobs.

    The table is rebuilt (SQLite's documented way to change a table): seq loses AUTOINCREMENT, which wrote
    one more page per submit (jobs are never deleted, so seq still only grows). The queue's indexes are
    partial: they hold only the jobs they serve, so a job's later changes write no page of them."""
    db.execute(V2_JOBS)
    db.execute(f"INSERT INTO jobs_v2 ({V1_JOB_COLUMNS}) SELECT {V1_JOB_COLUMNS} FROM jobs")
    db.execute("DROP TABLE jobs")
    db.execute("ALTER TABLE jobs_v2 RENAME TO jobs")
    db.execute("DELETE FROM sqlite_sequence WHERE name = 'jobs'")
    # the jobs a release without a stored queue left waiting: its line was round-robin over clients in
    # the order of their first job, which is round = the job's rank among its client's waiting jobs
    db.execute("UPDATE jobs SET round = (SELECT COUNT(*) FROM jobs AS j WHERE j.client_id = jobs.client_id"
               " AND j.state = 'queued' AND j.seq < jobs.seq) WHERE state = 'queued'")
    for statement in V1_INDEXES[:2]:  # jobs_owner, jobs_taken (the uploads' ones are untouched)
        db.execute(statement)
    db.execute("CREATE INDEX jobs_client ON jobs (client_id, seq)")
    db.execute("CREATE INDEX jobs_fair ON jobs (round, seq) WHERE state = 'queued'")
    db.execute("CREATE INDEX jobs_waiting_owner ON jobs (owner) WHERE state = 'queued'")
    db.execute(f"CREATE INDEX jobs_open ON jobs (client_id, state, round) WHERE {OPEN}")


# the webhook outbox: one row per (event, endpoint), written in the transaction of the change it reports
DELIVERIES = """CREATE TABLE deliveries (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    event TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL,
    next_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending',
    last_status INTEGER,
    last_error TEXT,
    holder TEXT,
    held_until REAL,
    delivered_at REAL)"""


def _v3(db: sqlite3.Connection) -> None:
    """Jobs as resources: each output's metadata (width, height, frames, duration, ...), a job's own
    callback, and the webhook outbox."""
    db.execute("ALTER TABLE outputs ADD COLUMN meta TEXT NOT NULL DEFAULT '{}'")
    db.execute("ALTER TABLE jobs ADD COLUMN webhook TEXT")
    db.execute(DELIVERIES)
    db.execute("CREATE INDEX deliveries_due ON deliveries (next_at) WHERE state = 'pending'")
    db.execute("CREATE INDEX deliveries_state ON deliveries (state, created_at)")
    db.execute("CREATE INDEX deliveries_job ON deliveries (job_id)")


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_v1, _v2, _v3)  # version n is MIGRATIONS[n - 1]
LATEST = len(MIGRATIONS)


def version(db: sqlite3.Connection) -> int:
    """The schema version of an open database."""
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection) -> list[int]:
    """Run the pending migrations in order, each in one transaction; returns the versions applied.
    The connection must be in autocommit mode (isolation_level=None)."""
    done: list[int] = []
    for number in range(version(db) + 1, LATEST + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            if version(db) >= number:  # another process got there first
                db.execute("ROLLBACK")
                continue
            MIGRATIONS[number - 1](db)
            db.execute(f"PRAGMA user_version = {number}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        log.info("store: schema migrated to version %d", number)
        done.append(number)
    return done


def pending(path: Path) -> list[int]:
    """The migrations a store file still needs (every one for a file that does not exist yet); reads only."""
    if not path.exists():
        return list(range(1, LATEST + 1))
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return list(range(version(db) + 1, LATEST + 1))
    finally:
        db.close()
