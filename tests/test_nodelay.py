"""A caller socket's first message is never held back by Nagle's algorithm.

After the 101 upgrade the `connected` message is a small write sent while the 101 is not yet
acknowledged. Without TCP_NODELAY the kernel holds it until the caller's ACK, and a caller in
delayed-ACK mode sends that ACK only after ~40 ms. The client below puts its socket in delayed-ACK
mode (TCP_QUICKACK off, as a busy client often is), so the stall shows on every open when no-delay
is missing, not only on the unlucky ones. Such a stall is time the process sits idle waiting for the
network; time it spends running, or runnable while a busy machine runs others, is not counted.
"""
from __future__ import annotations

import asyncio
import base64
import os
import socket
import statistics
import time
from pathlib import Path

import pytest

from conftest import Bridge, new_client_id

SOCKETS = 200
DELAYED_ACK = 0.040  # Linux's minimum delayed-ACK time
SCHEDSTAT = Path("/proc/thread-self/schedstat")  # ns on the CPU, ns runnable but waiting for it, timeslices


def busy_seconds() -> float:
    """Seconds this thread has been on the CPU or waiting in the run queue (0 where the kernel does not say)."""
    try:
        ran, waited = SCHEDSTAT.read_text().split()[:2]
    except (OSError, ValueError):
        return 0.0
    return (int(ran) + int(waited)) / 1e9


async def first_message_delay(port: int, client_id: str) -> float:
    """Seconds from reading the 101 to reading the first frame that this thread (the bridge's and the
    client's) sat idle, waiting for the network, on a raw socket in delayed-ACK mode."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    await writer.drain()
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head[:80]
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)  # the kernel may have switched it back
        busy, t0 = busy_seconds(), time.perf_counter()
        frame = await asyncio.wait_for(reader.readexactly(2), 5)
        took = time.perf_counter() - t0 - (busy_seconds() - busy)
        assert frame[0] == 0x81, frame  # a final text frame
        return took
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_connected_message_is_not_delayed_on_200_opens(bridge: Bridge) -> None:
    delays = []
    for _ in range(SOCKETS):  # one after another, so each open sees an idle bridge
        delays.append(await first_message_delay(bridge.port, new_client_id()))
    delays.sort()
    p99 = delays[int(len(delays) * 0.99) - 1]
    stalled = sum(1 for d in delays if d >= DELAYED_ACK * 0.75)
    assert stalled == 0 and p99 < DELAYED_ACK / 4, (
        f"{stalled} of {SOCKETS} opens waited for the caller's delayed ACK; "
        f"p50 {statistics.median(delays) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
