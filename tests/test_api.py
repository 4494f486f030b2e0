"""Each endpoint's success shape and each documented error, as API.md states them."""
from __future__ import annotations

import asyncio
import json

import pytest
from tornado import httpclient, websocket

from conftest import Bridge, new_client_id, next_message

pytestmark = pytest.mark.both_profiles  # the engine runs against each ComfyUI release the fake imitates


async def test_workflow_list(bridge: Bridge) -> None:
    names = await bridge.get_json("/workflow-list")
    assert {"text-to-image", "image-to-image", "invert-image", "blank-canvas"} <= set(names)
    assert "load_invert_blur" not in names  # renamed by the manifest


async def test_workflow_info_shape(bridge: Bridge) -> None:
    info = await bridge.get_json("/workflow-info?workflow=text-to-image")
    assert info["6/text"]["type"] == "str"
    assert info["6/text"]["class"] == "CLIPTextEncode"
    assert info["6/text"]["title"] == "CLIP Text Encode (Prompt)"
    assert info["6/text"]["default"].startswith("beautiful scenery nature glass bottle")
    assert info["3/seed"]["type"] == "int" and info["3/seed"]["min"] == 0
    i2i = await bridge.get_json("/workflow-info?workflow=image-to-image")
    assert i2i["10/image"] == {**i2i["10/image"], "type": "str", "class": "LoadImage", "upload": True}


async def test_workflow_info_learns_bounds_from_backend(bridge: Bridge) -> None:
    async def learned() -> dict:
        while True:
            info = await bridge.get_json("/workflow-info?workflow=text-to-image")
            if "max" in info["3/steps"]:
                return info
            await asyncio.sleep(0.02)
    info = await asyncio.wait_for(learned(), 5)
    assert (info["3/steps"]["min"], info["3/steps"]["max"]) == (1, 10000)
    assert info["3/seed"]["max"] == 18446744073709551615
    inv = await bridge.get_json("/workflow-info?workflow=invert-image")
    # a file input offers the caller's uploads, not the backend's input folder
    assert "choices" not in inv["1/image"]


async def test_workflow_info_full_view_serves_the_description(bridge: Bridge) -> None:
    async def enriched() -> dict:  # once the backend's /object_info is in, the answer stops changing
        while "step" not in (info := await bridge.get_json("/workflow-info?workflow=blank-canvas"))["1/width"]:
            await asyncio.sleep(0.02)
        return info
    plain = await asyncio.wait_for(enriched(), 5)
    full = await bridge.get_json("/workflow-info?workflow=blank-canvas&view=full")
    assert full == {"workflow": "blank-canvas", "description": "A plain image of one colour", "timeout": 60.0,
                    "inputs": plain}
    assert all("/" in key for key in plain)  # the default answer keeps its specified shape
    assert plain["1/color"]["display"] == "color"  # the page offers a colour picker for it
    assert await bridge.get_json("/workflow-info?workflow=blank-canvas&view=inputs") == plain
    resp = await bridge.fetch("GET", "/workflow-info?workflow=blank-canvas&view=everything")
    assert resp.code == 400 and "view must be one of inputs, full" in json.loads(resp.body)["detail"]


@pytest.mark.parametrize("query", ["", "?workflow=", "?workflow=nope"])
async def test_workflow_info_unknown(bridge: Bridge, query: str) -> None:
    resp = await bridge.fetch("GET", "/workflow-info" + query)
    assert resp.code == 400 and "workflow" in json.loads(resp.body)["detail"]


@pytest.mark.parametrize(("body", "needle"), [
    ({"workflow": "nope"}, "unknown workflow"),
    ({}, "'workflow' is required"),
    ({"workflow": "blank-canvas", "9/zzz": 1}, "unknown input"),
    ({"workflow": "blank-canvas", "1/width": "wide"}, "expected int"),
    ({"workflow": "blank-canvas", "1/width": 1.5}, "expected int"),
    ({"workflow": "blank-canvas", "1/width": True}, "expected int"),
    ({"workflow": "blank-canvas", "1/width": 0}, "smaller than the minimum"),
    ({"workflow": "invert-image", "1/image": "never-uploaded.png"}, "no uploaded file"),
    ({"workflow": "invert-image", "3/sigma": "x"}, "expected float"),
])
async def test_generate_rejects_bad_input(bridge: Bridge, body: dict, needle: str) -> None:
    resp = await bridge.fetch("POST", f"/generate-based-workflow?clientId={new_client_id()}", body)
    assert resp.code == 400
    assert needle in json.loads(resp.body)["detail"]
    assert bridge.fakes[0].prompts == {}


