"""Temporary files: what is being written is named *.part until it is complete; a killed run leaves them."""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = ".part"


def remove_part_files(*folders: Path) -> int:
    """Delete every *.part file directly in these folders (missing folders are skipped); returns how many.

    Only at start: one bridge owns its data_dir, so no other process can be writing them."""
    removed = 0
    for folder in folders:
        try:
            entries = list(folder.iterdir())
        except FileNotFoundError:
            continue
        for path in entries:
            if path.name.endswith(SUFFIX) and path.is_file():
                try:
                    path.unlink()
                    removed += 1
                except OSError as exc:
                    log.warning("could not remove the unfinished file %s: %s", path, exc)
    return removed
