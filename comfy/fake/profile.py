"""Version profiles of the fake: what ComfyUI 0.3.64 and a current release (0.38) do differently on the wire."""
from __future__ import annotations

import logging
import struct
import sys
import uuid
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

PROFILES = ("0.3.64", "current")
CURRENT_VERSION = "0.38.1"
FEATURES_0364 = {"supports_preview_metadata": True, "max_upload_size": 104857600}
# feature_flags.py on current ComfyUI: six server keys (PROTOCOL-CURRENT.md §15)
FEATURES_CURRENT = {**FEATURES_0364, "supports_model_type_tags": True,
                    "extension": {"manager": {"supports_v4": True}}, "node_replacements": True, "assets": True}
RAM_CACHE_ENTRIES = 4096  # the RAM-pressure cache evicts only under memory pressure; the fake just bounds it


@dataclass(frozen=True)
class Profile:
    """Which ComfyUI release the fake imitates; each flag is one observable difference."""

    name: str
    version: str
    jobs_api: bool  # GET /api/jobs[/{id}], POST /api/jobs/{id}/cancel and /api/jobs/cancel (0.6 / 0.26)
    uuid_prompt_ids: bool  # a client prompt_id must be a canonical lowercase UUID, else 400 (0.25)
    missing_node_type: bool  # unknown/missing class_type -> missing_node_type, cycles -> dependency_cycle
    asset_outputs: bool  # output entries carry id, preview_id and metadata; uploads answer an asset
    ram_cache: bool  # results cached across prompts, not only the previous prompt's (0.23)
    cross_site_403: bool  # Sec-Fetch-Site: cross-site -> 403 on every route (0.19)
    create_time: bool  # extra_data.create_time added on queueing (0.3.69)

    def features(self) -> dict[str, Any]:
        """What GET /features and the WebSocket feature_flags reply carry."""
        return dict(FEATURES_CURRENT if self.name == "current" else FEATURES_0364)


def get_profile(name: str) -> Profile:
    """The profile called name ("0.3.64" or "current"); ValueError for anything else."""
    if name == "0.3.64":
        return Profile(name, "0.3.64", jobs_api=False, uuid_prompt_ids=False, missing_node_type=False,
                       asset_outputs=False, ram_cache=False, cross_site_403=False, create_time=False)
    if name == "current":
        return Profile(name, CURRENT_VERSION, jobs_api=True, uuid_prompt_ids=True, missing_node_type=True,
                       asset_outputs=True, ram_cache=True, cross_site_403=True, create_time=True)
    raise ValueError(f"unknown profile {name!r} (choose from {', '.join(PROFILES)})")


def is_canonical_uuid(value: Any) -> bool:
    """jobs.validate_job_id: a string equal to str(uuid.UUID(value)) (lowercase, hyphenated)."""
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def invalid_prompt_id() -> dict[str, Any]:
    """The 400 body of POST /prompt for a prompt_id that is not a canonical UUID."""
    return {"error": {"type": "invalid_prompt_id", "message": "prompt_id must be a valid UUID",
                      "details": "prompt_id must be a lowercase, hyphenated UUID such as "
                                 "'0b6d5f0e-8c1a-4a49-9f3e-2d6f7d1c9e11'", "extra_info": {}},
            "node_errors": {}}


def system_stats(profile: Profile, host: str, port: int) -> dict[str, Any]:
    """A plausible /system_stats of a CPU-only box for this profile (os value, devices and keys differ)."""
    total, free = 8 * 1024 ** 3, 6 * 1024 ** 3
    system: dict[str, Any] = {
        "os": "posix", "ram_total": total, "ram_free": free, "comfyui_version": profile.version,
        "required_frontend_version": "1.27.10", "installed_templates_version": "0.1.95",
        "required_templates_version": "0.1.95", "python_version": sys.version, "pytorch_version": "2.8.0+cpu",
        "embedded_python": False, "argv": ["main.py", "--cpu", "--listen", host, "--port", str(port)]}
    devices = [{"name": "cpu", "type": "cpu", "index": None, "vram_total": total, "vram_free": free,
                "torch_vram_total": total, "torch_vram_free": free}]
    if profile.name == "current":
        system.update(os=sys.platform, pytorch_version="2.14.1+cpu", deploy_environment="local-git",
                      comfy_package_versions=[{"name": "comfyui-frontend-package", "installed": "1.41.3",
                                               "required": "1.41.3"}])
    return {"system": system, "devices": devices}


