"""Large files: concurrent 50 MB uploads to /upload and 50 MB multipart /history downloads, against bare Tornado.

    python -m bench large_files [--size-mb 50] [--concurrent 8]

The bridge runs as `python bridge.py` over simulated backends whose saved PNGs carry --size-mb of
random data (FakeComfy.padding). Uploads: `concurrent` clients each POST one multipart body with one
image part of that size at the same moment; the baseline is a bare Tornado @stream_request_body
handler (own process, same Tornado) writing each chunk to a file and fsyncing it at the end, as the
bridge does. Downloads: `concurrent` clients each take one finished job's result with
GET /history?clientId (multipart); the baseline is tornado.web.StaticFileHandler serving a file of
the same size. MB/s is all bytes moved / the time from the first request to the last answer, each way.
RSS growth is the server's peak RSS (VmHWM, reset just before) less its RSS before the transfers.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import struct
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from bench.harness import MeasureError
from bench.machine import machine_note, peak_kb, peak_reset, rss_kb
from bench.procs import (
    Bridge,
    baseline_process,
    bridge_process,
    fake_backends,
    http_get,
)

MB = 1_000_000
GOAL_RATE, GOAL_RSS = 300.0, 50.0


def png_payload(size: int) -> bytes:
    """`size` bytes that start like a PNG (signature and a valid 64x64 IHDR, which the upload check reads) and
    are otherwise random (incompressible)."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
    head = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
    return head + os.urandom(size - len(head))


async def _answer(reader: asyncio.StreamReader, sink: bool = False) -> tuple[int, bytes, int]:
    """Read one HTTP answer: (status, body or b"" when sunk, body length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
    length = int(m.group(1)) if m else 0
    if not sink:
        return status, await reader.readexactly(length), length
    left = length
    while left:
        chunk = await reader.read(min(left, 1 << 20))
        if not chunk:
            raise MeasureError("the download ended early")
        left -= len(chunk)
    return status, b"", length


async def upload(port: int, path: str, data: bytes, field: str) -> tuple[int, bytes]:
    """POST one multipart body with one file part; returns (status, answer body)."""
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"big.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                     f"boundary={boundary}\r\nContent-Length: {len(head) + len(data) + len(tail)}\r\n\r\n".encode())
        writer.write(head)
        view = memoryview(data)
        for i in range(0, len(data), 1 << 20):
            writer.write(view[i:i + (1 << 20)])
            await writer.drain()
        writer.write(tail)
        status, body, _ = await _answer(reader)
    finally:
        writer.close()
    return status, body


async def download(port: int, path: str) -> int:
    """GET one answer and throw its bytes away as they come; returns the body length."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        status, _, length = await _answer(reader, sink=True)
    finally:
        writer.close()
    if status != 200:
        raise MeasureError(f"GET {path} answered {status}")
    return length


async def rounds(count: int, one: Callable[[], Awaitable[dict[str, float]]]) -> dict[str, float]:
    """Repeat a measurement: the median rate of the rounds, the largest RSS growth of any."""
    runs = [await one() for _ in range(count)]
    return {"rate": statistics.median(r["rate"] for r in runs), "rss": max(r["rss"] for r in runs),
            "bytes": min(r["bytes"] for r in runs), "rates": [r["rate"] for r in runs]}  # type: ignore[dict-item]


async def transfer(pid: int, jobs: list[Callable[[], Awaitable[int]]]) -> dict[str, float]:
    """Run the transfers at once; MB/s over all of them and the server's RSS growth (MB)."""
    exact = peak_reset(pid)
    before = rss_kb(pid)
    peak = before
    done = asyncio.Event()

    async def watch() -> None:  # where the peak cannot be reset, sample it
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kb(pid))
            await asyncio.sleep(0.01)
    watcher = asyncio.create_task(watch())
    started = time.perf_counter()
    try:
        sizes = await asyncio.wait_for(asyncio.gather(*(job() for job in jobs)), 110)
    except TimeoutError:
        raise MeasureError("the transfers did not finish in 110 s") from None
    finally:
        done.set()
        await watcher
    took = time.perf_counter() - started
    if exact:
        peak = max(peak, peak_kb(pid))
    return {"rate": sum(sizes) / MB / took, "seconds": took, "rss": (peak - before) * 1024 / MB,
            "bytes": sum(sizes)}


