"""Several bridges on one PostgreSQL: the per-job overhead against SQLite, progress events across bridges,
the takeover after a kill -9, and jobs/s with 1, 2 and 3 bridges.

    python -m bench cluster [--parts oetj] [--jobs 200] [--follow-jobs 4] [--follow-seconds 4]
                            [--kills 3] [--lease-ttl 10] [--backends 16] [--job-time 0.02]
                            [--throughput-jobs 400] [--bridges 1,2,3]

Every bridge is `python bridge.py` (tests/cluster.py); PostgreSQL 15 is a throw-away server in a temp
folder (tests/pgcluster.py), a fresh database for each part; simulated backends run in a child process.
(o) overhead: one simulated backend with no job time (EmptyImage -> SaveImage, a new colour each job), three
    paths interleaved job by job until the caller holds the output bytes: direct to the backend, a bridge on
    SQLite, a bridge on PostgreSQL. Latency, each bridge's CPU per job (/proc, less its idle rate) and the
    PostgreSQL server's (all its processes).
(e) events: two bridges over four backends that report progress every 20 ms and record when; every job's
    clientId has a socket on each bridge. Latency = receipt - the backend sending the value (as in
    `bench websockets` (b)), split into the socket on the bridge that drives the job's backend and the socket
    on the other one (the event came through PostgreSQL).
(t) takeover: three bridges over four backends, `--lease-ttl`; kill -9 the bridge driving the most backends,
    time until every one of them is driven by another (their GET /backends), start it again, repeat.
(j) throughput: `--backends` fast simulated backends; callers in a closed loop (socket on one bridge, submit
    on the next, take the result on the third) until `--throughput-jobs` jobs are done; SQLite with one
    bridge, then PostgreSQL with each count of `--bridges`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from tornado import httpclient, websocket

from bench.harness import ROOT, MeasureError, run_benchmark, scratch_dir
from bench.load import ws_connect
from bench.machine import CPU, cpu_seconds, machine_note
from bench.overhead import direct_job, pct, pool, socket_job
from bench.procs import fake_backends
from bench.websockets import backend_timelines
from tests.cluster import Cluster, Node
from tests.pgcluster import PgCluster

QUIET = {"health": {"probe_interval": 2, "down_after": 3, "up_after": 2}, "jobs": {"history_poll_interval": 2},
         "clients": {"keepalive_interval": 60}}


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live children (PostgreSQL: the postmaster and its backends)."""
    total = cpu_seconds(pid)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            total += cpu_seconds(int(stat.parent.name))
    return total


def cluster(folder: Path, store: str, urls: list[str], size: int, lease_ttl: float = 10, **extra: Any) -> Cluster:
    """Bridges as the benchmarks run them: warnings only, quiet probes."""
    return Cluster(folder, store, urls, size, lease_ttl, log_level="WARNING", **{**QUIET, **extra})


