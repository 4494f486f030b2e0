"""The workflow catalog: API-format graphs from workflows_dir and the inputs a caller may set."""
from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

MANIFEST = "workflows.yaml"
TYPES = {"str": str, "int": int, "float": float}
# (class_type, input) pairs whose value names a file in the backend's input folder.
FILE_INPUTS = {("LoadImage", "image"), ("LoadImageMask", "image"), ("LoadImageOutput", "image"),
               ("LoadVideo", "file"), ("LoadAudio", "audio"), ("VHS_LoadVideo", "video")}
_OVERRIDABLE = {"title", "type", "min", "max", "step", "choices", "multiline", "upload", "description",
                "display"}


class CatalogError(Exception):
    """The workflows folder or its manifest is wrong; the message says where."""


class InputError(ValueError):
    """A caller's submitted inputs do not fit the workflow; the message is shown to the caller."""


@dataclass(frozen=True)
class InputSpec:
    """One input a caller may set, keyed "<node id>/<input name>"."""

    key: str
    node_id: str
    name: str
    type: str
    title: str
    class_type: str
    default: Any
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[Any, ...] | None = None
    multiline: bool = False
    upload: bool = False
    description: str = ""
    display: str = ""  # "color": ComfyUI shows this integer as a colour picker (0xRRGGBB)
    overridden: frozenset[str] = frozenset()

    def info(self) -> dict[str, Any]:
        """The public description shown by /workflow-info."""
        out: dict[str, Any] = {"type": self.type, "title": self.title, "class": self.class_type,
                               "default": self.default}
        for name in ("min", "max", "step"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.choices is not None:
            out["choices"] = list(self.choices)
        if self.multiline:
            out["multiline"] = True
        if self.upload:
            out["upload"] = True
        if self.display:
            out["display"] = self.display
        if self.description:
            out["description"] = self.description
        return out

    def check(self, value: Any, max_len: int) -> Any:
        """The value converted for the graph, or InputError saying what is wrong."""
        want = TYPES[self.type]
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise InputError(f"{self.key}: expected {self.type}, got {type(value).__name__}")
        if want is str:
            if not isinstance(value, str):
                raise InputError(f"{self.key}: expected str, got {type(value).__name__}")
            if len(value) > max_len:
                raise InputError(f"{self.key}: longer than {max_len} characters")
        elif want is int:
            if not isinstance(value, int):
                raise InputError(f"{self.key}: expected int, got {type(value).__name__}")
        else:
            if isinstance(value, str):
                raise InputError(f"{self.key}: expected float, got str")
            try:
                value = float(value)
            except OverflowError:
                raise InputError(f"{self.key}: number too large") from None
            if not math.isfinite(value):
                raise InputError(f"{self.key}: must be a finite number")
        if self.min is not None and value < self.min:
            raise InputError(f"{self.key}: {value} is smaller than the minimum {self.min}")
        if self.max is not None and value > self.max:
            raise InputError(f"{self.key}: {value} is bigger than the maximum {self.max}")
        if self.choices is not None and not self.upload and value not in self.choices:
            raise InputError(f"{self.key}: {value!r} is not one of {list(self.choices)}")
        return value


@dataclass(frozen=True)
class Workflow:
    """One curated workflow: its graph, its settable inputs and its time limit."""

    alias: str
    file: Path
    graph: dict[str, Any]
    inputs: dict[str, InputSpec]
    timeout: float
    description: str = ""

    def validate(self, body: dict[str, Any], max_len: int) -> dict[str, Any]:
        """The caller's values by input key, checked; raises InputError."""
        values: dict[str, Any] = {}
        for key, value in body.items():
            if key == "workflow":
                continue
            spec = self.inputs.get(key)
            if spec is None:
                allowed = ", ".join(self.inputs) or "none"
                raise InputError(f"unknown input {key!r} for workflow {self.alias!r} (allowed: {allowed})")
            values[key] = spec.check(value, max_len)
        return values

    def build(self, values: dict[str, Any]) -> dict[str, Any]:
        """A copy of the graph with the caller's values put in."""
        graph = copy.deepcopy(self.graph)
        for key, value in values.items():
            spec = self.inputs[key]
            graph[spec.node_id]["inputs"][spec.name] = value
        return graph

    def file_inputs(self, values: dict[str, Any]) -> dict[str, str]:
        """Input key -> file name, for every file input of the job (given or default)."""
        out = {}
        for key, spec in self.inputs.items():
            if spec.upload:
                out[key] = values.get(key, spec.default)
        return out


class Catalog:
    """The workflows on offer; reloaded as a whole, so readers never see half a catalog."""

    def __init__(self, workflows: dict[str, Workflow], root: Path, errors: dict[str, str] | None = None) -> None:
        self.workflows = workflows
        self.root = root
        self.errors = errors or {}  # file name or alias -> what is wrong with it (left out of the catalog)

    @classmethod
    def load(cls, root: Path, default_timeout: float = 60.0) -> Catalog:
        """Read every *.json in root and the optional workflows.yaml. A broken file or entry is left out
        and recorded in `errors` (by file name or alias); the rest is served."""
        errors: dict[str, str] = {}
        if not root.is_dir():
            errors["workflows_dir"] = f"workflows_dir: {root} is not a folder"
            return cls({}, root, errors)
        graphs: dict[str, tuple[Path, dict[str, Any]]] = {}
        for path in sorted(root.glob("*.json")):
            try:
                graphs[path.name] = (path, _read_graph(path))
            except CatalogError as exc:
                errors[path.name] = str(exc)
        try:
            manifest = _read_manifest(root / MANIFEST)
        except CatalogError as exc:
            errors[MANIFEST] = str(exc)
            manifest = {}
        workflows: dict[str, Workflow] = {}
        claimed: set[str] = set()
        for alias, entry in manifest.items():
            fname = entry.get("file", f"{alias}.json") if isinstance(entry, dict) else None
            if isinstance(fname, str):
                claimed.add(fname)  # an entry that is broken must not leave its file on offer under its stem
            try:
                workflows[alias] = _workflow(root, alias, entry, graphs, errors, default_timeout)
            except CatalogError as exc:
                errors[str(alias)] = str(exc)
        for fname, (path, graph) in graphs.items():
            if fname not in claimed and path.stem not in workflows and path.stem not in errors:
                workflows[path.stem] = Workflow(path.stem, path, graph, {}, float(default_timeout))
        return cls(workflows, root, errors)

    @staticmethod
    def fingerprint(root: Path) -> tuple[tuple[str, int, int], ...]:
        """What changes when an administrator edits the folder (names, sizes, modification times)."""
        try:
            return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                                for p in root.iterdir() if p.is_file()))
        except OSError:
            return ()

    def get(self, alias: Any) -> Workflow | None:
        """The workflow with this alias, or None."""
        return self.workflows.get(alias) if isinstance(alias, str) else None

    def aliases(self) -> list[str]:
        """Every alias, in a stable order."""
        return sorted(self.workflows)

    def classes(self) -> set[str]:
        """Node classes whose inputs are offered to callers (worth asking a backend about)."""
        return {s.class_type for w in self.workflows.values() for s in w.inputs.values()}

    def enrich(self, object_info: dict[str, Any]) -> None:
        """Add min/max/step/choices that a backend's /object_info knows and the manifest did not say."""
        for alias, wf in list(self.workflows.items()):
            inputs = {k: _enrich(s, object_info.get(s.class_type)) for k, s in wf.inputs.items()}
            self.workflows[alias] = replace(wf, inputs=inputs)


