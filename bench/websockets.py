"""Caller WebSockets: 5,000 idle sockets, 2,000 sockets following running jobs, and sockets that stop reading.

    python -m bench websockets [--idle 5000] [--followers 2000] [--jobs 40] [--slow 50] [--parts abc]

(a) idle: N sockets on /ws, each its own clientId, held by this process (raw RFC 6455 clients). The
    bridge's RSS per connection is (VmRSS after - VmRSS before) / N; the keep-alive's cost is the
    bridge's CPU over an idle period, less its CPU with no sockets, per `listening` message received.
    The baseline is a bare Tornado WebSocketHandler (same Tornado, own process) that greets and sends
    the same keep-alive on the same timer.
(b) following: F sockets spread over J clientIds, each clientId with one sleep-progress job running on
    its own simulated backend (J backends, one job each). The simulated backends report progress every
    --tick seconds (far faster than the 10/s a caller may get) and record when they sent each message.
    Delivery latency of a progress message = the time the caller received it - the time the backend
    sent the message whose value the caller sees (the bridge's percentage is recomputed from the
    recorded messages with the bridge's own Progress class, so each received "42.17%" names the backend
    message it came from). Both clocks are CLOCK_MONOTONIC of one machine. This includes the wait for
    the bridge's pacing (at most one message per progress_interval per client), the fan-out to every
    socket and the receiving process's own delay (it is busy too, and tunes its garbage collector as
    the bridge does), so it is an upper bound on what the bridge adds. Also printed: the latency second
    by second, and each socket's message rate (most messages in any one second).
(c) stalled readers: K sockets of one client stop reading (a small receive buffer, reading paused)
    while its job streams progress; one more socket keeps reading. To reach a backlog within seconds
    instead of hours, this part sets clients.progress_interval to --slow-interval and the backend
    reports every 2 ms. Printed each few seconds: the bridge's RSS and its open caller sockets (from
    /metrics); then whether the stalled sockets were dropped and when.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import statistics
import time
from collections import defaultdict
from typing import Any

from bench.harness import ROOT, MeasureError, run_benchmark
from bridge import tune_gc
from bench.load import WsClient, percentile, ws_open_many
from bench.machine import cpu_seconds, machine_note, raise_fd_limit, rss_kb
from bench.procs import (
    baseline_process,
    bridge_process,
    fake_backends,
    http_get,
)
from comfy.protocol import Progress

GRAPH = json.loads((ROOT / "workflows" / "test_sleep_progress.json").read_text())
# sent by the bridge itself, not caused by a backend message: the job starting and the job done
EDGES = ("0.00%", "100.00%")


async def _settle(clients: list[WsClient], want: int, timeout: float) -> None:
    """Wait until every client has at least `want` messages."""
    deadline = time.monotonic() + timeout
    while any(c.messages < want for c in clients):
        if time.monotonic() > deadline:
            short = sum(1 for c in clients if c.messages < want)
            raise MeasureError(f"{short} sockets did not get their first message in {timeout:g} s")
        await asyncio.sleep(0.05)


async def _close_all(clients: list[WsClient]) -> None:
    for c in clients:
        c.close()
    await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), 30)


async def idle_server(name: str, pid: int, port: int, path: str, count: int, seconds: float) -> dict[str, float]:
    """Per-connection RSS and keep-alive CPU of one server holding `count` idle sockets."""
    warm = await ws_open_many("127.0.0.1", port, [f"{path}warm-{i}" for i in range(100)])
    await _close_all(warm)
    await asyncio.sleep(min(1.0, seconds / 4))
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds / 2)
    idle_rate = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)  # probes, timers: no sockets at all
    rss0 = rss_kb(pid)
    t = time.monotonic()
    clients = await ws_open_many("127.0.0.1", port, [f"{path}idle-{i}" for i in range(count)])
    opened = time.monotonic() - t
    await _settle(clients, 1, 30)
    await asyncio.sleep(2 if count >= 1000 else 0.5)  # let the last handshakes' garbage go
    rss1 = rss_kb(pid)
    got0, cpu0, t0 = sum(c.messages for c in clients), cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    got, cpu, took = sum(c.messages for c in clients) - got0, cpu_seconds(pid) - cpu0, time.monotonic() - t0
    closed = sum(1 for c in clients if c.closed.done())
    await _close_all(clients)
    if closed:
        raise MeasureError(f"{name}: {closed} idle sockets were closed by the server")
    if not got:
        raise MeasureError(f"{name}: no keep-alive arrived in {seconds:g} s")
    per_msg = max(0.0, cpu - idle_rate * took) / got
    out = {"rss_per_conn": (rss1 - rss0) * 1024 / count, "rss_before": rss0 / 1024, "rss_after": rss1 / 1024,
           "msgs": got / took, "cpu_per_msg_us": per_msg * 1e6, "cpu_share": cpu / took, "open_s": opened}
    print(f"  {name}: {count} sockets opened in {opened:.1f} s; RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB "
          f"= {out['rss_per_conn'] / 1024:.1f} KiB per connection; {got / took:.0f} keep-alives/s cost "
          f"{out['cpu_per_msg_us']:.1f} us CPU each ({cpu / took * 100:.0f}% of a core in all)", flush=True)
    return out


async def part_idle(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    print(f"(a) {args.idle} idle sockets, keep-alive every {args.keepalive:g} s, {args.idle_seconds:g} s idle period")
    res = {}
    async with baseline_process(keepalive_interval=args.keepalive) as base:
        res["baseline"] = await idle_server("bare Tornado", base.pid, base.port, "/ws?clientId=", args.idle,
                                            args.idle_seconds)
    settings = {"clients": {"keepalive_interval": args.keepalive}}
    async with fake_backends(1) as fakes, bridge_process(fakes.urls, settings) as bridge:
        res["bridge"] = await idle_server("bridge", bridge.pid, bridge.port, "/ws?clientId=", args.idle,
                                          args.idle_seconds)
    return res


def backend_timelines(events: list[tuple[float, str, dict]]) -> dict[float, dict[str, float]]:
    """For each job (keyed by its TestSleep seconds): the bridge's percent text -> when the backend sent
    the message that first produced it, replayed through the bridge's own Progress class."""
    by_prompt: dict[str, list[tuple[float, str, dict]]] = defaultdict(list)
    for t, kind, data in events:
        by_prompt[data["prompt_id"]].append((t, kind, data))
    out: dict[float, dict[str, float]] = {}
    for msgs in by_prompt.values():
        msgs.sort(key=lambda m: m[0])
        maxes = {float(d["max"]) for _, k, d in msgs if k == "progress"}
        if len(maxes) != 1:
            continue
        progress = Progress(GRAPH)
        first: dict[str, float] = {}
        for t, kind, data in msgs:
            if progress.feed(kind, data):
                first.setdefault(f"{progress.value * 100:.2f}%", t)
        out[maxes.pop()] = first
    return out