def object_info_keys(info: dict[str, Any]) -> dict[str, Any]:
    """Current /object_info entries: the keys added since 0.3.64 (PROTOCOL-CURRENT.md §20)."""
    for entry in info.values():
        if isinstance(entry, dict):
            entry.update(is_input_list=False, has_intermediate_output=False, search_aliases=[])
    return info


def _png_size(path: str) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR chunk, or None when the file is not a PNG."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def enrich_ui(ui: dict[str, Any] | None, dirs: dict[str, str]) -> dict[str, Any] | None:
    """Output entries as current ComfyUI writes them: + asset id/preview_id, + media metadata (a fresh copy)."""
    if not ui:
        return ui
    out: dict[str, Any] = {}
    for key, items in ui.items():
        if not isinstance(items, list):
            out[key] = items
            continue
        entries: list[Any] = []
        for item in items:
            if isinstance(item, dict) and "filename" in item:
                asset = str(uuid.uuid4())  # re-registered for each prompt, also for a cached replay
                item = {**item, "id": asset, "preview_id": asset}
                root = dirs.get(str(item.get("type", "output")), "")
                size = _png_size(f"{root}/{item.get('subfolder') or ''}/{item['filename']}")
                if size is not None:
                    item["metadata"] = {"kind": "image", "width": size[0], "height": size[1]}
            entries.append(item)
        out[key] = entries
    return out


def upload_asset(name: str, size: int, digest: str) -> dict[str, Any]:
    """The "asset" key an upload answer gains when assets are on."""
    return {"id": str(uuid.uuid4()), "name": name, "asset_hash": f"blake3:{digest}", "size": size,
            "mime_type": "image/png" if name.lower().endswith(".png") else "application/octet-stream",
            "tags": ["input"]}


def find_cycle(prompt: dict[str, Any]) -> list[str] | None:
    """Node ids of one dependency cycle in an API-format graph (in link order), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(nid: str, path: list[str]) -> list[str] | None:
        state[nid] = 1
        path.append(nid)
        node = prompt.get(nid)
        inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
        for value in inputs.values() if isinstance(inputs, dict) else ():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
                up = str(value[0])
                if state.get(up) == 1:
                    return path[path.index(up):]
                if up not in state:
                    found = visit(up, path)
                    if found:
                        return found
        path.pop()
        state[nid] = 2
        return None

    for nid in prompt:
        if nid not in state:
            found = visit(nid, [])
            if found:
                return found
    return None


def cycle_errors(prompt: dict[str, Any], cycle: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(top-level error, node_errors) of current ComfyUI for a graph with a dependency cycle."""
    def label(nid: str) -> str:
        return f"{nid} ({prompt[nid].get('class_type')})"
    details = " -> ".join(label(n) for n in cycle + cycle[:1])
    node_errors = {nid: {"errors": [{"type": "dependency_cycle", "message": "Dependency cycle detected",
                                     "details": details, "extra_info": {"node_id": nid, "cycle_nodes": list(cycle)}}],
                         "dependent_outputs": [], "class_type": prompt[nid].get("class_type")} for nid in cycle}
    error = {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
             "details": f"Dependency cycle detected: {details}", "extra_info": {}}
    return error, node_errors


def missing_node_type(node_id: str, node: dict[str, Any]) -> dict[str, Any]:
    """execution.validate_prompt on current ComfyUI: the error for an unknown or missing class_type."""
    class_type = node.get("class_type")
    meta = node.get("_meta")
    title = meta.get("title") if isinstance(meta, dict) and meta.get("title") else class_type
    if class_type is None:
        message = f"Node '#{node_id}' has no class_type. The workflow may be corrupted or a custom node is missing."
    else:
        message = f"Node '{title}' not found. The custom node may not be installed."
    return {"type": "missing_node_type", "message": message, "details": f"Node ID '#{node_id}'",
            "extra_info": {"node_id": node_id, "class_type": class_type, "node_title": title}}
