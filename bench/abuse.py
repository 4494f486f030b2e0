"""Abuse: the bridge's RSS and /health latency while idle sockets, stalled uploads and a request flood run.

    python -m bench abuse [--idle 2000] [--stalled 200] [--flood 16] [--seconds 5]

The bridge runs as `python bridge.py` (its default connection limits) over one simulated backend, on
loopback only. First at rest: /health is asked `--probes` times a second on a fresh connection each, for
--seconds, and its RSS read. Then the same while --idle sockets are open and send nothing, --stalled uploads
have sent their headers and 64 KiB of a 10 MB file and stopped, and --flood clients send GET /workflow-list
as fast as the bridge answers them, each on a fresh connection. Everything stops after --seconds (well
inside the header and body timeouts, so the abuse is held for the whole window); the flood runs in a child
process of its own so that it does not delay the probes. Figures are printed with their ratio to the
bridge at rest.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid

from bench.harness import MeasureError, run_benchmark
from bench.machine import cpu_seconds, machine_note, raise_fd_limit, rss_kb
from bench.procs import Bridge, bridge_process, fake_backends

HOST = "127.0.0.1"


async def get(port: int, path: str, timeout: float = 5.0) -> int:
    """One HTTP/1.0 GET on a fresh loopback connection; its status."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {HOST}:{port}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout)
        await asyncio.wait_for(reader.read(), timeout)
        return int(head.split(b" ", 2)[1])
    finally:
        writer.close()


async def probe(bridge: Bridge, seconds: float, rate: float) -> tuple[list[float], int, int]:
    """/health latencies (ms) at `rate` a second for `seconds`, the failures, and the peak RSS (KiB) seen."""
    latencies: list[float] = []
    failed = peak = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        try:
            if await get(bridge.port, "/health") == 200:
                latencies.append((time.perf_counter() - start) * 1000)
            else:
                failed += 1
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            failed += 1
        peak = max(peak, rss_kb(bridge.pid))
        await asyncio.sleep(max(0.0, 1 / rate - (time.perf_counter() - start)))
    return latencies, failed, peak


def p99(values: list[float]) -> float:
    """The 99th percentile (the largest of the lowest 99 %)."""
    if not values:
        raise MeasureError("no /health answer was measured")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def open_idle(port: int, count: int) -> list[asyncio.StreamWriter]:
    """`count` connections that send nothing."""
    out: list[asyncio.StreamWriter] = []
    for start in range(0, count, 200):
        pairs = await asyncio.gather(*(asyncio.wait_for(asyncio.open_connection(HOST, port), 20)
                                       for _ in range(start, min(count, start + 200))))
        out += [w for _, w in pairs]
    return out


async def open_stalled(port: int, count: int) -> list[asyncio.StreamWriter]:
    """`count` uploads that declare 10 MB, send the headers and 64 KiB, and stop."""
    out: list[asyncio.StreamWriter] = []
    for _ in range(count):
        _, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 20)
        boundary = uuid.uuid4().hex
        writer.write((f"POST /upload HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Length: 10000000\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n--{boundary}\r\n"
                      "Content-Disposition: form-data; name=\"f\"; filename=\"a.png\"\r\n\r\n").encode()
                     + b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR" + b"\0" * (64 * 1024))
        out.append(writer)
    return out


# The flood runs in its own process, so its loops do not delay this process's /health probes.
# argv: port, clients, seconds; prints "<answered 2xx> <other answers or errors>".
FLOOD = r"""
import asyncio, sys, time
port, clients, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
counts = [0, 0]

async def loop(end):
    while time.monotonic() < end:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
            writer.write(f"GET /workflow-list HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            counts[0 if head[9:10] == b"2" else 1] += 1
        except (OSError, asyncio.TimeoutError):
            counts[1] += 1

async def main():
    end = time.monotonic() + seconds
    await asyncio.gather(*(loop(end) for _ in range(clients)))
    print(counts[0], counts[1], flush=True)

asyncio.run(main())
"""


async def flood(port: int, clients: int, seconds: float) -> tuple[int, int]:
    """GET /workflow-list from `clients` loops in a child process for `seconds`: (answered 2xx, others)."""
    if clients == 0:
        await asyncio.sleep(seconds)
        return 0, 0
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", FLOOD, str(port), str(clients), str(seconds),
                                                stdout=asyncio.subprocess.PIPE)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    served, refused = out.split()
    return int(served), int(refused)


