"""The JobStore contract, run against every engine: fair order, caps, compare-and-set, events after commit,
take-once, retention, uploads, quota, the count and the log. Engine-specific checks (the SQLite file,
its migrations) are at the end."""
from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from comfy.jobs import Job, Output, State
from comfy.jobstore import CANCEL, FETCHED, PROGRESS, REQUEUED, JobEvent, JobStore, QueueFull, StoreUnavailable
from comfy.store_pg import PostgresStore
from comfy.store_sqlite import SqliteStore

ENGINES = ["sqlite", "postgresql"]
BIG = 10_000          # max_queue / max_per_owner when a test is not about the caps
WAITING, ON_BACKEND = [State.QUEUED], [State.DISPATCHING, State.RUNNING]

MakeStore = Callable[..., Awaitable[JobStore]]


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """The engine under test."""
    return str(request.param)


@pytest.fixture
async def make_store(engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[MakeStore]:
    """Opens a store of the engine on this test's data (each call: another connection to the same data,
    as a restarted or second bridge would open it). Every store is closed at the end."""
    opened: list[JobStore] = []

    async def make(bridge: str = "bridge-1") -> JobStore:
        store: JobStore
        if engine == "sqlite":
            store = SqliteStore(tmp_path / "data", bridge)
        else:  # a fresh database of the test session's PostgreSQL (tests/pgcluster.py)
            store = PostgresStore(request.getfixturevalue("pg_url"), bridge)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
def state_now(engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[str], str | None]:
    """A job's state read over a connection of its own, synchronously: what another process sees, i.e.
    only what is committed."""
    def read(job_id: str) -> str | None:
        if engine == "sqlite":
            db = sqlite3.connect(tmp_path / "data" / "bridge.sqlite3")
            try:
                row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            finally:
                db.close()
            return None if row is None else str(row[0])
        url, cluster = request.getfixturevalue("pg_url"), request.getfixturevalue("pg_cluster")
        return cluster.sql(f"SELECT state FROM jobs WHERE id = '{job_id}'", url.rsplit("/", 1)[1]) or None
    return read


def new_job(client: str, workflow: str = "w", owner: str = "", files: dict[str, Any] | None = None) -> Job:
    """A job as a submit makes it."""
    return Job(client_id=client, workflow=workflow, inputs={"seed": 1}, prompt={"3": {"class_type": "KSampler"}},
               files=files or {}, owner=owner)


async def push(store: JobStore, *specs: str, **kw: Any) -> dict[str, Job]:
    """Enqueue jobs named like 'A1' (client A); returns them by name."""
    out = {}
    for spec in specs:
        out[spec] = await store.enqueue(new_job(spec[0], **kw), BIG, BIG)
    return out


async def drain(store: JobStore, names: dict[str, Job], workflows: frozenset[str] | None = None) -> list[str]:
    """Claim until nothing is left for `workflows`; the names in dispatch order."""
    by_id = {j.id: n for n, j in names.items()}
    order = []
    while (job := await store.claim("sim-0", workflows)) is not None:
        order.append(by_id[job.id])
    return order


async def places(store: JobStore, names: dict[str, Job]) -> dict[str, int]:
    """Every waiting job's place by name, checked against position() one by one."""
    by_id = {j.id: n for n, j in names.items()}
    everyone = {by_id[i]: p for i, p in (await store.positions()).items()}
    for name, place in everyone.items():
        assert await store.position(names[name].id) == place
    return everyone


async def run_to(store: JobStore, job: Job, outputs: list[Output] | None = None) -> Job:
    """Claim `job` (it must be first in line) and complete it with outputs."""
    claimed = await store.claim("sim-0", None)
    assert claimed is not None and claimed.id == job.id
    assert await store.transition(job.id, [State.DISPATCHING], State.RUNNING) is not None
    done = await store.transition(job.id, [State.RUNNING], State.COMPLETED,
                                  outputs=outputs or [Output("9", "a.png", "image/png", f"{job.id}/a.png", 100)])
    assert done is not None
    return done


# the fair queue --------------------------------------------------------------------------------------
# Each expected order below was derived by hand from the contract's rule, and the ones marked
# "as FairQueue" were also fed to the queue the bridge used before the store owned it: same order.

async def test_a_burst_never_starves_a_single_job(make_store: MakeStore) -> None:
    store = await make_store()
    jobs = await push(store, "A1", "A2", "A3", "A4", "B1", "C1", "C2")
    expected = ["A1", "B1", "C1", "A2", "C2", "A3", "A4"]  # as FairQueue
    assert await places(store, jobs) == {name: i for i, name in enumerate(expected, 1)}
    assert await store.queue_length() == 7
    peeked = await store.peek(None)
    assert peeked is not None and peeked.id == jobs["A1"].id
    assert await drain(store, jobs) == expected
    assert await store.queue_length() == 0 and await store.positions() == {}


async def test_a_late_client_joins_the_lowest_waiting_round(make_store: MakeStore) -> None:
    store = await make_store()
    jobs = await push(store, "A1", "A2", "A3")
    assert await drain_one(store, jobs) == "A1"
    jobs |= await push(store, "B1")               # A2 is in round 1, the lowest waiting: B1 joins it
    assert await places(store, jobs) == {"A2": 1, "B1": 2, "A3": 3}   # as FairQueue
    jobs |= await push(store, "C1", "B2")
    # rounds: 1 = A2 B1 C1, 2 = A3 B2; within a round, in the order the jobs came
    assert await drain(store, jobs) == ["A2", "B1", "C1", "A3", "B2"]


async def test_within_a_round_jobs_go_in_the_order_they_came(make_store: MakeStore) -> None:
    store = await make_store()
    jobs = await push(store, "A1", "B1", "B2", "A2", "C1")
    # round 0: A1 B1 C1; round 1: B2 before A2, as B2 came first (FairQueue, which kept a rotation of
    # clients, gave A1 B1 C1 A2 B2: fair the same way, a different order inside the round)
    assert await places(store, jobs) == {"A1": 1, "B1": 2, "C1": 3, "B2": 4, "A2": 5}
    assert await drain(store, jobs) == ["A1", "B1", "C1", "B2", "A2"]


async def drain_one(store: JobStore, names: dict[str, Job]) -> str:
    """Claim one job; its name."""
    job = await store.claim("sim-0", None)
    assert job is not None
    return next(n for n, j in names.items() if j.id == job.id)


async def test_a_requeued_job_goes_to_the_head_of_the_line(make_store: MakeStore) -> None:
    store = await make_store()
    jobs = await push(store, "A1", "B1")
    assert await drain_one(store, jobs) == "A1"
    back = await store.requeue(jobs["A1"].id, ON_BACKEND, "backend lost")
    assert back is not None and back.state is State.QUEUED and back.backend is None and back.attempts == 1
    assert await places(store, jobs) == {"A1": 1, "B1": 2}   # as FairQueue
    jobs |= await push(store, "A2", "B2")
    assert await drain_one(store, jobs) == "A1"
    assert await store.requeue(jobs["A1"].id, ON_BACKEND, "again") is not None
    # the head even of its own client's line and of every round still waiting
    assert await places(store, jobs) == {"A1": 1, "B1": 2, "A2": 3, "B2": 4}
    again = await store.claim("sim-1", None)
    assert again is not None and again.id == jobs["A1"].id and again.attempts == 3 and again.backend == "sim-1"
    assert await store.requeue(jobs["B1"].id, ON_BACKEND, "not dispatched") is None  # it waits: no CAS match


async def test_a_restricted_claim_takes_the_first_job_the_backend_can_run(make_store: MakeStore) -> None:
    store = await make_store()
    jobs = {**await push(store, "A1", workflow="x"), **await push(store, "A2", workflow="y"),
            **await push(store, "B1", workflow="y"), **await push(store, "C1", workflow="x")}
    assert await store.peek(frozenset({"z"})) is None
    assert await store.claim("sim-z", frozenset({"z"})) is None
    ys = frozenset({"y"})
    peeked = await store.peek(ys)
    assert peeked is not None and peeked.id == jobs["B1"].id
    assert await drain(store, jobs, ys) == ["B1", "A2"]  # rounds: B1 in 0, A2 in 1
    assert await places(store, jobs) == {"A1": 1, "C1": 2}
    assert await drain(store, jobs, frozenset({"x", "y"})) == ["A1", "C1"]


# caps -----------------------------------------------------------------------------------------------
async def test_max_queue_and_the_owner_cap_count_waiting_jobs_only(make_store: MakeStore) -> None:
    store = await make_store()
    for _ in range(2):
        await store.enqueue(new_job("a", owner="alice"), 3, 2)
    with pytest.raises(QueueFull, match=r"already has 2 jobs waiting \(jobs.max_queue_per_identity\)"):
        await store.enqueue(new_job("a2", owner="alice"), 3, 2)
    await store.enqueue(new_job("b", owner="bob"), 3, 2)
    with pytest.raises(QueueFull, match=r"the queue is full \(3 jobs waiting\)"):
        await store.enqueue(new_job("c", owner="carol"), 3, 2)
    assert await store.queue_length() == 3
    assert await store.claim("sim-0", None) is not None  # alice's first starts: she may wait with one more
    await store.enqueue(new_job("a", owner="alice"), 3, 2)
    await store.enqueue(new_job("x"), 5, 0)  # no owner (loopback tools): only max_queue applies


# compare-and-set -------------------------------------------------------------------------------------
async def test_a_change_from_an_unexpected_state_changes_nothing(make_store: MakeStore) -> None:
    store = await make_store()
    events: list[JobEvent] = []
    store.subscribe(events.append)
    job = (await push(store, "A1"))["A1"]
    events.clear()
    assert await store.transition(job.id, ON_BACKEND, State.COMPLETED) is None
    assert await store.transition(job.id, [State.RUNNING], State.FAILED, error="x") is None
    assert await store.update(job.id, ON_BACKEND, prompt_id="p-1") is None
    assert await store.transition("gen_nobody", WAITING, State.CANCELLED) is None
    now = await store.job(job.id)
    assert now is not None and now.state is State.QUEUED and now.prompt_id is None and now.error is None
    assert now.finished_at is None and events == []
    assert await store.position(job.id) == 1
    updated = await store.update(job.id, WAITING, prompt_id="p-2")
    assert updated is not None and updated.prompt_id == "p-2" and events == []  # update emits nothing


async def test_a_job_from_submit_to_taken(make_store: MakeStore) -> None:
    store = await make_store("bridge-7")
    events: list[JobEvent] = []
    store.subscribe(events.append)
    job = (await push(store, "A1", owner="alice"))["A1"]
    assert job.seq > 0 and await store.known_client("A") and not await store.known_client("Z")
    claimed = await store.claim("sim-0", None)
    assert claimed is not None and claimed.state is State.DISPATCHING and claimed.attempts == 1
    assert await store.update(job.id, [State.DISPATCHING], prompt_id="p-1") is not None
    running = await store.transition(job.id, [State.DISPATCHING], State.RUNNING)
    assert running is not None and running.started_at is not None and running.prompt_id == "p-1"
    assert [j.id for j in await store.active_on("sim-0")] == [job.id] and await store.active_on("sim-1") == []
    await store.progress(running, 0.25)
    seen = await store.job(job.id)
    assert seen is not None and seen.progress == 0.25
    out = [Output("9", "a.png", "image/png", f"{job.id}/a.png", 100), Output("9", "b.png", "image/png", "b", 20)]
    done = await store.transition(job.id, [State.RUNNING], State.COMPLETED, outputs=out)
    assert done is not None and done.progress == 1.0 and done.finished_at is not None and done.outputs == out
    assert await store.latest_backend("A") == "sim-0"
    assert [j.id for j in await store.client_jobs("A")] == [job.id]  # its results wait
    status = await store.status_job("A")
    assert status is not None and status.state is State.COMPLETED
    assert await store.transition(job.id, [State.RUNNING], State.FAILED) is None  # finished: CAS fails
    taken = await store.claim_results("A", 30)
    assert taken is not None and [j.outputs for j in taken] == [out]
    assert await store.mark_fetched([job.id]) == []  # taken files stay for the refetch grace
    assert await store.client_jobs("A") == []
    assert [e.kind for e in events] == ["queued", "dispatching", "running", PROGRESS, "completed", FETCHED]
    assert {e.origin for e in events} == {"bridge-7"} and {e.job_id for e in events} == {job.id}
    assert events[3].progress == 0.25 and events[3].percent == "25.00%"
    assert events[4].result_bytes == 120 and events[4].owner == "alice"


async def test_events_go_out_after_the_commit(make_store: MakeStore,
                                              state_now: Callable[[str], str | None]) -> None:
    store = await make_store()
    seen: list[tuple[str, str | None]] = []
    store.subscribe(lambda e: seen.append((e.kind, state_now(e.job_id))) if e.job_id else None)
    job = (await push(store, "A1", "A2"))["A1"]
    await store.claim("sim-0", None)
    await store.transition(job.id, [State.DISPATCHING], State.RUNNING)
    await store.requeue(job.id, ON_BACKEND, "lost")
    await store.claim("sim-0", None)
    await store.transition(job.id, [State.DISPATCHING], State.FAILED, error="boom")
    await store.request_cancel([j.id for j in await store.client_jobs("A")], "bye")
    assert seen == [("queued", "queued"), ("queued", "queued"), ("dispatching", "dispatching"),
                    ("running", "running"), (REQUEUED, "queued"), ("dispatching", "dispatching"),
                    ("failed", "failed"), ("cancelled", "cancelled")]


async def test_cancel_of_waiting_and_running_jobs(make_store: MakeStore) -> None:
    store = await make_store()
    events: list[JobEvent] = []
    store.subscribe(events.append)
    jobs = await push(store, "A1", "A2", "A3")
    await run_to(store, jobs["A1"])                        # finished: left alone
    await store.claim("sim-0", None)                       # A2 dispatching
    events.clear()
    active = await store.request_cancel([j.id for j in jobs.values()], "client gone")
    assert [j.id for j in active] == [jobs["A2"].id, jobs["A3"].id]
    a2, a3 = await store.job(jobs["A2"].id), await store.job(jobs["A3"].id)
    assert a2 is not None and a2.state is State.DISPATCHING and a2.cancel_reason == "client gone"
    assert a3 is not None and a3.state is State.CANCELLED and a3.error == "client gone" and a3.finished_at
    assert sorted((e.kind, e.job_id, e.detail) for e in events) == sorted(
        [(CANCEL, jobs["A2"].id, "client gone"), ("cancelled", jobs["A3"].id, "client gone")])
    assert await store.queue_length() == 0
    # the bridge running A2 ends it as the cancel asked
    ended = await store.transition(jobs["A2"].id, ON_BACKEND, State.CANCELLED, error=a2.cancel_reason)
    assert ended is not None and ended.state is State.CANCELLED
    assert await store.request_cancel([jobs["A2"].id], "again") == []


async def test_free_is_delivered_as_an_event(make_store: MakeStore) -> None:
    store = await make_store()
    events: list[JobEvent] = []
    store.subscribe(events.append)
    await store.command("free", "sim-0", "unload")
    assert [(e.kind, e.backend, e.detail, e.origin) for e in events] == [("free", "sim-0", "unload", "bridge-1")]
    assert await store.leases(["sim-0", "sim-1"], 10) == {"sim-0", "sim-1"}


# take-once ------------------------------------------------------------------------------------------
async def test_two_answers_at_once_one_gets_the_results(make_store: MakeStore) -> None:
    store = await make_store()
    jobs = await push(store, "A1", "A2", owner="alice")
    for job in jobs.values():
        await run_to(store, job)
    assert await store.usage("alice") == 200
    first, second = await asyncio.gather(store.claim_results("A", 30), store.claim_results("A", 30))
    winners = [r for r in (first, second) if r]
    assert len(winners) == 1 and (first is None) != (second is None)
    assert sorted(j.id for j in winners[0]) == sorted(j.id for j in jobs.values())
    assert await store.expired_results(time.time() + 60) == []  # reserved: not expired under an answer
    await store.release_results([jobs["A1"].id])               # that answer broke off for A1
    again = await store.claim_results("A", 30)
    assert again is not None and [j.id for j in again] == [jobs["A1"].id]
    assert await store.claim_results("A", 30) is None
    assert await store.mark_fetched([jobs["A1"].id, jobs["A2"].id]) == []
    assert await store.claim_results("A", 30) == [] and await store.usage("alice") == 0
    since = time.time() - 60
    assert sorted(j.id for j in await store.taken_jobs("A", since)) == sorted(j.id for j in jobs.values())
    paths = await store.purge_taken(time.time() + 1)
    assert sorted(paths) == sorted(f"{j.id}/a.png" for j in jobs.values())
    assert await store.taken_jobs("A", since) == []


async def test_a_reservation_lapses_after_its_hold(make_store: MakeStore) -> None:
    store = await make_store()
    await run_to(store, (await push(store, "A1"))["A1"])
    assert await store.claim_results("A", 0.05)
    assert await store.claim_results("A", 30) is None
    await asyncio.sleep(0.1)
    assert await store.claim_results("A", 30)


async def test_untaken_results_expire(make_store: MakeStore) -> None:
    store = await make_store()
    events: list[JobEvent] = []
    jobs = await push(store, "A1", "B1", owner="alice")
    old = await run_to(store, jobs["A1"])
    assert await store.expired_results(time.time() - 60) == []  # not old enough yet
    store.subscribe(events.append)
    assert await store.expired_results(time.time() + 1) == [old.id]
    assert await store.mark_fetched([old.id], expired=True) == [f"{old.id}/a.png"]
    assert [(e.kind, e.job_id) for e in events] == [(FETCHED, old.id)]
    assert await store.mark_fetched([old.id], expired=True) == []  # once
    gone = await store.job(old.id)
    assert gone is not None and gone.outputs == [] and gone.expired and gone.fetched
    assert await store.taken_jobs("A", 0) == [] and await store.expired_results(time.time() + 1) == []
    rows, total = await store.log_page(10, 0)
    assert total == 2 and rows[1]["expired"] == 1 and not rows[1]["stored"]


# uploads and quota ----------------------------------------------------------------------------------
async def test_old_uploads_expire_unless_a_job_needs_them(make_store: MakeStore) -> None:
    store = await make_store()
    for name in ("waits", "runs", "untaken", "taken", "free"):
        await store.add_upload(name, "0" * 64, 10, "image/png", f"{name}.png", owner="alice")
    assert await store.usage("alice") == 50
    ref = {"image": {"name": "", "path": "", "sha256": "0" * 64}}
    jobs = {}
    for name in ("untaken", "taken", "runs", "waits"):
        job = new_job(name, files={"image": {**ref["image"], "name": name}}, owner="alice")
        jobs[name] = await store.enqueue(job, BIG, BIG)
    await run_to(store, jobs["untaken"], [Output("9", "o.png", "image/png", "u/o.png", 5)])
    await run_to(store, jobs["taken"], [Output("9", "o.png", "image/png", "t/o.png", 5)])
    assert await store.usage("alice") == 60
    await store.mark_fetched([jobs["taken"].id])
    await store.claim("sim-0", None)  # "runs" dispatching
    assert await store.usage("alice") == 55
    assert sorted(await store.expire_uploads(time.time() + 1)) == ["free", "taken"]
    assert await store.upload("free") is None
    assert await store.usage("alice") == 35
    row = await store.upload("waits", owner="alice")
    assert row is not None and row["size"] == 10 and row["original"] == "waits.png"
    assert await store.upload("waits", owner="bob") is None
    assert await store.expire_uploads(time.time() - 60) == []  # none old enough


async def test_usage_summed_from_the_tables_after_a_reopen(make_store: MakeStore) -> None:
    store = await make_store()
    await store.add_upload("u1", "0" * 64, 7, "image/png", "u1.png", owner="alice")
    await run_to(store, (await push(store, "A1", owner="alice"))["A1"])
    await store.close()
    again = await make_store()
    assert await again.usage("alice") == 107 and await again.usage("bob") == 0


# the count and the log ------------------------------------------------------------------------------
async def test_a_job_is_counted_once_when_it_first_runs(make_store: MakeStore) -> None:
    store = await make_store()
    jobs = await push(store, "A1", "B1", "C1")
    assert await store.generation_count() == 0
    await store.claim("sim-0", None)
    assert await store.generation_count() == 0  # dispatched is not running
    await store.transition(jobs["A1"].id, [State.DISPATCHING], State.RUNNING)
    await store.requeue(jobs["A1"].id, ON_BACKEND, "lost")
    await store.claim("sim-0", None)
    again = await store.transition(jobs["A1"].id, [State.DISPATCHING], State.RUNNING)
    assert again is not None and again.counted
    assert await store.generation_count() == 1
    await run_to(store, jobs["B1"])
    assert await store.generation_count() == 2
    await store.close()
    assert await (await make_store()).generation_count() == 2


async def test_the_log_newest_first_one_owner_or_all(make_store: MakeStore) -> None:
    store = await make_store()
    jobs = await push(store, "A1", owner="alice")
    jobs |= await push(store, "B1", "B2", owner="bob")
    await run_to(store, jobs["A1"])
    await store.mark_fetched([jobs["A1"].id])
    rows, total = await store.log_page(2, 0)
    assert total == 3 and [r["id"] for r in rows] == [jobs["B2"].id, jobs["B1"].id]
    assert set(rows[0]) == {"id", "workflow", "state", "error", "created_at", "finished_at", "fetched",
                            "expired", "stored"}
    rows, total = await store.log_page(10, 0, owner="alice")
    assert total == 1 and rows[0]["state"] == "completed" and rows[0]["fetched"] and rows[0]["stored"]
    assert rows[0]["finished_at"] is not None and rows[0]["workflow"] == "w"
    assert (await store.log_page(10, 2))[0][0]["id"] == jobs["A1"].id
    assert await store.log_page(10, 0, owner="nobody") == ([], 0)


async def test_meta_is_made_once(make_store: MakeStore) -> None:
    store = await make_store()
    assert await store.meta("secret", lambda: "first") == "first"
    assert await store.meta("secret", lambda: "second") == "first"


# the SQLite engine's file ---------------------------------------------------------------------------
# the jobs and uploads tables of the first release; the later columns came one by one, unnumbered
FIRST_RELEASE = """
CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, client_id TEXT NOT NULL,
    workflow TEXT NOT NULL, inputs TEXT NOT NULL, prompt TEXT NOT NULL, files TEXT NOT NULL, timeout REAL NOT NULL,
    state TEXT NOT NULL, backend TEXT, prompt_id TEXT, attempts INTEGER NOT NULL DEFAULT 0, error TEXT,
    created_at REAL NOT NULL, started_at REAL, finished_at REAL, counted INTEGER NOT NULL DEFAULT 0,
    fetched INTEGER NOT NULL DEFAULT 0);
CREATE INDEX jobs_client ON jobs (client_id, seq);
CREATE INDEX jobs_state ON jobs (state);
CREATE TABLE outputs (job_id TEXT NOT NULL, idx INTEGER NOT NULL, node_id TEXT NOT NULL, filename TEXT NOT NULL,
    content_type TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (job_id, idx));
CREATE TABLE uploads (name TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    content_type TEXT NOT NULL, original TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# and what the last release before numbered migrations had added to it
LAST_UNNUMBERED = """
ALTER TABLE jobs ADD COLUMN expired INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN fetched_at REAL;
ALTER TABLE uploads ADD COLUMN owner TEXT NOT NULL DEFAULT '';
CREATE INDEX jobs_owner ON jobs (owner, seq);
CREATE INDEX jobs_taken ON jobs (fetched_at) WHERE fetched_at IS NOT NULL;
CREATE INDEX uploads_owner ON uploads (owner);
CREATE INDEX uploads_age ON uploads (created_at);
"""


def old_store(data: Path, last: bool) -> None:
    """A data_dir as an earlier release left it: three clients waiting (A with three jobs), one result
    untaken, one taken, one upload; the count file lagging the jobs that ran."""
    data.mkdir()
    db = sqlite3.connect(data / "bridge.sqlite3")
    db.executescript(FIRST_RELEASE + (LAST_UNNUMBERED if last else ""))
    rows = [("gen_done", "Z", "completed", 1, 0), ("gen_taken", "Z", "completed", 1, 1),
            ("gen_a1", "A", "queued", 0, 0), ("gen_a2", "A", "queued", 0, 0), ("gen_b1", "B", "queued", 0, 0),
            ("gen_a3", "A", "queued", 0, 0), ("gen_c1", "C", "queued", 0, 0)]
    for i, (job_id, client, state, counted, fetched) in enumerate(rows):
        db.execute("INSERT INTO jobs (id, client_id, workflow, inputs, prompt, files, timeout, state, created_at,"
                   " finished_at, counted, fetched) VALUES (?, ?, 'w', '{\"seed\": 1}', '{}', '{}', 60, ?, ?, ?, ?, ?)",
                   (job_id, client, state, 1000 + i, 1001 + i if counted else None, counted, fetched))
    db.execute("INSERT INTO outputs VALUES ('gen_done', 0, '9', 'a.png', 'image/png', 'gen_done/a.png', 42)")
    db.execute("INSERT INTO uploads (name, sha256, size, content_type, original, created_at)"
               " VALUES ('up.png', ?, 7, 'image/png', 'mine.png', 5)", ("0" * 64,))
    db.commit()
    db.close()
    (data / "current_state.json").write_text(json.dumps({"generation_count": 1}))


@pytest.mark.parametrize("last", [False, True], ids=["first-release", "last-unnumbered"])
async def test_a_store_of_an_earlier_release_is_migrated_in_order(tmp_path: Path, last: bool) -> None:
    data = tmp_path / "data"
    old_store(data, last)
    store = SqliteStore(data, "b")
    assert await store.pending_migrations() == [1, 2, 3]
    await store.open()
    try:
        assert store.schema_version == 3 and await store.pending_migrations() == [] and await store.migrate() == []
        done = await store.job("gen_done")
        assert done is not None and done.state is State.COMPLETED and done.inputs == {"seed": 1}
        assert done.owner == "" and done.outputs == [Output("9", "a.png", "image/png", "gen_done/a.png", 42)]
        assert await store.generation_count() == 2  # the file said 1; two jobs are recorded as run
        # the old line was round-robin by each client's first job: the store keeps that order
        order = ["gen_a1", "gen_b1", "gen_c1", "gen_a2", "gen_a3"]
        assert await store.positions() == {job_id: i for i, job_id in enumerate(order, 1)}
        upload = await store.upload("up.png")
        assert upload is not None and upload["owner"] == "" and upload["original"] == "mine.png"
        assert [j.id for j in await store.client_jobs("Z")] == ["gen_done"]
        rows, total = await store.log_page(10, 0)
        assert total == 7 and rows[-1]["id"] == "gen_done" and rows[-1]["stored"] and not rows[-1]["fetched"]
        assert await store.usage("") == 49
        claimed = await store.claim("sim-0", None)
        assert claimed is not None and claimed.id == "gen_a1"
        fresh = await store.enqueue(new_job("D"), BIG, BIG)
        assert await store.position(fresh.id) == 3  # round 0, after B1 and C1
    finally:
        await store.close()


async def test_each_migration_runs_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = SqliteStore(data, "b")
    assert await store.pending_migrations() == [1, 2, 3]
    await store.open()
    await store.enqueue(new_job("A"), BIG, BIG)
    await store.close()
    again = SqliteStore(data, "b")
    assert await again.pending_migrations() == []
    await again.open()
    try:
        assert again.schema_version == 3 and await again.queue_length() == 1
    finally:
        await again.close()


async def test_the_count_file_is_written_atomically_and_soon(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = SqliteStore(data, "b")
    await store.open()
    try:
        job = await store.enqueue(new_job("A"), BIG, BIG)
        await store.claim("sim-0", None)
        await store.transition(job.id, [State.DISPATCHING], State.RUNNING)
        await asyncio.sleep(0.7)  # FLUSH_DELAY is 0.5 s
        assert json.loads((data / "current_state.json").read_text()) == {"generation_count": 1}
        assert not (data / "current_state.tmp").exists()
    finally:
        await store.close()
    (data / "current_state.json").write_text("{broken")  # a file damaged by hand: the jobs still count
    again = SqliteStore(data, "b")
    await again.open()
    try:
        assert await again.generation_count() == 1
    finally:
        await again.close()


async def test_progress_is_written_seldom_but_not_lost(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = SqliteStore(data, "b")
    await store.open()
    job = await store.enqueue(new_job("A"), BIG, BIG)
    await store.claim("sim-0", None)
    running = await store.transition(job.id, [State.DISPATCHING], State.RUNNING)
    assert running is not None
    changes = store.db.total_changes
    for step in range(1, 101):
        await store.progress(running, step / 200)
    assert store.db.total_changes == changes  # a hundred steps, no write yet
    await store.close()
    db = sqlite3.connect(data / "bridge.sqlite3")
    assert db.execute("SELECT progress FROM jobs WHERE id = ?", (job.id,)).fetchone()[0] == 0.5
    db.close()


async def test_a_file_that_became_unusable_makes_the_store_unavailable(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = SqliteStore(data, "b")
    await store.open()
    try:
        job = await store.enqueue(new_job("A"), BIG, BIG)
        other = sqlite3.connect(data / "bridge.sqlite3")
        other.execute("ALTER TABLE outputs RENAME TO outputs_elsewhere")  # another process broke the file
        other.commit()
        with pytest.raises(StoreUnavailable, match="no such table: outputs"):
            await store.claim_results("A", 30)
        assert not store.available
        assert await store.queue_length() == 1 and store.available  # what still works, works: available again
        other.execute("ALTER TABLE outputs_elsewhere RENAME TO outputs")
        other.commit()
        other.close()
        assert await store.claim_results("A", 30) == [] and (await store.job(job.id)) is not None
    finally:
        await store.close()


async def test_a_change_of_an_unknown_field_is_refused(make_store: MakeStore) -> None:
    store = await make_store()
    job = await store.enqueue(new_job("A"), BIG, BIG)
    with pytest.raises(TypeError, match="not a changeable job field"):
        await store.update(job.id, [State.QUEUED], **{"error = 'x', state": "y"})
    stored = await store.job(job.id)
    assert stored is not None and stored.state is State.QUEUED and stored.error is None


async def test_output_metadata_and_a_jobs_callback_survive_a_reopen(make_store: MakeStore) -> None:
    store = await make_store("bridge-7")
    job = new_job("A")
    job.webhook = {"url": "https://hooks.example.com/done", "events": ["completed"]}
    await store.enqueue(job, BIG, BIG)
    out = [Output("9", "clip.mp4", "video/mp4", f"{job.id}/clip.mp4", 5000,
                  meta={"width": 512, "height": 288, "frames": 48, "duration": 2.0}),
           Output("9", "a.png", "image/png", f"{job.id}/a.png", 100)]
    await run_to(store, job, out)
    reopened = await make_store("bridge-8")
    seen = await reopened.job(job.id)
    assert seen is not None and seen.outputs == out and seen.outputs[1].meta == {}
    assert seen.webhook == {"url": "https://hooks.example.com/done", "events": ["completed"]}
    taken = await reopened.claim_results("A", 30)
    assert taken is not None and taken[0].outputs[0].meta["frames"] == 48
    other = (await push(reopened, "B1"))["B1"]
    seen = await reopened.job(other.id)
    assert seen is not None and seen.webhook is None
