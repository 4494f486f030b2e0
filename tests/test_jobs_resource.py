"""Jobs as resources: GET /jobs/{id} (the job document), GET/HEAD /jobs/{id}/outputs/{n} (ranges, validators),
DELETE /jobs/{id} in each state, typed outputs of video, audio, 3D and text workflows, and nobody but the owner."""
from __future__ import annotations

import io
import json
import random
import re
import struct
import wave
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from tornado import httpclient

from conftest import TIMEOUT, Bridge, new_client_id, parse_multipart, stopped, wait_for, wait_until
from comfy.config import ApiKey
from comfy.fake import containers, imaging
from comfy.mediainfo import probe
from comfy.outputs import reported_meta

MB = 1024 * 1024
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
ALICE, BOB, OPS = "alice-key-0123456789", "bob-key-0123456789ab", "ops-key-0123456789abc"
KEYS = (ApiKey("alice", "caller", ApiKey.hash(ALICE)), ApiKey("bob", "caller", ApiKey.hash(BOB)),
        ApiKey("ops", "admin", ApiKey.hash(OPS)))


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def submit(bridge: Bridge, cid: str, workflow: str, key: str | None = None, **inputs: Any) -> str:
    resp = await bridge.fetch("POST", f"/generate-based-workflow?clientId={cid}", {"workflow": workflow, **inputs},
                              headers=bearer(key))
    assert resp.code == 200, resp.body
    return str(json.loads(resp.body)["job_id"])


async def finished(bridge: Bridge, cid: str, workflow: str, key: str | None = None) -> str:
    """Submit a workflow for cid and wait until it ended; returns the job id."""
    job_id = await submit(bridge, cid, workflow, key)
    await wait_until(lambda: state_is(bridge, job_id, ("completed", "failed", "cancelled")))
    return job_id


async def state_is(bridge: Bridge, job_id: str, states: tuple[str, ...]) -> bool:
    job = await bridge.services.jobs.find_job(job_id)
    return job is not None and job.state.value in states


async def document(bridge: Bridge, job_id: str, cid: str = "", key: str | None = None, method: str = "GET",
                   status: int = 200) -> dict[str, Any]:
    query = f"?clientId={cid}" if cid else ""
    resp = await bridge.fetch(method, f"/jobs/{job_id}{query}", headers=bearer(key))
    assert resp.code == status, (resp.code, resp.body)
    return dict(json.loads(resp.body))


async def get(bridge: Bridge, url: str, method: str = "GET", **headers: str) -> httpclient.HTTPResponse:
    """One request to an output URL with these headers (underscores in names become dashes)."""
    return await bridge.fetch(method, url, headers={k.replace("_", "-"): v for k, v in headers.items()})


def by_node(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["node_id"]: o for o in doc["outputs"]}


