"""Input hygiene: names never become paths, types come from bytes, nothing of the caller's is forwarded,
no URL of the caller's is fetched, WebSocket origins and CORS are allow-lists."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import quote

import pytest
from tornado import httpclient, web, websocket
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from conftest import TIMEOUT, Bridge, check_invariants, multipart, new_client_id, wait_for
from handlers.docs import StaticHandler

UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
COMFY_PATHS = {"/prompt", "/queue", "/history", "/interrupt", "/free", "/upload/image", "/view", "/ws",
               "/object_info", "/system_stats", "/api/jobs", "/api/jobs/cancel"}


@pytest.mark.parametrize("filename", [
    "../../../../tmp/evil.png", "/etc/passwd", "C:\\Windows\\evil.png", "..\\..\\evil.png", "x.png\x00.txt",
    "%2e%2e%2f%2e%2e%2fevil.png", "..%252f..%252fevil.png", "\uff0e\uff0e\uff0fevil.png", "\u2024\u2024/evil.png",
    "CON.png", "x" * 300 + ".png", "evil.php.png", ".htaccess", "~/.ssh/id_rsa", "\u202egnp.exe",
])
async def test_filenames_never_become_paths(bridge: Bridge, png: bytes, filename: str) -> None:
    saved = await bridge.upload({"file": (filename, png)})
    assert [p.name for p in bridge.config.uploads_dir.iterdir()] == [saved["file"]]
    assert len(saved["file"]) == 36 and saved["file"].endswith(".png")  # 32 hex + .png, made by the bridge
    assert not Path("/tmp/evil.png").exists()


async def test_filename_star_and_raw_bytes_are_not_paths_either(bridge: Bridge, png: bytes) -> None:
    boundary = "bnd"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"../../id\"; filename*=UTF-8''..%2F..%2Fx.png;"
            f" filename=\"\xc0\xae\xc0\xae/x.png\"\r\nContent-Type: image/png\r\n\r\n").encode("latin-1")
    body += png + f"\r\n--{boundary}--\r\n".encode()
    resp = await bridge.fetch("POST", "/upload", raw=body,
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert resp.code == 200
    name = json.loads(resp.body)["../../id"]  # the identifier is only a key of the answer
    assert [p.name for p in bridge.config.uploads_dir.iterdir()] == [name]


@pytest.mark.parametrize("value", ["../uploads/x.png", "/etc/passwd", "..", "workflows.yaml",
                                   "load_invert_blur.json", "..\\..\\x.png", "%2e%2e/x.png", "example.png/.."])
async def test_a_file_input_names_an_upload_or_its_default_only(bridge: Bridge, value: str) -> None:
    resp = await bridge.fetch("POST", f"/generate-based-workflow?clientId={new_client_id()}",
                              {"workflow": "invert-image", "1/image": value})
    assert resp.code == 400 and "no uploaded file" in json.loads(resp.body)["detail"]
    assert bridge.fakes[0].uploads == [] and bridge.fakes[0].prompts == {}


@pytest.mark.parametrize(("data", "name"), [
    (b"<html><script>alert(1)</script></html>" * 3, "x.png"),
    (b"%PDF-1.7\n" + b"0" * 64, "x.jpg"),
    (b"GIF8" + b"<script>" * 8, "x.gif"),           # almost a GIF
    (b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\0" * 32, "x.webp"),  # RIFF, but not WebP
    (b"\x89PNG", "tiny.png"),                        # a signature's start, cut short
    (b"", "empty.png"),
])
async def test_file_types_come_from_the_bytes(bridge: Bridge, data: bytes, name: str) -> None:
    body, ctype = multipart({"file": (name, data)})
    resp = await bridge.fetch("POST", "/upload", raw=body, headers={"Content-Type": ctype})
    assert resp.code == 415 and "not a PNG, JPEG, WebP or GIF" in json.loads(resp.body)["detail"]
    assert list(bridge.config.uploads_dir.iterdir()) == []


async def test_nosniff_on_every_kind_of_answer(bridge: Bridge, png: bytes) -> None:
    cid = new_client_id()
    await bridge.submit(cid, {"workflow": "blank-canvas"})
    await bridge.wait_state(cid, {"closed"})
    results = await bridge.fetch("GET", f"/history?clientId={cid}")
    assert results.headers["Content-Type"].startswith("multipart/form-data")
    for resp in (results, await bridge.fetch("GET", "/workflow-list"), await bridge.fetch("GET", "/nope"),
                 await bridge.fetch("GET", "/docs"), await bridge.fetch("GET", "/openapi.json"),
                 await bridge.fetch("GET", "/ws?clientId=x"), await bridge.fetch("DELETE", "/upload")):
        assert resp.headers["X-Content-Type-Options"] == "nosniff", resp.effective_url


async def test_static_files_have_nosniff_and_json_errors(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html><p>hi")
    (tmp_path / "app.js").write_text("1;")
    (tmp_path / "image.png").write_text("<script>alert(1)</script>")  # HTML in disguise
    app = web.Application([(r"/()", StaticHandler, {"path": str(tmp_path), "default_filename": "index.html"}),
                           (r"/static/(.*)", StaticHandler, {"path": str(tmp_path)})])
    sock, port = bind_unused_port()
    server = HTTPServer(app)
    server.add_sockets([sock])
    client = httpclient.AsyncHTTPClient(force_instance=True)
    try:
        async def get(path: str, method: str = "GET") -> httpclient.HTTPResponse:
            resp = await client.fetch(f"http://127.0.0.1:{port}{path}", method=method, raise_error=False,
                                      body=b"" if method == "POST" else None)
            check_invariants(resp)
            return resp
        for path in ("/", "/static/app.js", "/static/image.png"):
            resp = await get(path)
            assert resp.code == 200 and resp.headers["X-Content-Type-Options"] == "nosniff", path
        assert (await get("/static/image.png")).headers["Content-Type"] == "image/png"
        for path in ("/static/missing.js", "/static/..%2f..%2fetc%2fpasswd", "/static/%2e%2e/%2e%2e/etc/passwd"):
            resp = await get(path)
            assert resp.code in (403, 404) and resp.headers["X-Content-Type-Options"] == "nosniff", path
        resp = await get("/", "POST")
        assert resp.code == 405 and resp.headers["Allow"] == "GET, HEAD"
    finally:
        client.close()
        server.stop()
        await server.close_all_connections()


async def test_callers_origin_cookies_and_authorization_are_never_forwarded(bridge_factory, fake,
                                                                            png: bytes) -> None:  # type: ignore[no-untyped-def]
    key = "fwd-test-key-123"
    bridge = await bridge_factory([fake], api_key=key, allowed_origins=("https://app.example",),
                                  cors_origins=("https://app.example",))
    hostile = {"Authorization": f"Bearer {key}", "Cookie": "session=caller-cookie", "Origin": "https://app.example",
               "X-Forwarded-For": "6.6.6.6", "Referer": "https://app.example/page", "X-Api-Key": "caller-x"}
    body, ctype = multipart({"file": ("me.png", png)})
    saved = json.loads((await bridge.fetch("POST", "/upload", raw=body,
                                           headers={**hostile, "Content-Type": ctype})).body)
    cid = new_client_id()
    conn = await websocket.websocket_connect(httpclient.HTTPRequest(
        f"ws://127.0.0.1:{bridge.port}/ws?clientId={cid}", headers=hostile))
    bridge.sockets.append(conn)
    resp = await bridge.fetch("POST", f"/generate-based-workflow?clientId={cid}",
                              {"workflow": "invert-image", "1/image": saved["file"]}, headers=hostile)
    assert resp.code == 200
    await wait_for(lambda: fake.executed != [])
    await bridge.fetch("POST", f"/free?clientId={cid}", headers=hostile)
    await bridge.fetch("POST", f"/interrupt?clientId={cid}", headers=hostile)
    await bridge.fetch("POST", "/free", headers=hostile)
    assert {r["path"] for r in fake.requests_seen} >= {"/upload/image", "/prompt", "/free"}
    for seen in fake.requests_seen:
        names = {n.lower() for n in seen["headers"]}
        assert not names & {"authorization", "cookie", "origin", "referer", "x-forwarded-for", "x-api-key"}, seen
        text = json.dumps(seen)
        for secret in (key, "caller-cookie", "app.example", "6.6.6.6", "caller-x"):
            assert secret not in text, (secret, seen["path"])


async def test_only_configured_backends_are_ever_contacted(bridge: Bridge, fakes, png: bytes) -> None:  # type: ignore[no-untyped-def]
    trap = await fakes()  # a ComfyUI-alike nobody configured: it must hear nothing
    url = trap.url
    host = url.split("//")[1]
    cid = new_client_id()
    await bridge.upload({"file": (f"{url}/view?filename=x.png", png)})
    body, ctype = multipart({url: ("x.png", png)})
    await bridge.fetch("POST", "/upload", raw=body, headers={"Content-Type": ctype, "Referer": url})
    for body in ({"workflow": url}, {"workflow": "invert-image", "1/image": f"{url}/view?filename=a.png"},
                 {"workflow": "text-to-image", "6/text": url, "7/text": f"//{host}/x"},
                 {"workflow": "invert-image", "1/image": f"//{host}/x.png"}, {"workflow": "blank-canvas", url: 1}):
        await bridge.fetch("POST", f"/generate-based-workflow?clientId={cid}&url={quote(url)}&callback={quote(url)}",
                           body, headers={"Referer": url, "X-Forwarded-Host": host})
    q = f"url={quote(url)}&server={quote(url)}&backend={quote(url)}&redirect={quote(url)}"
    for method, path in (("GET", f"/workflow-info?workflow={quote(url)}&{q}"), ("GET", f"/workflow-list?{q}"),
                         ("GET", f"/execution-info?clientId={cid}&{q}"), ("GET", f"/history?clientId={cid}&{q}"),
                         ("POST", f"/free?{q}"), ("POST", f"/free?clientId={cid}&{q}"), ("GET", f"/backends?{q}"),
                         ("POST", f"/backends/drain?name={quote(url)}"), ("POST", f"/backends/resume?name={host}"),
                         ("POST", f"/interrupt?clientId={cid}&{q}"), ("GET", f"/{url}"), ("GET", f"/ws?clientId={cid}&{q}")):
        await bridge.fetch(method, path, headers={"Host": host, "X-Forwarded-Host": host, "Forwarded": f"host={host}"})
    await bridge.wait_state(cid, {"closed", "error"})
    await asyncio.sleep(0.2)
    assert list(trap.requests_seen) == []
    for seen in bridge.fakes[0].requests_seen:  # the configured one hears only ComfyUI's own API
        assert seen["path"] in COMFY_PATHS or seen["path"].startswith(("/history/", "/object_info/", "/api/jobs/")), seen
        assert host not in seen["uri"], seen


async def test_websocket_origin_allow_list(bridge_factory, fake) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], allowed_origins=("https://app.example",))
    for origin in (None, f"http://127.0.0.1:{bridge.port}", "https://app.example"):
        headers = {"Origin": origin} if origin else {}
        conn = await asyncio.wait_for(websocket.websocket_connect(httpclient.HTTPRequest(
            f"ws://127.0.0.1:{bridge.port}/ws?clientId={new_client_id()}", headers=headers)), TIMEOUT)
        bridge.sockets.append(conn)
        assert json.loads(await conn.read_message())["status"] == "connected", origin
    for origin in ("https://evil.example", "https://app.example.evil.example", "null", "http://127.0.0.1:1"):
        resp = await bridge.fetch("GET", f"/ws?clientId={new_client_id()}", headers={**UPGRADE, "Origin": origin})
        assert resp.code == 403 and "origin" in json.loads(resp.body)["detail"], origin
    assert bridge.services.hub.count == 3


async def test_cors_is_off_by_default(bridge: Bridge) -> None:
    origin = {"Origin": "https://app.example"}
    resp = await bridge.fetch("GET", "/workflow-list", headers=origin)
    assert resp.code == 200 and "Access-Control-Allow-Origin" not in resp.headers
    resp = await bridge.fetch("OPTIONS", "/generate-based-workflow", headers={
        **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert resp.code == 204
    assert not [h for h in resp.headers if h.lower().startswith("access-control-")]


async def test_cors_for_configured_origins(bridge_factory, fake) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], cors_origins=("https://app.example",), api_key="cors-key")
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    resp = await bridge.fetch("OPTIONS", "/generate-based-workflow", headers=preflight)  # no key on a preflight
    assert resp.code == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    allowed = {h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "prefer", "last-event-id"} <= allowed  # one-call submit, streams
    assert resp.headers["Vary"] == "Origin"
    resp = await bridge.fetch("OPTIONS", "/history", headers={**preflight, "Access-Control-Request-Method": "GET"})
    assert resp.headers["Access-Control-Allow-Methods"] == "GET, OPTIONS"
    ok = await bridge.fetch("GET", "/workflow-list", headers={"Origin": "https://app.example",
                                                               "Authorization": "Bearer cors-key"})
    denied = await bridge.fetch("GET", "/workflow-list", headers={"Origin": "https://app.example"})
    assert ok.code == 200 and denied.code == 401
    for resp in (ok, denied):  # errors are readable by the page too
        assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
        exposed = {h.strip() for h in resp.headers["Access-Control-Expose-Headers"].split(",")}
        # a page may read what the one-call submit and ranged output downloads answer with
        assert {"Retry-After", "Location", "Preference-Applied", "X-Job-Id", "ETag", "Content-Range"} <= exposed
    for origin in ("https://evil.example", "https://app.example.evil.example", "null"):
        resp = await bridge.fetch("OPTIONS", "/generate-based-workflow", headers={**preflight, "Origin": origin})
        assert "Access-Control-Allow-Origin" not in resp.headers, origin
        resp = await bridge.fetch("GET", "/workflow-list", headers={"Origin": origin, "Authorization": "Bearer cors-key"})
        assert "Access-Control-Allow-Origin" not in resp.headers, origin
