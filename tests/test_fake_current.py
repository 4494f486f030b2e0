"""The fake's `current` profile against PROTOCOL-CURRENT.md: what ComfyUI 0.4 ... 0.38 changed on the wire."""
from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, AsyncIterator

import pytest
from tornado.httpclient import AsyncHTTPClient
from tornado.websocket import websocket_connect

from comfy.fake import FakeComfy
from test_fake_comfy import (EMPTY_IMAGE, STEP, WS, call, condense, is_end, jcall, multipart, of_type,
                             sleep_graph)


@pytest.fixture
async def http() -> AsyncIterator[AsyncHTTPClient]:
    """Our own HTTP client instance."""
    client = AsyncHTTPClient(force_instance=True)
    yield client
    client.close()


@pytest.fixture
async def servers() -> AsyncIterator[Any]:
    """Factory of started fakes of a given profile, stopped after the test."""
    started: list[FakeComfy] = []

    async def make(profile: str = "current", **kw: Any) -> FakeComfy:
        server = FakeComfy(duration=0.02, tick=0.005, profile=profile, **kw)
        await asyncio.wait_for(server.start(), STEP)
        started.append(server)
        return server
    yield make
    for server in started:
        await asyncio.wait_for(server.stop(), STEP)


@pytest.fixture
async def current(servers: Any) -> FakeComfy:
    """One fake imitating current ComfyUI."""
    return await servers("current")


async def open_ws(fake: FakeComfy, client_id: str) -> WS:
    """/ws?clientId=..., first status frame read."""
    conn = await asyncio.wait_for(websocket_connect(f"{fake.ws_url}?clientId={client_id}"), STEP)
    return WS(conn, json.loads(await asyncio.wait_for(conn.read_message(), STEP)))


async def post(http: AsyncHTTPClient, fake: FakeComfy, graph: dict, client_id: str | None = None,
               prompt_id: str | None = None) -> str:
    """POST /prompt with a fresh canonical UUID (unless given); returns the prompt id."""
    body: dict[str, Any] = {"prompt": graph, "prompt_id": prompt_id or str(uuid.uuid4())}
    if client_id:
        body["client_id"] = client_id
    return (await jcall(http, fake, "POST", "/prompt", body))["prompt_id"]


async def test_system_stats_and_features_differ_by_profile(servers, http) -> None:  # type: ignore[no-untyped-def]
    old, new = await servers("0.3.64"), await servers("current")
    old_stats = await jcall(http, old, "GET", "/system_stats")
    new_stats = await jcall(http, new, "GET", "/system_stats")
    assert old_stats["system"]["comfyui_version"] == "0.3.64" and old_stats["system"]["os"] == "posix"
    assert new_stats["system"]["comfyui_version"] == "0.38.1" and new_stats["system"]["os"] == "linux"
    assert "deploy_environment" in new_stats["system"] and "deploy_environment" not in old_stats["system"]
    assert len(await jcall(http, old, "GET", "/features")) == 2
    assert len(await jcall(http, new, "GET", "/features")) == 6


async def test_non_uuid_prompt_ids_are_refused(current, http) -> None:  # type: ignore[no-untyped-def]
    for bad in ("abc", str(uuid.uuid4()).upper(), uuid.uuid4().hex, 7):
        resp = await call(http, current, "POST", "/prompt", {"prompt": EMPTY_IMAGE, "prompt_id": bad})
        assert resp.code == 400, bad
        assert json.loads(resp.body)["error"]["type"] == "invalid_prompt_id"
    good = str(uuid.uuid4())
    assert await post(http, current, EMPTY_IMAGE, prompt_id=good) == good
    minted = await jcall(http, current, "POST", "/prompt", {"prompt": EMPTY_IMAGE, "prompt_id": None})
    assert str(uuid.UUID(minted["prompt_id"])) == minted["prompt_id"]
    assert minted["number"] == 5  # refused ids still took a number


