"""Malformed everything gets a 4xx JSON answer: bodies, types, numbers, methods; never a traceback."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from tornado import httpclient

from bridge import make_app
from conftest import TIMEOUT, Bridge, check_invariants, multipart, new_client_id, wait_for
from handlers.base import allowed_methods
from test_openapi import app_routes

SEED_MAX = 2**64 - 1
GENERATE = "/generate-based-workflow?clientId="


@pytest.mark.parametrize("raw", [b"null", b"1", b"true", b'"text"', b"[]", b"[{}]", b"{", b"{'a': 1}",
                                 b"\xff\xfe\x00", b"{\"workflow\": \"blank-canvas\",}", b"\x00" * 64,
                                 b"[" * 100_000 + b"]" * 100_000, b'{"a": ' + b"9" * 5000 + b"}",
                                 b'{"workflow": "blank-canvas", "1/width": NaN}'])
async def test_bodies_that_are_not_a_json_object(bridge: Bridge, raw: bytes) -> None:
    resp = await bridge.fetch("POST", GENERATE + new_client_id(), raw=raw, headers={"Content-Type": "application/json"})
    assert resp.code == 400, resp.body
    assert bridge.fakes[0].prompts == {}


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                   "application/xml"])
async def test_bodies_of_another_type(bridge: Bridge, ctype: str) -> None:
    resp = await bridge.fetch("POST", GENERATE + new_client_id(), raw=b'{"workflow": "blank-canvas"}',
                              headers={"Content-Type": ctype})
    assert resp.code == 415 and "application/json" in json.loads(resp.body)["detail"]


@pytest.mark.parametrize(("body", "needle"), [
    ({"workflow": "blank-canvas", "1/width": None}, "expected int"),
    ({"workflow": "blank-canvas", "1/width": [1]}, "expected int"),
    ({"workflow": "blank-canvas", "1/width": {"v": 1}}, "expected int"),
    ({"workflow": "blank-canvas", "1/width": "64"}, "expected int"),
    ({"workflow": "blank-canvas", "1/width": 64.0}, "expected int"),
    ({"workflow": "text-to-image", "6/text": 5}, "expected str"),
    ({"workflow": "text-to-image", "6/text": ["a"]}, "expected str"),
    ({"workflow": "text-to-image", "3/cfg": True}, "expected float"),
    ({"workflow": 7}, "unknown workflow"),
    ({"workflow": ["blank-canvas"]}, "unknown workflow"),
    ({"workflow": None}, "'workflow' is required"),
    ({"workflow": "blank-canvas", "unknown": 1}, "unknown input"),
    ({"workflow": "blank-canvas", "1/width ": 64}, "unknown input"),
    ({"workflow": "blank-canvas", "1/WIDTH": 64}, "unknown input"),
    ({"workflow": "blank-canvas", "__proto__": {}}, "unknown input"),
    ({"workflow": "blank-canvas", "6/text": "\ud800"}, "lone surrogate"),
])
async def test_wrong_types_and_unknown_keys(bridge: Bridge, body: dict[str, Any], needle: str) -> None:
    resp = await bridge.fetch("POST", GENERATE + new_client_id(), body)
    assert resp.code == 400 and needle in json.loads(resp.body)["detail"], resp.body


@pytest.mark.parametrize("seed", [2**53 + 1, SEED_MAX, 0])
async def test_huge_integers_are_kept_exactly(bridge: Bridge, seed: int) -> None:
    cid = new_client_id()
    await bridge.submit(cid, {"workflow": "text-to-image", "3/seed": seed})
    fake = bridge.fakes[0]
    await wait_for(lambda: len(fake.prompts) == 1)
    prompt = next(iter(fake.prompts.values()))["prompt"]
    assert prompt["3"]["inputs"]["seed"] == seed and type(prompt["3"]["inputs"]["seed"]) is int


@pytest.mark.parametrize(("value", "needle"), [
    (SEED_MAX + 1, "bigger than the maximum"), (10**30, "bigger than the maximum"), (-1, "smaller than the minimum"),
    (1e19, "expected int"), (1e400, "expected int"), (-(2**70), "smaller than the minimum"),
])
async def test_numbers_out_of_range(bridge: Bridge, value: Any, needle: str) -> None:
    raw = '{"workflow": "text-to-image", "3/seed": %s}' % ("1e400" if value == 1e400 else repr(value))
    resp = await bridge.fetch("POST", GENERATE + new_client_id(), raw=raw.encode(),
                              headers={"Content-Type": "application/json"})
    assert resp.code == 400 and needle in json.loads(resp.body)["detail"]


@pytest.mark.parametrize("raw", ["Infinity", "-Infinity", "NaN", "1e999", "-1e999"])
async def test_non_finite_floats(bridge: Bridge, raw: str) -> None:
    body = '{"workflow": "invert-image", "3/sigma": %s}' % raw
    resp = await bridge.fetch("POST", GENERATE + new_client_id(), raw=body.encode(),
                              headers={"Content-Type": "application/json"})
    assert resp.code == 400


@pytest.mark.parametrize("query", ["limit=-1", "limit=0", "offset=-1", "limit=1001", "limit=1.5", "limit=abc",
                                   "offset=" + "9" * 5000, "limit=%2D1", "limit=0x10", "limit=5%20x", "limit=", "offset=", "limit=%00"])
async def test_negative_and_silly_sizes(bridge: Bridge, query: str) -> None:
    resp = await bridge.fetch("GET", f"/history?{query}")
    assert resp.code == 400
    body = json.loads(resp.body)
    assert body["error"].startswith("invalid") and body["detail"]


@pytest.mark.parametrize("offset", [2**63, 2**64 + 5, 10**30])
async def test_offsets_past_any_log_are_an_empty_page(bridge: Bridge, offset: int) -> None:
    page = await bridge.get_json(f"/history?limit=7&offset={offset}")  # was a 500: too big for SQLite
    assert page["history"] == [] and page["page"] == offset // 7 + 1 and page["page_size"] == 7


async def test_unknown_methods_get_405_with_allow(bridge: Bridge) -> None:
    routes = app_routes(make_app(bridge.config, bridge.services))
    for path, handler in routes.items():
        allowed = allowed_methods(handler)
        url = path.replace("{path}", "app.js")
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "PROPFIND", "TRACE", "BREW"):
            if method in allowed:
                continue
            resp = await bridge.fetch(method, url, raw=b"" if method in ("POST", "PUT", "PATCH") else None,
                                      allow_nonstandard_methods=True)
            assert resp.code == 405, (method, path, resp.code)
            assert resp.headers["Allow"] == ", ".join(allowed), (method, path)
            assert json.loads(resp.body)["detail"] == "Method Not Allowed"
    assert allowed_methods(routes["/generate-based-workflow"]) == ["POST", "OPTIONS"]
    assert allowed_methods(routes["/ws"]) == ["GET"]


GARBAGE: list[tuple[bytes, str]] = [
    (b"", ""), (b"\x00\xff\xfe garbage \x80", "application/json"), (b"{" * 5000, "application/json"),
    (b"--x\r\nContent-Disposition: form-data\r\n\r\n", "multipart/form-data"),
    (b"--x\r\n\r\n--x--", "multipart/form-data; boundary=x"), (b"a=1&b=%ZZ", "application/x-www-form-urlencoded"),
    (json.dumps({"workflow": "invert-image", "1/image": "../" * 50, "3/blur_radius": 10**400}).encode(),
     "application/json"),
]
QUERIES = ["", "?clientId=%00", "?clientId=%FF%FE", "?clientId=" + "a" * 10_000, "?workflow=%00&limit=%FF&offset=-",
           "?clientId=ok&clientId=two", "?name=%2e%2e%2f", "?limit=1e999&offset=NaN", "?token=x&clientId=../../x"]


async def stream_head(bridge: Bridge, method: str, target: str, headers: dict[str, str]) -> tuple[int, str]:
    """The status and Content-Type of an answer, read off a raw connection that is then closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
    try:
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{bridge.port}\r\n{lines}\r\n".encode("latin-1"))
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)).decode("latin-1")
    finally:
        writer.close()
        await writer.wait_closed()
    status = int(head.split(" ", 2)[1])
    type_ = next((line.split(":", 1)[1].strip() for line in head.split("\r\n")
                  if line.lower().startswith("content-type:")), "")
    return status, type_


