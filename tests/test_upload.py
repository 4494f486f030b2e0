"""POST /upload: streamed to disk, names made by the bridge, sizes and types checked."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import Bridge, multipart, new_client_id

pytestmark = pytest.mark.both_profiles  # the engine runs against each ComfyUI release the fake imitates

GIF = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
ASSETS = Path(__file__).resolve().parent / "assets"
JPEG = (ASSETS / "sample.jpg").read_bytes()  # real images: the upload check reads their headers' structure
WEBP = (ASSETS / "sample-lossless.webp").read_bytes()


async def test_upload_several_files(bridge: Bridge, png: bytes) -> None:
    saved = await bridge.upload({"id_1": ("a.png", png), "id_2": ("b.gif", GIF), "id_3": ("c.jpg", JPEG),
                                 "id_4": ("d.webp", WEBP)})
    assert set(saved) == {"id_1", "id_2", "id_3", "id_4"}
    assert saved["id_1"].endswith(".png") and saved["id_2"].endswith(".gif")
    assert saved["id_3"].endswith(".jpg") and saved["id_4"].endswith(".webp")
    assert len(set(saved.values())) == 4
    for name in saved.values():
        assert (bridge.config.uploads_dir / name).is_file()
    assert (bridge.config.uploads_dir / saved["id_1"]).read_bytes() == png


@pytest.mark.parametrize("filename", ["../../etc/passwd.png", "/abs/x.png", "..\\win.png", "a\x00b.png",
                                      "%2e%2e%2fx.png", "\u2025\u2215x.png"])
async def test_upload_names_never_come_from_the_caller(bridge: Bridge, png: bytes, filename: str) -> None:
    saved = await bridge.upload({"file": (filename, png)})
    name = saved["file"]
    assert "/" not in name and "\\" not in name and ".." not in name
    assert (bridge.config.uploads_dir / name).read_bytes() == png
    assert sorted(p.name for p in bridge.config.uploads_dir.iterdir()) == [name]


async def test_upload_refuses_non_images(bridge: Bridge) -> None:
    body, ctype = multipart({"file": ("x.png", b"#!/bin/sh\nrm -rf /\n" * 4)})
    resp = await bridge.fetch("POST", "/upload", raw=body, headers={"Content-Type": ctype})
    assert resp.code == 415 and "not a PNG" in json.loads(resp.body)["detail"]
    assert list(bridge.config.uploads_dir.iterdir()) == []


async def test_upload_too_large(bridge_factory, fake, png: bytes) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], max_upload_bytes=2048)
    body, ctype = multipart({"file": ("big.png", png + b"\0" * 4096)})
    resp = await bridge.fetch("POST", "/upload", raw=body, headers={"Content-Type": ctype})
    assert resp.code == 413
    assert list(bridge.config.uploads_dir.iterdir()) == []


async def test_upload_declared_too_large_is_refused_before_reading(bridge_factory, fake) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], max_upload_bytes=1024, max_upload_files=1)
    body, ctype = multipart({"file": ("big.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 200_000)})
    resp = await bridge.fetch("POST", "/upload", raw=body, headers={"Content-Type": ctype})
    assert resp.code == 413


@pytest.mark.parametrize(("body", "ctype", "code"), [
    (b"", "multipart/form-data; boundary=xyz", 400),
    (b"hello", "text/plain", 415),
    (b"--xyz\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nvalue\r\n--xyz--\r\n",
     "multipart/form-data; boundary=xyz", 400),
])
async def test_upload_malformed(bridge: Bridge, body: bytes, ctype: str, code: int) -> None:
    resp = await bridge.fetch("POST", "/upload", raw=body, headers={"Content-Type": ctype})
    assert resp.code == code


async def test_uploaded_file_reaches_the_backend_once(bridge: Bridge, png: bytes) -> None:
    saved = await bridge.upload({"file": ("me.png", png)})
    cid = new_client_id()
    for _ in range(2):
        await bridge.submit(cid, {"workflow": "invert-image", "1/image": saved["file"]})
    await bridge.wait_state(cid, {"closed"})
    fake = bridge.fakes[0]
    await bridge.wait_state(cid, {"closed"})
    assert [u["name"] for u in fake.uploads] == [saved["file"]]
