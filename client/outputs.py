"""Saving a job's outputs into a folder, each under its own name, never over an existing file."""
from __future__ import annotations

import http.client
import socket
from pathlib import Path
from typing import IO, Any

from .api import Bridge, Unreachable

CHUNK = 256 * 1024


def safe_name(name: Any, index: int) -> str:
    """The output's file name without any folder part; a name that is empty or hidden gets a plain one."""
    base = Path(str(name or "").replace("\\", "/")).name
    return base if base and not base.startswith(".") else f"output_{index}"


def create_new(folder: Path, name: str) -> tuple[Path, IO[bytes]]:
    """Create `name` in `folder`, or `stem-1.ext`, `stem-2.ext` … when taken: an existing file is never
    replaced (the exclusive open also holds against another process saving there at the same time)."""
    stem, suffix = Path(name).stem, Path(name).suffix
    candidate, n = folder / name, 0
    while True:
        try:
            return candidate, open(candidate, "xb")
        except FileExistsError:
            n += 1
            candidate = folder / f"{stem}-{n}{suffix}"


def save_output(bridge: Bridge, output: dict[str, Any], folder: Path) -> Path:
    """Download one output (its `url` in the job document) into `folder`; returns the path it was saved to.
    A download that breaks off leaves no partial file behind."""
    index = int(output.get("index", 0))
    url = str(output.get("url") or "")
    with bridge.open("GET", url, timeout=60) as answer:
        path, fh = create_new(folder, safe_name(output.get("name"), index))
        try:
            with fh:
                while chunk := answer.read(CHUNK):
                    fh.write(chunk)
        except (ConnectionError, socket.timeout, http.client.HTTPException) as err:
            path.unlink(missing_ok=True)
            raise Unreachable(f"the download of output {index} broke off: {err or type(err).__name__}") from None
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    return path


def save_outputs(bridge: Bridge, document: dict[str, Any], folder: Path) -> list[Path]:
    """Every output of a finished job saved into `folder` (made if missing), in order."""
    folder.mkdir(parents=True, exist_ok=True)
    return [save_output(bridge, output, folder) for output in document.get("outputs") or []]
