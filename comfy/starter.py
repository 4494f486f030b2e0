"""bridge.py init DIR: a starter settings.yaml and a copy of the shipped workflows, ready to edit."""
from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

from .config import DEFAULT_SETTINGS, HERE

log = logging.getLogger(__name__)

SHIPPED_WORKFLOWS = HERE / "workflows"


def write_starter(args: list[str]) -> int:
    """Write DIR/settings.yaml and DIR/workflows/; never overwrite. Returns the exit code."""
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: bridge.py init DIR   (writes DIR/settings.yaml and DIR/workflows/)", file=sys.stderr)
        return 2
    target = Path(args[0]).expanduser().resolve()
    settings, workflows = target / "settings.yaml", target / "workflows"
    existing = [p for p in (settings, workflows) if p.exists()]
    if existing:
        print(f"bridge: init: {existing[0]} already exists; nothing was written", file=sys.stderr)
        return 2
    try:
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DEFAULT_SETTINGS, settings)
        # copyfile, not copytree's copy2: the files must get this user's umask, not the archive's modes
        shutil.copytree(SHIPPED_WORKFLOWS, workflows, copy_function=shutil.copyfile,
                        ignore=shutil.ignore_patterns("__pycache__"))
    except OSError as exc:
        print(f"bridge: init: cannot write {target}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {settings} and {workflows}/ ({len(list(workflows.glob('*.json')))} workflows).\n"
          f"Next: edit backends in {settings}, then run with --config {settings} --check")
    return 0