async def measure(args: argparse.Namespace) -> int:
    if args.seconds > 8:
        raise MeasureError("--seconds must stay under the bridge's header timeout (10 s) to hold the abuse")
    limit = raise_fd_limit(args.idle + args.stalled + args.flood + 1000)
    if limit < args.idle + args.stalled + args.flood + 200:
        raise MeasureError(f"the open-file limit is {limit}; the sockets need more")
    print(f"abuse benchmark; machine: {machine_note()}", flush=True)
    async with fake_backends(1) as fakes, bridge_process(fakes.urls) as bridge:
        await asyncio.sleep(1.0)  # let start-up settle
        rest, rest_failed, rest_rss = await probe(bridge, args.seconds, args.probes)
        cpu0 = cpu_seconds(bridge.pid)
        t0 = time.monotonic()
        idle = await open_idle(bridge.port, args.idle)
        stalled = await open_stalled(bridge.port, args.stalled)
        flooding = asyncio.create_task(flood(bridge.port, args.flood, args.seconds + 0.5))
        try:
            await asyncio.sleep(0.5)  # the flood is under way
            busy, busy_failed, busy_rss = await probe(bridge, args.seconds, args.probes)
        finally:
            served, refused = await flooding
            for writer in idle + stalled:
                writer.close()
        cpu = (cpu_seconds(bridge.pid) - cpu0) / (time.monotonic() - t0)
        await asyncio.sleep(0.5)
        after = await get(bridge.port, "/health")
    rows = [("/health p99", f"{p99(rest):.1f} ms", f"{p99(busy):.1f} ms", f"{p99(busy) / p99(rest):.1f}x"),
            ("/health p50", f"{sorted(rest)[len(rest) // 2]:.1f} ms", f"{sorted(busy)[len(busy) // 2]:.1f} ms",
             f"{sorted(busy)[len(busy) // 2] / sorted(rest)[len(rest) // 2]:.1f}x"),
            ("/health failed", f"{rest_failed} of {len(rest) + rest_failed}",
             f"{busy_failed} of {len(busy) + busy_failed}", ""),
            ("bridge RSS (peak)", f"{rest_rss / 1024:.1f} MiB", f"{busy_rss / 1024:.1f} MiB",
             f"{busy_rss / rest_rss:.2f}x")]
    print(f"\n{'':<22} {'at rest':>14} {'under abuse':>14} {'ratio':>8}")
    for name, a, b, ratio in rows:
        print(f"{name:<22} {a:>14} {b:>14} {ratio:>8}")
    print(f"abuse: {args.idle} idle sockets, {args.stalled} stalled uploads, {args.flood} flooding clients for "
          f"{args.seconds:g} s: the flood got {served} answers ({served / (args.seconds + 0.5):.0f}/s), {refused} refused "
          f"or failed; bridge CPU {cpu:.0%} of a core; /health after the abuse: {after}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench abuse", description=__doc__.splitlines()[0])
    p.add_argument("--idle", type=int, default=2000, help="sockets that connect and send nothing")
    p.add_argument("--stalled", type=int, default=200, help="uploads that stop after 64 KiB")
    p.add_argument("--flood", type=int, default=16, help="clients sending GET /workflow-list back to back (0: none)")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each measured window (at most 8)")
    p.add_argument("--probes", type=float, default=50.0, help="/health requests a second")
    return run_benchmark(measure(p.parse_args(argv)))