async def test_jobs_api_follows_a_prompt_and_404s_unknown_ids(servers, http) -> None:  # type: ignore[no-untyped-def]
    old, fake = await servers("0.3.64"), await servers("current")
    assert (await call(http, old, "GET", "/api/jobs?limit=1")).code == 404
    assert (await call(http, fake, "GET", "/jobs")).code == 404  # only under /api
    fake.hang = True
    sock = await open_ws(fake, "jobs")
    pid = await post(http, fake, EMPTY_IMAGE, "jobs")
    waiting = await post(http, fake, sleep_graph(0.01), "jobs")
    await sock.until(of_type("executing"))
    assert (await jcall(http, fake, "GET", f"/api/jobs/{pid}"))["status"] == "in_progress"
    assert (await jcall(http, fake, "GET", f"/api/jobs/{waiting}"))["status"] == "pending"
    assert await jcall(http, fake, "GET", f"/api/jobs/{uuid.uuid4()}", status=404) == {"error": "Job not found"}
    listing = await jcall(http, fake, "GET", "/api/jobs?status=pending,in_progress")
    assert {j["id"] for j in listing["jobs"]} == {pid, waiting} and listing["pagination"]["total"] == 2
    assert (await call(http, fake, "GET", "/api/jobs?status=bogus")).code == 400
    fake.hang = False
    assert await jcall(http, fake, "POST", f"/api/jobs/{pid}/cancel") == {"cancelled": True}
    await sock.until(is_end(waiting))
    cancelled = await jcall(http, fake, "GET", f"/api/jobs/{pid}")
    assert cancelled["status"] == "cancelled" and cancelled["execution_status"]["status_str"] == "error"
    done = await jcall(http, fake, "GET", f"/api/jobs/{waiting}")
    assert done["status"] == "completed" and done["outputs_count"] == 1
    entry = done["outputs"]["3"]["images"][0]
    assert entry["filename"] == "sleep_00001_.png" and entry["metadata"] == {"kind": "image", "width": 64,
                                                                             "height": 64}
    assert str(uuid.UUID(entry["id"])) == entry["id"]
    assert await jcall(http, fake, "POST", f"/api/jobs/{waiting}/cancel") == {"cancelled": False}
    await sock.close()


async def test_bulk_cancel_checks_every_id(current, http) -> None:  # type: ignore[no-untyped-def]
    assert await jcall(http, current, "POST", "/api/jobs/cancel", {"job_ids": []}) == {"cancelled": False}
    bad = await call(http, current, "POST", "/api/jobs/cancel", {"job_ids": [str(uuid.uuid4()), "nope"]})
    assert bad.code == 400 and json.loads(bad.body)["invalid_ids"] == ["nope"]
    assert (await call(http, current, "POST", "/api/jobs/cancel", raw=b"{")).code == 400
    assert (await call(http, current, "POST", "/api/jobs/cancel", {"job_ids": "x"})).code == 400
    current.hang = True
    pid = await post(http, current, EMPTY_IMAGE)
    queued = await post(http, current, sleep_graph(0.01))
    assert await jcall(http, current, "POST", "/api/jobs/cancel", {"job_ids": [queued]}) == {"cancelled": True}
    assert (await jcall(http, current, "GET", f"/api/jobs/{queued}", status=404))
    await jcall(http, current, "POST", f"/api/jobs/{pid}/cancel")


