"""Every limit in settings, enforced with a clear 4xx/503 JSON answer."""
from __future__ import annotations

import asyncio
import json
from urllib.parse import quote

import pytest
from tornado import httpclient, tcpclient

from comfy.limits import RateLimiter
from conftest import TIMEOUT, Bridge, check_invariants, multipart, new_client_id

UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


async def raw_request(bridge: Bridge, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send a request's head (and maybe part of a body), read one answer; the rest of the body never comes."""
    stream = await tcpclient.TCPClient().connect("127.0.0.1", bridge.port)
    try:
        await stream.write(head.encode("latin-1") + b"\r\n" + body)
        status_line = await asyncio.wait_for(stream.read_until(b"\r\n\r\n", max_bytes=65536), TIMEOUT)
        lines = status_line.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        length = int(headers.get("Content-Length", "0"))
        payload = await asyncio.wait_for(stream.read_bytes(length), TIMEOUT) if length else b""
        return int(lines[0].split()[1]), headers, payload
    finally:
        stream.close()


@pytest.mark.parametrize("path", ["/upload", "/generate-based-workflow?clientId=c1"])
async def test_too_large_is_refused_before_the_body_is_read(bridge: Bridge, path: str) -> None:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {10**12}\r\n")
    code, headers, payload = await raw_request(bridge, head, b"--b\r\n")  # and then nothing
    assert code == 413
    assert headers["Content-Type"].startswith("application/json")
    assert "larger than" in json.loads(payload)["detail"]
    assert list(bridge.config.uploads_dir.iterdir()) == []


async def test_upload_file_size_while_streaming(bridge_factory, fake, png: bytes) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], max_upload_bytes=len(png))
    assert (await bridge.upload({"file": ("a.png", png)}))["file"]
    body, ctype = multipart({"file": ("a.png", png + b"\0")})  # one byte over, sent chunked: no Content-Length
    resp = await chunked(bridge, "/upload", body, ctype)
    assert resp.code == 413 and "larger than" in json.loads(resp.body)["detail"]
    assert len(list(bridge.config.uploads_dir.iterdir())) == 1


async def chunked(bridge: Bridge, path: str, body: bytes, ctype: str) -> httpclient.HTTPResponse:
    """POST with Transfer-Encoding: chunked, so no Content-Length warns the bridge."""
    async def produce(write):  # type: ignore[no-untyped-def]
        for i in range(0, len(body), 1000):
            await write(body[i:i + 1000])
    resp = await asyncio.wait_for(bridge.http.fetch(bridge.url + path, method="POST", body_producer=produce,
                                                    headers={"Content-Type": ctype}, raise_error=False), TIMEOUT)
    check_invariants(resp)
    return resp


async def test_files_per_upload(bridge_factory, fake, png: bytes) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], max_upload_files=2)
    await bridge.upload({"a": ("a.png", png), "b": ("b.png", png)})
    body, ctype = multipart({"a": ("a.png", png), "b": ("b.png", png), "c": ("c.png", png)})
    resp = await bridge.fetch("POST", "/upload", raw=body, headers={"Content-Type": ctype})
    assert resp.code == 400 and "at most 2 files" in json.loads(resp.body)["detail"]
    assert len(list(bridge.config.uploads_dir.iterdir())) == 2  # the first request's, none of these


async def test_json_body_size(bridge_factory, fake) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], max_body_bytes=200)
    path = f"/generate-based-workflow?clientId={new_client_id()}"
    big = {"workflow": "blank-canvas", "pad": "x" * 300}
    resp = await bridge.fetch("POST", path, big)
    assert resp.code == 413 and "larger than 200 bytes" in json.loads(resp.body)["detail"]
    resp = await chunked(bridge, path, json.dumps(big).encode(), "application/json")
    assert resp.code == 413
    assert (await bridge.fetch("POST", path, {"workflow": "blank-canvas"})).code == 200


async def test_string_input_length(bridge_factory, fake) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], max_string_length=10)
    cid = new_client_id()
    resp = await bridge.fetch("POST", f"/generate-based-workflow?clientId={cid}",
                              {"workflow": "text-to-image", "6/text": "x" * 11})
    assert resp.code == 400 and "longer than 10 characters" in json.loads(resp.body)["detail"]
    await bridge.submit(cid, {"workflow": "text-to-image", "6/text": "x" * 10})


@pytest.mark.parametrize("bad", ["123456789", "a b", "a/b", "caf\u00e9", "<script>", "a%00b", "..", ""])
async def test_client_id_length_and_charset(bridge_factory, fake, bad: str) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], max_client_id_length=8)
    expect = "1-8 characters" if bad else "clientId is required"
    if bad == "..":  # the charset allows dots; the length of 2 is fine, so it is accepted
        await bridge.submit(bad, {"workflow": "blank-canvas"})
        return
    for method, path in (("POST", "/generate-based-workflow"), ("GET", "/execution-info"),
                         ("POST", "/interrupt"), ("GET", "/history"), ("GET", "/ws")):
        headers = UPGRADE if path == "/ws" else None
        resp = await bridge.fetch(method, f"{path}?clientId={quote(bad)}", {"workflow": "blank-canvas"}
                                  if method == "POST" else None, headers=headers)
        assert resp.code == 400, (path, resp.code)
        assert expect in json.loads(resp.body)["detail"], path
    await bridge.submit("12345678", {"workflow": "blank-canvas"})


