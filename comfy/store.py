"""The bridge's record: jobs, their outputs and uploads in SQLite; the generation count in a JSON file."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from .jobs import Job, Output, State

log = logging.getLogger(__name__)

FLUSH_DELAY = 0.5  # seconds the count file may lag the count

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
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
    fetched_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_client ON jobs (client_id, seq);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS outputs (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    filename TEXT NOT NULL,
    content_type TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (job_id, idx)
);
CREATE TABLE IF NOT EXISTS uploads (
    name TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    original TEXT NOT NULL,
    created_at REAL NOT NULL,
    owner TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# indexes on columns that stores made by earlier versions gain in _migrate(), so made after it
INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, seq);
CREATE INDEX IF NOT EXISTS jobs_taken ON jobs (fetched_at) WHERE fetched_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS uploads_owner ON uploads (owner);
CREATE INDEX IF NOT EXISTS uploads_age ON uploads (created_at);
"""

# columns added after the first release, with their declarations, for _migrate()
ADDED_COLUMNS = {"jobs": {"expired": "INTEGER NOT NULL DEFAULT 0", "owner": "TEXT NOT NULL DEFAULT ''",
                          "fetched_at": "REAL"},
                 "uploads": {"owner": "TEXT NOT NULL DEFAULT ''"}}

_JOB_FIELDS = ("id", "client_id", "workflow", "inputs", "prompt", "files", "timeout", "state", "backend",
               "prompt_id", "attempts", "error", "created_at", "started_at", "finished_at", "counted",
               "fetched", "owner", "fetched_at")