@pytest.mark.parametrize(("raw", "code"), [(b"{not json", 400), (b"[1, 2]", 400), (b"", 400), (b'"x"', 400)])
async def test_generate_rejects_bad_json(bridge: Bridge, raw: bytes, code: int) -> None:
    resp = await bridge.fetch("POST", f"/generate-based-workflow?clientId={new_client_id()}", raw=raw,
                              headers={"Content-Type": "application/json"})
    assert resp.code == code


@pytest.mark.parametrize("query", ["", "?clientId=", "?clientId=a%20b", "?clientId=" + "x" * 200])
async def test_generate_needs_a_good_client_id(bridge: Bridge, query: str) -> None:
    resp = await bridge.fetch("POST", "/generate-based-workflow" + query, {"workflow": "blank-canvas"})
    assert resp.code == 400 and "clientId" in json.loads(resp.body)["detail"]


async def test_generate_body_too_large(bridge: Bridge) -> None:
    big = {"workflow": "text-to-image", "6/text": "x" * (bridge.config.max_body_bytes + 10)}
    resp = await bridge.fetch("POST", f"/generate-based-workflow?clientId={new_client_id()}", big)
    assert resp.code == 413


async def test_queue_full_answers_429(bridge_factory, fake) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], max_queue=2)
    fake.hang = True
    cid = new_client_id()
    await bridge.submit(cid, {"workflow": "blank-canvas"})
    await bridge.wait_state(cid, {"progress"})  # one runs (dispatch follows the submit, it is not part of it)
    for _ in range(2):  # two wait
        await bridge.submit(cid, {"workflow": "blank-canvas"})
    resp = await bridge.fetch("POST", f"/generate-based-workflow?clientId={cid}", {"workflow": "blank-canvas"})
    assert resp.code == 429 and resp.headers["Retry-After"].isdigit()
    await bridge.post_json(f"/interrupt?clientId={cid}", {})


@pytest.mark.parametrize("path", ["/execution-info", "/interrupt", "/free"])
async def test_unknown_client_is_400(bridge: Bridge, path: str) -> None:
    method = "GET" if path == "/execution-info" else "POST"
    resp = await bridge.fetch(method, f"{path}?clientId={new_client_id()}")
    assert resp.code == 400 and "not recognized" in json.loads(resp.body)["detail"]


async def test_history_unknown_client_is_204(bridge: Bridge) -> None:
    cid = new_client_id()
    resp = await bridge.fetch("GET", f"/history?clientId={cid}")
    assert resp.code == 204 and not resp.body
    assert resp.headers["X-Detail"] == ("The client ID has not been submitted to the server before. "
                                        f"It is not recognized. / {cid}")


async def test_history_log_pages(bridge: Bridge) -> None:
    cid = new_client_id()
    for _ in range(3):
        await bridge.submit(cid, {"workflow": "blank-canvas"})
    await bridge.submit(cid, {"workflow": "error_runtime"})
    await bridge.wait_state(cid, {"error"})
    page = await bridge.get_json("/history?limit=2&offset=0")
    assert page["total_count"] == 4 and page["page"] == 1 and page["page_size"] == 2
    newest = page["history"][0]
    assert newest["workflow"] == "error_runtime" and newest["status"] == "failed"
    assert "outside the output folder" in newest["error_message"]
    older = await bridge.get_json("/history?limit=2&offset=2")
    assert older["page"] == 2 and [e["status"] for e in older["history"]] == ["completed", "completed"]
    entry = older["history"][0]
    assert entry["result_url"] == f"/jobs/{entry['id']}"
    assert entry["timestamp"].endswith("Z")
    assert cid not in json.dumps(page) + json.dumps(older)  # the log never names a clientId
    default = await bridge.get_json("/history")
    assert default["page_size"] == 10 and len(default["history"]) == 4


@pytest.mark.parametrize("query", ["limit=0", "limit=abc", "offset=-1", "limit=100000", "offset=1.5"])
async def test_history_log_bad_paging(bridge: Bridge, query: str) -> None:
    resp = await bridge.fetch("GET", f"/history?{query}")
    assert resp.code == 400
    body = json.loads(resp.body)
    assert body["error"] and body["detail"]


