"""What ComfyUI says, as typed values: version and capabilities, job status, prompt errors, outcomes, outputs."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Iterator

log = logging.getLogger(__name__)

# keys of a node's output that hold file entries ({filename, subfolder, type} plus whatever a release adds)
FILE_KEYS = ("images", "gifs", "video", "videos", "audio", "files", "3d")
FINISHED = ("completed", "failed", "cancelled")
# messages the bridge never uses, recognised without parsing them (ComfyUI writes "type" first)
IGNORED_PREFIXES = ('{"type": "progress_state"', '{"type":"progress_state"', '{"type": "status"', '{"type":"status"')
# 0.3.64 names a missing class only inside this sentence
_NO_SUCH_NODE = re.compile(r"Cannot execute because node (.+) does not exist\.")


@dataclass(frozen=True)
class Capabilities:
    """What one ComfyUI server offers, learnt when the bridge connects to it."""

    version: str | None = None  # system.comfyui_version, e.g. "0.3.64" or "0.38.1"
    os: str | None = None  # "posix" (0.3.x) or sys.platform ("linux", "win32", "darwin") on newer releases
    jobs_api: bool = False  # GET /api/jobs/{id}: a definite status, 404 for a prompt the server does not know
    job_cancel: bool = False  # POST /api/jobs/{id}/cancel: stops that prompt whether pending or running

    def describe(self) -> dict[str, Any]:
        """The view /backends shows."""
        return {"comfyui_version": self.version, "os": self.os, "jobs_api": self.jobs_api,
                "job_cancel": self.job_cancel,
                "status_from": "/api/jobs/{id}" if self.jobs_api else "/history/{id}",
                "cancel_with": "/api/jobs/{id}/cancel" if self.job_cancel else "/queue delete + /interrupt"}


def system_info(body: Any) -> tuple[str | None, str | None]:
    """(comfyui_version, os) from a /system_stats answer; None for what it does not say."""
    system = body.get("system") if isinstance(body, dict) else None
    if not isinstance(system, dict):
        return None, None
    version, os_name = system.get("comfyui_version"), system.get("os")
    return (str(version) if version is not None else None, str(os_name) if os_name is not None else None)


@dataclass(frozen=True)
class JobStatus:
    """One prompt as the server sees it: "pending", "in_progress", a finished state, or "unknown"."""

    state: str
    entry: dict[str, Any] | None = None  # history-shaped {"outputs", "status"} once finished

    @property
    def finished(self) -> bool:
        """True once the server has written the prompt's outcome."""
        return self.state in FINISHED

    @property
    def known(self) -> bool:
        """False when the server has never heard of the prompt (or forgot it in a restart)."""
        return self.state != "unknown"


def job_status(code: int, body: Any) -> JobStatus | None:
    """The answer of GET /api/jobs/{id} as a JobStatus; None when the answer is not one of the jobs API."""
    if code == 404:
        return JobStatus("unknown")
    if code != 200 or not isinstance(body, dict) or not isinstance(body.get("status"), str):
        return None
    state = body["status"]
    if state not in FINISHED:
        return JobStatus(state)
    status = body.get("execution_status")
    if not isinstance(status, dict):  # not sent by every release: rebuild what history would say
        messages: list[list[Any]] = []
        if state == "failed":
            messages.append(["execution_error", body.get("execution_error") or {}])
        elif state == "cancelled":
            messages.append(["execution_interrupted", {}])
        status = {"status_str": "success" if state == "completed" else "error",
                  "completed": state == "completed", "messages": messages}
    outputs = body.get("outputs")
    return JobStatus(state, {"outputs": outputs if isinstance(outputs, dict) else {}, "status": status})


def history_status(entry: dict[str, Any] | None) -> JobStatus:
    """A /history/{id} entry as a JobStatus: finished, or "not_finished" (pending, running or unknown alike)."""
    if entry is None or (entry.get("status") or {}).get("completed") is None:
        return JobStatus("not_finished")
    return JobStatus("completed" if outcome(entry)[0] == "success" else "failed", entry)


def outcome(entry: dict[str, Any]) -> tuple[str, str]:
    """("error" | "interrupted" | "success", message) from a history entry's status."""
    status = entry.get("status") or {}
    if status.get("status_str") == "success":
        return "success", ""
    for kind, data in reversed(status.get("messages") or []):
        if kind == "execution_interrupted":
            return "interrupted", "interrupted"
        if kind == "execution_error" and isinstance(data, dict):
            msg = str(data.get("exception_message") or "execution error").strip()
            return "error", f"{data.get('node_type', 'node')} failed: {msg.splitlines()[0] if msg else msg}"
    return "error", "the backend reported an error"


