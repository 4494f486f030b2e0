"""The bridge's record: jobs, their outputs and uploads in SQLite; the generation count in a JSON file."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

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
    expired INTEGER NOT NULL DEFAULT 0
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
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# columns added after the first release, with their declarations, for _migrate()
ADDED_COLUMNS = {"expired": "INTEGER NOT NULL DEFAULT 0"}

_JOB_FIELDS = ("id", "client_id", "workflow", "inputs", "prompt", "files", "timeout", "state", "backend",
               "prompt_id", "attempts", "error", "created_at", "started_at", "finished_at", "counted",
               "fetched")


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

    def _migrate(self) -> None:
        """Bring a store made by an earlier version up to this schema (columns are only ever added)."""
        have = {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}
        for column, decl in ADDED_COLUMNS.items():
            if column not in have:
                self.db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {decl}")
                log.info("store: added column jobs.%s", column)

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

    def mark_fetched(self, job_ids: list[str], expired: bool = False) -> None:
        """The caller took these jobs' outputs (or they expired untaken): forget the output records."""
        with self._tx():
            self.db.executemany(f"UPDATE jobs SET fetched=1, expired={int(expired)} WHERE id=?",
                                [(j,) for j in job_ids])
            self.db.executemany("DELETE FROM outputs WHERE job_id=?", [(j,) for j in job_ids])

    def unfinished_jobs(self) -> list[Job]:
        """Jobs still waiting or running, oldest first (for recovery after a restart)."""
        rows = self.db.execute("SELECT * FROM jobs WHERE state IN (?, ?, ?) ORDER BY seq",
                               [State.QUEUED.value, State.DISPATCHING.value, State.RUNNING.value])
        return [self._job(r) for r in rows]

    def unfetched_jobs(self) -> list[Job]:
        """Completed jobs whose outputs the caller has not taken yet."""
        rows = self.db.execute("SELECT * FROM jobs WHERE state=? AND fetched=0 ORDER BY seq",
                               [State.COMPLETED.value]).fetchall()
        jobs = [self._job(r) for r in rows]
        by_id = {j.id: j for j in jobs}
        for o in self.db.execute("SELECT * FROM outputs ORDER BY job_id, idx"):
            job = by_id.get(o["job_id"])
            if job:
                job.outputs.append(Output(o["node_id"], o["filename"], o["content_type"], o["path"], o["size"]))
        return jobs

    def latest_per_client(self) -> Iterator[Job]:
        """Every client's newest job (so /execution-info knows clients from before a restart)."""
        rows = self.db.execute("SELECT * FROM jobs WHERE seq IN (SELECT MAX(seq) FROM jobs GROUP BY client_id)")
        return (self._job(r) for r in rows)

    def count_counted(self) -> int:
        """How many jobs have started running (the floor of the generation count)."""
        return int(self.db.execute("SELECT COUNT(*) FROM jobs WHERE counted=1").fetchone()[0])

    def log_page(self, limit: int, offset: int) -> tuple[list[sqlite3.Row], int]:
        """One page of the generation log, newest first, and the total number of jobs."""
        total = int(self.db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
        rows = self.db.execute(
            "SELECT id, client_id, workflow, state, error, created_at, finished_at, fetched, expired FROM jobs"
            " ORDER BY seq DESC LIMIT ? OFFSET ?", [limit, offset]).fetchall()
        return rows, total

    # uploads ----------------------------------------------------------------------------------
    def add_upload(self, name: str, sha256: str, size: int, content_type: str, original: str) -> None:
        """Record a stored upload."""
        self.db.execute("INSERT INTO uploads (name, sha256, size, content_type, original, created_at)"
                        " VALUES (?, ?, ?, ?, ?, ?)", [name, sha256, size, content_type, original, time.time()])

    def upload(self, name: str) -> sqlite3.Row | None:
        """A stored upload by its saved name."""
        return self.db.execute("SELECT * FROM uploads WHERE name=?", [name]).fetchone()

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
                "finished_at": job.finished_at, "counted": int(job.counted), "fetched": int(job.fetched)}

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        return Job(id=row["id"], client_id=row["client_id"], workflow=row["workflow"],
                   inputs=json.loads(row["inputs"]), prompt=json.loads(row["prompt"]),
                   files=json.loads(row["files"]), timeout=row["timeout"], state=State(row["state"]),
                   backend=row["backend"], prompt_id=row["prompt_id"], attempts=row["attempts"],
                   error=row["error"], created_at=row["created_at"], started_at=row["started_at"],
                   finished_at=row["finished_at"], counted=bool(row["counted"]),
                   fetched=bool(row["fetched"]), seq=row["seq"])


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
