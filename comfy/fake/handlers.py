"""API routes of the fake (prompt, queue, interrupt, history, free, object_info, ...) and its URL table."""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from typing import TYPE_CHECKING, Any

from tornado.web import HTTPError

from . import jobsapi
from .base import BaseHandler, IndexHandler
from .files import UploadHandler, ViewHandler
from .nodes import NodeDef, object_info
from .ops import annotated_path
from .profile import invalid_prompt_id, is_canonical_uuid, object_info_keys
from .validate import validate_prompt
from .ws import ComfyWebSocket

if TYPE_CHECKING:
    from .server import FakeComfy

log = logging.getLogger(__name__)

SENSITIVE_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


class PromptHandler(BaseHandler):
    """GET/POST /prompt."""

    def get(self) -> None:
        """Queue size."""
        self.reply(self.inst.queue_info())

    def post(self) -> None:
        """post_prompt: number, validation, queueing."""
        fake, inst = self.fake, self.inst
        body = self.json_body()
        if not isinstance(body, dict):
            body = {}
        if "number" in body:
            number: Any = float(body["number"])
        else:
            number = inst.number
            if body.get("front"):
                number = -number
            inst.number += 1
        if "prompt" not in body:
            error = {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided",
                     "extra_info": {}}
            return self.reply({"error": error, "node_errors": {}}, 400)
        prompt = body["prompt"]
        if fake.profile.uuid_prompt_ids:
            # current ComfyUI mints an id for a missing or null one and refuses anything not canonical
            if body.get("prompt_id") is None:
                body["prompt_id"] = str(uuid.uuid4())
            elif not is_canonical_uuid(body["prompt_id"]):
                return self.reply(invalid_prompt_id(), 400)
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        if fake.reject:
            return self.reply(_rejection(prompt, fake.registry), 400)
        verdict = validate_prompt(fake.registry, prompt, self._image_exists, body.get("partial_execution_targets"),
                                  current=fake.profile.missing_node_type)
        extra_data = body["extra_data"] if "extra_data" in body else {}
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if fake.profile.create_time:
            extra_data["create_time"] = int(time.time() * 1000)
        if not verdict.ok:
            log.info("invalid prompt: %s", verdict.error)
            return self.reply({"error": verdict.error, "node_errors": verdict.node_errors}, 400)
        for key in SENSITIVE_KEYS:
            extra_data.pop(key, None)
        fake.prompts[prompt_id] = {"prompt": prompt, "client_id": extra_data.get("client_id"), "state": "pending",
                                   "number": number}
        inst.put([number, prompt_id, prompt, extra_data, verdict.outputs])
        self.reply({"prompt_id": prompt_id, "number": number, "node_errors": verdict.node_errors})

    def _image_exists(self, name: str) -> bool:
        """folder_paths.exists_annotated_filepath."""
        return os.path.exists(annotated_path(name, self.fake.dirs))


def _rejection(prompt: Any, registry: dict[str, NodeDef]) -> dict[str, Any]:
    """What the `reject` switch answers: prompt_outputs_failed_validation charged to the first output node."""
    node_id, class_type = "1", "SaveImage"
    if isinstance(prompt, dict) and prompt:
        nodes = [(k, v) for k, v in prompt.items() if isinstance(v, dict)]
        outputs = [(k, v) for k, v in nodes if isinstance(v.get("class_type"), str)
                   and getattr(registry.get(v["class_type"]), "output_node", False)]
        if outputs or nodes:
            node_id, node = (outputs or nodes)[0]
            class_type = node.get("class_type", "")
    reason = {"type": "custom_validation_failed", "message": "Custom validation failed for node",
              "details": "FakeComfy.reject is on", "extra_info": {"input_name": "images"}}
    return {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                      "details": "Custom validation failed for node: FakeComfy.reject is on", "extra_info": {}},
            "node_errors": {node_id: {"errors": [reason], "dependent_outputs": [node_id], "class_type": class_type}}}


class QueueHandler(BaseHandler):
    """GET/POST /queue."""

    def get(self) -> None:
        """Running and pending items."""
        self.reply(self.inst.get_queue())

    def post(self) -> None:
        """Delete pending items or clear the pending queue."""
        fake, inst = self.fake, self.inst
        body = self.json_body()
        if "clear" in body and body["clear"]:
            for prompt_id in inst.wipe_queue():
                fake._mark(prompt_id, "deleted")
        if "delete" in body:
            for prompt_id in body["delete"]:
                fake.queue_deletes.append(prompt_id)
                if inst.delete_pending(prompt_id):
                    fake._mark(prompt_id, "deleted")
        self.empty()