async def test_garbage_to_every_route_never_shows_a_traceback(bridge: Bridge, png: bytes) -> None:
    """Every route, every method, bodies and queries of junk: 4xx (or a documented 503), JSON, no traceback."""
    routes = app_routes(make_app(bridge.config, bridge.services))
    answered = 0
    for path in routes:
        url = path.replace("{path}", "..%2F%00%FF")
        for method in ("GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD"):
            for i, query in enumerate(QUERIES):
                raw, ctype = GARBAGE[i % len(GARBAGE)]
                has_body = method in ("POST", "PUT")
                headers = {"Content-Type": ctype} if ctype and has_body else {}
                headers["Authorization"] = "Bearer \u00ff\u00fe" if i % 2 else "Basic %%%%"
                if path == "/ws" and i % 3 == 0:
                    headers.update({"Upgrade": "websocket", "Connection": "Upgrade",
                                    "Sec-WebSocket-Version": "99" if i else "13"})
                if method in ("GET", "HEAD") and path.endswith("/events"):
                    # a stream never ends when the query is good: its head is what can go wrong
                    code, type_ = await stream_head(bridge, method, url + query, headers)
                    assert code < 500 and (code != 200 or type_.startswith("text/event-stream")), (url + query, code)
                elif method == "HEAD":  # no body to check, and the helper expects one on errors
                    resp = await bridge.http.fetch(bridge.url + url + query, method="HEAD", headers=headers,
                                                   raise_error=False, request_timeout=TIMEOUT)
                    assert resp.code < 500 and resp.body == b"", (method, url + query, resp.code)
                else:
                    resp = await bridge.fetch(method, url + query, raw=raw if has_body else None, headers=headers,
                                              allow_nonstandard_methods=True)
                    assert resp.code < 500 or resp.code == 503, (method, url + query, resp.code, resp.body[:200])
                answered += 1
    # a multipart body whose boundary is not the declared one
    client = httpclient.AsyncHTTPClient(force_instance=True)
    try:
        body, ctype = multipart({"file": ("x.png", png)})
        resp = await client.fetch(f"{bridge.url}/upload", method="POST", body=body, raise_error=False,
                                  headers={"Content-Type": ctype + "; boundary=other", "Content-Length": str(len(body))},
                                  request_timeout=TIMEOUT)
        check_invariants(resp)
        assert resp.code == 400
    finally:
        client.close()
    assert answered >= len(routes) * 6 * len(QUERIES)