@pytest.mark.both_profiles  # current releases add asset ids and "metadata" to output entries
async def test_typed_outputs_in_the_document_the_files_and_the_multipart(bridge: Bridge) -> None:
    cid = new_client_id()
    job_id = await finished(bridge, cid, "media_outputs")
    doc = await document(bridge, job_id, cid)
    assert doc["id"] == job_id and doc["client_id"] == cid and doc["workflow"] == "media_outputs"
    assert (doc["state"], doc["status"], doc["details"], doc["results"]) == \
        ("completed", "closed", "Execution is done", "stored")
    assert doc["inputs"] == {} and doc["progress"] == 1.0 and doc["attempts"] == 1 and "error" not in doc
    assert all(ISO.match(doc[k]) for k in ("created_at", "started_at", "finished_at"))
    assert "queue_position" not in doc
    assert doc["links"] == {"self": f"/jobs/{job_id}?clientId={cid}", "events": f"/jobs/{job_id}/events?clientId={cid}"}
    outputs = by_node(doc)
    # SaveVideo (core: an .mp4 under "images" with animated) and SaveWEBM: size, length, rate from the files
    assert outputs["3"] == {**outputs["3"], "type": "video", "content_type": "video/mp4", "width": 64, "height": 48,
                            "frames": 3, "duration": 0.375, "frame_rate": 8.0, "animated": True}
    assert outputs["4"] == {**outputs["4"], "type": "video", "content_type": "video/webm", "width": 64,
                            "height": 48, "duration": 0.375, "frame_rate": 8.0, "animated": True}
    # VHS_VideoCombine reports its format and frame rate under "gifs"
    assert outputs["5"] == {**outputs["5"], "type": "video", "content_type": "video/mp4", "format": "video/h264-mp4",
                            "frame_rate": 8.0, "frames": 3, "width": 64}
    assert outputs["6"] == {**outputs["6"], "type": "image", "content_type": "image/gif", "format": "image/gif",
                            "frame_rate": 8.0, "width": 64, "height": 48}
    assert "fullpath" not in outputs["5"] and "workflow" not in outputs["5"]  # the backend's paths stay there
    assert outputs["8"] == {**outputs["8"], "type": "audio", "content_type": "audio/flac", "duration": 1.5,
                            "sample_rate": 44100, "channels": 2}
    assert outputs["13"] == {**outputs["13"], "type": "3d", "content_type": "model/gltf-binary"}
    assert outputs["15"] == {**outputs["15"], "type": "text", "content_type": "text/plain", "text": "64"}
    assert outputs["16"] == {**outputs["16"], "type": "image", "content_type": "image/webp", "animated": True,
                             "frames": 3, "duration": 0.375, "width": 64}
    # each URL serves the file with its type; reading it takes nothing
    files = {}
    for out in doc["outputs"]:
        assert out["url"] == f"/jobs/{job_id}/outputs/{out['index']}?clientId={cid}"
        resp = await get(bridge, out["url"])
        assert resp.code == 200 and resp.headers["Content-Type"] == out["content_type"]
        assert int(resp.headers["Content-Length"]) == len(resp.body) == out["size"]
        files[out["node_id"]] = resp.body
    assert files["13"].startswith(b"glTF") and files["8"].startswith(b"fLaC") and files["15"] == b"64"
    assert files["4"].startswith(b"\x1a\x45\xdf\xa3") and files["3"][4:8] == b"ftyp"
    # the spec's multipart keeps its part headers, byte for byte, and adds what each output is
    resp = await bridge.fetch("GET", f"/history?clientId={cid}")
    assert resp.code == 200
    flac = outputs["8"]
    head = (f'Content-Disposition: form-data; name="{job_id}/8"; filename="{flac["name"]}"; '
            f"filename*=UTF-8''{flac['name']}\r\nContent-Type: audio/flac\r\nContent-Length: {flac['size']}\r\n"
            "X-Output-Type: audio\r\nX-Output-Sample-Rate: 44100\r\nX-Output-Channels: 2\r\n"
            "X-Output-Duration: 1.5\r\n\r\n").encode()
    assert head + files["8"] + b"\r\n--" in resp.body
    parts = {h["Content-Disposition"].split('"')[1].split("/")[1]: (h, body) for h, body in parse_multipart(resp)}
    assert {node: body for node, (_, body) in parts.items()} == files
    video = parts["5"][0]
    assert (video["X-Output-Type"], video["X-Output-Format"], video["X-Output-Frame-Rate"], video["X-Output-Width"]) \
        == ("video", "video/h264-mp4", "8.0", "64")
    assert parts["3"][0]["X-Output-Animated"] == "true" and parts["15"][0]["X-Output-Type"] == "text"
    # taken there, it says so here; within the refetch grace the files are still served
    after = await document(bridge, job_id, cid)
    assert after["results"] == "taken" and (await get(bridge, after["outputs"][0]["url"])).body == files["3"]


