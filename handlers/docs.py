"""The API reference: /openapi.json, /openapi.yaml, and /docs (plain HTML rendered here, no CDN)."""
from __future__ import annotations

import functools
import html
import json
import re
from pathlib import Path
from typing import Any

import yaml
from tornado import web

from comfy.facade import Api

from .base import BaseHandler, json_error, safe_summary

DOCUMENT = Path(__file__).resolve().parent / "openapi.yaml"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch")
STYLE = """
body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
code,pre{font-family:ui-monospace,monospace;font-size:.9em;background:#f4f4f4;padding:0 .2em}
pre{padding:.5em;overflow-x:auto}
h2{border-bottom:1px solid #ccc;margin-top:2.5rem}
h3{margin-bottom:.2rem}
.method{display:inline-block;min-width:4.5em;font-family:ui-monospace,monospace;color:#fff;
background:#555;padding:0 .4em;border-radius:3px;text-align:center}
.get{background:#2f6f9f}.post{background:#3c8d40}
table{border-collapse:collapse;margin:.4rem 0 1rem;width:100%}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f4f4f4}
.lock{color:#a60}
"""


def load_document(path: Path = DOCUMENT) -> dict[str, Any]:
    """The OpenAPI document kept beside this module."""
    doc: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return doc


def _inline(text: str) -> str:
    """Escaped text with the two bits of Markdown the document uses: `code` and **bold**."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _prose(text: str | None) -> str:
    if not text:
        return ""
    return "".join(f"<p>{_inline(p)}</p>" for p in text.strip().split("\n\n"))


class Renderer:
    """Turns the document into one HTML page: the operations, then the shared schemas."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.components = doc.get("components", {})

    def resolve(self, obj: Any) -> Any:
        """Follow a local $ref (one level is all the document uses)."""
        if isinstance(obj, dict) and isinstance(obj.get("$ref"), str) and obj["$ref"].startswith("#/"):
            node: Any = self.doc
            for part in obj["$ref"][2:].split("/"):
                node = node[part]
            return node
        return obj

    def schema(self, schema: Any) -> str:
        """A short, readable description of a schema, linking named ones."""
        if not isinstance(schema, dict):
            return ""
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            name = ref.rsplit("/", 1)[1]
            return f'<a href="#schema-{html.escape(name)}">{html.escape(name)}</a>'
        if "allOf" in schema:
            return " and ".join(self.schema(s) for s in schema["allOf"])
        if "enum" in schema:
            return " | ".join(f"<code>{html.escape(json.dumps(v))}</code>" for v in schema["enum"])
        if "const" in schema:
            return f"<code>{html.escape(json.dumps(schema['const']))}</code>"
        kind = schema.get("type", "any")
        text = " or ".join(kind) if isinstance(kind, list) else str(kind)
        if kind == "array" and "items" in schema:
            text = f"array of {self.schema(schema['items'])}"
        elif kind == "object" and isinstance(schema.get("additionalProperties"), dict) and not schema.get("properties"):
            text = f"object of {self.schema(schema['additionalProperties'])}"
        elif kind == "object" and schema.get("properties"):
            text = "object {" + ", ".join(html.escape(k) for k in schema["properties"]) + "}"
        text = html.escape(text) if "<" not in text else text
        bits = []
        for key in ("minimum", "maximum", "minLength", "maxLength", "pattern", "default", "format"):
            if key in schema:
                bits.append(f"{key} <code>{html.escape(json.dumps(schema[key]))}</code>")
        return text + (f" ({', '.join(bits)})" if bits else "")

    def operation(self, path: str, method: str, op: dict[str, Any]) -> str:
        anchor = f"op-{op.get('operationId', method + path)}"
        secured = op.get("security", self.doc.get("security")) not in ([], None)
        lock = ' <span class="lock" title="needs the API key when one is set">&#128274; key</span>' if secured else ""
        out = [f'<h3 id="{html.escape(anchor)}"><span class="method {method}">{method.upper()}</span> '
               f"<code>{html.escape(path)}</code>{lock}</h3>",
               f"<p><em>{_inline(op.get('summary', ''))}</em></p>", _prose(op.get("description"))]
        params = [self.resolve(p) for p in op.get("parameters", [])]
        if params:
            out.append("<table><tr><th>parameter</th><th>in</th><th>required</th><th>schema</th>"
                       "<th>description</th></tr>")
            for p in params:
                out.append(f"<tr><td><code>{html.escape(p['name'])}</code></td><td>{html.escape(p['in'])}</td>"
                           f"<td>{'yes' if p.get('required') else 'no'}</td><td>{self.schema(p.get('schema'))}</td>"
                           f"<td>{_inline(p.get('description', ''))}</td></tr>")
            out.append("</table>")
        body = self.resolve(op.get("requestBody"))
        if body:
            for media, content in body.get("content", {}).items():
                out.append(f"<p>Request body <code>{html.escape(media)}</code>: "
                           f"{self.schema(content.get('schema'))}</p>")
                if "example" in content:
                    out.append(f"<pre>{html.escape(json.dumps(content['example'], indent=1))}</pre>")
        out.append("<table><tr><th>status</th><th>meaning</th><th>body</th></tr>")
        for code, resp in op.get("responses", {}).items():
            resp = self.resolve(resp)
            bodies = [f"<code>{html.escape(m)}</code> {self.schema(c.get('schema'))}"
                      for m, c in (resp.get("content") or {}).items()]
            headers = [f"header <code>{html.escape(h)}</code>" for h in (resp.get("headers") or {})]
            out.append(f"<tr><td>{html.escape(str(code))}</td><td>{_inline(resp.get('description', ''))}</td>"
                       f"<td>{'<br>'.join(bodies + headers)}</td></tr>")
        out.append("</table>")
        return "\n".join(out)

    def schemas(self) -> str:
        out = ["<h2 id=\"schemas\">Schemas</h2>"]
        for name, schema in self.components.get("schemas", {}).items():
            out.append(f'<h3 id="schema-{html.escape(name)}">{html.escape(name)}</h3>')
            out.append(_prose(schema.get("description")))
            props = schema.get("properties") or {}
            if not props:
                out.append(f"<p>{self.schema(schema)}</p>")
                continue
            required = set(schema.get("required", []))
            out.append("<table><tr><th>key</th><th>required</th><th>schema</th><th>description</th></tr>")
            for key, sub in props.items():
                out.append(f"<tr><td><code>{html.escape(key)}</code></td><td>{'yes' if key in required else 'no'}"
                           f"</td><td>{self.schema(sub)}</td><td>{_inline(sub.get('description', ''))}</td></tr>")
            out.append("</table>")
            if isinstance(schema.get("additionalProperties"), dict):
                out.append(f"<p>Other keys: {self.schema(schema['additionalProperties'])}</p>")
        return "\n".join(out)

    def page(self) -> str:
        """The whole reference page."""
        info = self.doc.get("info", {})
        ops = [(path, m, item[m]) for path, item in self.doc.get("paths", {}).items() for m in METHODS if m in item]
        by_tag: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
        for path, method, op in ops:
            by_tag.setdefault((op.get("tags") or ["other"])[0], []).append((path, method, op))
        toc = ["<ul>"]
        for tag, items in by_tag.items():
            links = ", ".join(f'<a href="#op-{html.escape(op.get("operationId", ""))}">{m.upper()} '
                              f"{html.escape(p)}</a>" for p, m, op in items)
            toc.append(f"<li><strong>{html.escape(tag)}</strong>: {links}</li>")
        toc.append('<li><a href="#schemas">Schemas</a> &middot; <a href="/openapi.json">openapi.json</a>'
                   ' &middot; <a href="/openapi.yaml">openapi.yaml</a></li></ul>')
        sections = []
        tags = {t["name"]: t.get("description", "") for t in self.doc.get("tags", [])}
        for tag, items in by_tag.items():
            sections.append(f"<h2>{html.escape(tag)}</h2><p>{_inline(tags.get(tag, ''))}</p>")
            sections += [self.operation(p, m, op) for p, m, op in items]
        title = html.escape(f"{info.get('title', 'API')} {info.get('version', '')}".strip())
        return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
                f"<title>{title} API reference</title><style>{STYLE}</style></head><body>\n"
                f"<h1>{title}</h1><p><em>{_inline(info.get('summary', ''))}</em></p>"
                f"{_prose(info.get('description'))}\n{''.join(toc)}\n" + "\n".join(sections)
                + "\n" + self.schemas() + "\n</body></html>\n")


