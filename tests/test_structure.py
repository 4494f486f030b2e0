"""The engine's layers, read from the imports of the source: who may know the dispatcher, the store engines,
and ComfyUI's wire protocol."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

ASSEMBLY = {"comfy/services.py", "bridge.py"}  # builds the parts and wires them together
ENGINE_PREFIXES = ("comfy.store_", "comfy.sqlite_", "comfy.pg_")  # the engines of the job store and their parts
# words only ComfyUI's messages and answers use: parsed in comfy/protocol.py, nowhere else
PROTOCOL_WORDS = ("execution_cached", "execution_error", "status_str", "queue_running", "queue_pending",
                  "node_errors", "\"executing\"", "'executing'")


def sources() -> dict[str, Path]:
    """The bridge's own modules (the fake ComfyUI is a test double, not the bridge)."""
    files = [ROOT / "bridge.py", *(ROOT / "handlers").glob("*.py"), *(ROOT / "comfy").glob("*.py")]
    return {str(f.relative_to(ROOT)): f for f in files}


def engines(names: set[str]) -> set[str]:
    """The store engines' modules among these imports."""
    return {n for n in names if n.startswith(ENGINE_PREFIXES)}


def imports(path: Path) -> set[str]:
    """Every module a file imports, as absolute dotted names (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def test_only_the_assembly_knows_the_dispatcher() -> None:
    users = {name for name, path in sources().items() if "comfy.dispatcher" in imports(path)}
    assert users <= ASSEMBLY, users
    assert users  # the assembly does build it


def test_handlers_reach_jobs_only_through_the_facade() -> None:
    for name, path in sources().items():
        if not name.startswith("handlers/"):
            continue
        used = imports(path)
        assert not used & {"comfy.services", "comfy.dispatcher", "comfy.runner", "comfy.pool"}, name
        assert not engines(used), name


def test_only_the_assembly_chooses_a_store_engine() -> None:
    for name, path in sources().items():
        if name in ASSEMBLY or f"comfy.{Path(name).stem}".startswith(ENGINE_PREFIXES):
            continue
        assert not engines(imports(path)), name


def test_the_hub_and_metrics_follow_events_not_the_engine() -> None:
    for name in ("comfy/clients.py", "comfy/metrics.py"):
        used = imports(sources()[name])
        assert "comfy.jobstore" in used, name  # they read JobEvents
        assert not used & {"comfy.dispatcher", "comfy.runner", "comfy.services", "comfy.jobservice"}, name
        assert not engines(used), name


def test_comfyui_protocol_is_parsed_in_one_module() -> None:
    for name, path in sources().items():
        if name == "comfy/protocol.py":
            continue
        text = path.read_text(encoding="utf-8")
        assert not [w for w in PROTOCOL_WORDS if w in text], name


def test_a_detector_that_would_see_a_violation() -> None:
    # the same reading finds the imports it should, so the rules above cannot pass by reading nothing
    assert "comfy.jobstore" in imports(ROOT / "comfy" / "dispatcher.py")
    assert "comfy.dispatcher.Dispatcher" in imports(ROOT / "comfy" / "services.py")
    assert engines(imports(ROOT / "comfy" / "services.py")) == {"comfy.store_sqlite", "comfy.store_sqlite.SqliteStore",
                                                              "comfy.store_pg", "comfy.store_pg.PostgresStore"}
