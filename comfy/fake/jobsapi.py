"""The jobs API of current ComfyUI (GET /api/jobs[/{id}], the atomic cancel endpoints), for the `current` profile."""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from .base import BaseHandler
from .profile import is_canonical_uuid

if TYPE_CHECKING:
    from .executor import Instance
    from .server import FakeComfy

log = logging.getLogger(__name__)

STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")
FILE_KEYS = ("images", "gifs", "video", "videos", "audio", "files", "3d")


def _timestamp(messages: list[Any], kinds: tuple[str, ...]) -> int | None:
    for kind, data in messages:
        if kind in kinds and isinstance(data, dict) and "timestamp" in data:
            return int(data["timestamp"])
    return None


def _queued_job(item: list[Any], status: str) -> dict[str, Any]:
    """A pending or running queue item as a job (null values are left out, as ComfyUI does)."""
    number, prompt_id, prompt, extra_data = item[0], item[1], item[2], item[3]
    job: dict[str, Any] = {"id": prompt_id, "status": status, "priority": number,
                           "create_time": extra_data.get("create_time"), "outputs_count": 0,
                           "previewable_outputs_count": 0,
                           "workflow": {"prompt": prompt, "extra_data": extra_data}}
    return {k: v for k, v in job.items() if v is not None}


def _history_job(prompt_id: str, entry: dict[str, Any], full: bool) -> dict[str, Any]:
    """normalize_history_item: status from status_str and messages, times, counts, the error payload."""
    number, _, prompt, extra_data = entry["prompt"][:4]
    status = entry.get("status") or {}
    messages = status.get("messages") or []
    if status.get("status_str") == "success":
        state = "completed"
    elif any(kind == "execution_interrupted" for kind, _ in messages):
        state = "cancelled"
    else:
        state = "failed"
    files = [dict(item, nodeId=nid, mediaType=key) for nid, out in (entry.get("outputs") or {}).items()
             for key in FILE_KEYS for item in (out.get(key) or []) if isinstance(item, dict)]
    error = next((data for kind, data in messages if kind == "execution_error"), None)
    job: dict[str, Any] = {
        "id": prompt_id, "status": state, "priority": number, "create_time": extra_data.get("create_time"),
        "execution_start_time": _timestamp(messages, ("execution_start",)),
        "execution_end_time": _timestamp(messages, ("execution_success", "execution_error",
                                                    "execution_interrupted")),
        "execution_error": error, "outputs_count": len(files), "previewable_outputs_count": len(files),
        "preview_output": files[0] if files else None}
    if full:
        job.update(outputs=entry.get("outputs") or {}, execution_status=status,
                   workflow={"prompt": prompt, "extra_data": extra_data})
    return {k: v for k, v in job.items() if v is not None}


def find_job(inst: Instance, prompt_id: str) -> dict[str, Any] | None:
    """get_job: history first, then running, then pending."""
    entry = inst.history.get(prompt_id)
    if entry is not None:
        return _history_job(prompt_id, entry, full=True)
    for item in inst.running.values():
        if item[1] == prompt_id:
            return _queued_job(item, "in_progress")
    for _, _, item in inst.queue:
        if item[1] == prompt_id:
            return _queued_job(item, "pending")
    return None


def cancel(inst: Instance, prompt_id: str) -> bool:
    """cancel_job: interrupt it if it is still the running prompt, remove it if pending; else False."""
    if prompt_id in inst.running_ids():
        inst.interrupt(prompt_id)  # checked and set in one step: no other prompt can start in between
        return True
    return inst.delete_pending(prompt_id)