async def part_overhead(pg: PgCluster, jobs: int) -> None:
    print(f"(o) per-job overhead, {jobs} jobs on each path, interleaved (the order rotating every round)",
          flush=True)
    with scratch_dir() as tmp:
        async with fake_backends(1, duration=0.0) as fakes:
            backend = fakes.urls[0]
            plain = cluster(Path(tmp) / "sqlite", "", fakes.urls, 1)
            shared = cluster(Path(tmp) / "pg", pg.url(pg.create_database()), fakes.urls, 1)
            direct_id = f"bench-direct-{uuid.uuid4().hex[:8]}"
            ws = await websocket.websocket_connect(backend.replace("http", "ws", 1) + f"/ws?clientId={direct_id}")
            http = {"direct": pool(backend)}
            try:
                await plain.start()
                await shared.start()
                nodes = {"sqlite": plain[0], "postgresql": shared[0]}
                http.update({name: pool(node.url) for name, node in nodes.items()})

                async def job(name: str, color: int) -> float:
                    if name == "direct":
                        return await direct_job(http[name], ws, direct_id, color)
                    return (await socket_job(http[name], nodes[name].url, color))[1]
                for i in range(5):  # first-prompt costs, imports, caches
                    for name in http:
                        await job(name, 1000 + i)
                assert pg.proc is not None
                server = pg.proc.pid
                cpus = {name: CPU(node.pid) for name, node in nodes.items()}
                base, t0 = tree_cpu(server), time.monotonic()
                await asyncio.gather(*(c.measure_idle(3) for c in cpus.values()))
                server_idle = (tree_cpu(server) - base) / (time.monotonic() - t0)
                took: dict[str, list[float]] = {name: [] for name in http}
                for c in cpus.values():
                    c.reset()
                base, t0 = tree_cpu(server), time.monotonic()
                order = list(http)
                for i in range(jobs):
                    for name in order[i % 3:] + order[:i % 3]:
                        took[name].append(await job(name, (i * 104729 + len(name)) % 0xFFFFFF))
                await asyncio.sleep(1.5)  # deferred work (history deletes, file removal) lands too
                cpu = {name: sum(c.busy()) / jobs for name, c in cpus.items()}
                cpu["postgres"] = (tree_cpu(server) - base - server_idle * (time.monotonic() - t0)) / jobs
            finally:
                ws.close()
                for client in http.values():
                    client.close()
                await plain.stop()
                await shared.stop()
    print("  path         p50 ms   p90 ms   p99 ms   added p50   bridge CPU/job")
    for name, values in took.items():
        added = f"{pct(values, 50) - pct(took['direct'], 50):8.2f}" if name != "direct" else "        "
        own = f"{cpu[name] * 1000:9.2f} ms" if name != "direct" else ""
        print(f"  {name:<11} {pct(values, 50):7.2f}  {pct(values, 90):7.2f}  {pct(values, 99):7.2f}   {added}    {own}")
    print(f"  PostgreSQL server CPU per job: {cpu['postgres'] * 1000:.2f} ms (all its processes, less idle)")
    sql, pgs = took["sqlite"], took["postgresql"]
    print(f"  ratio PostgreSQL / SQLite: latency p50 {pct(pgs, 50) / pct(sql, 50):.2f}x, p90 "
          f"{pct(pgs, 90) / pct(sql, 90):.2f}x; bridge CPU {cpu['postgresql'] / cpu['sqlite']:.2f}x; bridge + "
          f"server CPU {(cpu['postgresql'] + cpu['postgres']) / cpu['sqlite']:.2f}x", flush=True)


def follow_catalog(folder: Path, count: int) -> Path:
    """A catalog of `count` copies of sleep-progress (follow-0 ...), so a backend allowed only follow-K runs
    job K: which bridge ran a job is then known from /backends."""
    folder.mkdir()
    entries = {}
    for k in range(count):
        shutil.copy(ROOT / "workflows" / "test_sleep_progress.json", folder / f"follow-{k}.json")
        entries[f"follow-{k}"] = {"file": f"follow-{k}.json", "inputs": ["2/seconds"], "timeout": 120}
    (folder / "workflows.yaml").write_text(json.dumps(entries))  # JSON is YAML
    return folder


async def part_events(pg: PgCluster, jobs: int, seconds: float) -> None:
    print(f"(e) progress across bridges: 2 bridges, {jobs} jobs of {seconds:g} s on 4 backends, a socket per job "
          "on each bridge", flush=True)
    received: dict[tuple[int, str], list[tuple[float, str]]] = {}

    def sink(key: tuple[int, str]) -> Callable[[float, str], None]:
        out = received.setdefault(key, [])

        def on_text(t: float, text: str) -> None:
            if '"progress"' in text:
                out.append((t, json.loads(text)["details"]))
        return on_text
    durations = [round(seconds + j / 1000, 3) for j in range(jobs)]
    with scratch_dir() as tmp:
        catalog = follow_catalog(Path(tmp) / "workflows", 4)
        async with fake_backends(4, tick=0.02, record=True) as fakes:
            pair = cluster(Path(tmp) / "c", pg.url(pg.create_database()), fakes.urls, 2, workflows_dir=str(catalog),
                           backend_opts=[{"workflows": [f"follow-{k}"]} for k in range(4)])
            try:
                await pair.start()
                drivers = await pair.drivers()
                sockets = [await ws_connect("127.0.0.1", node.port, f"/ws?clientId=follow-{j}", sink((j, node.name)))
                           for node in pair for j in range(jobs)]
                for j in range(jobs):
                    resp = await pair[j % 2].fetch("POST", f"/generate-based-workflow?clientId=follow-{j}",
                                                   {"workflow": f"follow-{j % 4}", "2/seconds": durations[j]})
                    if resp.code != 200:
                        raise MeasureError(f"submit answered {resp.code}: {resp.body!r}")
                try:
                    await asyncio.wait_for(asyncio.gather(*(s.closed for s in sockets)), seconds * jobs + 60)
                except TimeoutError:
                    raise MeasureError("the jobs did not all finish and close their sockets in time") from None
                if await pair.drivers() != drivers:
                    raise MeasureError("the backends changed drivers during the run")
                events = await fakes.events()
            finally:
                await pair.stop()
    timelines = backend_timelines(events)
    ages: dict[str, list[float]] = {"same bridge": [], "across bridges": []}
    for (j, bridge), msgs in received.items():
        first = timelines.get(durations[j], {})
        where = "same bridge" if drivers[f"sim-{j % 4}"] == bridge else "across bridges"
        ages[where] += [t - first[p] for t, p in msgs if p in first and p not in ("0.00%", "100.00%")]
    if not all(ages.values()):
        raise MeasureError(f"no matched progress messages: {[len(v) for v in ages.values()]}")
    for where, values in ages.items():
        print(f"  {where:<15} p50 {pct(values, 50):6.1f} ms   p99 {pct(values, 99):6.1f} ms   ({len(values)} messages)")
    near, far = ages["same bridge"], ages["across bridges"]
    print(f"  across / same: p50 {pct(far, 50) / pct(near, 50):.2f}x, p99 {pct(far, 99) / pct(near, 99):.2f}x; "
          f"goal across bridges p99 <= 50 ms: {'met' if pct(far, 99) <= 50 else 'missed'}", flush=True)


