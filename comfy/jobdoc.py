"""The job document: one job as GET /jobs/{id}, a waiting submit and a webhook's `data` show it."""
from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

from .identity import unscoped
from .jobs import Job, Output, State
from .outputs import META_KEYS, TEXT_INLINE, kind


def iso(ts: float | None) -> str | None:
    """A timestamp as the API writes it (UTC, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else None


def output_kind(output: Output) -> str:
    """What an output is for a caller: image, video, audio, 3d, text or file."""
    return kind(output.content_type, output.filename)


def output_document(job: Job, index: int, output: Output, url_query: str = "") -> dict[str, Any]:
    """One output as callers see it: name, type, size, content type, its URL and what is known of it."""
    doc: dict[str, Any] = {"index": index, "node_id": output.node_id, "name": output.filename,
                           "type": output_kind(output), "content_type": output.content_type, "size": output.size,
                           "url": f"/jobs/{job.id}/outputs/{index}{url_query}"}
    doc.update({key: output.meta[key] for key in META_KEYS if output.meta.get(key) is not None})
    text = output.meta.get("text")
    if isinstance(text, str) and len(text.encode("utf-8")) <= TEXT_INLINE:
        doc["text"] = text
    return doc


def open_mode_query(client_id: str | None) -> str:
    """The `?clientId=` an output URL needs without keys (the id is what proves ownership then)."""
    return f"?clientId={quote(client_id)}" if client_id else ""


def job_document(job: Job, position: int | None = None, url_query: str = "") -> dict[str, Any]:
    """The job as one JSON document. `position`: its place in the line while it waits; `url_query`: added to
    every URL (open mode's ?clientId=)."""
    status, details = job.client_status()
    doc: dict[str, Any] = {
        "id": job.id, "client_id": unscoped(job.client_id), "workflow": job.workflow, "state": job.state.value,
        "status": status, "details": details, "inputs": job.inputs,
    }
    if job.state is State.QUEUED and position is not None:
        doc["queue_position"] = position
    doc.update({"progress": round(job.progress, 4), "attempts": job.attempts, "created_at": iso(job.created_at),
                "started_at": iso(job.started_at), "finished_at": iso(job.finished_at)})
    if job.error and job.state in (State.FAILED, State.CANCELLED):
        doc["error"] = job.error
    if job.state is State.COMPLETED:
        doc["results"] = "expired" if job.expired else "taken" if job.fetched else "stored"
    doc["outputs"] = [output_document(job, i, o, url_query) for i, o in enumerate(job.outputs)]
    doc["links"] = {"self": f"/jobs/{job.id}{url_query}", "events": f"/jobs/{job.id}/events{url_query}"}
    return doc