class JobsHandler(BaseHandler):
    """GET /api/jobs: every job, filtered, sorted and paged."""

    def get(self) -> None:
        """status, sort_by, sort_order, limit, offset; a bad value is 400 {"error": text}."""
        inst = self.inst
        wanted = [s for s in self.get_query_argument("status", "").split(",") if s]
        bad = [s for s in wanted if s not in STATUSES]
        if bad:
            return self.reply({"error": f"Invalid status value(s): {', '.join(bad)}"}, 400)
        sort_by = self.get_query_argument("sort_by", "created_at")
        order = self.get_query_argument("sort_order", "desc")
        if sort_by not in ("created_at", "execution_duration") or order not in ("asc", "desc"):
            return self.reply({"error": "sort_by must be created_at or execution_duration, "
                                        "sort_order asc or desc"}, 400)
        try:
            limit = int(self.get_query_argument("limit")) if self.get_query_argument("limit", None) else None
            offset = max(0, int(self.get_query_argument("offset", "0")))
        except ValueError:
            return self.reply({"error": "limit and offset must be integers"}, 400)
        if limit is not None and limit <= 0:
            return self.reply({"error": "limit must be a positive integer"}, 400)
        jobs = [_history_job(pid, e, full=False) for pid, e in inst.history.items()]
        jobs += [_queued_job(item, "in_progress") for item in inst.running.values()]
        jobs += [_queued_job(item, "pending") for _, _, item in inst.queue]
        for job in jobs:
            job.pop("workflow", None)
        if wanted:
            jobs = [j for j in jobs if j["status"] in wanted]
        jobs.sort(key=lambda j: (j.get("create_time") or 0, j.get("priority") or 0), reverse=order == "desc")
        total = len(jobs)
        page = jobs[offset:offset + limit] if limit is not None else jobs[offset:]
        self.reply({"jobs": page, "pagination": {"offset": offset, "limit": limit, "total": total,
                                                 "has_more": offset + len(page) < total}})


class JobHandler(BaseHandler):
    """GET /api/jobs/{id}."""

    def get(self, prompt_id: str) -> None:
        """The job with its outputs and status once finished; 404 when the server does not know it."""
        job = find_job(self.inst, prompt_id)
        if job is None:
            return self.reply({"error": "Job not found"}, 404)
        self.reply(job)


class JobCancelHandler(BaseHandler):
    """POST /api/jobs/{id}/cancel (no body; the id is not format-checked)."""

    def post(self, prompt_id: str) -> None:
        """{"cancelled": bool}: true only if this prompt was running or pending."""
        done = cancel(self.inst, prompt_id)
        self.fake.job_cancels.append({"prompt_id": prompt_id, "cancelled": done})
        self.reply({"cancelled": done})


class JobsCancelHandler(BaseHandler):
    """POST /api/jobs/cancel with {"job_ids": [...]}."""

    def post(self) -> None:
        """All ids must be canonical UUIDs (else 400 and nothing happens); true if any was acted on."""
        try:
            body = json.loads(self.request.body)
        except ValueError:
            return self.reply({"error": "Request body must be valid JSON"}, 400)
        ids = body.get("job_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list):
            return self.reply({"error": "job_ids must be a list"}, 400)
        invalid = [i for i in ids if not is_canonical_uuid(i)]
        if invalid:
            return self.reply({"error": "job_ids contains invalid id(s)", "invalid_ids": invalid}, 400)
        results = [cancel(self.inst, i) for i in ids]
        for prompt_id, done in zip(ids, results):
            self.fake.job_cancels.append({"prompt_id": prompt_id, "cancelled": done})
        self.reply({"cancelled": any(results)})


def routes(fake: FakeComfy) -> list[tuple[str, type, dict[str, Any]]]:
    """The jobs routes: only under /api (ComfyUI declares them with the prefix); none (404) on 0.3.64."""
    if not fake.profile.jobs_api:
        return []
    kw = {"fake": fake}
    return [(r"/api/jobs", JobsHandler, kw), (r"/api/jobs/cancel", JobsCancelHandler, kw),
            (r"/api/jobs/([^/]+)", JobHandler, kw), (r"/api/jobs/([^/]+)/cancel", JobCancelHandler, kw)]
