"""Scheduling: throughput with N backends against N x one backend, and makespan on mixed speeds against ideal.

    python -m bench scheduling [--job-time 0.25] [--per-backend 12] [--backends 1,2,4,8,16] [--mixed-jobs 70]
"""
from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

from tornado import httpclient

from bench.harness import MeasureError, running_bridge, simulated_backends
from comfy.jobs import Job, State


async def run_jobs(durations: list[float], count: int) -> float:
    """Submit `count` jobs at once through the bridge's API; seconds until the last one completed."""
    async with simulated_backends(durations) as urls, running_bridge(urls, keepalive_interval=60) as (services, port):
        done: dict[str, float] = {}
        failed: list[str] = []

        def on_job(job: Job) -> None:
            if job.state is State.COMPLETED:
                done[job.id] = time.monotonic()
            elif not job.state.active:
                failed.append(f"{job.id}: {job.error}")
        services.scheduler.listeners.append(on_job)
        http = httpclient.AsyncHTTPClient(force_instance=True)
        try:
            cpu0 = time.process_time()
            started = time.monotonic()
            body = '{"workflow": "blank-canvas", "1/width": 8, "1/height": 8}'
            answers = await asyncio.gather(*(
                http.fetch(f"http://127.0.0.1:{port}/generate-based-workflow?clientId=bench-{uuid.uuid4().hex[:12]}",
                           method="POST", body=body, headers={"Content-Type": "application/json"})
                for _ in range(count)))
            if any(a.code != 200 for a in answers):
                raise MeasureError("a submit was refused")
            deadline = started + 120
            while len(done) < count:
                if failed:
                    raise MeasureError(f"a job failed: {failed[0]}")
                if time.monotonic() > deadline:
                    raise MeasureError(f"only {len(done)} of {count} jobs completed in time")
                await asyncio.sleep(0.01)
            cpu = time.process_time() - cpu0
            print(f"    bridge process CPU: {cpu * 1000 / count:.2f} ms per job "
                  f"({cpu / (time.monotonic() - started) * 100:.0f}% of one core)", flush=True)
            return max(done.values()) - started
        finally:
            http.close()


def ideal_makespan(durations: list[float], count: int) -> float:
    """The shortest possible time for `count` equal jobs on servers of these job times."""
    t = 0.0
    while sum(int(t / d + 1e-9) for d in durations) < count:
        t = min((int(t / d + 1e-9) + 1) * d for d in durations)
    return t


async def measure(args: argparse.Namespace) -> list[tuple[str, float, float, str]]:
    rows: list[tuple[str, float, float, str]] = []
    single = None
    for n in args.backends:
        count = n * args.per_backend
        elapsed = await run_jobs([args.job_time] * n, count)
        throughput = count / elapsed
        if single is None:
            single = throughput  # the baseline: one backend, measured in this run
        ratio = throughput / (n * single)
        rows.append((f"throughput N={n:<2} ({count} jobs)", throughput, ratio, ">= 0.95 x N x single"))
        print(f"  N={n:<2} {count:4d} jobs in {elapsed:6.2f} s = {throughput:7.2f} jobs/s; "
              f"ratio to {n} x single: {ratio:.3f}", flush=True)
    mixed = [args.job_time * 4 / s for s in (1, 2, 4)]  # 1x, 2x, 4x speed
    elapsed = await run_jobs(mixed, args.mixed_jobs)
    ideal = ideal_makespan(mixed, args.mixed_jobs)
    rows.append((f"makespan mixed 1x/2x/4x ({args.mixed_jobs} jobs)", elapsed, elapsed / ideal, "<= 1.1 x ideal"))
    print(f"  mixed speeds: {args.mixed_jobs} jobs in {elapsed:.2f} s, ideal {ideal:.2f} s; "
          f"ratio {elapsed / ideal:.3f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench scheduling", description=__doc__.splitlines()[0])
    p.add_argument("--job-time", type=float, default=0.25, help="seconds one job takes on a 1x backend")
    p.add_argument("--per-backend", type=int, default=12, help="jobs per backend in the throughput runs")
    p.add_argument("--backends", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    p.add_argument("--mixed-jobs", type=int, default=70)
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
