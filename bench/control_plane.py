"""Control plane: /execution-info, /workflow-list, /generation-count under load, against Tornado's hello world.

    python -m bench control_plane [--seconds 5] [--connections 32] [--tool auto|wrk|python]

The bridge runs as `python bridge.py` over one simulated backend; the baseline is a bare Tornado
"Hello, world" handler in its own process on the same Tornado. Each is loaded in turn with keep-alive
GETs from wrk (one thread; the server under test has the other core) or, when wrk is absent, from
this process (asyncio keep-alive HTTP/1.1 clients). Hello world is measured before and after the
bridge's paths; the ratio is to their mean. While the bridge is loaded, the backend's request counter
and the bridge's storage writes are read to show that no request touches either; with strace
installed, a short extra run counts the bridge's file system calls.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from typing import Any

from bench.harness import MeasureError, run_benchmark
from bench.load import LoadResult, http_load, wrk_available
from bench.machine import cpu_seconds, disk_write_bytes, machine_note
from bench.procs import (
    Bridge,
    baseline_process,
    bridge_process,
    fake_backends,
)

CLIENT = "bench-known-client"
PATHS = (f"/execution-info?clientId={CLIENT}", "/workflow-list", "/generation-count")
GOAL = 0.8


def _fetch(url: str, body: bytes | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, json.loads(resp.read() or b"null")


async def make_known_client(bridge: Bridge) -> None:
    """Submit one tiny job for CLIENT and wait until it is done, so /execution-info has something to say."""
    body = json.dumps({"workflow": "blank-canvas", "1/width": 8, "1/height": 8}).encode()
    status, _ = await asyncio.to_thread(_fetch, f"{bridge.url}/generate-based-workflow?clientId={CLIENT}", body)
    if status != 200:
        raise MeasureError(f"the submit answered {status}")
    deadline = time.monotonic() + 30
    while True:
        _, info = await asyncio.to_thread(_fetch, f"{bridge.url}/execution-info?clientId={CLIENT}")
        if info["status"] == "closed":
            return
        if info["status"] == "error" or time.monotonic() > deadline:
            raise MeasureError(f"the known client's job did not complete: {info}")
        await asyncio.sleep(0.05)


def strace_file_calls(pid: int, seconds: float) -> list[str] | None:
    """File system calls (open, stat, rename, unlink, fsync...) the process makes in `seconds`; None without strace."""
    if shutil.which("strace") is None:
        return None
    proc = subprocess.run(["timeout", "-s", "INT", str(seconds), "strace", "-f", "-qq", "-p", str(pid), "-e",
                           "trace=open,openat,stat,lstat,newfstatat,statx,access,rename,renameat,unlink,unlinkat,"
                           "fsync,fdatasync,truncate,ftruncate"],
                          capture_output=True, text=True, timeout=seconds + 10)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "resumed>" not in ln]
    if proc.returncode not in (0, 124, 130) and not lines:
        return None  # not allowed to trace here (e.g. no ptrace permission)
    return lines


def summarize(calls: list[str]) -> str:
    """'N x syscall(folder)' for the most frequent kinds of call."""
    kinds: dict[str, int] = {}
    for line in calls:
        m = re.search(r"(\w+)\((?:AT_FDCWD, |\d+, )?\"([^\"]*)\"", line)
        key = f"{m.group(1)}({os.path.dirname(m.group(2)) or m.group(2)})" if m else line.split("(")[0][-20:]
        kinds[key] = kinds.get(key, 0) + 1
    return ", ".join(f"{n} x {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:4])


def row(name: str, r: LoadResult, ratio: float, cpu: str, goal: str) -> str:
    return f"{name:<42} {r.rps:9.0f} {r.p50:8.2f} {r.p99:8.2f}  {ratio:6.2f}x  {cpu:>8}  {goal}"


async def measure(args: argparse.Namespace) -> int:
    use_wrk = args.tool == "wrk" or (args.tool == "auto" and wrk_available())
    if args.tool == "wrk" and not wrk_available():
        raise MeasureError("--tool wrk, but wrk is not installed (apt-get install wrk)")
    tool = "wrk -t1 (Debian package)" if use_wrk else "Python asyncio keep-alive clients (wrk not installed)"
    print(f"control-plane benchmark: {args.connections} keep-alive connections, {args.seconds:g} s per run, "
          f"load generator: {tool}", flush=True)
    print(f"machine: {machine_note()}", flush=True)
    async with fake_backends(1) as fakes, bridge_process(fakes.urls) as bridge, baseline_process() as base:
        await make_known_client(bridge)

        cpu_us: dict[int, float] = {}  # id(result) -> server CPU per request, microseconds

        async def load(port: int, path: str, seconds: float) -> LoadResult:
            pid = base.pid if port == base.port else bridge.pid
            cpu0 = cpu_seconds(pid)
            r = await http_load("127.0.0.1", port, path, args.connections, seconds, use_wrk)
            if r.errors:
                raise MeasureError(f"{r.errors} of {r.requests} answers on {path} were not 200")
            cpu_us[id(r)] = (cpu_seconds(pid) - cpu0) / r.requests * 1e6
            return r

        for path in ("/", *PATHS):  # warm up both servers (first requests import and cache)
            await load(base.port if path == "/" else bridge.port, path, args.warmup)
        results: dict[str, LoadResult] = {}
        results["hello-world (before)"] = await load(base.port, "/", args.seconds)
        backend_before = await fakes.requests()
        disk_before = disk_write_bytes(bridge.pid)
        t0 = time.monotonic()
        for path in PATHS:
            results[path] = await load(bridge.port, path, args.seconds)
        window = time.monotonic() - t0
        backend_calls = await fakes.requests() - backend_before - 1  # the "requests" question is not a request
        disk = disk_write_bytes(bridge.pid) - disk_before
        results["hello-world (after)"] = await load(base.port, "/", args.seconds)
        traced: tuple[list[str], int] | None = None
        if args.strace and shutil.which("strace"):
            tracer = asyncio.create_task(asyncio.to_thread(strace_file_calls, bridge.pid, 4.0))
            await asyncio.sleep(0.5)  # strace attaches
            traced_requests = 0
            for path in PATHS:
                traced_requests += (await load(bridge.port, path, 1)).requests
            calls = await tracer
            traced = (calls, traced_requests) if calls is not None else None
    hello = (results["hello-world (before)"].rps + results["hello-world (after)"].rps) / 2
    hello_cpu = (cpu_us[id(results["hello-world (before)"])] + cpu_us[id(results["hello-world (after)"])]) / 2
    print(f"\n{'path':<42} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}  {'ratio':>7}  {'CPU/req':>8}  goal")
    ok = True
    for name, r in results.items():
        cpu = f"{cpu_us[id(r)]:5.0f} us"
        if name.startswith("hello"):
            print(row(name, r, r.rps / hello, cpu, "baseline"))
        else:
            ratio = r.rps / hello
            ok = ok and ratio >= GOAL
            print(row(name, r, ratio, cpu, f">= {GOAL}x hello world ({'met' if ratio >= GOAL else 'MISSED'}); "
                                            f"hello world's CPU/req / this: {hello_cpu / cpu_us[id(r)]:.2f}"))
    total = sum(r.requests for n, r in results.items() if not n.startswith("hello"))
    print(f"\nduring the bridge's {total} requests ({window:.1f} s): {backend_calls} backend requests "
          f"(health probes run every 2 s regardless), {disk} bytes written to storage by the bridge")
    if traced is not None:
        print(f"strace: {len(traced[0])} file system calls by the bridge while it answered {traced[1]} requests "
              f"(slowed by the tracer, not counted above){': ' + summarize(traced[0]) if traced[0] else ''}")
    elif args.strace:
        print("strace: not installed or not permitted here; file system calls not counted")
    print(f"goal {'met' if ok else 'missed'}: every path >= {GOAL}x hello world")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench control_plane", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0, help="seconds of load per path")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load per path before measuring")
    p.add_argument("--tool", choices=["auto", "wrk", "python"], default="auto")
    p.add_argument("--strace", action="store_true", help="also count the bridge's file system calls (needs strace)")
    return run_benchmark(measure(p.parse_args(argv)))
