"""Scheduling: throughput with N backends against N x one backend, makespan on mixed speeds against ideal,
and the dispatcher's time per dispatch with 1,000 jobs queued over 16 backends.

    python -m bench scheduling [--job-time 0.25] [--per-backend 12] [--backends 1,2,4,8,16] [--mixed-jobs 70]
                               [--dispatch-jobs 1000]
"""
from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

from tornado import httpclient

from bench.harness import MeasureError, running_bridge, simulated_backends
from comfy.fake.profile import PROFILES
from comfy.jobs import State
from comfy.jobstore import JobEvent
from comfy.services import Services


async def submit_and_wait(services: Services, port: int, count: int, clients: int, timeout: float) -> dict[str, float]:
    """Submit `count` jobs at once through the HTTP API from `clients` clientIds (0: one each); returns
    each job's completion time (monotonic). Any failed job stops the run: no figure from a partial run."""
    done: dict[str, float] = {}
    failed: list[str] = []

    def on_event(event: JobEvent) -> None:
        if event.kind == State.COMPLETED.value:
            done[event.job_id] = time.monotonic()
        elif event.kind in (State.FAILED.value, State.CANCELLED.value):
            failed.append(f"{event.job_id}: {event.detail}")
    services.store.subscribe(on_event)
    http = httpclient.AsyncHTTPClient(force_instance=True, max_clients=50)
    try:
        body = '{"workflow": "blank-canvas", "1/width": 8, "1/height": 8}'
        answers = await asyncio.gather(*(
            http.fetch(f"http://127.0.0.1:{port}/generate-based-workflow?clientId=bench-"
                       f"{i % clients if clients else uuid.uuid4().hex[:12]}",
                       method="POST", body=body, headers={"Content-Type": "application/json"})
            for i in range(count)))
        if any(a.code != 200 for a in answers):
            raise MeasureError("a submit was refused")
        deadline = time.monotonic() + timeout
        while len(done) < count:
            if failed:
                raise MeasureError(f"a job failed: {failed[0]}")
            if time.monotonic() > deadline:
                raise MeasureError(f"only {len(done)} of {count} jobs completed in time")
            await asyncio.sleep(0.01)
        return done
    finally:
        http.close()


async def run_jobs(durations: list[float], count: int, profile: str = "0.3.64") -> float:
    """Submit `count` jobs at once through the bridge's API; seconds until the last one completed."""
    async with simulated_backends(durations, profile) as urls, running_bridge(urls, keepalive_interval=60) as (services, port):
        cpu0 = time.process_time()
        started = time.monotonic()
        done = await submit_and_wait(services, port, count, clients=0, timeout=120)
        cpu = time.process_time() - cpu0
        print(f"    bridge process CPU: {cpu * 1000 / count:.2f} ms per job "
              f"({cpu / (time.monotonic() - started) * 100:.0f}% of one core)", flush=True)
        return max(done.values()) - started


def ideal_makespan(durations: list[float], count: int) -> float:
    """The shortest possible time for `count` equal jobs on servers of these job times."""
    t = 0.0
    while sum(int(t / d + 1e-9) for d in durations) < count:
        t = min((int(t / d + 1e-9) + 1) * d for d in durations)
    return t


async def dispatch_latency(backends: int, jobs: int, job_time: float,
                           profile: str = "0.3.64") -> tuple[float, float, int]:
    """Submit `jobs` at once over `backends` servers; the dispatcher's time per dispatched job (mean, p99 ms)."""
    async with simulated_backends([job_time] * backends, profile) as urls, \
            running_bridge(urls, keepalive_interval=60, max_queue=jobs + 10) as (services, port):
        dispatcher = services.dispatcher
        costs: list[float] = []
        inner = dispatcher._dispatch_round

        async def timed_round() -> None:
            before = dispatcher.running()
            t = time.perf_counter()
            await inner()
            took = time.perf_counter() - t
            dispatched = dispatcher.running() - before
            if dispatched > 0:
                costs.extend([took / dispatched] * dispatched)
        dispatcher._dispatch_round = timed_round  # type: ignore[method-assign]
        await submit_and_wait(services, port, jobs, clients=50, timeout=110)
        costs.sort()
        return (sum(costs) / len(costs) * 1000, costs[int(0.99 * (len(costs) - 1))] * 1000, len(costs))


async def measure(args: argparse.Namespace) -> list[tuple[str, float, float, str]]:
    rows: list[tuple[str, float, float, str]] = []
    if args.dispatch_jobs:
        mean, p99, n = await dispatch_latency(16, args.dispatch_jobs, args.job_time / 5, args.profile)
        print(f"  dispatch: {n} jobs queued over 16 backends: {mean * 1000:.0f} us mean, {p99 * 1000:.0f} us p99 "
              f"per dispatched job", flush=True)
        rows.append((f"dispatch latency, {n} queued / 16 backends", mean, mean / 1.0, "< 1 ms per job"))
    single = None
    for n in args.backends:
        count = n * args.per_backend
        elapsed = await run_jobs([args.job_time] * n, count, args.profile)
        throughput = count / elapsed
        if single is None:
            single = throughput  # the baseline: one backend, measured in this run
        ratio = throughput / (n * single)
        rows.append((f"throughput N={n:<2} ({count} jobs)", throughput, ratio, ">= 0.95 x N x single"))
        print(f"  N={n:<2} {count:4d} jobs in {elapsed:6.2f} s = {throughput:7.2f} jobs/s; "
              f"ratio to {n} x single: {ratio:.3f}", flush=True)
    if args.mixed_jobs:
        mixed = [args.job_time * 4 / s for s in (1, 2, 4)]  # 1x, 2x, 4x speed
        elapsed = await run_jobs(mixed, args.mixed_jobs, args.profile)
        ideal = ideal_makespan(mixed, args.mixed_jobs)
        rows.append((f"makespan mixed 1x/2x/4x ({args.mixed_jobs} jobs)", elapsed, elapsed / ideal,
                     "<= 1.1 x ideal"))
        print(f"  mixed speeds: {args.mixed_jobs} jobs in {elapsed:.2f} s, ideal {ideal:.2f} s; "
              f"ratio {elapsed / ideal:.3f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench scheduling", description=__doc__.splitlines()[0])
    p.add_argument("--profile", choices=PROFILES, default="0.3.64",
                   help="the ComfyUI release the simulated backends imitate")
    p.add_argument("--job-time", type=float, default=0.25, help="seconds one job takes on a 1x backend")
    p.add_argument("--per-backend", type=int, default=12, help="jobs per backend in the throughput runs")
    p.add_argument("--backends", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    p.add_argument("--mixed-jobs", type=int, default=70, help="jobs for the mixed-speed run (0: skip)")
    p.add_argument("--dispatch-jobs", type=int, default=1000, help="queued jobs for the dispatch-latency run (0: skip)")
    args = p.parse_args(argv)
    print(f"scheduling benchmark: job time {args.job_time}s, simulated backends in a child process")
    try:
        rows: Any = asyncio.run(measure(args))
    except MeasureError as exc:
        print(f"cannot measure: {exc}")
        return 1
    print("\nresult                                  value     ratio   goal")
    for name, value, ratio, goal in rows:
        print(f"{name:<38} {value:8.2f}  {ratio:7.3f}   {goal}")
    return 0
