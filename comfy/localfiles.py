"""Outputs read straight from a backend's output folder, when the bridge sees it (a GPU box running both).

ComfyUI names an output by (filename, subfolder, type). With `output_dir` set for a backend, an output of
type "output" is taken from `output_dir/subfolder/filename` when that path, with every link resolved, is a
regular file inside the folder and carries the reported name; anything else falls back to GET /view."""
from __future__ import annotations

import mimetypes
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from .wire import commit_file


def local_output(root: Path | None, item: dict[str, Any]) -> Path | None:
    """The local file of one output entry, confined to `root`; None when it is not there to take."""
    if root is None or item.get("type", "output") != "output":
        return None
    name, sub = item.get("filename"), item.get("subfolder") or ""
    if not isinstance(name, str) or not name or not isinstance(sub, str) or "\0" in name + sub:
        return None
    try:
        real = (root / sub / name).resolve(strict=True)
        info = real.stat()
    except (OSError, RuntimeError, ValueError):
        return None
    if not real.is_relative_to(root) or real.name != Path(name).name or not stat.S_ISREG(info.st_mode):
        return None
    return real


def copy_output(src: Path, dest: Path, durable: bool) -> tuple[int, str]:
    """Copy a local output to dest under a temporary name, then rename (synced first when `durable`).
    Returns (size, content type). Raises OSError when the file changed or vanished while it was copied."""
    tmp = dest.with_name(dest.name + ".part")
    before = src.stat()
    try:
        with open(src, "rb") as source:
            fh = open(tmp, "wb")
            shutil.copyfileobj(source, fh, 1024 * 1024)
            size = fh.tell()
            if size != before.st_size or os.fstat(source.fileno()).st_mtime_ns != before.st_mtime_ns:
                fh.close()
                raise OSError(f"{src.name} changed while it was read")
            finish(fh, tmp, dest, durable)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size, mimetypes.guess_type(src.name)[0] or "application/octet-stream"


def finish(fh: Any, tmp: Path, dest: Path, durable: bool) -> None:
    """Give a written file its final name: synced first when the store's commits outlive an OS crash,
    else renamed at once (the name is then as durable as the commit that records it)."""
    if durable:
        commit_file(fh, tmp, dest)
    else:
        fh.close()
        os.replace(tmp, dest)
