"""A throw-away PostgreSQL 15 for the tests: Debian's binaries, a temp folder, 127.0.0.1 on a free port.

PostgreSQL refuses to run as root, and CI runs as root: then the cluster runs as the system user
`comfy-bridge-ci` (made by .ci/run), which owns the temp folder. Settings favour speed over durability
(fsync off: a machine crash may lose the test cluster, which is thrown away anyway); loopback logins are
trusted. `PgCluster` works without pytest (the benchmarks use it); the fixtures are `pg_cluster` (one per
test session, so one per pytest-xdist worker, with `stop()`/`start()` for outage tests) and `pg_url` (a fresh
empty database per test). Making a database takes a few tenths of a second, so the fixtures' cluster makes
them ahead, and drops the used ones, in a thread of its own while the tests run.
"""
from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from bench.machine import free_port

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
RUN_AS = "comfy-bridge-ci"  # the unprivileged user the server runs as when the tests run as root
START_TIMEOUT = 30.0
SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",   # TCP on loopback only: nothing to clash with another cluster's socket
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",         # three bridges' pools and listeners, plus many per-test databases
    "shared_buffers": "64MB",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",  # tests provoke errors on purpose; the log need not repeat them
}


class PgCluster:
    """One PostgreSQL server in a temp folder; `stop()` and `start()` keep its data and its port.

    With `spares`, a thread keeps that many fresh databases made ahead for `create_database()` and drops
    the ones given to `discard_database()` (while the server is stopped, it waits)."""

    def __init__(self, root: Path | None = None, spares: int = 0) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="comfy-pg-")) if root is None else root
        self.spares = spares
        self._ready_made: list[str] = []
        self._doomed: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._helper: threading.Thread | None = None
        self.data = self.root / "data"
        self.logfile = self.root / "postgres.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self._user = pwd.getpwnam(RUN_AS) if os.geteuid() == 0 else None
        except KeyError:
            raise RuntimeError(f"PostgreSQL refuses to run as root: create the system user {RUN_AS}"
                               " (as .ci/run does)") from None
        if self._user is not None:
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        self._run([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                   "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"])

    @staticmethod
    def installed() -> bool:
        """True if Debian's PostgreSQL 15 server binaries are here."""
        return (PG_BIN / "postgres").exists() and (PG_BIN / "initdb").exists()

    def url(self, dbname: str = "postgres") -> str:
        """The connection URL of one database of this cluster."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    @property
    def running(self) -> bool:
        """True while the server process runs."""
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the server (again) on its port and wait until it accepts connections."""
        if self.running:
            return
        options = [arg for key, value in SETTINGS.items() for arg in ("-c", f"{key}={value}")]
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(self._as_user([str(PG_BIN / "postgres"), "-D", str(self.data),
                                                        "-p", str(self.port), *options]),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.root)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"PostgreSQL did not start on port {self.port}:\n{self.log_tail()}")
            time.sleep(0.02)
        if self.spares and self._helper is None:
            self._helper = threading.Thread(target=self._keep_spares, name="pg-spares", daemon=True)
            self._helper.start()
        self._wake.set()

    def stop(self) -> None:
        """Stop the server now (fast shutdown: open sessions are cut, committed data stays)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def destroy(self) -> None:
        """Stop the helper thread and the server, and delete its folder."""
        self._closing = True
        self._wake.set()
        if self._helper is not None:
            self._helper.join(START_TIMEOUT)
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def sql(self, statement: str, dbname: str = "postgres") -> str:
        """Run one statement with psql (outside a transaction) and return its unaligned output."""
        out = subprocess.run([str(PG_BIN / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                              "-d", self.url(dbname), "-c", statement],
                             capture_output=True, text=True, timeout=START_TIMEOUT, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"psql failed on {statement!r}: {out.stderr.strip()}")
        return out.stdout.strip()

    def create_database(self) -> str:
        """A new empty database (one made ahead, when there is one); returns its name."""
        with self._lock:
            name = self._ready_made.pop(0) if self._ready_made else None
        self._wake.set()
        if name is None:
            name = self._new_name()
            self.sql(f"CREATE DATABASE {name} TEMPLATE template0 STRATEGY FILE_COPY")
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database, cutting off whoever is still connected to it."""
        self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def discard_database(self, name: str) -> None:
        """Drop a database soon (in the helper thread, with `spares`), cutting off whoever is still connected."""
        if not self.spares:
            return self.drop_database(name)
        with self._lock:
            self._doomed.append(name)
        self._wake.set()
        return None

    @staticmethod
    def _new_name() -> str:
        return "t_" + uuid.uuid4().hex[:16]

    def _keep_spares(self) -> None:
        """The helper thread: drop the discarded databases and keep `spares` fresh ones made, until destroy().
        It talks to the server over asyncpg, not psql: a child process started from a second thread while the
        tests start theirs from the main one sometimes failed to start (EFAULT from exec after vfork)."""
        import asyncpg  # the PostgreSQL engine's driver: the tests that need this cluster need it anyway

        async def execute(statement: str) -> None:
            conn = await asyncpg.connect(self.url(), timeout=START_TIMEOUT)
            try:
                await conn.execute(statement, timeout=START_TIMEOUT)
            finally:
                await conn.close()

        while not self._closing:
            self._wake.wait()
            self._wake.clear()
            while not self._closing:
                with self._lock:
                    doomed = self._doomed.pop(0) if self._doomed else None
                    made = self._new_name() if doomed is None and len(self._ready_made) < self.spares else None
                if doomed is None and made is None:
                    break
                statement = (f"DROP DATABASE IF EXISTS {doomed} WITH (FORCE)" if doomed is not None
                             else f"CREATE DATABASE {made} TEMPLATE template0 STRATEGY FILE_COPY")
                try:
                    asyncio.run(execute(statement))
                except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    if doomed is not None:  # the server is down (an outage test): again after start()
                        with self._lock:
                            self._doomed.append(doomed)
                    break
                if made is not None:
                    with self._lock:
                        self._ready_made.append(made)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log."""
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def _ready(self) -> bool:
        # the postmaster writes "ready" as the last line of postmaster.pid once it accepts connections
        try:
            status = (self.data / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return False
        return len(status) >= 8 and status[7].strip() == "ready"

    def _as_user(self, argv: list[str]) -> list[str]:
        if self._user is None:
            return argv
        return ["setpriv", f"--reuid={self._user.pw_uid}", f"--regid={self._user.pw_gid}", "--clear-groups",
                "--reset-env", "--", *argv]

    def _run(self, argv: list[str]) -> None:
        out = subprocess.run(self._as_user(argv), capture_output=True, text=True, cwd=self.root,
                             timeout=120, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {out.stdout}{out.stderr}")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One PostgreSQL 15 server for the whole test session (skipped only outside CI when not installed)."""
    if not PgCluster.installed():
        message = f"PostgreSQL 15 is not installed ({PG_BIN}); .ci/run installs Debian's postgresql package"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    cluster = PgCluster(spares=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> Iterator[str]:
    """The URL of a fresh, empty database of the session's cluster, dropped after the test."""
    if not pg_cluster.running:  # a test that stopped the server and failed before starting it again
        pg_cluster.start()
    name = pg_cluster.create_database()
    yield pg_cluster.url(name)
    if not pg_cluster.running:
        pg_cluster.start()
    pg_cluster.discard_database(name)