def _read_graph(path: Path) -> dict[str, Any]:
    try:
        graph = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CatalogError(f"{path.name}: not readable JSON: {exc}") from None
    if isinstance(graph, dict) and "nodes" in graph and "links" in graph:
        raise CatalogError(f"{path.name}: this is ComfyUI's UI format; export it with 'Save (API Format)'")
    if not isinstance(graph, dict) or not graph:
        raise CatalogError(f"{path.name}: must be an API-format workflow (an object of nodes)")
    for node_id, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) \
                or not isinstance(node.get("inputs", {}), dict):
            raise CatalogError(f"{path.name}: node {node_id!r} needs a class_type and an inputs object")
        node.setdefault("inputs", {})
    return graph


def _read_manifest(path: Path) -> dict[Any, Any]:
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CatalogError(f"{MANIFEST}: not readable YAML: {exc}") from None
    if not isinstance(data, dict):
        raise CatalogError(f"{MANIFEST}: must map aliases to entries")
    return data


def _workflow(root: Path, alias: Any, entry: Any, graphs: dict[str, tuple[Path, dict[str, Any]]],
              errors: dict[str, str], default_timeout: float) -> Workflow:
    """One manifest entry as a Workflow; raises CatalogError naming the alias and what is wrong."""
    if not isinstance(alias, str) or not alias or "/" in alias:
        raise CatalogError(f"{MANIFEST}: {alias!r} is not a usable alias")
    if entry is None:
        entry = {}
    elif not isinstance(entry, dict):
        raise CatalogError(f"{MANIFEST}: {alias}: must be a mapping (file, inputs, timeout)")
    unknown = set(entry) - {"file", "inputs", "timeout", "description"}
    if unknown:
        raise CatalogError(f"{MANIFEST}: {alias}.{sorted(unknown)[0]}: unknown key")
    fname = entry.get("file", f"{alias}.json")
    if not isinstance(fname, str):
        raise CatalogError(f"{MANIFEST}: {alias}.file: must be a file name")
    if fname in errors:
        raise CatalogError(f"{MANIFEST}: {alias}.file: {errors[fname]}")
    if fname not in graphs:
        raise CatalogError(f"{MANIFEST}: {alias}.file: no such workflow file {fname!r} in {root}")
    path, graph = graphs[fname]
    inputs = _inputs(alias, graph, entry.get("inputs") or [])
    timeout = entry.get("timeout", default_timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise CatalogError(f"{MANIFEST}: {alias}.timeout: must be a number of seconds > 0")
    return Workflow(alias, path, graph, inputs, float(timeout), str(entry.get("description", "")))


def _inputs(alias: str, graph: dict[str, Any], entries: list[Any]) -> dict[str, InputSpec]:
    where = f"{MANIFEST}: {alias}.inputs"
    if not isinstance(entries, list):
        raise CatalogError(f"{where}: must be a list")
    out: dict[str, InputSpec] = {}
    for entry in entries:
        over: dict[str, Any] = {}
        if isinstance(entry, dict):
            over = dict(entry)
            key = over.pop("key", None)
            unknown = set(over) - _OVERRIDABLE
            if unknown:
                raise CatalogError(f"{where}: {key}: unknown key {sorted(unknown)[0]!r}")
        else:
            key = entry
        if not isinstance(key, str) or key.count("/") != 1:
            raise CatalogError(f"{where}: {key!r} must be \"<node id>/<input name>\"")
        node_id, name = key.split("/")
        node = graph.get(node_id)
        if node is None:
            raise CatalogError(f"{where}: {key}: no node {node_id!r} in the workflow")
        if name not in node["inputs"]:
            raise CatalogError(f"{where}: {key}: node {node_id} ({node['class_type']}) has no input {name!r}")
        default = node["inputs"][name]
        if isinstance(default, list):
            raise CatalogError(f"{where}: {key}: is linked to another node; only literal inputs can be offered")
        out[key] = _spec(key, node_id, name, node, default, over, where)
    return out


def _spec(key: str, node_id: str, name: str, node: dict[str, Any], default: Any,
          over: dict[str, Any], where: str) -> InputSpec:
    kind = over.get("type")
    if kind is None:
        if isinstance(default, bool):
            raise CatalogError(f"{where}: {key}: boolean inputs can't be offered; give it a type")
        kind = {str: "str", int: "int", float: "float"}.get(type(default))
        if kind is None:
            raise CatalogError(f"{where}: {key}: default {default!r} is not a str, int or float")
    if kind not in TYPES:
        raise CatalogError(f"{where}: {key}: type must be one of str, int, float")
    for bound in ("min", "max", "step"):
        v = over.get(bound)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise CatalogError(f"{where}: {key}: {bound} must be a number")
        if v is not None and kind == "str":
            raise CatalogError(f"{where}: {key}: {bound} applies to numbers, not a str input")
    if over.get("display") not in (None, "color") or (over.get("display") and kind != "int"):
        raise CatalogError(f"{where}: {key}: display may only be color, on an int input")
    choices = over.get("choices")
    if choices is not None and not isinstance(choices, list):
        raise CatalogError(f"{where}: {key}: choices must be a list")
    title = over.get("title") or (node.get("_meta") or {}).get("title") or node["class_type"]
    upload = bool(over.get("upload", (node["class_type"], name) in FILE_INPUTS))
    return InputSpec(key=key, node_id=node_id, name=name, type=kind, title=str(title),
                     class_type=node["class_type"], default=default, min=over.get("min"),
                     max=over.get("max"), step=over.get("step"),
                     choices=tuple(choices) if choices is not None else None,
                     multiline=bool(over.get("multiline", False)), upload=upload,
                     description=str(over.get("description", "")), display=str(over.get("display", "")),
                     overridden=frozenset(over))


def _enrich(spec: InputSpec, info: Any) -> InputSpec:
    """Fill bounds and choices from an /object_info entry (both combo forms are understood)."""
    if not isinstance(info, dict):
        return spec
    section = info.get("input") or {}
    raw = None
    for part in ("required", "optional"):
        if isinstance(section.get(part), dict) and spec.name in section[part]:
            raw = section[part][spec.name]
    if not isinstance(raw, list) or not raw:
        return spec
    opts = raw[1] if len(raw) > 1 and isinstance(raw[1], dict) else {}
    changes: dict[str, Any] = {}
    if isinstance(raw[0], list):
        changes["choices"] = tuple(raw[0])
    elif raw[0] == "COMBO" and isinstance(opts.get("options"), list):
        changes["choices"] = tuple(opts["options"])
    elif raw[0] in ("INT", "FLOAT"):
        if raw[0] == "FLOAT" and spec.type == "int":
            changes["type"] = "float"  # exported by JavaScript, 8.0 arrives as 8
        for bound in ("min", "max", "step"):
            if isinstance(opts.get(bound), (int, float)) and not isinstance(opts.get(bound), bool):
                changes[bound] = opts[bound]
        if raw[0] == "INT" and opts.get("display") == "color":
            changes["display"] = "color"
    elif raw[0] == "STRING" and opts.get("multiline"):
        changes["multiline"] = True
    display = info.get("display_name")
    if spec.title == spec.class_type and isinstance(display, str) and display:
        changes["title"] = display
    if spec.upload:
        changes.pop("choices", None)  # the offered files are the caller's uploads, not the backend's folder
    changes = {k: v for k, v in changes.items() if k not in spec.overridden}
    return replace(spec, **changes) if changes else spec