class Store:
    """SQLite in WAL mode; every write is one short transaction committed before it is announced."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "bridge.sqlite3"
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash (kill -9); only an OS crash or
        # power cut may lose the last commits, never corrupt the file.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._migrate()
        self.db.executescript(INDEXES)
        self._usage: dict[str, int] = {}  # owner -> stored bytes (uploads + untaken results), filled lazily

    def _migrate(self) -> None:
        """Bring a store made by an earlier version up to this schema (columns are only ever added)."""
        for table, columns in ADDED_COLUMNS.items():
            have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            for column, decl in columns.items():
                if column not in have:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
                    log.info("store: added column %s.%s", table, column)

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    # jobs -------------------------------------------------------------------------------------
    def add_job(self, job: Job) -> None:
        """Record a new job; sets its seq (the submission order)."""
        row = self._job_row(job)
        cur = self.db.execute(
            f"INSERT INTO jobs ({', '.join(_JOB_FIELDS)}) VALUES ({', '.join('?' * len(_JOB_FIELDS))})",
            [row[f] for f in _JOB_FIELDS])
        job.seq = int(cur.lastrowid or 0)

    def save_job(self, job: Job) -> None:
        """Write the job's changing fields."""
        row = self._job_row(job)
        fields = [f for f in _JOB_FIELDS if f not in ("id", "client_id", "workflow", "inputs", "created_at")]
        self.db.execute(f"UPDATE jobs SET {', '.join(f + '=?' for f in fields)} WHERE id=?",
                        [row[f] for f in fields] + [job.id])

    def complete_job(self, job: Job) -> None:
        """Record the outputs and the completed state in one transaction."""
        with self._tx():
            self.db.executemany(
                "INSERT OR REPLACE INTO outputs (job_id, idx, node_id, filename, content_type, path, size)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(job.id, i, o.node_id, o.filename, o.content_type, o.path, o.size)
                 for i, o in enumerate(job.outputs)])
            self.save_job(job)
        self._count(job.owner, sum(o.size for o in job.outputs))

    def mark_fetched(self, jobs: list[Job], expired: bool = False) -> list[str]:
        """The caller took these jobs' outputs, or they expired untaken. Taken outputs stay on record for
        refetch_grace (see purge_taken); expired ones are forgotten now. Returns the paths to delete now."""
        now = time.time()
        ids = [(j.id,) for j in jobs]
        paths: list[str] = []
        with self._tx():
            self.db.executemany(f"UPDATE jobs SET fetched=1, expired={int(expired)}, fetched_at={now!r} WHERE id=?",
                                ids)
            if expired:
                paths = [r[0] for j in ids for r in self.db.execute("SELECT path FROM outputs WHERE job_id=?", j)]
                self.db.executemany("DELETE FROM outputs WHERE job_id=?", ids)
        for job in jobs:  # taken results no longer count against their owner's quota
            self._count(job.owner, -sum(o.size for o in job.outputs))
        return paths

    def purge_taken(self, before: float) -> list[str]:
        """Forget the outputs of results taken before `before` (their grace is over); returns their paths."""
        with self._tx():
            rows = self.db.execute("SELECT o.job_id, o.path FROM outputs o JOIN jobs j ON j.id = o.job_id"
                                   " WHERE j.fetched_at IS NOT NULL AND j.fetched_at < ?", [before]).fetchall()
            self.db.executemany("DELETE FROM outputs WHERE job_id=?", {(r[0],) for r in rows})
        return [r[1] for r in rows]

    def taken_jobs(self, client_id: str, since: float) -> list[Job]:
        """The client's results taken at or after `since` whose outputs are still on record (oldest first)."""
        rows = self.db.execute("SELECT * FROM jobs WHERE client_id=? AND fetched_at >= ? AND expired=0 ORDER BY seq",
                               [client_id, since]).fetchall()
        return [job for job in map(self._job, rows) if self._load_outputs(job)]

    def job(self, job_id: str) -> Job | None:
        """One job by id with the outputs still on record, or None."""
        row = self.db.execute("SELECT * FROM jobs WHERE id=?", [job_id]).fetchone()
        if row is None:
            return None
        job = self._job(row)
        self._load_outputs(job)
        return job

    def latest_job(self, client_id: str) -> Job | None:
        """The client's newest job (any state), or None if it never submitted."""
        row = self.db.execute("SELECT * FROM jobs WHERE client_id=? ORDER BY seq DESC LIMIT 1", [client_id]).fetchone()
        return self._job(row) if row is not None else None

    def latest_backend(self, client_id: str) -> str | None:
        """The backend the client's newest dispatched job went to."""
        row = self.db.execute("SELECT backend FROM jobs WHERE client_id=? AND backend IS NOT NULL"
                              " ORDER BY seq DESC LIMIT 1", [client_id]).fetchone()
        return row[0] if row is not None else None

    def _load_outputs(self, job: Job) -> list[Output]:
        job.outputs = [Output(o["node_id"], o["filename"], o["content_type"], o["path"], o["size"])
                       for o in self.db.execute("SELECT * FROM outputs WHERE job_id=? ORDER BY idx", [job.id])]
        return job.outputs

    def unfinished_jobs(self) -> list[Job]:
        """Jobs still waiting or running, oldest first (for recovery after a restart)."""
        rows = self.db.execute("SELECT * FROM jobs WHERE state IN (?, ?, ?) ORDER BY seq",
                               [State.QUEUED.value, State.DISPATCHING.value, State.RUNNING.value])
        return [self._job(r) for r in rows]

    def unfetched_jobs(self) -> list[Job]:
        """Completed jobs with outputs the caller has not taken yet."""
        rows = self.db.execute("SELECT * FROM jobs WHERE state=? AND fetched=0"
                               " AND EXISTS (SELECT 1 FROM outputs WHERE job_id=jobs.id) ORDER BY seq",
                               [State.COMPLETED.value]).fetchall()
        jobs = [self._job(r) for r in rows]
        by_id = {j.id: j for j in jobs}
        for o in self.db.execute("SELECT * FROM outputs ORDER BY job_id, idx"):
            job = by_id.get(o["job_id"])
            if job:
                job.outputs.append(Output(o["node_id"], o["filename"], o["content_type"], o["path"], o["size"]))
        return jobs

    def count_counted(self) -> int:
        """How many jobs have started running (the floor of the generation count)."""
        return int(self.db.execute("SELECT COUNT(*) FROM jobs WHERE counted=1").fetchone()[0])

    def log_page(self, limit: int, offset: int, owner: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """One page of the generation log, newest first, and the number of jobs in it (one owner's, or all)."""
        where, args = ("WHERE owner=?", [owner]) if owner is not None else ("", [])
        total = int(self.db.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0])
        rows = self.db.execute(
            "SELECT id, workflow, state, error, created_at, finished_at, fetched, expired,"
            " EXISTS (SELECT 1 FROM outputs WHERE job_id=jobs.id) AS stored"
            f" FROM jobs {where} ORDER BY seq DESC LIMIT ? OFFSET ?", [*args, limit, offset]).fetchall()
        return [dict(r) for r in rows], total

    # uploads ----------------------------------------------------------------------------------
    def add_upload(self, name: str, sha256: str, size: int, content_type: str, original: str,
                   owner: str = "") -> None:
        """Record a stored upload and whose it is."""
        self.db.execute("INSERT INTO uploads (name, sha256, size, content_type, original, created_at, owner)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)", [name, sha256, size, content_type, original, time.time(), owner])
        self._count(owner, size)

    def upload(self, name: str, owner: str | None = None) -> dict[str, Any] | None:
        """A stored upload by its saved name (only if `owner` holds it, when one is given)."""
        row = self.db.execute("SELECT * FROM uploads WHERE name=?", [name]).fetchone()
        if row is None or (owner is not None and row["owner"] != owner):
            return None
        return dict(row)

    def stale_uploads(self, before: float) -> list[str]:
        """Names of uploads made before `before`, oldest first."""
        return [r[0] for r in self.db.execute("SELECT name FROM uploads WHERE created_at < ? ORDER BY created_at",
                                              [before])]

    def delete_uploads(self, names: list[str]) -> None:
        """Forget these uploads (their files are the caller's to delete)."""
        with self._tx():
            for name in names:
                row = self.db.execute("DELETE FROM uploads WHERE name=? RETURNING owner, size", [name]).fetchone()
                if row is not None:
                    self._count(row[0], -row[1])

    # quota ------------------------------------------------------------------------------------
    def usage(self, owner: str) -> int:
        """Bytes an owner has stored: its uploads and its results not yet taken."""
        if owner not in self._usage:
            uploads = self.db.execute("SELECT COALESCE(SUM(size), 0) FROM uploads WHERE owner=?", [owner]).fetchone()[0]
            results = self.db.execute(
                "SELECT COALESCE(SUM(o.size), 0) FROM outputs o JOIN jobs j ON j.id = o.job_id"
                " WHERE j.owner=? AND j.fetched=0", [owner]).fetchone()[0]
            self._usage[owner] = int(uploads) + int(results)
        return self._usage[owner]

    def _count(self, owner: str, delta: int) -> None:
        if owner in self._usage:  # owners not yet asked about are summed from the tables when they are
            self._usage[owner] = max(0, self._usage[owner] + delta)

    # meta -------------------------------------------------------------------------------------
    def meta(self, key: str, make: Any) -> str:
        """A persistent value, created by make() the first time."""
        row = self.db.execute("SELECT value FROM meta WHERE key=?", [key]).fetchone()
        if row:
            return str(row[0])
        value = str(make())
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", [key, value])
        return value

    # helpers ----------------------------------------------------------------------------------
    def _tx(self) -> Any:
        store = self

        class _Tx:
            def __enter__(self) -> None:
                store.db.execute("BEGIN")

            def __exit__(self, kind: Any, *_: Any) -> None:
                store.db.execute("ROLLBACK" if kind else "COMMIT")
        return _Tx()

    @staticmethod
    def _job_row(job: Job) -> dict[str, Any]:
        return {"id": job.id, "client_id": job.client_id, "workflow": job.workflow,
                "inputs": json.dumps(job.inputs), "prompt": json.dumps(job.prompt),
                "files": json.dumps(job.files), "timeout": job.timeout, "state": job.state.value,
                "backend": job.backend, "prompt_id": job.prompt_id, "attempts": job.attempts,
                "error": job.error, "created_at": job.created_at, "started_at": job.started_at,
                "finished_at": job.finished_at, "counted": int(job.counted), "fetched": int(job.fetched),
                "owner": job.owner, "fetched_at": job.fetched_at}

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        return Job(id=row["id"], client_id=row["client_id"], workflow=row["workflow"],
                   inputs=json.loads(row["inputs"]), prompt=json.loads(row["prompt"]),
                   files=json.loads(row["files"]), timeout=row["timeout"], state=State(row["state"]),
                   backend=row["backend"], prompt_id=row["prompt_id"], attempts=row["attempts"],
                   error=row["error"], created_at=row["created_at"], started_at=row["started_at"],
                   finished_at=row["finished_at"], counted=bool(row["counted"]),
                   fetched=bool(row["fetched"]), seq=row["seq"], owner=row["owner"],
                   fetched_at=row["fetched_at"], expired=bool(row["expired"]))


class GenerationCounter:
    """The persistent job counter in current_state.json, replaced atomically on every change."""

    def __init__(self, path: Path, floor: int = 0) -> None:
        self.path = path
        self.value = max(self._read(), floor)
        self._written = -1
        self._flush: asyncio.TimerHandle | None = None

    def _read(self) -> int:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return int(data.get("generation_count", 0))
        except FileNotFoundError:
            return 0
        except (ValueError, TypeError, AttributeError):
            log.warning("%s is unreadable; counting from the job store", self.path)
            return 0

    def increment(self) -> int:
        """Count one more job; the file follows within FLUSH_DELAY (one fsync for a burst of jobs).

        A crash in between cannot lower the count: at start it is raised to the jobs the store has
        recorded as run, and that record is committed with each job."""
        self.value += 1
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(FLUSH_DELAY, self.flush)
        return self.value

    def flush(self) -> None:
        """Write the count now if it changed."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self.value != self._written:
            self.write()

    def write(self) -> None:
        """Write the count: temp file, fsync, rename, so a crash leaves the old or the new file."""
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"generation_count": self.value}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._written = self.value