async def part_takeover(pg: PgCluster, kills: int, lease_ttl: float) -> None:
    print(f"(t) takeover after kill -9: 3 bridges over 4 backends, lease_ttl {lease_ttl:g} s, {kills} kills", flush=True)
    taken, back = [], []
    with scratch_dir() as tmp:
        async with fake_backends(4) as fakes:
            trio = cluster(Path(tmp) / "c", pg.url(pg.create_database()), fakes.urls, 3, lease_ttl)
            try:
                await trio.start()
                for k in range(kills):
                    drivers = await trio.wait_drivers(lambda d: len(d) == 4 and len(set(d.values())) == 3, 4 * lease_ttl)
                    victim = max(trio, key=lambda n: sum(1 for v in drivers.values() if v == n.name))
                    moved = [b for b, n in drivers.items() if n == victim.name]
                    t0 = time.monotonic()
                    await victim.kill()
                    await trio.wait_drivers(lambda d: all(d.get(b, victim.name) != victim.name for b in moved),
                                            3 * lease_ttl)
                    taken.append(time.monotonic() - t0)
                    t0 = time.monotonic()
                    await victim.start()
                    await trio.wait_drivers(lambda d: victim.name in d.values(), 4 * lease_ttl)
                    back.append(time.monotonic() - t0)
                    print(f"  kill {k + 1}: {victim.name} drove {len(moved)}; taken over in {taken[-1]:.2f} s; "
                          f"after its restart it drove a backend again in {back[-1]:.2f} s", flush=True)
            finally:
                await trio.stop()
    print(f"  takeover: median {statistics.median(taken):.2f} s, max {max(taken):.2f} s = "
          f"{max(taken) / lease_ttl:.2f}x lease_ttl; back after a restart: median {statistics.median(back):.2f} s",
          flush=True)


async def closed_loop(nodes: list[Node], callers: int, total: int, http: httpclient.AsyncHTTPClient) -> float:
    """Callers each run jobs one after another (socket on one bridge, submit on the next, take on the third)
    until `total` jobs are done; the seconds it took."""
    started = time.monotonic()
    left = [total]

    async def caller(i: int) -> None:
        while left[0] > 0:
            left[0] -= 1
            cid = uuid.uuid4().hex
            socket_at, submit_at, take_at = (nodes[(i + k) % len(nodes)] for k in range(3))
            ws = await websocket.websocket_connect(f"ws://127.0.0.1:{socket_at.port}/ws?clientId={cid}")
            await ws.read_message()  # connected
            resp = await submit_at.fetch("POST", f"/generate-based-workflow?clientId={cid}",
                                         {"workflow": "blank-canvas", "1/width": 8, "1/height": 8, "1/color": i},
                                         timeout=60)
            if resp.code != 200:
                raise MeasureError(f"submit answered {resp.code}: {resp.body!r}")
            while (msg := await asyncio.wait_for(ws.read_message(), 60)) is not None:
                if json.loads(msg)["status"] in ("closed", "error"):
                    break
            ws.close()
            if msg is None or json.loads(msg)["status"] != "closed":
                raise MeasureError(f"a job did not end well: {msg!r}")
            if (await take_at.fetch("GET", f"/history?clientId={cid}", timeout=60)).code != 200:
                raise MeasureError("a result could not be taken")
    await asyncio.gather(*(caller(i) for i in range(callers)))
    return time.monotonic() - started