async def make_results(bridge: Bridge, clients: list[str]) -> float:
    """One blank-canvas job per client (its saved PNG carries the padding); wait until all completed.
    Returns the bridge's RSS growth (MB) while it collected the results from the backends."""
    exact = peak_reset(bridge.pid)
    before = rss_kb(bridge.pid)
    body = json.dumps({"workflow": "blank-canvas", "1/width": 8, "1/height": 8})
    for cid in clients:
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        writer.write(f"POST /generate-based-workflow?clientId={cid} HTTP/1.0\r\nHost: 127.0.0.1\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        status, answer, _ = await _answer(reader)
        writer.close()
        if status != 200:
            raise MeasureError(f"submit answered {status}: {answer!r}")
    deadline = time.monotonic() + 90
    pending = set(clients)
    peak = before
    while pending:
        peak = max(peak, rss_kb(bridge.pid))
        for cid in list(pending):
            status, raw = await http_get(bridge.port, f"/execution-info?clientId={cid}", 10)
            info = json.loads(raw)
            if info["status"] == "closed":
                pending.discard(cid)
            elif info["status"] == "error":
                raise MeasureError(f"a job failed: {info['details']}")
        if time.monotonic() > deadline:
            raise MeasureError(f"{len(pending)} jobs did not complete in 90 s")
        await asyncio.sleep(0.1)
    if exact:
        peak = max(peak, peak_kb(bridge.pid))
    return (peak - before) * 1024 / MB


async def measure(args: argparse.Namespace) -> int:
    size, n = args.size_mb * MB, args.concurrent
    print(f"large-files benchmark: {n} concurrent transfers of {args.size_mb} MB each way", flush=True)
    print(f"machine: {machine_note()}", flush=True)
    data = png_payload(size)
    results: dict[str, dict[str, float]] = {}
    async with baseline_process() as base:
        (base.folder / "big.png").write_bytes(data)

        def base_up(i: int) -> Callable[[], Awaitable[int]]:
            async def go() -> int:
                status, body = await upload(base.port, "/upload", data, f"file{i}")
                if status != 200 or json.loads(body)["bytes"] < size:
                    raise MeasureError(f"baseline upload answered {status}")
                return size
            return go
        await upload(base.port, "/upload", data[:MB], "warm")
        results["baseline upload"] = await rounds(args.rounds, lambda: transfer(base.pid, [base_up(i) for i in range(n)]))
        await download(base.port, "/files/big.png")
        results["baseline download"] = await rounds(args.rounds, lambda: transfer(
            base.pid, [lambda: download(base.port, "/files/big.png") for _ in range(n)]))
    async with fake_backends(n, padding=size) as fakes, bridge_process(fakes.urls) as bridge:
        def bridge_up(i: int) -> Callable[[], Awaitable[int]]:
            async def go() -> int:
                status, body = await upload(bridge.port, "/upload", data, f"file{i}")
                if status != 200:
                    raise MeasureError(f"upload answered {status}: {body[:200]!r}")
                return size
            return go
        status, body = await upload(bridge.port, "/upload", data[:MB], "warm")
        if status != 200:
            raise MeasureError(f"upload answered {status}: {body[:200]!r}")
        results["bridge upload"] = await rounds(args.rounds,
                                                lambda: transfer(bridge.pid, [bridge_up(i) for i in range(n)]))
        collect_rss = 0.0

        async def bridge_down() -> dict[str, float]:
            nonlocal collect_rss
            clients = [f"large-{i}-{uuid.uuid4().hex[:8]}" for i in range(n)]
            collect_rss = max(collect_rss, await make_results(bridge, clients))
            return await transfer(bridge.pid, [lambda cid=cid: download(bridge.port, f"/history?clientId={cid}")
                                               for cid in clients])
        results["bridge download"] = await rounds(args.rounds, bridge_down)
        if results["bridge download"]["bytes"] < n * size:
            raise MeasureError("the /history answers were smaller than the results")
    print(f"\n{'transfer':<22} {'MB/s':>8} {'ratio':>7}  {'RSS growth':>10}  goal  (MB/s: median of {args.rounds} "
          "rounds; RSS: the largest growth of any round)")
    met: list[bool] = []
    for way in ("upload", "download"):
        b, ref = results[f"bridge {way}"], results[f"baseline {way}"]
        ok_rate, ok_rss = b["rate"] >= GOAL_RATE, b["rss"] <= GOAL_RSS
        met += [ok_rate, ok_rss]
        print(f"{'bare Tornado ' + way:<22} {ref['rate']:8.0f} {1.0:7.2f}  {ref['rss']:7.1f} MB  baseline "
              f"(rounds: {', '.join(f'{r:.0f}' for r in ref['rates'])})")
        print(f"{'bridge ' + way:<22} {b['rate']:8.0f} {b['rate'] / ref['rate']:7.2f}  {b['rss']:7.1f} MB  "
              f">= {GOAL_RATE:g} MB/s ({'met' if ok_rate else 'MISSED'}), <= {GOAL_RSS:g} MB RSS "
              f"({'met' if ok_rss else 'MISSED'}) (rounds: {', '.join(f'{r:.0f}' for r in b['rates'])})")
    print(f"\nwhile the bridge collected {n} results of {args.size_mb} MB from the backends at once, its RSS grew "
          f"{collect_rss:.1f} MB (largest of the rounds)")
    print(f"goals {'met' if all(met) else 'missed'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench large_files", description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=50)
    p.add_argument("--concurrent", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="measure each transfer this many times")
    args: Any = p.parse_args(argv)
    try:
        return asyncio.run(measure(args))
    except MeasureError as exc:
        print(f"cannot measure: {exc}")
        return 1
