"""The store's queue, as the dispatcher uses it: the places callers are told are the order jobs leave in,
through any mix of submits, claims (some for restricted backends), cancels and re-queues."""
from __future__ import annotations

import random
import sqlite3
from pathlib import Path

from comfy.jobs import Job, State
from comfy.store_sqlite import SqliteStore

BIG = 10_000


def job(client: str, workflow: str) -> Job:
    """A waiting job of a client."""
    return Job(client_id=client, workflow=workflow, inputs={}, prompt={})


async def claim_order(store: SqliteStore, folder: Path) -> list[str]:
    """The order every waiting job would leave in if nothing else happened (a copy of the store is drained)."""
    copy = folder / "copy"
    copy.mkdir(exist_ok=True)
    (copy / "bridge.sqlite3").unlink(missing_ok=True)
    target = sqlite3.connect(copy / "bridge.sqlite3")
    store.db.backup(target)
    target.close()
    other = SqliteStore(copy, "copy")
    await other.open()
    try:
        order = []
        while (claimed := await other.claim("any", None)) is not None:
            order.append(claimed.id)
        return order
    finally:
        await other.close()


async def test_places_equal_the_order_jobs_leave_in(tmp_path: Path) -> None:
    rng = random.Random(20240607)
    store = SqliteStore(tmp_path / "data", "bridge-1")
    await store.open()
    waiting: list[str] = []
    running: list[str] = []
    try:
        for step in range(150):
            op = rng.random()
            if op < 0.5 or not waiting:
                added = await store.enqueue(job(rng.choice("abcde"), rng.choice(("big", "small"))), BIG, BIG)
                waiting.append(added.id)
            elif op < 0.7:
                first = (await claim_order(store, tmp_path))[0]
                claimed = await store.claim("sim-0", None)
                assert claimed is not None and claimed.id == first, step
                waiting.remove(claimed.id)
                running.append(claimed.id)
            elif op < 0.8:
                victim = rng.choice(waiting)
                assert [j.id for j in await store.request_cancel([victim], "gone")] == [victim]
                waiting.remove(victim)
            elif op < 0.9 and running:
                back = running.pop(rng.randrange(len(running)))
                assert await store.requeue(back, [State.DISPATCHING], "its backend failed") is not None
                waiting.append(back)
            else:
                claimed = await store.claim("small-only", frozenset({"small"}))
                if claimed is not None:
                    assert claimed.workflow == "small"
                    waiting.remove(claimed.id)
                    running.append(claimed.id)
            assert await store.queue_length() == len(waiting), step
            places = await store.positions()
            assert set(places) == set(waiting), step
            order = await claim_order(store, tmp_path)
            assert places == {job_id: i for i, job_id in enumerate(order, 1)}, step
            for job_id in rng.sample(waiting, min(3, len(waiting))):
                assert await store.position(job_id) == places[job_id], step
    finally:
        await store.close()
