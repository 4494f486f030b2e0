"""Chaos: many clients submit while backends die and come back at random; nothing accepted is lost."""
from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import pytest

from conftest import new_client_id, parse_multipart

pytestmark = pytest.mark.both_profiles  # the engine runs against each ComfyUI release the fake imitates

CLIENTS = 20
JOBS_PER_CLIENT = 10
CHAOS_SECONDS = 20  # backends die and come back for this long (unless every job ended sooner)
# then, every backend up, the jobs left end within this: a bound against a job that never ends, not a speed
# goal (how many are left, and how fast they go, depends on how busy the machine is)
SETTLE_SECONDS = 40


@pytest.mark.timeout(CHAOS_SECONDS + SETTLE_SECONDS + 40)
async def test_chaos_every_job_ends_once(bridge_factory, fakes) -> None:  # type: ignore[no-untyped-def]
    backends = [await fakes(duration=0.05) for _ in range(3)]
    bridge = await bridge_factory(backends, probe_interval=0.05, down_after=2, up_after=2, failover_grace=0.3,
                                  max_attempts=8, job_timeout=10, history_poll_interval=0.2,
                                  max_queue_per_identity=1000)  # 20 callers, all on this one address
    rng = random.Random(20261122)
    stop = asyncio.Event()

    async def chaos() -> None:
        while not stop.is_set():
            await asyncio.sleep(rng.uniform(0.1, 0.4))
            fake = rng.choice(backends)
            if fake.is_up and sum(f.is_up for f in backends) > 1 or not fake.is_up and rng.random() < 0.7:
                await (fake.go_down() if fake.is_up else fake.come_up())
        for fake in backends:
            if not fake.is_up:
                await fake.come_up()

    async def client(cid: str) -> list[str]:
        ids = []
        for i in range(JOBS_PER_CLIENT):
            answer = await bridge.submit(cid, {"workflow": "blank-canvas", "1/width": 16 + i, "1/color": rng.randrange(1 << 24)})
            ids.append(answer["job_id"])
            await asyncio.sleep(rng.uniform(0, 0.05))
        return ids

    started = time.monotonic()
    chaos_task = asyncio.create_task(chaos())
    clients = [new_client_id() for _ in range(CLIENTS)]
    submitted = dict(zip(clients, await asyncio.gather(*(client(c) for c in clients))))
    all_ids = [j for ids in submitted.values() for j in ids]
    assert len(set(all_ids)) == CLIENTS * JOBS_PER_CLIENT

    async def settled() -> dict[str, dict]:
        while True:
            log = await bridge.get_json("/history?limit=1000")
            entries = {e["id"]: e for e in log["history"]}
            if all(entries.get(j, {}).get("status") in ("completed", "failed") for j in all_ids):
                return entries
            if time.monotonic() - started > CHAOS_SECONDS:
                stop.set()  # let the backends settle so stragglers can finish
            await asyncio.sleep(0.1)

    entries = await asyncio.wait_for(settled(), CHAOS_SECONDS + SETTLE_SECONDS)
    stop.set()
    await chaos_task
    statuses = Counter(entries[j]["status"] for j in all_ids)
    for j in all_ids:
        if entries[j]["status"] == "failed":
            assert entries[j]["error_message"], entries[j]
    assert statuses["completed"] >= CLIENTS * JOBS_PER_CLIENT * 0.9, statuses
    # each caller receives exactly one result per completed job, and none for a failed one
    for cid, ids in submitted.items():
        resp = await bridge.fetch("GET", f"/history?clientId={cid}")
        done = {j for j in ids if entries[j]["status"] == "completed"}
        if not done:
            assert resp.code == 204
            continue
        parts = parse_multipart(resp)
        per_job = Counter(h["Content-Disposition"].split('name="', 1)[1].split("/", 1)[0] for h, _ in parts)
        assert per_job == Counter({j: 1 for j in done}), (per_job, done)