class InterruptHandler(BaseHandler):
    """POST /interrupt: tolerant of any body."""

    def post(self) -> None:
        """Global, or targeted at the running prompt only."""
        try:
            body = json.loads(self.request.body)
        except ValueError:
            body = {}
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        hit = self.inst.interrupt(prompt_id)
        self.fake.interrupts.append({"prompt_id": prompt_id or None, "hit": hit})
        self.empty()


class HistoryHandler(BaseHandler):
    """GET/POST /history and GET /history/{id}."""

    def get(self, prompt_id: str | None = None) -> None:
        """One entry ({} unless finished) or a max_items/offset slice."""
        if prompt_id is not None:
            return self.reply(self.inst.get_history(prompt_id))
        try:
            max_items = self.get_query_argument("max_items", None)
            offset = self.get_query_argument("offset", None)
            self.reply(self.inst.get_history(
                max_items=int(max_items) if max_items is not None else None,
                offset=int(offset) if offset is not None else -1))
        except ValueError:
            raise HTTPError(500, "bad max_items/offset") from None

    def post(self, prompt_id: str | None = None) -> None:
        """Delete entries or clear history."""
        if prompt_id is not None:
            raise HTTPError(405)
        inst = self.inst
        body = self.json_body()
        if "clear" in body and body["clear"]:
            inst.history.clear()
        if "delete" in body:
            for key in body["delete"]:
                inst.history.pop(key, None)
        self.empty()


class FreeHandler(BaseHandler):
    """POST /free."""

    def post(self) -> None:
        """Remember the flags for the worker; reply at once."""
        body = self.json_body()
        self.fake.frees.append(body)
        for flag in ("unload_models", "free_memory"):
            if body.get(flag, False):
                self.inst.flags[flag] = body[flag]
        self.empty()


class ObjectInfoHandler(BaseHandler):
    """GET /object_info[/{class}]."""

    def get(self, name: str | None = None) -> None:
        """Node specs; an unknown class is 200 {}."""
        info = object_info(self.fake.registry, self.fake.input_files(), name)
        self.reply(object_info_keys(info) if self.fake.profile.name == "current" else info)


class SystemStatsHandler(BaseHandler):
    """GET /system_stats."""

    def get(self) -> None:
        """A small plausible CPU-only machine."""
        self.reply(self.fake.system_stats())


class StaticJSONHandler(BaseHandler):
    """Routes that return a fixed JSON value (features, embeddings, extensions, models)."""

    def initialize(self, fake: FakeComfy, value: Any = None) -> None:
        """Receive the value to serve."""
        super().initialize(fake)
        self.value = value

    def get(self, folder: str | None = None) -> None:
        """Serve the value; /models/{folder} looks the folder up."""
        if folder is None:
            return self.reply(self.value)
        if folder not in self.value:
            raise HTTPError(404)
        self.reply(self.value[folder])


def routes(fake: FakeComfy) -> list[tuple[str, type, dict[str, Any]]]:
    """URL table; every route also answers under /api."""
    kw = {"fake": fake}
    models = {"checkpoints": list(fake.checkpoints()), "loras": [], "vae": [], "embeddings": [],
              "upscale_models": []}
    table: list[tuple[str, type, dict[str, Any]]] = [
        (r"/", IndexHandler, kw),
        (r"(?:/api)?/prompt", PromptHandler, kw),
        (r"(?:/api)?/queue", QueueHandler, kw),
        (r"(?:/api)?/interrupt", InterruptHandler, kw),
        (r"(?:/api)?/history", HistoryHandler, kw),
        (r"(?:/api)?/history/([^/]+)", HistoryHandler, kw),
        (r"(?:/api)?/view", ViewHandler, kw),
        (r"(?:/api)?/upload/image", UploadHandler, kw),
        (r"(?:/api)?/free", FreeHandler, kw),
        (r"(?:/api)?/object_info", ObjectInfoHandler, kw),
        (r"(?:/api)?/object_info/([^/]+)", ObjectInfoHandler, kw),
        (r"(?:/api)?/system_stats", SystemStatsHandler, kw),
        (r"(?:/api)?/features", StaticJSONHandler, {**kw, "value": fake.profile.features()}),
        (r"(?:/api)?/embeddings", StaticJSONHandler, {**kw, "value": []}),
        (r"(?:/api)?/extensions", StaticJSONHandler, {**kw, "value": []}),
        (r"(?:/api)?/models", StaticJSONHandler, {**kw, "value": list(models)}),
        (r"(?:/api)?/models/([^/]+)", StaticJSONHandler, {**kw, "value": models}),
        (r"(?:/api)?/ws", ComfyWebSocket, kw),
        *jobsapi.routes(fake),
    ]
    return table
