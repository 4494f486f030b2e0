"""Per-job overhead: the same short workflow straight to a backend, through the bridge and through a peer gateway.

    python -m bench overhead [--jobs 200] [--profile 0.3.64|current] [--backend http://127.0.0.1:8188]
                             [--peer http://127.0.0.1:3000 [--peer-pid PID]] [--wait 30]

Every path runs the same graph (EmptyImage 64x64 -> SaveImage, a new colour each job so no cache hides
work) until the caller holds the output bytes, over kept-alive HTTP connections (one pool per server,
reused for the whole run):
  direct    POST /prompt with our clientId on one open WebSocket, wait for executing {node: null},
            GET /history/{id}, GET /view of the image (what a careful client of ComfyUI does);
  socket    the bridge's socket + take mode: open a caller WebSocket (timed on its own: `open`),
            POST /generate-based-workflow, wait for "closed", GET /history?clientId (the multipart answer);
  one call  POST /generate-based-workflow with `Prefer: wait=N` and `Accept: image/png`, answered with the
            image bytes (measured only when the bridge answers that way; otherwise it says so);
  peer      (--peer) Salad's comfyui-api in sync mode: POST /prompt {"prompt": graph}, answered with the
            outputs in base64 (its backend must be --backend, the same ComfyUI).
Jobs are interleaved, one of each path per round, the order rotating every round. The bridge runs as its own
process, so its CPU time per job is read from /proc; so is the peer's when --peer-pid names it.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from tornado import websocket

from bench.harness import ROOT, MeasureError, run_benchmark, simulated_backends
from bench.machine import CPU, machine_note, rss_kb
from bench.procs import bridge_process
from comfy.fake.profile import PROFILES
from comfy.httppool import KeepAliveClient

BATCH = 50
IDLE_SECONDS = 3.0
PNG = b"\x89PNG"
GRAPH = json.loads((ROOT / "workflows" / "empty_image.json").read_text())
JSON_HEADERS = {"Content-Type": "application/json"}


def graph_for(color: int, prefix: str = "empty") -> dict[str, Any]:
    """The benchmark's graph at 64x64 in one colour, saved under `prefix`.

    The direct and peer paths save at the root of ComfyUI's output folder (the peer reads its outputs there
    by file name), the bridge's workflow under bridge/: ComfyUI lists the target folder at every save, so
    the folders the paths write to grow alike over a run."""
    g: dict[str, Any] = json.loads(json.dumps(GRAPH))
    g["1"]["inputs"].update({"width": 64, "height": 64, "color": color})
    g["2"]["inputs"]["filename_prefix"] = prefix
    return g


def pool(base: str) -> KeepAliveClient:
    """One keep-alive connection pool to a server, reused by every request of the run."""
    return KeepAliveClient(base, connect_timeout=10, request_timeout=60)


async def ok(client: KeepAliveClient, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> bytes:
    """The body of a 200 answer; anything else cannot be measured."""
    resp = await client.fetch(method, path, body, headers)
    if resp.code != 200:
        raise MeasureError(f"{method} {path} answered {resp.code}: {resp.body[:200]!r}")
    return resp.body


async def direct_job(http: KeepAliveClient, ws: websocket.WebSocketClientConnection, client_id: str,
                     color: int) -> float:
    """Seconds for one job straight to ComfyUI, from POST /prompt to holding the image."""
    started = time.perf_counter()
    prompt_id = str(uuid.uuid4())
    await ok(http, "POST", "/prompt", json.dumps({"prompt": graph_for(color), "client_id": client_id,
                                                  "prompt_id": prompt_id}).encode(), JSON_HEADERS)
    while True:
        msg = await asyncio.wait_for(ws.read_message(), 30)
        if msg is None:
            raise MeasureError("the backend closed its WebSocket")
        if isinstance(msg, str):
            data = json.loads(msg)
            if data["type"] == "executing" and data["data"].get("node") is None \
                    and data["data"].get("prompt_id") == prompt_id:
                break
    entry = json.loads(await ok(http, "GET", f"/history/{prompt_id}"))[prompt_id]
    for out in entry["outputs"].values():
        for img in out.get("images", []):
            q = f"filename={img['filename']}&subfolder={img['subfolder']}&type={img['type']}"
            if not (await ok(http, "GET", f"/view?{q}")).startswith(PNG):
                raise MeasureError("the backend's output is not a PNG")
    return time.perf_counter() - started


def bridge_body(color: int) -> bytes:
    """The bridge's submit body for the benchmark's graph (workflow blank-canvas) in one colour."""
    return json.dumps({"workflow": "blank-canvas", "1/width": 64, "1/height": 64, "1/color": color}).encode()


async def open_socket(base: str, client_id: str) -> websocket.WebSocketClientConnection:
    """A caller socket of the bridge, open once its `connected` message has arrived."""
    ws = await websocket.websocket_connect(base.replace("http", "ws", 1) + f"/ws?clientId={client_id}")
    if await asyncio.wait_for(ws.read_message(), 30) is None:
        raise MeasureError("the bridge closed a caller socket at once")
    return ws


async def socket_job(http: KeepAliveClient, base: str, color: int) -> tuple[float, float]:
    """The socket + take mode: (seconds to open the caller socket, seconds from submit to holding the image)."""
    client_id = uuid.uuid4().hex
    t0 = time.perf_counter()
    ws = await open_socket(base, client_id)
    started = time.perf_counter()
    await ok(http, "POST", f"/generate-based-workflow?clientId={client_id}", bridge_body(color), JSON_HEADERS)
    while True:
        msg = await asyncio.wait_for(ws.read_message(), 30)
        if msg is None:
            raise MeasureError("the bridge closed the socket before the job ended")
        status = json.loads(msg)["status"]
        if status == "closed":
            break
        if status == "error":
            raise MeasureError(f"a job failed: {msg!r}")
    result = await ok(http, "GET", f"/history?clientId={client_id}")
    took = time.perf_counter() - started
    ws.close()
    if PNG not in result:
        raise MeasureError("the bridge's result holds no PNG")
    return started - t0, took


# ---- the one-call mode: POST /generate-based-workflow with Prefer: wait=N, answered with the image itself.
# probe_one_call() checks the bridge answers so (a bridge of an earlier release does not: the run then
# measures the other paths and says why).

def one_call_headers(wait: int) -> dict[str, str]:
    """Ask the bridge to wait up to `wait` seconds and answer with the image itself."""
    return {**JSON_HEADERS, "Prefer": f"wait={wait}", "Accept": "image/png"}


async def one_call_job(http: KeepAliveClient, wait: int, color: int) -> float:
    """Seconds for one job in a single request that answers with the image's bytes."""
    started = time.perf_counter()
    resp = await http.fetch("POST", f"/generate-based-workflow?clientId={uuid.uuid4().hex}", bridge_body(color),
                            one_call_headers(wait))
    took = time.perf_counter() - started
    if resp.code != 200 or not resp.body.startswith(PNG):
        raise MeasureError(f"a one-call submit answered {resp.code} {resp.headers.get('Content-Type', '')} "
                           f"instead of the image within {wait} s")
    return took