async def test_websockets_per_client_and_in_total(bridge_factory, fake) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], max_ws_per_client=2, max_ws_total=3)
    a, b = new_client_id(), new_client_id()
    await bridge.ws(a)
    await bridge.ws(a)
    resp = await bridge.fetch("GET", f"/ws?clientId={a}", headers=UPGRADE)
    assert resp.code == 429 and resp.headers["Retry-After"] == "5"
    assert "2 open sockets" in json.loads(resp.body)["detail"]
    await bridge.ws(b)
    resp = await bridge.fetch("GET", f"/ws?clientId={new_client_id()}", headers=UPGRADE)
    assert resp.code == 503 and "open sockets" in json.loads(resp.body)["detail"]
    with pytest.raises(httpclient.HTTPClientError) as refused:  # a real client sees the refusal too
        await bridge.ws(new_client_id())
    assert refused.value.code == 503
    # a closed socket frees its place
    first = bridge.sockets[0]
    first.close()
    await asyncio.wait_for(_until(lambda: bridge.services.hub.count == 2), TIMEOUT)
    await bridge.ws(new_client_id())


async def _until(predicate) -> None:  # type: ignore[no-untyped-def]
    while not predicate():
        await asyncio.sleep(0.01)


def submit_limiter(bridge: Bridge) -> RateLimiter:
    """The bridge's per-client limiter of POST /generate-based-workflow."""
    rules = bridge.server.request_callback.wildcard_router.rules  # type: ignore[attr-defined]
    return next(rule.target_kwargs["limiter"] for rule in rules if "limiter" in rule.target_kwargs)


async def test_submit_rate_per_client(bridge_factory, fake) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], submit_burst=3, submit_rate=4)
    now = [1000.0]
    submit_limiter(bridge).clock = lambda: now[0]  # its time moves when the test says, however slow the machine
    cid = new_client_id()
    for _ in range(3):
        await bridge.submit(cid, {"workflow": "blank-canvas"})
    resp = await bridge.fetch("POST", f"/generate-based-workflow?clientId={cid}", {"workflow": "blank-canvas"})
    assert resp.code == 429 and resp.headers["Retry-After"] == "1"
    detail = json.loads(resp.body)["detail"]
    assert "too many submits" in detail and "3 at once" in detail and "4 per second" in detail
    await bridge.submit(new_client_id(), {"workflow": "blank-canvas"})  # another client is not held back
    now[0] += 0.3  # 4 per second: one token back after 0.25 s
    await bridge.submit(cid, {"workflow": "blank-canvas"})
    assert (await bridge.fetch("POST", f"/generate-based-workflow?clientId={cid}",
                               {"workflow": "blank-canvas"})).code == 429


def test_rate_limiter_token_bucket() -> None:
    now = [100.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0.0
    now[0] += 0.5
    assert limiter.take("a") == 0.0
    assert limiter.take("a") == pytest.approx(0.5)
    now[0] += 60
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]  # refilled to the burst, not beyond
    assert limiter.take("a") > 0
    assert RateLimiter.retry_after(0.01) == "1" and RateLimiter.retry_after(2.2) == "3"


def test_rate_limiter_memory_is_bounded() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=1.0, burst=2, clock=lambda: now[0], max_keys=100)
    for i in range(1000):
        limiter.take(f"c{i}")
        now[0] += 0.001
    assert len(limiter) <= 100
    limiter.take("hot")
    limiter.take("hot")
    assert limiter.take("hot") > 0


async def test_limits_have_settings_with_defaults() -> None:
    from comfy.config import Config, load_config
    from conftest import ROOT
    shipped = load_config(ROOT / "settings.yaml", environ={})
    defaults = Config()
    for name in ("max_upload_bytes", "max_upload_files", "max_body_bytes", "max_string_length",
                 "max_client_id_length", "max_ws_per_client", "max_ws_total", "submit_rate", "submit_burst"):
        assert getattr(shipped, name) == getattr(defaults, name) > 0, name
    assert shipped.cors_origins == () and shipped.api_key == ""


async def test_a_stalled_body_does_not_block_others(bridge: Bridge) -> None:
    stream = await tcpclient.TCPClient().connect("127.0.0.1", bridge.port)
    await stream.write(b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                       b"Content-Length: 1000\r\n\r\n--b\r\n")
    try:
        assert await bridge.get_json("/workflow-list")  # answered while that upload hangs
    finally:
        stream.close()
