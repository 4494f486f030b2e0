"""Store: the generation log page and start-up recovery with 100,000 jobs, against a nearly empty store.

    python -m bench store [--jobs 100000] [--clients 5000] [--unfetched 1000] [--queued 200]
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import time
import uuid
from pathlib import Path

from tornado import httpclient

from bench.harness import ROOT, MeasureError, run_benchmark, scratch_dir
from comfy.config import BackendConfig, Config
from comfy.services import Services
from comfy.sqlite_schema import V1_TABLES
from comfy.store_sqlite import SqliteStore

GRAPH = json.dumps(json.loads((ROOT / "workflows" / "empty_image.json").read_text()))


async def fill(data_dir: Path, jobs: int, clients: int, unfetched: int, queued: int) -> None:
    """Write a store as months of use would leave it: mostly finished jobs, some waiting, some results held
    (in the schema of the release before the job store, which the engine then brings up to date once)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(data_dir / "bridge.sqlite3")
    for statement in V1_TABLES:
        db.execute(statement)
    now = time.time() - jobs
    rows = []
    for i in range(jobs):
        left = jobs - i
        state = "queued" if left <= queued else "failed" if i % 17 == 0 else "completed"
        fetched = 0 if state == "completed" and left <= queued + unfetched else 1
        rows.append((f"gen_{uuid.uuid4().hex[:16]}", f"client-{i % clients}", "blank-canvas", "{}", GRAPH, "{}",
                     60.0, state, None if state == "queued" else "sim-0", None, 1, "boom" if state == "failed" else None,
                     now + i, now + i, now + i + 1, 1, fetched))
    with db:
        db.executemany(
            "INSERT INTO jobs (id, client_id, workflow, inputs, prompt, files, timeout, state, backend, prompt_id,"
            " attempts, error, created_at, started_at, finished_at, counted, fetched)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.close()
    store = SqliteStore(data_dir)
    await store.open()
    await store.close()


async def start_and_stop(data_dir: Path) -> tuple[float, Services]:
    """Seconds from nothing to a started bridge (store opened, backends leased, their jobs recovered)."""
    config = Config(backends=(BackendConfig(url="http://127.0.0.1:9", name="sim-0"),), data_dir=data_dir,
                    workflows_dir=ROOT / "workflows", connect_timeout=0.2)
    started = time.perf_counter()
    services = Services.build(config)
    await services.start()
    return time.perf_counter() - started, services


async def page_times(data_dir: Path, offsets: list[int], repeat: int) -> dict[int, list[float]]:
    """Milliseconds per GET /history?limit=10&offset=N through the HTTP API."""
    from tornado.httpserver import HTTPServer
    from tornado.testing import bind_unused_port

    from bridge import make_app
    took, services = await start_and_stop(data_dir)
    sock, port = bind_unused_port()
    server = HTTPServer(make_app(services.config, services))
    server.add_sockets([sock])
    http = httpclient.AsyncHTTPClient(force_instance=True)
    out: dict[int, list[float]] = {}
    try:
        for offset in offsets:
            out[offset] = []
            for _ in range(repeat):
                t = time.perf_counter()
                resp = await http.fetch(f"http://127.0.0.1:{port}/history?limit=10&offset={offset}")
                out[offset].append((time.perf_counter() - t) * 1000)
                if len(json.loads(resp.body)["history"]) == 0:
                    raise MeasureError(f"offset {offset} returned no entries")
    finally:
        http.close()
        server.stop()
        await services.stop()
    return out


async def measure(args: argparse.Namespace) -> int:
    with scratch_dir() as small, scratch_dir() as big:
        await fill(Path(small), 100, 10, 10, 5)
        t = time.perf_counter()
        await fill(Path(big), args.jobs, args.clients, args.unfetched, args.queued)
        print(f"  filled {args.jobs} jobs in {time.perf_counter() - t:.1f} s")
        recovery = {}
        for name, d in (("100 jobs", small), (f"{args.jobs} jobs", big)):
            took, services = await start_and_stop(Path(d))
            waiting = await services.jobs.queue_length()
            await services.stop()  # the next start on this data_dir needs its lock
            recovery[name] = took
            print(f"  start-up with {name}: {took * 1000:.0f} ms ({waiting} jobs waiting)")
        deep = args.jobs - 20
        small_pages = await page_times(Path(small), [0], args.repeat)
        big_pages = await page_times(Path(big), [0, args.jobs // 2, deep], args.repeat)
    base = statistics.median(small_pages[0])
    print("\nresult                                   value      ratio   goal")
    for offset, times in big_pages.items():
        p50, worst = statistics.median(times), max(times)
        print(f"log page offset {offset:<7} p50 / max  {p50:6.2f} / {worst:6.2f} ms  {p50 / base:5.2f}x  < 50 ms "
              f"(ratio to the same page with 100 jobs: {base:.2f} ms)")
    small_t, big_t = recovery["100 jobs"], recovery[f"{args.jobs} jobs"]
    print(f"recovery at start-up                     {big_t * 1000:6.0f} ms   {big_t / small_t:5.2f}x  < 2000 ms "
          f"(ratio to a start with 100 jobs: {small_t * 1000:.0f} ms)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench store", description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=100_000)
    p.add_argument("--clients", type=int, default=5_000)
    p.add_argument("--unfetched", type=int, default=1_000)
    p.add_argument("--queued", type=int, default=200)
    p.add_argument("--repeat", type=int, default=30)
    return run_benchmark(measure(p.parse_args(argv)))