async def probe_one_call(http: KeepAliveClient, wait: int) -> str | None:
    """None when the bridge answers a waiting submit with the image; else why the mode is not available.
    A submit the bridge queued without waiting is taken before returning, so it leaves no job behind."""
    client_id = uuid.uuid4().hex
    resp = await http.fetch("POST", f"/generate-based-workflow?clientId={client_id}", bridge_body(1),
                            one_call_headers(wait))
    if resp.code == 200 and resp.body.startswith(PNG):
        return None
    why = f"the bridge answered a submit with Prefer: wait={wait} by {resp.code} " \
          f"{resp.headers.get('Content-Type', '')} {resp.body[:60]!r}"
    if resp.code == 200:  # queued the usual way: take its result, as a caller would
        deadline = time.monotonic() + 30
        while (await http.fetch("GET", f"/history?clientId={client_id}")).code != 200:
            if time.monotonic() > deadline:
                raise MeasureError("the probe's job did not finish in 30 s")
            await asyncio.sleep(0.05)
    return why


async def peer_job(http: KeepAliveClient, color: int) -> float:
    """Seconds for one job through Salad's comfyui-api in sync mode, until its answer holds the image.
    It reads outputs from ComfyUI's output folder by file name, so the graph's prefix names no folder."""
    started = time.perf_counter()
    answer = json.loads(await ok(http, "POST", "/prompt", json.dumps({"prompt": graph_for(color)}).encode(),
                                 JSON_HEADERS))
    took = time.perf_counter() - started
    images = answer.get("images") or []
    if len(images) != 1 or not base64.b64decode(images[0]).startswith(PNG):
        raise MeasureError(f"the peer's answer holds no PNG: {str(answer)[:200]}")
    return took