async def part_follow(args: argparse.Namespace) -> dict[str, Any]:
    per_client = math.ceil(args.followers / args.jobs)
    print(f"(b) {args.followers} sockets following {args.jobs} running jobs ({per_client} sockets per clientId), "
          f"backends report progress every {args.tick * 1000:g} ms", flush=True)
    settings = {"clients": {"max_ws_per_client": per_client, "keepalive_interval": 5},
                "health": {"probe_interval": 5}}
    received: list[list[tuple[float, str]]] = [[] for _ in range(args.followers)]

    def handler(i: int):
        sink = received[i]

        def on_text(t: float, text: str) -> None:
            if '"progress"' in text:
                sink.append((t, json.loads(text)["details"]))
        return on_text

    seconds = [round(args.job_seconds + j * 0.001, 3) for j in range(args.jobs)]
    async with fake_backends(args.jobs, tick=args.tick, record=True) as fakes, \
            bridge_process(fakes.urls, settings) as bridge:
        owner = [i % args.jobs for i in range(args.followers)]
        clients = await ws_open_many("127.0.0.1", bridge.port, [f"/ws?clientId=follow-{owner[i]}"
                                                                for i in range(args.followers)], on_text=handler)
        await _settle(clients, 1, 30)
        tune_gc()  # this receiving process holds 2,000 sockets too: its collector pauses must not count
        cpu0, client_cpu0, t0 = cpu_seconds(bridge.pid), time.process_time(), time.monotonic()
        for j in range(args.jobs):
            body = json.dumps({"workflow": "sleep-progress", "2/seconds": seconds[j]})
            status, answer = await _post(bridge.port, f"/generate-based-workflow?clientId=follow-{j}", body)
            if status != 200:
                raise MeasureError(f"submit answered {status}: {answer}")
        try:
            await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), args.job_seconds + 60)
        except TimeoutError:
            raise MeasureError("the jobs did not all finish and close their sockets in time") from None
        took = time.monotonic() - t0
        bridge_cpu, client_cpu = cpu_seconds(bridge.pid) - cpu0, time.process_time() - client_cpu0
        events = await fakes.events()
    timelines = backend_timelines(events)
    if len(timelines) != args.jobs:
        raise MeasureError(f"recorded progress for {len(timelines)} of {args.jobs} jobs")
    backend_rate = statistics.median(len(tl) / args.job_seconds for tl in timelines.values())
    ages, unmatched, gaps, worst_rate = [], 0, [], 0
    stamped: list[tuple[float, float]] = []
    for i, msgs in enumerate(received):
        first = timelines[seconds[owner[i]]]
        running = [(t, p) for t, p in msgs if p not in EDGES]
        for t, p in running:
            sent = first.get(p)
            if sent is None:
                unmatched += 1
            else:
                ages.append((t - sent) * 1000)
                stamped.append((t, (t - sent) * 1000))
        times = [t for t, _ in running]
        gaps += [(b - a) * 1000 for a, b in zip(times, times[1:])]
        lo = 0
        for hi in range(len(times)):  # most messages within any one second
            while times[hi] - times[lo] >= 1.0:
                lo += 1
            worst_rate = max(worst_rate, hi - lo + 1)
    if not ages:
        raise MeasureError("no progress message could be matched to a backend message")
    begin, end = min(t for t, _ in stamped), max(t for t, _ in stamped)
    steady = [a for t, a in stamped if begin + 1.0 < t < end - 1.0] or ages  # without the jobs' first second
    seconds_ = defaultdict(list)
    for t, a in stamped:
        seconds_[int(t - begin)].append(a)
    print("  latency by second of the run (p50 / p99 ms): " + ", ".join(
        f"{k}s {statistics.median(v):.0f}/{percentile(v, 99):.0f}" for k, v in sorted(seconds_.items())))
    total = sum(len(m) for m in received)
    out = {"p50": statistics.median(ages), "p99": percentile(ages, 99), "max": max(ages),
           "steady_p50": statistics.median(steady), "steady_p99": percentile(steady, 99),
           "gap_p50": statistics.median(gaps), "worst_rate": worst_rate, "backend_rate": backend_rate,
           "messages": total, "unmatched": unmatched, "bridge_cpu": bridge_cpu / took, "client_cpu": client_cpu / took,
           "cpu_per_msg_us": bridge_cpu / total * 1e6}
    print(f"  {total} progress messages to {args.followers} sockets in {took:.1f} s; backends reported "
          f"{backend_rate:.0f} distinct values/s per job; bridge CPU {bridge_cpu / took * 100:.0f}% of a core, "
          f"this receiving process {client_cpu / took * 100:.0f}%; bridge CPU per delivered message "
          f"{bridge_cpu / total * 1e6:.0f} us (backend messages and job handling included)", flush=True)
    if unmatched:
        print(f"  {unmatched} received values matched no backend message (not counted)")
    return out


