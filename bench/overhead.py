"""Per-job overhead: the same short workflow straight to a backend and through the bridge, end to end.

    python -m bench overhead [--jobs 200] [--profile 0.3.64|current] [--backend http://127.0.0.1:8188]

Both paths run the same graph (EmptyImage 64x64 -> SaveImage, a new colour each job so no cache
hides work) until the caller holds the output bytes:
  direct  POST /prompt with our clientId on an open WebSocket, wait for executing {node: null},
          GET /history/{id}, GET /view of the image (what a careful client of ComfyUI does);
  bridge  POST /generate-based-workflow with a caller WebSocket already open, wait for "closed",
          GET /history?clientId (the multipart answer).
The bridge runs as its own process, so its CPU time per job is read from /proc.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

from tornado import httpclient, websocket

from bench.harness import ROOT, MeasureError, run_benchmark, simulated_backends
from bench.machine import cpu_split, rss_kb
from bench.procs import bridge_process
from comfy.fake.profile import PROFILES

BATCH = 50
IDLE_SECONDS = 3.0
GRAPH = json.loads((ROOT / "workflows" / "empty_image.json").read_text())


def graph_for(color: int) -> dict:
    g = json.loads(json.dumps(GRAPH))
    g["1"]["inputs"].update({"width": 64, "height": 64, "color": color})
    return g


async def direct_job(http: httpclient.AsyncHTTPClient, base: str, ws: websocket.WebSocketClientConnection,
                     client_id: str, color: int) -> float:
    started = time.perf_counter()
    prompt_id = str(uuid.uuid4())
    body = json.dumps({"prompt": graph_for(color), "client_id": client_id, "prompt_id": prompt_id})
    await http.fetch(base + "/prompt", method="POST", body=body)
    while True:
        msg = await asyncio.wait_for(ws.read_message(), 30)
        if msg is None:
            raise MeasureError("the backend closed its WebSocket")
        if isinstance(msg, str):
            data = json.loads(msg)
            if data["type"] == "executing" and data["data"].get("node") is None \
                    and data["data"].get("prompt_id") == prompt_id:
                break
    entry = json.loads((await http.fetch(f"{base}/history/{prompt_id}")).body)[prompt_id]
    for out in entry["outputs"].values():
        for img in out.get("images", []):
            q = f"filename={img['filename']}&subfolder={img['subfolder']}&type={img['type']}"
            if not (await http.fetch(f"{base}/view?{q}")).body:
                raise MeasureError("empty output")
    return time.perf_counter() - started


async def bridge_job(http: httpclient.AsyncHTTPClient, base: str, color: int) -> float:
    client_id = uuid.uuid4().hex
    ws = await websocket.websocket_connect(base.replace("http", "ws", 1) + f"/ws?clientId={client_id}")
    await ws.read_message()  # connected
    started = time.perf_counter()
    body = json.dumps({"workflow": "blank-canvas", "1/width": 64, "1/height": 64, "1/color": color})
    await http.fetch(f"{base}/generate-based-workflow?clientId={client_id}", method="POST", body=body,
                     headers={"Content-Type": "application/json"})
    while True:
        msg = await asyncio.wait_for(ws.read_message(), 30)
        if msg is None:
            raise MeasureError("the bridge closed the socket before the job ended")
        status = json.loads(msg)["status"]
        if status == "closed":
            break
        if status == "error":
            raise MeasureError(f"a job failed: {msg}")
    resp = await http.fetch(f"{base}/history?clientId={client_id}")
    took = time.perf_counter() - started
    ws.close()
    if resp.code != 200 or b"\x89PNG" not in resp.body:
        raise MeasureError("no result")
    return took


async def caller_only(http: httpclient.AsyncHTTPClient, base: str) -> None:
    """The caller's side of a job with no job in it: the same WebSocket and two requests on new connections,
    answered without touching a backend, the store or the disk (an unknown workflow, an empty /history)."""
    client_id = uuid.uuid4().hex
    ws = await websocket.websocket_connect(base.replace("http", "ws", 1) + f"/ws?clientId={client_id}")
    await ws.read_message()  # connected
    resp = await http.fetch(f"{base}/generate-based-workflow?clientId={client_id}", method="POST",
                            body='{"workflow": "no-such-workflow"}', headers={"Content-Type": "application/json"},
                            raise_error=False)
    if resp.code != 400:
        raise MeasureError(f"an unknown workflow was answered {resp.code}")
    await http.fetch(f"{base}/history?clientId={client_id}", raise_error=False)
    ws.close()
    await ws.read_message()


def busy_since(pid: int, cpu0: float, t0: float, idle: float) -> float:
    """CPU seconds the process used since (cpu0, t0), less what it uses idle in that time."""
    return sum(cpu_split(pid)) - cpu0 - idle * (time.monotonic() - t0)


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] * 1000


async def measure(args: argparse.Namespace) -> int:
    async with _backend(args.backend, args.profile) as backend:
        http = httpclient.AsyncHTTPClient(force_instance=True, defaults={"request_timeout": 60})
        client_id = f"bench-direct-{uuid.uuid4().hex[:8]}"
        ws = await websocket.websocket_connect(backend.replace("http", "ws", 1) + f"/ws?clientId={client_id}")
        async with bridge_process([backend], {"clients": {"keepalive_interval": 60}}) as bridge:
            base, pid = f"http://127.0.0.1:{bridge.port}", bridge.pid
            await asyncio.sleep(0.5)
            idle_rss = rss_kb(pid) / 1024
            for i in range(5):  # warm both paths (first-prompt costs on the backend, imports, caches)
                await direct_job(http, backend, ws, client_id, 1000 + i)
                await bridge_job(http, base, 2000 + i)
            # what the bridge spends with nothing to do (health probes, timers), taken off the run's CPU below
            idle_cpu, idle_t = cpu_split(pid), time.monotonic()
            await asyncio.sleep(IDLE_SECONDS)
            idle_rate = [(b - a) / (time.monotonic() - idle_t) for a, b in zip(idle_cpu, cpu_split(pid))]
            direct, bridged, batches = [], [], []
            run_cpu, run_t = cpu_split(pid), time.monotonic()
            batch_cpu, batch_t = sum(run_cpu), run_t
            for i in range(args.jobs):  # interleaved, so drift on the machine hits both paths alike
                direct.append(await direct_job(http, backend, ws, client_id, (i * 7919) % 0xFFFFFF))
                bridged.append(await bridge_job(http, base, (i * 104729) % 0xFFFFFF))
                if i % BATCH == BATCH - 1:
                    batches.append(busy_since(pid, batch_cpu, batch_t, sum(idle_rate)) / BATCH)
                    batch_cpu, batch_t = sum(cpu_split(pid)), time.monotonic()
            await asyncio.sleep(1.5)  # work the bridge defers (history deletes, file removal) lands too
            took = time.monotonic() - run_t
            user, system = ((b - a - rate * took) for a, b, rate in zip(run_cpu, cpu_split(pid), idle_rate))
            floor_cpu, floor_t = sum(cpu_split(pid)), time.monotonic()
            for _ in range(args.jobs):
                await caller_only(http, base)
            await asyncio.sleep(0.5)
            floor = busy_since(pid, floor_cpu, floor_t, sum(idle_rate)) / args.jobs
            after_rss = rss_kb(pid) / 1024
        ws.close()
        http.close()
    print(f"\n{args.jobs} jobs each way against {'a real ComfyUI at ' + args.backend if args.backend else f'the simulated ComfyUI {args.profile}'}")
    print("path      p50 ms   p90 ms   p99 ms")
    for name, vals in (("direct", direct), ("bridge", bridged)):
        print(f"{name:<8} {pct(vals, 50):7.2f}  {pct(vals, 90):7.2f}  {pct(vals, 99):7.2f}")
    d50, d90 = pct(bridged, 50) - pct(direct, 50), pct(bridged, 90) - pct(direct, 90)
    print(f"added    {d50:7.2f}  {d90:7.2f}  {pct(bridged, 99) - pct(direct, 99):7.2f}   goal: <= 3 ms p50, <= 6 ms p90")
    print(f"ratio    {pct(bridged, 50) / pct(direct, 50):7.2f}x {pct(bridged, 90) / pct(direct, 90):7.2f}x")
    print(f"bridge CPU per job: {(user + system) * 1000 / args.jobs:.2f} ms (user {user * 1000 / args.jobs:.2f} + "
          f"kernel {system * 1000 / args.jobs:.2f}; goal <= 3 ms) = all its CPU over the run, less its idle "
          f"{sum(idle_rate) * 1000:.1f} ms/s, / {args.jobs} jobs")
    print(f"  of which {floor * 1000:.2f} ms is Tornado serving the caller's WebSocket and two requests on new "
          f"connections (the same calls without a job, measured after the run); the job itself: "
          f"{((user + system) / args.jobs - floor) * 1000:.2f} ms")
    if batches:
        print(f"  by batch of {BATCH} jobs: median {statistics.median(batches) * 1000:.2f} ms, "
              f"min {min(batches) * 1000:.2f}, max {max(batches) * 1000:.2f} "
              f"(/proc clock ticks of {1000 / os.sysconf('SC_CLK_TCK'):.0f} ms)")
    print(f"bridge RSS: {idle_rss:.1f} MiB idle after start, {after_rss:.1f} MiB after the run (goal idle <= 60 MiB)")
    print(f"direct mean {statistics.mean(direct) * 1000:.2f} ms, bridge mean {statistics.mean(bridged) * 1000:.2f} ms")
    return 0


@asynccontextmanager
async def _backend(url: str | None, profile: str) -> AsyncIterator[str]:
    if url:
        yield url.rstrip("/")
        return
    async with simulated_backends([0.0], profile) as urls:
        yield urls[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench overhead", description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--backend", help="a real ComfyUI to measure against (default: the simulated one)")
    p.add_argument("--profile", choices=PROFILES, default="0.3.64",
                   help="the ComfyUI release the simulated backend imitates")
    return run_benchmark(measure(p.parse_args(argv)))