async def caller_only(http: KeepAliveClient, base: str) -> None:
    """The caller's side of a job with no job in it: a new WebSocket and two requests on kept-alive
    connections, answered without touching a backend, the store or the disk (an unknown workflow, an empty
    /history)."""
    client_id = uuid.uuid4().hex
    ws = await open_socket(base, client_id)
    resp = await http.fetch("POST", f"/generate-based-workflow?clientId={client_id}",
                            b'{"workflow": "no-such-workflow"}', JSON_HEADERS)
    if resp.code != 400:
        raise MeasureError(f"an unknown workflow was answered {resp.code}")
    await http.fetch("GET", f"/history?clientId={client_id}")
    ws.close()
    await ws.read_message()


async def request_floor(servers: dict[str, tuple[KeepAliveClient, str]], rounds: int = 200) -> dict[str, float]:
    """p50 milliseconds of one kept-alive GET that each server answers with no work behind it (name -> (its
    pool, the path)), interleaved: what any request to it costs on this machine, client included. A server
    that does not answer 200 is left out."""
    took: dict[str, list[float]] = {name: [] for name in servers}
    for _ in range(rounds):
        for name, (http, path) in list(servers.items()):
            started = time.perf_counter()
            resp = await http.fetch("GET", path)
            took[name].append(time.perf_counter() - started)
            if resp.code != 200:
                del servers[name], took[name]
    return {name: pct(vals, 50) for name, vals in took.items()}


def pct(values: list[float], p: float) -> float:
    """The p-th percentile of durations in seconds, in milliseconds."""
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] * 1000


