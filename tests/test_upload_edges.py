"""Uploads at their edges: early refusal, aborted uploads, boundaries, image structure, leftovers; /free calls."""
from __future__ import annotations

import asyncio
import json
import select
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

import comfy.comfyclient
from comfy.fake import FakeComfy
from conftest import ASSETS, Bridge, multipart
from procbridge import bridge_process, http_get
from test_connlimits import bounded, raw  # noqa: F401  (a fixture)

REAL_IMAGES = sorted(p for p in ASSETS.iterdir() if p.suffix in (".png", ".jpg", ".gif", ".webp"))


def part_head(boundary: str, name: str = "file") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"x.png\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()


def upload_head(port: int, boundary: str, length: int) -> bytes:
    return (f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {length}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()


@pytest.mark.parametrize("path", REAL_IMAGES, ids=lambda p: p.name)
async def test_real_images_pass_the_structure_check(bridge: Bridge, path: Path) -> None:
    saved = await bridge.upload({"file": (path.name, path.read_bytes())})
    assert (bridge.config.uploads_dir / saved["file"]).read_bytes() == path.read_bytes()


@pytest.mark.parametrize("data", [
    b"\xff\xd8\xff",                                            # a JPEG's first three bytes, nothing more
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"<script>alert(1)</script>",  # a JPEG segment that leads nowhere
    b"\x89PNG\r\n\x1a\n<script>alert(1)</script>" * 2,          # a PNG signature, then a script
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR" + b"\x00" * 17,    # IHDR with a wrong CRC and no size
    b"RIFF\x24\x00\x00\x00WEBPVP8L" + b"\x00" * 28,             # WebP whose VP8L chunk is empty
    b"GIF89a<script>alert(1)</script>",                         # a GIF signature, then a script
], ids=["jpeg-3-bytes", "jpeg-bad-segment", "png-script", "png-bad-crc", "webp-empty", "gif-script"])
async def test_a_magic_number_alone_is_not_an_image(bridge: Bridge, data: bytes) -> None:
    body, ctype = multipart({"file": ("x.png", data)})
    resp = await bridge.fetch("POST", "/upload", raw=body, headers={"Content-Type": ctype})
    assert resp.code == 415 and "not a PNG, JPEG, WebP or GIF" in json.loads(resp.body)["detail"]
    assert list(bridge.config.uploads_dir.iterdir()) == []


@pytest.mark.parametrize("length", [71, 300])
async def test_a_boundary_over_70_characters_is_a_400(bridge: Bridge, png: bytes, length: int) -> None:
    boundary = "b" * length
    body = part_head(boundary) + png + f"\r\n--{boundary}--\r\n".encode()
    resp = await bridge.fetch("POST", "/upload", raw=body,
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert resp.code == 400 and "boundary" in json.loads(resp.body)["detail"]


async def test_an_oversize_file_in_a_large_body_is_refused_when_it_crosses_the_cap(bounded, png: bytes) -> None:  # type: ignore[no-untyped-def]
    cap = 1024 * 1024
    bridge = await bounded(max_upload_bytes=cap, max_upload_files=64)  # a 64 MiB body may be declared
    boundary = uuid.uuid4().hex
    head = part_head(boundary)
    sock = socket.create_connection(("127.0.0.1", bridge.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    sent, answer = 0, b""
    try:
        sock.sendall(upload_head(bridge.port, boundary, 60 * cap) + head + png)
        sent = len(head) + len(png)
        chunk = b"\0" * 64 * 1024
        deadline = time.monotonic() + 20
        while not answer and sent < 60 * cap and time.monotonic() < deadline:
            readable, writable, _ = await asyncio.to_thread(select.select, [sock], [sock], [], 1.0)
            if readable:
                answer = sock.recv(65536)
            elif writable:
                sent += sock.send(chunk)
                await asyncio.sleep(0.002)
        while answer and b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]
    assert "larger than 1048576 bytes" in json.loads(answer.split(b"\r\n\r\n", 1)[1] or b"{}").get("detail", "")
    # read up to the cap, then at most what the sockets' buffers held: not the 60 MiB declared
    assert sent < cap + 4 * 1024 * 1024, sent
    await asyncio.sleep(0.2)
    assert list(bridge.config.uploads_dir.iterdir()) == []


async def abort_uploads(port: int, count: int, png: bytes, parallel: int = 50) -> None:
    """`count` uploads that send half their file and disconnect."""
    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        boundary = uuid.uuid4().hex
        writer.write(upload_head(port, boundary, 200_000) + part_head(boundary) + png + b"\0" * 20_000)
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.transport.abort()

    async def worker(n: int) -> None:
        for _ in range(n):
            await one()
    await asyncio.gather(*(worker(count // parallel) for _ in range(parallel)))


@pytest.mark.timeout(240)
async def test_2000_aborted_uploads_leave_nothing_behind(tmp_path: Path, fake: FakeComfy, png: bytes) -> None:
    # a handler kept alive by an aborted upload costs ~10 KiB: 2,000 of them grow RSS by ~20 MiB, while after
    # the warm-up a bridge that frees them drifts by ~0.5 MiB at most
    async with bridge_process(tmp_path, fake.url) as bridge:
        await abort_uploads(bridge.port, 2000, png)  # warm-up: the allocator's and the loop's own growth
        await asyncio.sleep(1.0)
        before = bridge.rss_kb()
        start = time.monotonic()
        await abort_uploads(bridge.port, 2000, png)
        await asyncio.sleep(1.0)
        grown = bridge.rss_kb() - before
        assert grown < 3 * 1024, f"RSS grew {grown} KiB over 2,000 aborted uploads ({time.monotonic() - start:.1f} s)"
        uploads, deadline = bridge.data_dir / "uploads", time.monotonic() + 10
        while (left := list(uploads.iterdir())) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # a busy machine may still be noticing the last hang-ups
        assert left == []
        assert (await http_get(bridge.port, "/health"))[0] == 200


async def test_unfinished_files_of_a_killed_run_are_removed_at_start(tmp_path: Path, fake: FakeComfy) -> None:
    uploads, results = tmp_path / "data" / "uploads", tmp_path / "data" / "results"
    uploads.mkdir(parents=True)
    results.mkdir(parents=True)
    (uploads / ".0123abcd.part").write_bytes(b"\x89PNG half")
    (results / "out.png.part").write_bytes(b"\x89PNG half")
    (uploads / "kept.png").write_bytes(b"a finished upload")
    async with bridge_process(tmp_path, fake.url) as bridge:
        assert sorted(p.name for p in uploads.iterdir()) == ["kept.png"]
        assert list(results.glob("*.part")) == []
        assert any("removed 2 unfinished temporary file(s)" in line for line in bridge.log_lines())


async def test_200_concurrent_free_requests_make_few_backend_calls(
        bridge_factory: Callable[..., Awaitable[Bridge]], fakes: Callable[..., Awaitable[FakeComfy]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a finished /free answers the next ones for FREE_REUSE seconds: longer here than a busy machine may take
    # to run the job below, so only the job, not the clock, decides which backend is asked again
    monkeypatch.setattr(comfy.comfyclient, "FREE_REUSE", 60.0)
    backends = [await fakes(), await fakes()]
    bridge = await bridge_factory(backends)
    answers = await asyncio.gather(*(bridge.fetch("POST", "/free") for _ in range(200)))
    assert all(a.code == 200 for a in answers), {a.code for a in answers}
    assert all(json.loads(a.body)["freed"] == 2 for a in answers)
    calls = [len(f.frees) for f in backends]
    assert all(1 <= n <= 5 for n in calls), calls
    # a job posted since the last /free loaded models again: the next /free reaches the backend
    cid = uuid.uuid4().hex
    await bridge.submit(cid, {"workflow": "blank-canvas"})
    await bridge.wait_state(cid, {"closed"})
    await bridge.fetch("POST", "/free")
    assert sum(len(f.frees) for f in backends) == sum(calls) + 1


async def test_free_callers_share_a_failure_too(bridge_factory: Callable[..., Awaitable[Bridge]],
                                                fake: FakeComfy) -> None:
    bridge = await bridge_factory([fake])
    backend = bridge.services.pool.members[0].client

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("connection refused")
    backend.http.fetch = broken  # type: ignore[method-assign]
    answers = await asyncio.gather(*(bridge.fetch("POST", "/free") for _ in range(20)))
    assert {a.code for a in answers} == {503}