async def test_ranges_validators_and_head_on_a_large_output(bridge_factory, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes()
    fake.padding = 5 * MB
    bridge = await bridge_factory([fake])
    cid = new_client_id()
    doc = await document(bridge, await finished(bridge, cid, "blank-canvas"), cid)
    url = doc["outputs"][0]["url"]
    whole = await get(bridge, url)
    data, size = whole.body, len(whole.body)
    assert size > 5 * MB and whole.code == 200 and int(whole.headers["Content-Length"]) == size == doc["outputs"][0]["size"]
    etag, modified = whole.headers["ETag"], whole.headers["Last-Modified"]
    assert re.fullmatch(r'"[^"]+"', etag) and whole.headers["Accept-Ranges"] == "bytes"  # strong
    assert whole.headers["Content-Type"] == "image/png"
    for spec, (first, last) in {"bytes=0-99": (0, 99), "bytes=1048576-3145727": (1048576, 3145727),
                                "bytes=100-": (100, size - 1), "bytes=-500": (size - 500, size - 1),
                                f"bytes={size - 1}-{size + 100}": (size - 1, size - 1),
                                "bytes=-99999999999": (0, size - 1), " bytes = 7 - 9 ": (7, 9)}.items():
        part = await get(bridge, url, Range=spec)
        assert part.code == 206, (spec, part.code)
        assert part.headers["Content-Range"] == f"bytes {first}-{last}/{size}", spec
        assert part.body == data[first:last + 1] and int(part.headers["Content-Length"]) == last - first + 1
        assert part.headers["ETag"] == etag
    for spec in (f"bytes={size}-", "bytes=-0", f"bytes={size + 10}-{size + 20}", "bytes=99999999999999999999-"):
        refused = await get(bridge, url, Range=spec)
        assert refused.code == 416, spec
        assert refused.headers["Content-Range"] == f"bytes */{size}" and "outside" in json.loads(refused.body)["detail"]
    # not a range the bridge serves: the whole file (several ranges, another unit, nonsense, backwards)
    for spec in ("bytes=0-1,5-6", "items=0-1", "bytes=abc", "bytes=9-2", "bytes=²-3"):
        again = await get(bridge, url, Range=spec)
        assert again.code == 200 and again.body == data, spec
    # conditional requests: the caller's copy is current -> 304, no body
    for tag in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
        cached = await get(bridge, url, If_None_Match=tag)
        assert cached.code == 304 and cached.body == b"" and cached.headers["ETag"] == etag, tag
    assert (await get(bridge, url, If_None_Match='"nope"')).code == 200
    assert (await get(bridge, url, If_Modified_Since=modified)).code == 304
    assert (await get(bridge, url, If_Modified_Since=formatdate(0, usegmt=True))).code == 200
    # If-Range: the range only while the file is the one the caller has part of
    assert (await get(bridge, url, Range="bytes=0-9", If_Range=etag)).code == 206
    assert (await get(bridge, url, Range="bytes=0-9", If_Range=modified)).code == 206
    assert (await get(bridge, url, Range="bytes=0-9", If_Range='"other"')).body == data
    assert (await get(bridge, url, Range="bytes=0-9", If_Range=f"W/{etag}")).code == 200
    assert (await get(bridge, url, Range="bytes=0-9", If_Range=formatdate(0, usegmt=True))).code == 200
    # HEAD: the same headers, no body
    head = await get(bridge, url, "HEAD")
    assert head.code == 200 and head.body == b"" and head.headers["Content-Length"] == str(size)
    assert head.headers["ETag"] == etag and head.headers["Content-Type"] == "image/png"
    head = await get(bridge, url, "HEAD", Range="bytes=10-19")
    assert head.code == 206 and head.headers["Content-Range"] == f"bytes 10-19/{size}" and head.body == b""
    # none of it took the result
    assert (await document(bridge, doc["id"], cid))["results"] == "stored"


async def test_the_document_and_delete_while_queued_and_running(bridge_factory, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes()
    bridge = await bridge_factory([fake])
    first, second = new_client_id(), new_client_id()
    running = await submit(bridge, first, "sleep-progress", **{"2/seconds": 10.0})
    await wait_until(lambda: state_is(bridge, running, ("running",)))
    queued = await submit(bridge, second, "blank-canvas", **{"1/width": 32})
    doc = await document(bridge, queued, second)
    assert (doc["state"], doc["status"], doc["queue_position"], doc["outputs"]) == ("queued", "connected", 1, [])
    assert doc["inputs"] == {"1/width": 32} and doc["started_at"] is None and "results" not in doc
    assert (await get(bridge, f"/jobs/{running}/outputs/0?clientId={first}")).code == 404  # not finished
    # a waiting job is dropped at once: 200 and the cancelled document
    gone = await document(bridge, queued, second, method="DELETE")
    assert (gone["state"], gone["status"], gone["error"]) == ("cancelled", "error", f"cancelled with DELETE /jobs/{queued}")
    assert "queue_position" not in gone and await bridge.services.jobs.queue_length() == 0
    # a running one is stopped on its backend: 202 while that happens, then cancelled
    stopping = await document(bridge, running, first, method="DELETE", status=202)
    assert stopping["state"] == "running"
    await wait_until(lambda: state_is(bridge, running, ("cancelled",)))
    await wait_for(lambda: bool(stopped(fake)))
    job = await bridge.services.jobs.find_job(running)
    assert job is not None and stopped(fake) == [job.prompt_id]
    # deleting again changes nothing
    for job_id, cid in ((running, first), (queued, second)):
        again = await document(bridge, job_id, cid, method="DELETE")
        assert again["state"] == "cancelled" and again == await document(bridge, job_id, cid)


async def test_delete_discards_stored_results_and_leaves_taken_ones(bridge: Bridge) -> None:
    cid = new_client_id()
    job_id = await finished(bridge, cid, "blank-canvas")
    owner = "@127.0.0.1"
    assert await bridge.services.jobs.usage(owner) > 0
    url = (await document(bridge, job_id, cid))["outputs"][0]["url"]
    gone = await document(bridge, job_id, cid, method="DELETE")
    assert (gone["state"], gone["results"], gone["outputs"]) == ("completed", "expired", [])
    assert await bridge.services.jobs.usage(owner) == 0  # no longer counted against the quota
    await wait_for(lambda: not any(bridge.config.results_dir.iterdir()))  # the files are deleted
    assert (await get(bridge, url)).code == 410
    assert (await bridge.fetch("GET", f"/history?clientId={cid}")).code == 204  # gone from the take-once too
    assert (await bridge.fetch("GET", f"/history?clientId={cid}&redeliver=1")).code == 204
    assert await document(bridge, job_id, cid, method="DELETE") == gone
    # results taken through /history stay for their refetch grace: DELETE leaves them
    taken = await finished(bridge, cid, "blank-canvas")
    assert (await bridge.fetch("GET", f"/history?clientId={cid}")).code == 200
    after = await document(bridge, taken, cid, method="DELETE")
    assert after["results"] == "taken" and (await get(bridge, after["outputs"][0]["url"])).code == 200


async def test_only_the_owner_or_an_admin_reaches_a_job(bridge_factory, fake) -> None:  # type: ignore[no-untyped-def]
    keyed = await bridge_factory([fake], keys=KEYS)
    cid = new_client_id()
    job_id = await finished(keyed, cid, "blank-canvas", ALICE)
    mine = await document(keyed, job_id, key=ALICE)
    assert mine["client_id"] == cid and mine["outputs"][0]["url"] == f"/jobs/{job_id}/outputs/0"
    for method, path in (("GET", f"/jobs/{job_id}"), ("GET", f"/jobs/{job_id}/outputs/0"),
                         ("DELETE", f"/jobs/{job_id}"), ("GET", f"/jobs/{job_id}?clientId={cid}")):
        resp = await keyed.fetch(method, path, headers=bearer(BOB))
        assert resp.code == 404 and job_id in json.loads(resp.body)["detail"], (method, path)
    head = await keyed.http.fetch(f"{keyed.url}/jobs/{job_id}/outputs/0", method="HEAD", headers=bearer(BOB),
                                  raise_error=False, request_timeout=TIMEOUT)
    assert head.code == 404
    assert (await document(keyed, job_id, key=ALICE))["results"] == "stored"  # bob's DELETE did nothing
    assert (await get(keyed, f"/jobs/{job_id}/outputs/0", Authorization=f"Bearer {OPS}")).code == 200
    assert (await document(keyed, job_id, key=OPS, method="DELETE"))["results"] == "expired"

async def test_without_keys_the_jobs_client_id_is_what_proves_it(bridge: Bridge) -> None:
    cid = new_client_id()
    job_id = await finished(bridge, cid, "blank-canvas")
    for query in (f"?clientId={new_client_id()}", ""):
        for method, path in (("GET", f"/jobs/{job_id}"), ("GET", f"/jobs/{job_id}/outputs/0"),
                             ("DELETE", f"/jobs/{job_id}")):
            resp = await bridge.fetch(method, path + query)
            assert resp.code == 404 and "clientId" in json.loads(resp.body)["detail"], (method, path, query)
    assert (await document(bridge, job_id, cid))["results"] == "stored"


def ogg_page(granule: int, packet: bytes) -> bytes:
    """One Ogg page holding one packet (the readers never check the CRC)."""
    return b"OggS" + struct.pack("<BBqIIIB", 0, 2, granule, 1, 0, 0, 1) + bytes([len(packet)]) + packet


def test_header_readers_on_real_and_damaged_files(tmp_path: Path) -> None:
    from PIL import Image
    frames = [Image.new("RGB", (40, 30), rgb) for rgb in ((255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9))]
    wav = io.BytesIO()
    with wave.open(wav, "wb") as w:  # the standard library's writer: 0.5 s of 22.05 kHz stereo
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(22050), w.writeframes(bytes(22050 * 2))
    webp, apng, jpeg = io.BytesIO(), io.BytesIO(), io.BytesIO()
    frames[0].save(webp, "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    frames[0].save(apng, "PNG", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(jpeg, "JPEG", exif=b"Exif\x00\x00" + bytes(30_000))  # the size comes after a large APP1
    opus = ogg_page(0, b"OpusHead" + struct.pack("<BBHIhB", 1, 2, 312, 48000, 0, 0)) + bytes(5000) \
        + ogg_page(312 + 96000, b"audio")
    vp8, width, height = imaging.vp8_frames(frames, 50)
    samples = {
        "a.wav": (wav.getvalue(), {"sample_rate": 22050, "channels": 2, "duration": 0.5}),
        "a.flac": (containers.flac_silence(2.25, 48000, 1), {"sample_rate": 48000, "channels": 1, "duration": 2.25}),
        "a.webm": (containers.webm(vp8, width, height, 10.0),
                   {"width": 40, "height": 30, "duration": 0.4, "frame_rate": 10.0}),
        "a.mp4": (containers.mp4(40, 30, 4, 10.0),
                  {"width": 40, "height": 30, "frames": 4, "duration": 0.4, "frame_rate": 10.0}),
        "a.webp": (webp.getvalue(), {"width": 40, "height": 30, "animated": True, "frames": 4, "duration": 0.4}),
        "a.png": (apng.getvalue(), {"width": 40, "height": 30, "animated": True, "frames": 4}),
        "a.jpg": (jpeg.getvalue(), {"width": 40, "height": 30}),
        "a.opus": (opus, {"channels": 2, "sample_rate": 48000, "duration": 2.0}),
        "a.glb": (containers.glb_cube({}), {}),
    }
    rng = random.Random(16)
    for name, (data, expected) in samples.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert probe(path) == expected, name
        # cut short or with bytes changed, a file gives what could be read, never an error
        for _ in range(100):
            damaged = bytearray(data[:rng.randrange(len(data) + 1)])
            for _ in range(rng.randrange(4) if damaged else 0):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            path.write_bytes(damaged)
            assert isinstance(probe(path), dict), name


def test_what_comfyui_says_of_an_output_is_kept_only_when_it_makes_sense() -> None:
    # current releases' "metadata" (media_enrichment), VHS_VideoCombine's own keys
    current = {"filename": "v.mp4", "id": "x", "metadata": {"kind": "video", "width": 640, "height": 360,
                                                             "duration": 2.5, "fps": 24, "frame_count": 60}}
    assert reported_meta(current) == {"width": 640, "height": 360, "duration": 2.5, "frame_rate": 24.0, "frames": 60}
    vhs = {"filename": "a.mp4", "format": "video/h264-mp4", "frame_rate": 8, "fullpath": "/srv/out/a.mp4"}
    assert reported_meta(vhs) == {"format": "video/h264-mp4", "frame_rate": 8.0}
    odd = {"format": "video/h264\r\nX-Evil: 1", "frame_rate": True,
           "metadata": {"width": "640", "height": -1, "duration": float("nan"), "frame_count": 2.5, "fps": 1e12}}
    assert reported_meta(odd) == {}
