"""The bridge against each ComfyUI release the fake imitates: what it learns, what it sends, lost messages."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from tornado import websocket

from comfy.check import run_check
from conftest import TIMEOUT, Bridge, close_ws, new_client_id, parse_multipart, stopped, wait_for

pytestmark = pytest.mark.both_profiles  # the engine runs against each ComfyUI release the fake imitates

NEEDS_PLUGIN = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
    "2": {"class_type": "FancyUpscaler", "inputs": {"image": ["1", 0]}, "_meta": {"title": "Fancy upscale"}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bridge/plugin"}},
}


async def outputs_of(bridge: Bridge, cid: str) -> Counter[str]:
    """How many result files the caller receives per job from GET /history."""
    resp = await bridge.fetch("GET", f"/history?clientId={cid}")
    assert resp.code == 200, resp.code
    return Counter(h["Content-Disposition"].split('name="', 1)[1].split("/", 1)[0] for h, _ in parse_multipart(resp))


async def test_backends_show_the_version_and_what_the_bridge_uses(bridge: Bridge, fake_profile: str) -> None:
    listing = (await bridge.get_json("/backends"))["backends"][0]
    caps = listing["capabilities"]
    if fake_profile == "current":
        assert listing["comfyui_version"] == "0.38.1" and caps["os"] == "linux"
        assert caps["jobs_api"] is True and caps["job_cancel"] is True
        assert caps["status_from"] == "/api/jobs/{id}" and caps["cancel_with"] == "/api/jobs/{id}/cancel"
    else:
        assert listing["comfyui_version"] == "0.3.64" and caps["os"] == "posix"
        assert caps["jobs_api"] is False and caps["job_cancel"] is False
        assert caps["status_from"] == "/history/{id}"


async def test_prompt_ids_are_uuids_and_no_browser_headers_are_forwarded(bridge: Bridge) -> None:
    fake = bridge.fakes[0]
    cid = new_client_id()
    # a browser's markers on the caller's request (the bridge's own page): current ComfyUI would refuse a
    # request marked cross-site with a 403, so none of them may travel on to a backend
    resp = await bridge.fetch("POST", f"/generate-based-workflow?clientId={cid}", {"workflow": "blank-canvas"},
                              headers={"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors",
                                       "Origin": bridge.url})
    assert resp.code == 200, resp.body
    assert (await bridge.wait_state(cid, {"closed", "error"}))["status"] == "closed"
    assert all(str(uuid.UUID(pid)) == pid for pid in fake.prompts)  # canonical: a current backend checks
    sent = [h.lower() for r in fake.requests_seen for h in r["headers"]]
    assert not [h for h in sent if h.startswith("sec-fetch-") or h == "origin"]


async def test_cancel_of_a_running_job_uses_the_jobs_cancel_endpoint_where_present(bridge: Bridge,
                                                                                     fake_profile: str) -> None:
    fake = bridge.fakes[0]
    cid = new_client_id()
    await bridge.submit(cid, {"workflow": "sleep-progress", "2/seconds": 3.0})
    await bridge.wait_state(cid, {"progress"})
    await bridge.post_json(f"/interrupt?clientId={cid}", {})
    info = await bridge.wait_state(cid, {"error", "closed"})
    assert info["status"] == "error" and "interrupted" in info["details"]
    prompt_id = next(iter(fake.prompts))
    assert stopped(fake) == [prompt_id]
    if fake_profile == "current":
        assert fake.job_cancels == [{"prompt_id": prompt_id, "cancelled": True}] and fake.interrupts == []
    else:
        assert fake.job_cancels == [] and fake.interrupts[0]["hit"] == prompt_id
    assert fake.prompts[prompt_id]["state"] == "interrupted"


async def test_a_class_the_backend_lacks_fails_with_its_name(bridge_factory, fakes, workflows_dir: Path,  # type: ignore[no-untyped-def]
                                                             fake_profile: str) -> None:
    (workflows_dir / "needs_plugin.json").write_text(json.dumps(NEEDS_PLUGIN))
    fake = await fakes()
    bridge = await bridge_factory([fake])
    cid = new_client_id()
    await bridge.submit(cid, {"workflow": "needs_plugin"})
    info = await bridge.wait_state(cid, {"error", "closed"})
    assert info["status"] == "error"
    assert "node class FancyUpscaler is not installed on this backend" in info["details"], info
    if fake_profile == "current":
        assert "'Fancy upscale'" in info["details"]  # the title current ComfyUI reports
    assert (await bridge.get_json("/backends"))["backends"][0]["state"] == "up"  # the job's fault, not the box's
    # and --check names the workflow and the class before anyone runs it
    settings = workflows_dir.parent / "check.yaml"
    settings.write_text(f"backends:\n  - url: {fake.url}\nworkflows_dir: {workflows_dir}\n"
                        f"data_dir: {workflows_dir.parent / 'check-data'}\n")
    ok, lines = await run_check(str(settings), {})
    assert not ok
    assert any("workflow needs_plugin needs node class FancyUpscaler" in line for line in lines), lines


async def test_two_identical_jobs_in_a_row_both_deliver(bridge: Bridge, fake_profile: str) -> None:
    fake = bridge.fakes[0]
    cid = new_client_id()
    jobs = []
    # A, A, then B, A: the second A is served from the cache; the last one too where the cache spans prompts
    for color in (7, 7, 9, 7):
        jobs.append((await bridge.submit(cid, {"workflow": "blank-canvas", "1/color": color}))["job_id"])
        assert (await bridge.wait_state(cid, {"closed", "error"}))["status"] == "closed"
    assert await outputs_of(bridge, cid) == Counter({j: 1 for j in jobs})
    ran = [fake.prompts[p]["state"] for p in fake.prompts]
    assert ran == ["done"] * 4
    # the cache really served them: no new file for a cached SaveImage
    files = sorted(p.name for p in Path(fake.dirs["output"], "bridge").iterdir())
    assert len(files) == (2 if fake_profile == "current" else 3), files


async def test_a_silenced_backend_socket_never_hangs_a_job(bridge_factory, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes()
    fake.reconnect_bug = True
    bridge = await bridge_factory([fake], history_poll_interval=0.3)
    backend = bridge.services.pool.members[0].client
    cid = new_client_id()
    await bridge.ws(cid)
    started = time.monotonic()
    job_id = (await bridge.submit(cid, {"workflow": "sleep-progress", "2/seconds": 1.5}))["job_id"]
    await bridge.wait_state(cid, {"progress"})
    # a stale socket under the bridge's clientId opens and closes: ComfyUI's cleanup of it unregisters the
    # bridge's live socket, which stays open and hears nothing from now on
    stale = await asyncio.wait_for(websocket.websocket_connect(f"{fake.ws_url}?clientId={backend.client_id}"),
                                   TIMEOUT)
    await asyncio.wait_for(stale.read_message(), TIMEOUT)
    await close_ws(stale)
    await wait_for(lambda: backend.client_id not in fake._inst.sockets)
    info = await bridge.wait_state(cid, {"closed", "error"}, timeout=8)
    assert info["status"] == "closed", info
    assert time.monotonic() - started < 8  # well within the job's 60 s timeout
    assert await outputs_of(bridge, cid) == Counter({job_id: 1})
    # the socket that stopped delivering was replaced: the backend hears the bridge again
    await wait_for(lambda: backend.client_id in fake._inst.sockets, timeout=5)
    second = (await bridge.submit(cid, {"workflow": "blank-canvas"}))["job_id"]
    assert (await bridge.wait_state(cid, {"closed", "error"}))["status"] == "closed"
    assert second in await outputs_of(bridge, cid)


async def test_recovery_after_a_restart_asks_the_jobs_api_where_present(bridge_factory, fakes,  # type: ignore[no-untyped-def]
                                                                        fake_profile: str) -> None:
    fake = await fakes()
    bridge = await bridge_factory([fake], probe_interval=0.05, down_after=2, up_after=2, failover_grace=5)
    cid = new_client_id()
    await bridge.submit(cid, {"workflow": "sleep-progress", "2/seconds": 1.0})
    await bridge.wait_state(cid, {"progress"})
    lost = next(iter(fake.prompts))
    await fake.go_down()
    await asyncio.sleep(0.2)
    await fake.come_up()  # a fresh process: it has forgotten the prompt
    assert (await bridge.wait_state(cid, {"closed", "error"}))["status"] == "closed"
    assert len(fake.prompts) == 2  # the lost prompt ran again under a new id
    asked = [r["path"] for r in fake.requests_seen if r["method"] == "GET"]
    if fake_profile == "current":
        assert f"/api/jobs/{lost}" in asked
    else:
        assert not [p for p in asked if p.startswith("/api/jobs/")]


async def test_a_long_silent_node_does_not_make_the_socket_churn(bridge_factory, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes()
    bridge = await bridge_factory([fake], history_poll_interval=0.1, job_timeout=2.5)
    backend = bridge.services.pool.members[0]
    fake.hang = True  # the prompt starts, then its node works without a word (like a model loading)
    cid = new_client_id()
    await bridge.submit(cid, {"workflow": "blank-canvas"})
    await bridge.wait_state(cid, {"progress"})
    opened_before = sum(r["path"] == "/ws" for r in fake.requests_seen)
    await asyncio.sleep(1.8)
    reopened = sum(r["path"] == "/ws" for r in fake.requests_seen) - opened_before
    # silence alone is a suspicion: re-open after 3 intervals, then ever less often (0.3 s, +0.6 s, +1.2 s ...),
    # not every 0.3 s
    assert 1 <= reopened <= 3, reopened
    assert backend.up
    info = await bridge.wait_state(cid, {"error", "closed"})
    assert info["details"] == "time out error: exceed 2.5s"