async def measure(args: argparse.Namespace) -> int:
    print(machine_note())
    async with _backend(args.backend, args.profile) as backend:
        direct_http = pool(backend)
        client_id = f"bench-direct-{uuid.uuid4().hex[:8]}"
        ws = await websocket.websocket_connect(backend.replace("http", "ws", 1) + f"/ws?clientId={client_id}")
        peer_http = pool(args.peer) if args.peer else None
        settings: dict[str, Any] = {"clients": {"keepalive_interval": 60}}
        if args.output_dir:  # the bridge on the GPU box: outputs copied from ComfyUI's folder
            settings["backends"] = [{"url": backend, "name": "sim-0", "output_dir": args.output_dir}]
        async with bridge_process([backend], settings) as bridge:
            base = f"http://127.0.0.1:{bridge.port}"
            bridge_http = pool(base)
            samples: dict[str, list[float]] = {"direct": [], "socket": [], "socket+open": [], "open": []}
            missing = await probe_one_call(bridge_http, args.wait)

            async def direct(color: int) -> None:
                samples["direct"].append(await direct_job(direct_http, ws, client_id, color))

            async def socket_mode(color: int) -> None:
                opened, took = await socket_job(bridge_http, base, color)
                samples["open"].append(opened)
                samples["socket"].append(took)
                samples["socket+open"].append(opened + took)

            async def one_call(color: int) -> None:
                samples["one call"].append(await one_call_job(bridge_http, args.wait, color))

            async def peer(color: int) -> None:
                assert peer_http is not None
                samples["peer"].append(await peer_job(peer_http, color))

            jobs: dict[str, Callable[[int], Awaitable[None]]] = {"direct": direct, "socket": socket_mode}
            if missing is None:
                jobs["one call"], samples["one call"] = one_call, []
            if peer_http is not None:
                jobs["peer"], samples["peer"] = peer, []
            await asyncio.sleep(0.5)
            idle_rss = rss_kb(bridge.pid) / 1024
            paths = list(jobs.values())
            for i in range(5):  # warm every path (first-prompt costs on the backend, imports, caches)
                for n, job in enumerate(paths):
                    await job(1000 + 10 * i + n)
            for vals in samples.values():
                vals.clear()
            cpu = CPU(bridge.pid)
            peer_cpu = CPU(args.peer_pid) if args.peer_pid else None
            # what the processes spend with nothing to do (health probes, timers), taken off the run's CPU below
            await asyncio.gather(cpu.measure_idle(IDLE_SECONDS),
                                 *([peer_cpu.measure_idle(IDLE_SECONDS)] if peer_cpu else []))
            cpu.reset()
            if peer_cpu:
                peer_cpu.reset()
            batch_cpu, batches = CPU(bridge.pid, cpu.idle), []
            bridge_modes = 1 + (missing is None)
            for i in range(args.jobs):  # interleaved and rotated, so drift on the machine hits every path alike
                r = i % len(paths)
                for n, job in enumerate(paths[r:] + paths[:r]):
                    await job((i * 7919 + n * 104729) % 0xFFFFFF)
                if i % BATCH == BATCH - 1:
                    batches.append(sum(batch_cpu.busy()) / (BATCH * bridge_modes))
                    batch_cpu.reset()
            await asyncio.sleep(1.5)  # work the bridge defers (history deletes, file removal) lands too
            user, system = cpu.busy()
            peer_busy = peer_cpu.busy() if peer_cpu else None
            floor_cpu = CPU(bridge.pid, cpu.idle)
            for _ in range(args.jobs):
                await caller_only(bridge_http, base)
            await asyncio.sleep(0.5)
            floor = sum(floor_cpu.busy()) / args.jobs
            after_rss = rss_kb(bridge.pid) / 1024
            round_trip = await request_floor({"bridge GET /health": (bridge_http, "/health"),
                                              "ComfyUI GET /queue": (direct_http, "/queue"),
                                              **({"peer GET /health": (peer_http, "/health")} if peer_http else {})})
            conns = {"direct": direct_http.connects, "bridge": bridge_http.connects,
                     **({"peer": peer_http.connects} if peer_http else {})}
            bridge_http.close()
        ws.close()
        direct_http.close()
        if peer_http is not None:
            peer_http.close()
    _report(args, samples, missing)
    print("HTTP connections opened over the whole run (kept alive): "
          + ", ".join(f"{k} {v}" for k, v in conns.items()) + "; plus one WebSocket per socket + take job")
    n = args.jobs * bridge_modes
    print(f"bridge CPU per job: {(user + system) * 1000 / n:.2f} ms (user {user * 1000 / n:.2f} + "
          f"kernel {system * 1000 / n:.2f}; goal <= 3 ms) = all its CPU over the run, less its idle "
          f"{sum(cpu.idle) * 1000:.1f} ms/s, / {n} jobs ({' and '.join(['socket'] + ['one call'] * (n > args.jobs))})")
    print(f"  of which {floor * 1000:.2f} ms is Tornado serving the caller's new WebSocket and two requests on "
          f"kept-alive connections (the same calls without a job, measured after the run); the job itself: "
          f"{((user + system) / n - floor) * 1000:.2f} ms")
    if batches:
        print(f"  by batch of {BATCH} rounds: median {statistics.median(batches) * 1000:.2f} ms, "
              f"min {min(batches) * 1000:.2f}, max {max(batches) * 1000:.2f} "
              f"(/proc clock ticks of {1000 / os.sysconf('SC_CLK_TCK'):.0f} ms)")
    if peer_busy is not None and peer_cpu is not None:
        pu, ps = peer_busy
        print(f"peer CPU per job: {(pu + ps) * 1000 / args.jobs:.2f} ms (user {pu * 1000 / args.jobs:.2f} + kernel "
              f"{ps * 1000 / args.jobs:.2f}), less its idle {sum(peer_cpu.idle) * 1000:.1f} ms/s; "
              f"peer RSS {rss_kb(args.peer_pid) / 1024:.1f} MiB")
    print(f"bridge RSS: {idle_rss:.1f} MiB idle after start, {after_rss:.1f} MiB after the run (goal idle <= 60 MiB)")
    print("one kept-alive GET with no work behind it, p50 (what any request costs here, client included): "
          + ", ".join(f"{name} {ms:.2f} ms" for name, ms in round_trip.items()))
    return 0