class DocumentHandler(BaseHandler):
    """GET /openapi.json, /openapi.yaml and /docs: one pre-rendered body each."""

    def initialize(self, services: Api, body: bytes, content_type: str) -> None:  # type: ignore[override]
        """Receive the services and the answer, rendered once at start."""
        super().initialize(services)
        self.body = body
        self.content_type = content_type

    def get(self) -> None:
        """The document (or page)."""
        self.set_header("Content-Type", self.content_type)
        self.finish(self.body)


class StaticHandler(web.StaticFileHandler):
    """The demo page's files, with nosniff and {"detail": ...} errors like every other answer."""

    def set_default_headers(self) -> None:
        self.set_header("X-Content-Type-Options", "nosniff")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """404 and friends as JSON."""
        json_error(self, status_code, kwargs)

    def _request_summary(self) -> str:
        return safe_summary(self)


@functools.cache
def _bodies() -> tuple[bytes, bytes, bytes]:
    """The document as JSON, as YAML and as the page: built once per process (parsing it takes ~0.1 s)."""
    doc = load_document()
    return json.dumps(doc, indent=1).encode(), DOCUMENT.read_bytes(), Renderer(doc).page().encode("utf-8")


def routes(services: Api) -> list[tuple[str, type, dict[str, Any]]]:
    """URL table of this module."""
    as_json, as_yaml, page = _bodies()
    return [
        (r"/openapi.json", DocumentHandler, {"services": services, "body": as_json,
                                             "content_type": "application/json; charset=utf-8"}),
        (r"/openapi.yaml", DocumentHandler, {"services": services, "body": as_yaml,
                                             "content_type": "application/yaml; charset=utf-8"}),
        (r"/docs", DocumentHandler, {"services": services, "body": page,
                                     "content_type": "text/html; charset=utf-8"}),
    ]
