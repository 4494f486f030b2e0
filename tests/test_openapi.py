"""The OpenAPI document covers exactly the app's routes and methods; /openapi.* and /docs serve it."""
from __future__ import annotations

import json
import re
from typing import Any

import schemathesis
import yaml
from tornado import web

from bridge import HERE, make_app
from conftest import Bridge
from handlers.base import allowed_methods
from handlers.docs import DOCUMENT, load_document

HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


def app_routes(app: web.Application) -> dict[str, type]:
    """OpenAPI path -> handler class, for every rule make_app() registered."""
    out = {}
    for rule in app.wildcard_router.rules:
        pattern = rule.matcher.regex.pattern.rstrip("$")
        path = re.sub(r"\(\?P<(\w+)>\[\^/\]\+\)", r"{\1}", pattern)  # (?P<job_id>[^/]+) -> {job_id}
        path = path.replace("()", "").replace("(.*)", "{path}") or "/"
        assert not re.search(r"[()\[\]*+?\\]", path), f"a route the test cannot name: {pattern}"
        out[path] = rule.target
    return out


def test_every_route_is_documented_and_every_documented_path_is_a_route(bridge: Bridge) -> None:
    routes = app_routes(make_app(bridge.config, bridge.services))
    documented = set(load_document()["paths"])
    static = {"/", "/static/{path}"}
    if not (HERE / "static" / "index.html").exists():  # make_app serves the demo page only when it is there
        documented -= static
    assert set(routes) == documented
    assert {"/workflow-list", "/upload", "/generate-based-workflow", "/history", "/ws", "/docs",
            "/openapi.json", "/backends/drain"} <= set(routes)


def test_documented_methods_are_the_implemented_ones(bridge: Bridge) -> None:
    doc = load_document()
    for path, handler in app_routes(make_app(bridge.config, bridge.services)).items():
        implemented = {m.lower() for m in allowed_methods(handler)} - {"options", "head"}
        declared = {m for m in doc["paths"][path] if m in HTTP_METHODS}
        assert declared == implemented, path


def test_document_is_valid_openapi_3_1() -> None:
    doc = load_document()
    assert doc["openapi"].startswith("3.1")
    schema = schemathesis.openapi.from_dict(doc)
    operations = [op.ok() for op in schema.get_all_operations()]  # raises on an invalid operation
    assert len(operations) == sum(1 for item in doc["paths"].values() for m in item if m in HTTP_METHODS)
    ids = [op["operationId"] for item in doc["paths"].values() for m, op in item.items() if m in HTTP_METHODS]
    assert len(ids) == len(set(ids))


def test_every_error_answer_is_documented_as_the_detail_shape() -> None:
    doc = load_document()

    def resolve(obj: Any) -> Any:
        while isinstance(obj, dict) and "$ref" in obj:
            node: Any = doc
            for part in obj["$ref"][2:].split("/"):
                node = node[part]
            obj = node
        return obj
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            for code, resp in op["responses"].items():
                resp = resolve(resp)
                if int(code) >= 400:
                    schema = resolve(resp["content"]["application/json"]["schema"])
                    assert "detail" in json.dumps(schema) or "Error" in json.dumps(schema), (path, code)


async def test_openapi_json_and_yaml_serve_the_document(bridge: Bridge) -> None:
    as_json = await bridge.get_json("/openapi.json")
    assert as_json == load_document()
    resp = await bridge.fetch("GET", "/openapi.yaml")
    assert resp.code == 200 and resp.headers["Content-Type"].startswith("application/yaml")
    assert yaml.safe_load(resp.body) == as_json
    assert resp.body == DOCUMENT.read_bytes()


async def test_docs_page_is_rendered_by_the_bridge(bridge: Bridge) -> None:
    resp = await bridge.fetch("GET", "/docs")
    assert resp.code == 200 and resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    page = resp.body.decode()
    assert page.startswith("<!doctype html>")
    for path in load_document()["paths"]:
        assert f"<code>{path}</code>" in page
    for name in load_document()["components"]["schemas"]:
        assert f'id="schema-{name}"' in page
    # nothing fetched from elsewhere: no scripts, no external styles, fonts or images
    assert "<script" not in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "clientId" in page and "Retry-After" in page
