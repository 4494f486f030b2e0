"""python bridge.py --check: settings, data_dir, the catalog, and each backend's nodes and models, as a report."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .comfyclient import BackendError, ComfyClient
from .catalog import FILE_INPUTS, Catalog, Workflow
from .config import BackendConfig, Config, ConfigError, load_config
from .datalock import DataDirLock
from .jobstore import StoreUnavailable

log = logging.getLogger(__name__)


async def run_check(path: str | None, overrides: dict[str, object], demo: bool = False) -> tuple[bool, list[str]]:
    """(all good, report lines). With demo, the simulated backends of --demo are started and checked."""
    try:
        config = load_config(path, overrides=overrides)
    except ConfigError as exc:
        return False, [f"FAIL settings: {exc}"]
    fakes: list[Any] = []
    if demo:
        from .demo import start_demo_backends
        config, fakes = await start_demo_backends(config)
    try:
        return await check_config(config, Path(path).resolve() if path else None, demo)
    finally:
        for fake in fakes:
            await fake.stop()


async def check_config(config: Config, path: Path | None, demo: bool = False) -> tuple[bool, list[str]]:
    """Check a loaded config; nothing is started and nothing in data_dir is changed."""
    lines = [f"ok   settings: {path or 'settings.yaml'} "
             f"(listen {config.host}:{config.port}, data_dir {config.data_dir})"]
    if demo:
        from .demo import demo_info
        lines.append(f"ok   demo: {demo_info()['note']}")
    ok = True
    holder = DataDirLock.holder(config.data_dir) if config.data_dir.is_dir() and not config.store_url else None
    if holder is not None:
        ok = False
        lines.append(f"FAIL data_dir: {config.data_dir} is in use by another bridge (pid {holder})")
    good, line = await check_store(config)
    ok = ok and good
    lines.append(line)
    catalog = Catalog.load(config.workflows_dir, config.job_timeout)
    lines.append(f"{'ok  ' if catalog.workflows else 'FAIL'} catalog: {len(catalog.workflows)} workflow(s) in "
                 f"{config.workflows_dir}: {', '.join(catalog.aliases()) or 'none'}")
    ok = ok and bool(catalog.workflows)
    for name, problem in catalog.errors.items():
        ok = False
        lines.append(f"FAIL catalog: {name} is left out: {problem}")
    for bc in config.backends:
        good, more = await _check_backend(config, bc, catalog)
        ok = ok and good
        lines += more
    for bc in config.backends:
        for alias in bc.workflows or ():
            if alias not in catalog.workflows:
                ok = False
                lines.append(f"FAIL backend {bc.label}: workflows lists {alias!r}, which is not in the catalog")
    return ok, lines


async def check_store(config: Config) -> tuple[bool, str]:
    """The job store: reachable, and its schema brought up to date (the pending migrations run now, as a
    start would run them; a fresh SQLite data_dir is left for the first start to create)."""
    from .services import make_store  # the assembly chooses the engine; only --check needs it here

    if config.store_url:
        parts = urlsplit(config.store_url)
        where = f"PostgreSQL {parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"  # no password
    else:
        where = f"SQLite {config.data_dir / 'bridge.sqlite3'}"
        if not (config.data_dir / "bridge.sqlite3").exists():
            return True, f"ok   store: {where}: created at the first start"
    try:
        store = make_store(config, "check")
        pending = await store.pending_migrations()
        if pending:
            await store.open()  # runs them, each once, under the engine's own lock
            await store.close()
    except (ConfigError, StoreUnavailable, OSError, RuntimeError) as exc:
        return False, f"FAIL store: {where}: {exc}"
    if not pending:
        return True, f"ok   store: {where}: schema up to date"
    return True, f"ok   store: {where}: ran schema migration(s) {', '.join(map(str, pending))}"


async def _check_backend(config: Config, cfg: BackendConfig, catalog: Catalog) -> tuple[bool, list[str]]:
    backend = ComfyClient(cfg, config, "comfy-bridge-check")
    label = cfg.label
    try:
        started = time.monotonic()
        await backend.probe(timeout=config.connect_timeout)
        took = (time.monotonic() - started) * 1000
        workflows = [wf for wf in catalog.workflows.values() if cfg.accepts(wf.alias)]
        classes = {n["class_type"] for wf in workflows for n in wf.graph.values()}
        known = await backend.fetch_object_info(classes)
    except BackendError as exc:
        return False, [f"FAIL backend {label}: {exc}"]
    finally:
        backend.http.close()
    lines = [f"ok   backend {label}: reachable ({took:.0f} ms)"]
    for wf in sorted(workflows, key=lambda w: w.alias):
        problems = missing_parts(wf, known)
        lines += [f"FAIL backend {label}: workflow {wf.alias} needs {p}" for p in problems]
    return len(lines) == 1, lines


def missing_parts(wf: Workflow, object_info: dict[str, Any]) -> list[str]:
    """What a backend lacks to run this workflow: node classes, and files (checkpoints, LoRAs, VAEs …)
    that the graph names and the backend's /object_info does not offer among an input's choices."""
    out: list[str] = []
    for node_id, node in sorted(wf.graph.items()):
        cls = node["class_type"]
        info = object_info.get(cls)
        if not isinstance(info, dict):
            out.append(f"node class {cls} (node {node_id}), which this backend does not have")
            continue
        section = info.get("input") or {}
        for name, value in node["inputs"].items():
            if not isinstance(value, str) or (cls, name) in FILE_INPUTS:
                continue  # links, numbers and input images (the bridge uploads those) are not models
            choices = _choices(section, name)
            if choices is not None and value not in choices:
                out.append(f"{value} ({node_id}/{name} of {cls}), which is not among this backend's "
                           f"{len(choices)} choice(s)")
    return out


def _choices(section: dict[str, Any], name: str) -> list[Any] | None:
    """The options of a combo input in either /object_info form, or None for any other input."""
    for part in ("required", "optional"):
        raw = (section.get(part) or {}).get(name) if isinstance(section.get(part), dict) else None
        if isinstance(raw, list) and raw:
            if isinstance(raw[0], list):
                return raw[0]
            if raw[0] == "COMBO" and len(raw) > 1 and isinstance(raw[1], dict) \
                    and isinstance(raw[1].get("options"), list):
                options: list[Any] = raw[1]["options"]
                return options
    return None