async def test_free_all_and_by_client(bridge: Bridge) -> None:
    fake = bridge.fakes[0]
    assert await bridge.post_json("/free", {}) == {"detail": "server memory free now / ALL", "freed": 1}
    assert fake.frees == [{"unload_models": True, "free_memory": True}]
    cid = new_client_id()
    await bridge.submit(cid, {"workflow": "blank-canvas"})
    await bridge.wait_state(cid, {"closed"})
    answer = await bridge.post_json(f"/free?clientId={cid}", {})
    assert answer["detail"] == f"server memory free now / {cid}"
    assert len(fake.frees) == 2


async def test_free_with_backend_down_is_503(bridge: Bridge) -> None:
    await bridge.fakes[0].go_down()
    await asyncio.sleep(0.2)
    resp = await bridge.fetch("POST", "/free")
    assert resp.code == 503


async def test_generation_count_is_a_number(bridge: Bridge) -> None:
    resp = await bridge.fetch("GET", "/generation-count")
    assert resp.code == 200 and json.loads(resp.body) == 0


async def test_unknown_path_and_method(bridge: Bridge) -> None:
    resp = await bridge.fetch("GET", "/nope")
    assert resp.code == 404
    resp = await bridge.fetch("DELETE", "/workflow-list")
    assert resp.code == 405


async def test_ws_without_client_id_is_400(bridge: Bridge) -> None:
    with pytest.raises(httpclient.HTTPClientError) as err:
        await asyncio.wait_for(websocket.websocket_connect(f"ws://127.0.0.1:{bridge.port}/ws"), 5)
    assert err.value.code == 400
    assert json.loads(err.value.response.body)["detail"].startswith("clientId is required")


async def test_ws_keepalive(bridge_factory, fake) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], keepalive_interval=0.1)
    conn = await bridge.ws(new_client_id())
    assert await next_message(conn) == {"status": "connected", "details": "server connected"}
    assert await next_message(conn, 2) == {"status": "listening", "details": "server is listening"}


async def test_api_key(bridge_factory, fake) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], api_key="s3cret")
    resp = await bridge.fetch("GET", "/workflow-list")
    assert resp.code == 401
    resp = await bridge.fetch("GET", "/workflow-list", headers={"Authorization": "Bearer wrong"})
    assert resp.code == 401
    resp = await bridge.fetch("GET", "/workflow-list", headers={"Authorization": "Bearer s3cret"})
    assert resp.code == 200
    with pytest.raises(httpclient.HTTPClientError) as err:
        await bridge.ws(new_client_id())
    assert err.value.code == 401
    conn = await bridge.ws(new_client_id(), token="s3cret")
    assert (await next_message(conn))["status"] == "connected"


async def test_backends_listing(bridge_factory, fakes) -> None:  # type: ignore[no-untyped-def]
    one, two = await fakes(), await fakes()
    bridge = await bridge_factory([one, two])
    listing = await bridge.get_json("/backends")
    assert listing["up"] == 2 and listing["total"] == 2 and listing["queue_length"] == 0
    assert {b["url"] for b in listing["backends"]} == {one.url, two.url}
    assert all(b["state"] == "up" and b["slots"] == 1 and b["running"] == 0 for b in listing["backends"])
    await two.go_down()

    async def down() -> dict:
        while True:
            listing = await bridge.get_json("/backends")
            if listing["up"] == 1:
                return listing
            await asyncio.sleep(0.02)
    listing = await asyncio.wait_for(down(), 5)
    states = {b["url"]: b["state"] for b in listing["backends"]}
    assert states == {one.url: "up", two.url: "down"}


def test_backend_listing_never_shows_credentials() -> None:
    from comfy.comfyclient import ComfyClient
    from comfy.config import BackendConfig, Config
    from comfy.pool import Member
    b = Member(ComfyClient(BackendConfig(url="http://user:secret@gpu-box:8188"), Config(), "cid"))
    shown = b.describe()
    assert "secret" not in str(shown) and shown["url"] == "http://gpu-box:8188"
    b.client.http.close()


async def test_file_input_never_names_other_files_of_the_workflows_folder(bridge: Bridge) -> None:
    for name in ("workflows.yaml", "load_invert_blur.json"):
        resp = await bridge.fetch("POST", f"/generate-based-workflow?clientId={new_client_id()}",
                                  {"workflow": "invert-image", "1/image": name})
        assert resp.code == 400 and "no uploaded file" in json.loads(resp.body)["detail"]
    assert bridge.fakes[0].uploads == []