async def _post(port: int, path: str, body: str) -> tuple[int, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        data = body.encode()
        writer.write(f"POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(rest or b"null")


async def _open_sockets(port: int) -> int:
    status, body = await http_get(port, "/metrics")
    m = re.search(rb"^comfy_bridge_websocket_clients(?:\{[^}]*\})? ([\d.e+]+)", body, re.MULTILINE)
    if status != 200 or m is None:
        raise MeasureError("/metrics does not show comfy_bridge_websocket_clients")
    return int(float(m.group(1)))


async def part_stalled(args: argparse.Namespace) -> dict[str, Any]:
    print(f"(c) {args.slow} sockets stop reading while their client's job streams progress "
          f"(progress_interval {args.slow_interval * 1000:g} ms), watched for {args.slow_seconds:g} s", flush=True)
    settings = {"clients": {"max_ws_per_client": args.slow + 1, "progress_interval": args.slow_interval,
                            "keepalive_interval": 5}}
    async with fake_backends(1, tick=0.002) as fakes, bridge_process(fakes.urls, settings) as bridge:
        reader = (await ws_open_many("127.0.0.1", bridge.port, ["/ws?clientId=stall-0"]))[0]
        stalled = await ws_open_many("127.0.0.1", bridge.port, ["/ws?clientId=stall-0"] * args.slow,
                                     small_window=True)
        await _settle([reader, *stalled], 1, 10)
        for c in stalled:
            c.pause()
        base_sockets = await _open_sockets(bridge.port)
        rss0 = rss_kb(bridge.pid)
        body = json.dumps({"workflow": "sleep-progress", "2/seconds": 60.0})
        status, answer = await _post(bridge.port, "/generate-based-workflow?clientId=stall-0", body)
        if status != 200:
            raise MeasureError(f"submit answered {status}: {answer}")
        t0 = time.monotonic()
        samples = []
        while (now := time.monotonic() - t0) < args.slow_seconds:
            samples.append((now, rss_kb(bridge.pid) / 1024, base_sockets - await _open_sockets(bridge.port),
                            reader.messages))
            await asyncio.sleep(0.5)
        rss1, reader_msgs = rss_kb(bridge.pid), reader.messages
        dropped_at = next((t for t, _, d, _ in samples if d >= args.slow), None)
        for c in stalled:
            c.resume()
        await asyncio.sleep(min(3.0, args.slow_seconds / 2))  # read what the kernel holds; a dropped socket ends
        ended = sum(1 for c in stalled if c.closed.done())
        reasons = sorted({f"{c.close_code} {c.close_reason}".strip() for c in stalled if c.close_code})
        backlog_kib = statistics.median(c.bytes for c in stalled) / 1024
        await _post(bridge.port, "/interrupt?clientId=stall-0", "")
        await _close_all([c for c in [reader, *stalled] if not c.closed.done()])
    print("  t (s)   bridge RSS (MiB)   stalled sockets dropped   messages to the reading socket")
    for t, rss, dropped, got in samples[::max(1, len(samples) // 12)]:
        print(f"  {t:5.1f}   {rss:16.1f}   {dropped:14d} of {args.slow}   {got:8d}")
    growth = (rss1 - rss0) / 1024
    print(f"  RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB ({growth:+.1f} MiB, "
          f"{growth / args.slow_seconds:+.2f} MiB/s) over {args.slow_seconds:g} s; the reading socket got "
          f"{reader_msgs} messages; after reading resumed {ended} of {args.slow} stalled sockets ended "
          f"{'(close: ' + ', '.join(reasons) + ')' if reasons else ''}; each had received {backlog_kib:.0f} KiB "
          f"(median)", flush=True)
    return {"growth": growth, "rate": growth / args.slow_seconds, "dropped_at": dropped_at, "ended": ended,
            "rss0": rss0 / 1024, "rss1": rss1 / 1024}


async def measure(args: argparse.Namespace) -> int:
    limit = raise_fd_limit(args.idle * 2 + args.followers + 1000)
    if limit < args.idle + 500:
        raise MeasureError(f"the open-file limit is {limit}; {args.idle} sockets need more")
    print(f"websockets benchmark; machine: {machine_note()}", flush=True)
    rows = []
    if "a" in args.parts:
        idle = await part_idle(args)
        b, base = idle["bridge"], idle["baseline"]
        rows += [("(a) RSS per idle connection", f"{b['rss_per_conn'] / 1024:.1f} KiB",
                  _ratio(b["rss_per_conn"], base["rss_per_conn"]), "<= 20 KB", b["rss_per_conn"] <= 20_000),
                 ("(a) keep-alive CPU per message", f"{b['cpu_per_msg_us']:.1f} us",
                  _ratio(b['cpu_per_msg_us'], base['cpu_per_msg_us']), "(report)", None)]
    if "b" in args.parts:
        f = await part_follow(args)
        rows += [("(b) progress latency p50 / p99", f"{f['p50']:.1f} / {f['p99']:.1f} ms", "", "p99 < 50 ms",
                  f["p99"] < 50),
                 ("(b)   the same without the first second", f"{f['steady_p50']:.1f} / {f['steady_p99']:.1f} ms",
                  "", "(report)", None),
                 ("(b) bridge CPU per delivered message", f"{f['cpu_per_msg_us']:.0f} us", "", "(report)", None),
                 ("(b) most progress msgs/s to one socket", f"{f['worst_rate']}", "",
                  f"~10 (backend: {f['backend_rate']:.0f}/s)", f["worst_rate"] <= 11)]
    if "c" in args.parts:
        s = await part_stalled(args)
        rows += [("(c) bridge RSS with stalled readers", f"{s['growth']:+.1f} MiB", f"{s['rate']:+.2f} MiB/s",
                  "flat", s["growth"] < 10),
                 ("(c) stalled sockets dropped", f"{s['ended']} of {args.slow}",
                  f"at {s['dropped_at']:.1f} s" if s["dropped_at"] is not None else "not dropped", "all",
                  s["ended"] == args.slow)]
    print(f"\n{'result':<40} {'value':>18} {'ratio/rate':>12}  goal")
    for name, value, ratio, goal, met in rows:
        verdict = "" if met is None else (" (met)" if met else " (MISSED)")
        print(f"{name:<40} {value:>18} {ratio:>12}  {goal}{verdict}")
    print("ratios in (a) are to the bare Tornado WebSocketHandler measured in the same run")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench websockets", description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="abc", help="which parts to run: any of a, b, c")
    p.add_argument("--idle", type=int, default=5000, help="(a) idle sockets")
    p.add_argument("--keepalive", type=float, default=1.0, help="(a) clients.keepalive_interval, seconds")
    p.add_argument("--idle-seconds", type=float, default=10.0, help="(a) idle period measured")
    p.add_argument("--followers", type=int, default=2000, help="(b) sockets following running jobs")
    p.add_argument("--jobs", type=int, default=40, help="(b) running jobs, one simulated backend each")
    p.add_argument("--tick", type=float, default=0.02, help="(b) seconds between a backend's progress reports")
    p.add_argument("--job-seconds", type=float, default=8.0, help="(b) how long each job runs")
    p.add_argument("--slow", type=int, default=50, help="(c) sockets that stop reading")
    p.add_argument("--slow-interval", type=float, default=0.005, help="(c) clients.progress_interval, seconds")
    p.add_argument("--slow-seconds", type=float, default=25.0, help="(c) how long the stall is watched (at most 55)")
    return run_benchmark(measure(p.parse_args(argv)))


def _ratio(value: float, base: float) -> str:
    """value / base as "1.02x", or "n/a" when the baseline did not move (too few sockets to see)."""
    return f"{value / base:.2f}x" if base > 0 else "n/a"