async def test_missing_class_and_cycle_errors(servers, http) -> None:  # type: ignore[no-untyped-def]
    old, fake = await servers("0.3.64"), await servers("current")
    graph = {**EMPTY_IMAGE, "9": {"class_type": "FancyLoader", "inputs": {}, "_meta": {"title": "My Loader"}}}
    answer = json.loads((await call(http, fake, "POST", "/prompt", {"prompt": graph})).body)
    assert answer["error"]["type"] == "missing_node_type" and answer["node_errors"] == {}
    assert answer["error"]["extra_info"] == {"node_id": "9", "class_type": "FancyLoader", "node_title": "My Loader"}
    assert "My Loader" in answer["error"]["message"]
    old_answer = json.loads((await call(http, old, "POST", "/prompt", {"prompt": graph})).body)
    assert old_answer["error"]["type"] == "invalid_prompt" and "FancyLoader" in old_answer["error"]["message"]
    cycle = {"1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
             "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
             "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}}
    answer = json.loads((await call(http, fake, "POST", "/prompt", {"prompt": cycle})).body)
    assert answer["error"]["type"] == "prompt_outputs_failed_validation"
    assert set(answer["node_errors"]) == {"1", "2"}
    error = answer["node_errors"]["1"]["errors"][0]
    assert error["type"] == "dependency_cycle" and sorted(error["extra_info"]["cycle_nodes"]) == ["1", "2"]


async def test_cross_site_requests_are_refused_only_by_current(servers, http) -> None:  # type: ignore[no-untyped-def]
    old, fake = await servers("0.3.64"), await servers("current")
    headers = {"Sec-Fetch-Site": "cross-site", "Host": "example.org"}
    assert (await call(http, fake, "GET", "/queue", headers=headers)).code == 403
    assert (await call(http, fake, "GET", "/queue", headers={"Sec-Fetch-Site": "same-origin"})).code == 200
    assert (await call(http, old, "GET", "/queue", headers=headers)).code == 200


async def test_cache_spans_prompts_and_replays_with_new_asset_ids(servers, http) -> None:  # type: ignore[no-untyped-def]
    for profile, cached_again in (("0.3.64", []), ("current", ["1", "2"])):
        fake = await servers(profile)
        sock = await open_ws(fake, "c")
        first = await post(http, fake, EMPTY_IMAGE, "c")
        await sock.until(is_end(first))
        other = await post(http, fake, sleep_graph(0.01), "c")
        await sock.until(is_end(other))
        again = await post(http, fake, EMPTY_IMAGE, "c")
        frames = await sock.until(is_end(again))
        assert next(f for f in frames if f["type"] == "execution_cached")["data"]["nodes"] == cached_again
        await sock.close()
        replay = next(f for f in frames if f["type"] == "executed")["data"]["output"]["images"][0]
        history = (await jcall(http, fake, "GET", f"/history/{first}"))[first]["outputs"]["2"]["images"][0]
        if profile == "current":  # no new file: the cached entry again, under a new asset id
            assert ("executing", "2") not in condense(frames)
            assert replay["filename"] == history["filename"] and replay["id"] != history["id"]
        else:  # the classic cache kept only the previous prompt: a new file, and no new keys
            assert replay["filename"] == "empty_00002_.png" and "id" not in replay and "metadata" not in replay


async def test_reconnect_bug_can_be_switched_off(servers, http) -> None:  # type: ignore[no-untyped-def]
    for bug in (True, False):
        fake = await servers("current")
        fake.reconnect_bug = bug
        old, new = await open_ws(fake, "dup"), await open_ws(fake, "dup")
        await old.close()
        pid = await post(http, fake, EMPTY_IMAGE, "dup")
        if bug:
            assert await new.quiet(0.2) == []  # the newer socket was dropped by the older one's cleanup
        else:
            await new.until(is_end(pid))
        await new.close()


async def test_upload_answers_an_asset_and_view_sets_nosniff(current, http) -> None:  # type: ignore[no-untyped-def]
    body, headers = multipart({"type": "input"}, "a.png", b"\x89PNG\r\n\x1a\nfake")
    answer = json.loads((await call(http, current, "POST", "/upload/image", raw=body, headers=headers)).body)
    assert answer["name"] == "a.png" and answer["asset"]["asset_hash"].startswith("blake3:")
    view = await call(http, current, "GET", "/view?filename=a.png&type=input")
    assert view.headers["X-Content-Type-Options"] == "nosniff"
    info = await jcall(http, current, "GET", "/object_info/SaveImage")
    assert info["SaveImage"]["search_aliases"] == [] and info["SaveImage"]["has_intermediate_output"] is False
