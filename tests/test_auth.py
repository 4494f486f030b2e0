"""The optional API key: every route but the public ones needs it, 401 is JSON, and it never reaches a log."""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from tornado import httpclient, websocket

from bridge import make_app
from conftest import Bridge, multipart, new_client_id
from comfy.config import ApiKey
from comfy.identity import bearer, find_key
from handlers.base import PUBLIC_PATHS, allowed_methods
from test_openapi import app_routes

KEY = "k3y-Zq9-do-not-log-me"
WRONG = "wr0ng-Yx7-do-not-log-me-either"
UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


@pytest.fixture
async def keyed(bridge_factory, fake) -> Bridge:  # type: ignore[no-untyped-def]
    """A bridge with an API key."""
    return await bridge_factory([fake], api_key=KEY)


def _requests(bridge: Bridge) -> list[tuple[str, str, type]]:
    """(method, concrete path, handler) for every implemented method of every route."""
    out = []
    for path, handler in app_routes(make_app(bridge.config, bridge.services)).items():
        for method in allowed_methods(handler):
            if method not in ("OPTIONS", "HEAD"):
                out.append((method, path.replace("{path}", "app.js").replace("{job_id}", "gen_0")
                            .replace("{index}", "0"), handler))
    return out


def _public(path: str) -> bool:
    return path in PUBLIC_PATHS or path == "/" or path.startswith("/static/")


async def test_every_route_but_the_public_ones_needs_the_key(keyed: Bridge) -> None:
    checked = 0
    for method, path, _ in _requests(keyed):
        headers = UPGRADE if path == "/ws" else None
        query = "?clientId=c1" if path == "/ws" else ""
        resp = await keyed.fetch(method, path + query, headers=headers)
        if _public(path):
            assert resp.code != 401, (method, path)
            continue
        assert resp.code == 401, (method, path, resp.code)
        assert "API key" in json.loads(resp.body)["detail"]
        if path != "/ws":
            assert resp.headers["WWW-Authenticate"] == "Bearer"
        for bad in (f"Bearer {WRONG}", f"Basic {KEY}", KEY, f"Bearer {KEY}x", "Bearer "):
            resp = await keyed.fetch(method, path + query, headers={**(headers or {}), "Authorization": bad})
            assert resp.code == 401, (method, path, bad)
        checked += 1
    assert checked >= 13


async def test_the_right_key_opens_every_route(keyed: Bridge, png: bytes) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    for method, path, _ in _requests(keyed):
        if path == "/ws":
            continue
        resp = await keyed.fetch(method, path, headers=auth)
        assert resp.code != 401, (method, path)
    body, ctype = multipart({"file": ("a.png", png)})
    resp = await keyed.fetch("POST", "/upload", raw=body, headers={**auth, "Content-Type": ctype})
    assert resp.code == 200
    resp = await keyed.fetch("POST", f"/generate-based-workflow?clientId={new_client_id()}",
                             {"workflow": "blank-canvas"}, headers={**auth, "authorization": f"bearer {KEY}"})
    assert resp.code == 200, resp.body


async def test_public_paths_need_no_key(keyed: Bridge) -> None:
    for path in ("/docs", "/openapi.json", "/openapi.yaml"):
        assert (await keyed.fetch("GET", path)).code == 200, path
    assert (await keyed.fetch("GET", "/workflow-list")).code == 401


async def test_websocket_takes_the_header_or_a_token(keyed: Bridge) -> None:
    url = f"ws://127.0.0.1:{keyed.port}/ws?clientId={new_client_id()}"
    for request in (httpclient.HTTPRequest(url, headers={"Authorization": f"Bearer {KEY}"}),
                    httpclient.HTTPRequest(f"{url}&token={KEY}")):
        conn = await asyncio.wait_for(websocket.websocket_connect(request), 5)
        keyed.sockets.append(conn)
        assert json.loads(await asyncio.wait_for(conn.read_message(), 5))["status"] == "connected"
    for query in (f"&token={WRONG}", ""):
        resp = await keyed.fetch("GET", f"/ws?clientId=c2{query}", headers=UPGRADE)
        assert resp.code == 401 and "token" in json.loads(resp.body)["detail"]


def test_key_comparison_is_constant_time_and_strict() -> None:
    keys = (ApiKey("default", "caller", ApiKey.hash(KEY)), ApiKey("ops", "admin", ApiKey.hash(WRONG + "!")))

    def found(headers: dict[str, str], token: str | None = None) -> str | None:
        key = find_key(keys, bearer(headers, token))
        return key.name if key else None
    assert found({"Authorization": f"Bearer {KEY}"}) == "default"
    assert found({"Authorization": f"bearer  {KEY} "}) == "default"
    assert found({}, token=KEY) == "default"
    assert found({"Authorization": f"Bearer {WRONG}!"}) == "ops"
    assert found({"Authorization": f"Bearer {WRONG}"}, token=KEY) is None  # the header wins
    assert found({"Authorization": "Bearer \udcff"}) is None
    assert found({}, token=KEY[:-1]) is None
    assert found({}) is None
    import inspect

    import comfy.identity
    assert "compare_digest" in inspect.getsource(comfy.identity.find_key)


async def test_the_key_never_reaches_a_log(keyed: Bridge, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("tornado.access", "tornado.general", "tornado.application"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    cid = new_client_id()
    sent: list[Any] = []
    for key in (KEY, WRONG):
        for path in ("/workflow-list", f"/execution-info?clientId={cid}", "/nope", f"/workflow-list?token={key}"):
            sent.append(await keyed.fetch("GET", path, headers={"Authorization": f"Bearer {key}"}))
        sent.append(await keyed.fetch("POST", f"/generate-based-workflow?clientId={cid}&token={key}",
                                      {"workflow": "blank-canvas", "1/width": "x"},
                                      headers={"Authorization": f"Bearer {key}"}))
        sent.append(await keyed.fetch("GET", f"/ws?clientId=bad%20id&token={key}", headers=UPGRADE))
        sent.append(await keyed.fetch("GET", f"/ws?clientId={cid}&token={key}"))
        sent.append(await keyed.fetch("GET", f"/static/..%2f..%2fetc%2fpasswd?token={key}"))
    conn = await websocket.websocket_connect(f"ws://127.0.0.1:{keyed.port}/ws?clientId={cid}&token={KEY}")
    keyed.sockets.append(conn)
    await asyncio.wait_for(conn.read_message(), 5)
    assert {r.code for r in sent} >= {200, 400, 401}
    assert any(r.name == "tornado.access" for r in caplog.records)  # the access log was captured too
    for record in caplog.records:
        text = record.getMessage() + str(record.args)
        assert KEY not in text and WRONG not in text, record.getMessage()
    assert KEY not in caplog.text and WRONG not in caplog.text