def file_entries(node_out: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The file entries of one node's outputs; extra keys (id, preview_id, metadata, ...) are left alone."""
    for key in FILE_KEYS:
        items = node_out.get(key)
        for item in items if isinstance(items, list) else ():
            if isinstance(item, dict) and item.get("filename"):
                yield item


@dataclass(frozen=True)
class OutputItem:
    """One output of a finished prompt: a file entry to download through /view, or a text a node returned."""

    node_id: str
    file: dict[str, Any] | None = None  # {filename, subfolder, type, ...}
    text: str | None = None
    index: int = 0  # the text's place among its node's texts


def output_items(entry: dict[str, Any]) -> Iterator[OutputItem]:
    """Every file and text output of a history entry, node by node."""
    for node_id, node_out in (entry.get("outputs") or {}).items():
        if not isinstance(node_out, dict):
            continue
        for item in file_entries(node_out):
            yield OutputItem(str(node_id), file=item)
        for i, text in enumerate(node_out.get("text") or []):
            yield OutputItem(str(node_id), text=str(text), index=i)


def describe_prompt_error(body: Any) -> str:
    """One readable line from ComfyUI's /prompt error answer (its useful part is often in node_errors)."""
    if not isinstance(body, dict):
        return ""
    parts = []
    err = body.get("error")
    if isinstance(err, dict):
        parts.append(_top_error(err))
    elif isinstance(err, str):  # the jobs API and some proxies answer {"error": "text"}
        parts.append(err)
    node_errors = body.get("node_errors")
    for node_id, node in (node_errors.items() if isinstance(node_errors, dict) else ()):
        node = node if isinstance(node, dict) else {}
        for e in node.get("errors") or []:
            if not isinstance(e, dict):
                continue
            text = str(e.get("message") or e.get("type") or "error")
            parts.append(f"node {node_id} ({node.get('class_type', '?')}): {text}"
                         + (f": {e['details']}" if e.get("details") else ""))
    return "; ".join(p for p in parts if p) or "prompt rejected"


def _top_error(err: dict[str, Any]) -> str:
    kind = err.get("type")
    raw_extra = err.get("extra_info")
    extra: dict[str, Any] = raw_extra if isinstance(raw_extra, dict) else {}
    message = str(err.get("message") or "").strip()
    details = str(err.get("details") or "").strip()
    if kind == "missing_node_type":  # 0.12 and later
        node_id = extra.get("node_id") or details.replace("Node ID '#", "").rstrip("'") or "?"
        if extra.get("class_type") is None:
            return f"node {node_id} has no class_type (the workflow file is damaged)"
        title = extra.get("node_title")
        named = f" ({title!r})" if title and title != extra["class_type"] else ""
        return f"node {node_id}{named}: node class {extra['class_type']} is not installed on this backend"
    missing = _NO_SUCH_NODE.fullmatch(message)
    if kind == "invalid_prompt" and missing:  # 0.3.64's form of the same error
        node_id = details.replace("Node ID '#", "").rstrip("'") or "?"
        return f"node {node_id}: node class {missing.group(1)} is not installed on this backend"
    text = message or str(kind or "")
    return f"{text}: {details}" if details and details != text else text


@dataclass(frozen=True)
class Message:
    """One WebSocket message of ComfyUI about a prompt: its type ("executing", "progress", ...) and data."""

    kind: str
    prompt_id: str
    data: dict[str, Any]

    @property
    def ends_prompt(self) -> bool:
        """True for the end signal of a prompt: "executing" with no node."""
        return self.kind == "executing" and self.data.get("node") is None


def parse_message(text: str) -> Message | None:
    """A text frame as a Message about one prompt; None for messages about no prompt, or not understood."""
    if text.startswith(IGNORED_PREFIXES):
        return None  # ComfyUI repeats its whole per-node state map on every tick; nothing here needs it
    try:
        msg = json.loads(text)
        data = msg["data"]
        prompt_id = data.get("prompt_id")
        kind = msg["type"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(prompt_id, str) or not isinstance(kind, str):
        return None
    return Message(kind, prompt_id, data)


def queued_prompt_ids(body: Any) -> set[str]:
    """The prompt ids GET /queue names as running or pending."""
    body = body if isinstance(body, dict) else {}
    return {item[1] for key in ("queue_running", "queue_pending") for item in body.get(key) or []
            if isinstance(item, list) and len(item) > 1}


def partly_refused(body: Any) -> bool:
    """True for a 200 answer of POST /prompt that names node errors: only the valid outputs were queued."""
    return isinstance(body, dict) and bool(body.get("node_errors"))


class Progress:
    """Overall progress of one prompt: nodes done plus the current node's fraction, never going back."""

    def __init__(self, graph: dict[str, Any]) -> None:
        self.total = max(1, len(graph))
        self.done: set[str] = set()
        self.current: str | None = None
        self.fraction = 0.0
        self.value = 0.0

    def feed(self, kind: str, data: dict[str, Any]) -> bool:
        """Take one WebSocket message; True when the overall value moved."""
        if kind == "execution_cached":
            self.done.update(str(n) for n in data.get("nodes") or [])
        elif kind == "executing" and data.get("node") is not None:
            if self.current is not None:
                self.done.add(self.current)
            self.current, self.fraction = str(data["node"]), 0.0
        elif kind == "progress":
            node = str(data.get("node")) if data.get("node") is not None else self.current
            if node != self.current:
                if self.current is not None:
                    self.done.add(self.current)
                self.current = node
            try:
                self.fraction = max(0.0, min(1.0, float(data["value"]) / float(data["max"])))
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                return False
        elif kind == "executed" and data.get("node") is not None:
            self.done.add(str(data["node"]))
        else:
            return False
        partial = self.fraction if self.current is not None and self.current not in self.done else 0.0
        value = min(0.99, (len(self.done) + partial) / self.total)
        if value > self.value:
            self.value = value
            return True
        return False
