"""python bridge.py --check: settings, catalog and every backend's reachability, as a report."""
from __future__ import annotations

import time
from pathlib import Path

from .backend import Backend, BackendError
from .catalog import Catalog, CatalogError
from .config import Config, ConfigError, load_config


async def run_check(path: str | None, overrides: dict[str, object]) -> tuple[bool, list[str]]:
    """(all good, report lines). Nothing is started and nothing is written."""
    lines: list[str] = []
    try:
        config = load_config(path, overrides=overrides)
    except ConfigError as exc:
        return False, [f"FAIL settings: {exc}"]
    lines.append(f"ok   settings: {Path(path).resolve() if path else 'settings.yaml'} "
                 f"(listen {config.host}:{config.port}, data_dir {config.data_dir})")
    ok = True
    try:
        catalog = Catalog.load(config.workflows_dir, config.job_timeout)
        lines.append(f"ok   catalog: {len(catalog.workflows)} workflow(s) in {config.workflows_dir}: "
                     f"{', '.join(catalog.aliases())}")
    except CatalogError as exc:
        ok = False
        catalog = None
        lines.append(f"FAIL catalog: {exc}")
    for bc in config.backends:
        good, line = await _check_backend(config, bc.url, catalog, bc.label)
        ok = ok and good
        lines.append(line)
    for bc in config.backends:
        for alias in bc.workflows or ():
            if catalog is not None and alias not in catalog.workflows:
                ok = False
                lines.append(f"FAIL backend {bc.label}: workflows lists {alias!r}, which is not in the catalog")
    return ok, lines


async def _check_backend(config: Config, url: str, catalog: Catalog | None, label: str) -> tuple[bool, str]:
    cfg = next(b for b in config.backends if b.url == url)
    backend = Backend(cfg, config, "comfy-bridge-check")
    try:
        started = time.monotonic()
        await backend.probe(timeout=config.connect_timeout)
        took = (time.monotonic() - started) * 1000
        missing: list[str] = []
        if catalog is not None:
            uses = {wf.alias: {n["class_type"] for n in wf.graph.values()} for wf in catalog.workflows.values()
                    if cfg.accepts(wf.alias)}
            known = set(await backend.fetch_object_info(set().union(*uses.values())))
            # per workflow, so the operator knows which ones will fail there and what to install
            missing = [f"{alias} needs {', '.join(sorted(classes - known))}"
                       for alias, classes in sorted(uses.items()) if classes - known]
        if missing:
            return True, (f"warn backend {label}: reachable ({took:.0f} ms) but lacks node classes: "
                          f"{'; '.join(missing)} (those workflows will fail there)")
        return True, f"ok   backend {label}: reachable ({took:.0f} ms)"
    except BackendError as exc:
        return False, f"FAIL backend {label}: {exc}"
    finally:
        backend.http.close()