async def part_throughput(pg: PgCluster, backends: int, job_time: float, jobs: int, sizes: list[int]) -> None:
    callers = 3 * backends
    print(f"(j) jobs/s: {backends} simulated backends of {job_time * 1000:g} ms, {callers} callers in a closed loop, "
          f"{jobs} jobs per run", flush=True)
    http = httpclient.AsyncHTTPClient(force_instance=True, max_clients=4 * callers)
    rates: list[float] = []
    assert pg.proc is not None
    server = pg.proc.pid
    with scratch_dir() as tmp:
        async with fake_backends(backends, duration=job_time) as fakes:
            for i, size in enumerate([0, *sizes]):  # 0: SQLite, one bridge
                store = pg.url(pg.create_database()) if size else ""
                group = cluster(Path(tmp) / f"run-{i}", store, fakes.urls, max(size, 1))
                try:
                    await group.start()
                    await closed_loop(group.nodes, callers, 2 * callers, http)  # warm-up
                    cpu0, db0 = sum(cpu_seconds(n.pid) for n in group), tree_cpu(server)
                    took = await closed_loop(group.nodes, callers, jobs, http)
                    cpu, db = sum(cpu_seconds(n.pid) for n in group) - cpu0, tree_cpu(server) - db0
                finally:
                    await group.stop()
                rates.append(jobs / took)
                label = f"PostgreSQL, {size} bridge{'s' if size > 1 else ''}" if size else "SQLite, 1 bridge"
                ratios = f"{rates[-1] / rates[0]:.2f}x SQLite" + (f", {rates[-1] / rates[1]:.2f}x PostgreSQL with "
                                                                  f"{sizes[0]}" if i > 1 else "")
                server_cpu = f", PostgreSQL {db / jobs * 1000:.2f} ms" if size else ""
                print(f"  {label:<24} {rates[-1]:7.1f} jobs/s  {ratios:<40} CPU per job: bridges "
                      f"{cpu / jobs * 1000:.2f} ms{server_cpu}", flush=True)
    http.close()


async def measure(args: argparse.Namespace) -> int:
    if not PgCluster.installed():
        raise MeasureError("PostgreSQL 15 is not installed (/usr/lib/postgresql/15/bin); see .ci/run")
    print(machine_note(), flush=True)
    pg = PgCluster()
    try:
        pg.start()
        if "o" in args.parts:
            await part_overhead(pg, args.jobs)
        if "e" in args.parts:
            await part_events(pg, args.follow_jobs, args.follow_seconds)
        if "t" in args.parts:
            await part_takeover(pg, args.kills, args.lease_ttl)
        if "j" in args.parts:
            await part_throughput(pg, args.backends, args.job_time, args.throughput_jobs,
                                  [int(n) for n in args.bridges.split(",")])
    finally:
        pg.destroy()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench cluster", description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="oetj", help="o overhead, e events, t takeover, j throughput")
    p.add_argument("--jobs", type=int, default=200, help="(o) jobs per path")
    p.add_argument("--follow-jobs", type=int, default=4, help="(e) jobs followed")
    p.add_argument("--follow-seconds", type=float, default=4.0, help="(e) each job's length")
    p.add_argument("--kills", type=int, default=3, help="(t) bridges killed, one after another")
    p.add_argument("--lease-ttl", type=float, default=10.0, help="(t) cluster.lease_ttl")
    p.add_argument("--backends", type=int, default=16, help="(j) simulated backends")
    p.add_argument("--job-time", type=float, default=0.02, help="(j) each simulated job's time")
    p.add_argument("--throughput-jobs", type=int, default=400, help="(j) jobs per run")
    p.add_argument("--bridges", default="1,2,3", help="(j) bridge counts on PostgreSQL")
    return run_benchmark(measure(p.parse_args(argv)))