LABELS = {"direct": "direct", "socket": "bridge, socket + take", "socket+open": "  the same + socket open",
          "open": "  socket open alone", "one call": "bridge, one call", "peer": "peer comfyui-api"}


def _report(args: argparse.Namespace, samples: dict[str, list[float]], missing: str | None) -> None:
    where = f"a real ComfyUI at {args.backend}" if args.backend else f"the simulated ComfyUI {args.profile}"
    print(f"\n{args.jobs} interleaved jobs per path against {where}; kept-alive connections on every path")
    print("path                        p50 ms   p90 ms   p99 ms   max ms     added vs direct p50 / p90 / p99 ms")
    direct = samples["direct"]
    for key, vals in samples.items():
        line = f"{LABELS[key]:<26} {pct(vals, 50):7.2f}  {pct(vals, 90):7.2f}  {pct(vals, 99):7.2f}  {pct(vals, 100):7.1f}"
        if key not in ("direct", "open"):
            line += "   " + " / ".join(f"{pct(vals, p) - pct(direct, p):6.2f}" for p in (50, 90, 99))
        print(line)
    d50, d90 = pct(samples["socket"], 50) - pct(direct, 50), pct(samples["socket"], 90) - pct(direct, 90)
    print(f"added    {d50:7.2f}  {d90:7.2f}  (bridge socket + take; goal: <= 3 ms p50, <= 6 ms p90)")
    if missing is not None:
        print(f"one-call mode: not available ({missing})")
    opens = samples["open"]
    slow = sum(1 for v in opens if v > 0.030)
    print(f"socket opens over 30 ms: {slow} of {len(opens)}")
    print("means: " + ", ".join(f"{k} {statistics.mean(v) * 1000:.2f} ms" for k, v in samples.items() if k != "open"))


@asynccontextmanager
async def _backend(url: str | None, profile: str) -> AsyncIterator[str]:
    if url:
        yield url.rstrip("/")
        return
    async with simulated_backends([0.0], profile) as urls:
        yield urls[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench overhead", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--jobs", type=int, default=200, help="measured jobs per path")
    p.add_argument("--backend", help="a real ComfyUI to measure against (default: the simulated one)")
    p.add_argument("--profile", choices=PROFILES, default="0.3.64",
                   help="the ComfyUI release the simulated backend imitates")
    p.add_argument("--peer", help="a Salad comfyui-api in front of --backend, measured as a third path "
                                  "(its sync POST /prompt)")
    p.add_argument("--peer-pid", type=int, help="the peer's process id, for its CPU per job and RSS")
    p.add_argument("--wait", type=int, default=30, help="N of the one-call mode's Prefer: wait=N")
    p.add_argument("--output-dir", help="--backend's output folder: the bridge reads outputs there (its output_dir "
                                        "setting), as a gateway on the same box would")
    args = p.parse_args(argv)
    if args.peer and not args.backend:
        p.error("--peer needs --backend: the ComfyUI the peer sits in front of")
    if args.peer_pid and not args.peer:
        p.error("--peer-pid needs --peer")
    return run_benchmark(measure(args))
