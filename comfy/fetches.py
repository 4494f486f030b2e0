"""A job's output files, fetched as soon as ComfyUI names them, several at once.

ComfyUI announces each output node's files in an `executed` message while it is still finishing the
prompt (writing its history, sending the end signal). The bridge starts fetching them then, so the
download overlaps that finishing; the history entry, read once the prompt has ended, still decides which
files are the job's outputs: a file it names that was fetched early is taken as fetched, one it does not
name is deleted. Downloads (and the header reads that type them) run concurrently."""
from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

from .comfyclient import ComfyClient
from .jobs import Output
from .localfiles import finish
from .outputs import describe, node_animated, text_meta
from .protocol import file_entries, output_items

log = logging.getLogger(__name__)

INLINE_DESCRIBE = 4 * 1024 * 1024  # bytes: a smaller file (just written, in the page cache) is typed in place

Fetched = tuple[Path, int, str, dict[str, Any]]  # (file, size, content type, metadata)


def safe_name(name: str) -> str:
    """A file name a caller may see: no folders, only plain characters, never empty."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9._ ()-]", "_", name).strip(" .")
    return name[:120] or "output"


def _key(item: dict[str, Any]) -> tuple[str, str, str]:
    return str(item.get("filename")), str(item.get("subfolder") or ""), str(item.get("type") or "output")


class OutputFetches:
    """The output files of one attempt of a job on one backend, fetched into the result folder."""

    def __init__(self, job_id: str, backend: ComfyClient, folder: Path, durable: bool) -> None:
        self.job_id = job_id
        self.backend = backend
        self.folder = folder
        self.durable = durable
        self._tasks: dict[tuple[str, str, str], asyncio.Task[Fetched]] = {}
        self._count = 0
        folder.mkdir(parents=True, exist_ok=True)  # once per attempt (an operator may have wiped data_dir)

    def executed(self, node_id: str, node_out: Any) -> None:
        """An `executed` message named a node's output: start fetching its files now."""
        if isinstance(node_out, dict):
            for item in file_entries(node_out):
                if _key(item) not in self._tasks:
                    self._tasks[_key(item)] = self._start(node_id, node_out, item)

    def _start(self, node_id: str, node_out: dict[str, Any], item: dict[str, Any]) -> asyncio.Task[Fetched]:
        name = safe_name(str(item["filename"]))
        dest = self.folder / f"{self.job_id}-{self._count}{Path(name).suffix}"
        self._count += 1
        animated = node_animated({node_id: node_out}, node_id, item)
        return asyncio.ensure_future(self._fetch(item, dest, name, animated))

    async def _fetch(self, item: dict[str, Any], dest: Path, name: str, animated: bool) -> Fetched:
        size, reported = await self.backend.download(item, dest, self.durable)
        try:
            if size <= INLINE_DESCRIBE:
                ctype, meta = describe(dest, name, reported, item, animated)
            else:  # a few small reads of a large file's headers, off the event loop
                ctype, meta = await asyncio.to_thread(describe, dest, name, reported, item, animated)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        return dest, size, ctype, meta

    async def collect(self, entry: dict[str, Any]) -> list[Output]:
        """The outputs the history entry names, in its order: files fetched early are taken as they are, the
        rest fetched now, all at once. Files fetched early that the entry does not name are deleted."""
        plan: list[tuple[str, str, asyncio.Task[Fetched] | None, str | None]] = []
        nodes = entry.get("outputs") or {}
        for item in output_items(entry):
            if item.file is not None:
                task = self._tasks.pop(_key(item.file), None)
                if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
                    task = self._start(item.node_id, nodes.get(item.node_id) or {}, item.file)  # (again)
                plan.append((item.node_id, safe_name(str(item.file["filename"])), task, None))
            elif item.text is not None:
                plan.append((item.node_id, f"node{item.node_id}_text{item.index}.txt", None, item.text))
        self.discard()  # fetched early, not in the history: not the job's
        tasks = [task for _, _, task, _ in plan if task is not None]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            for r in results:
                if not isinstance(r, BaseException):
                    r[0].unlink(missing_ok=True)
            raise failed[0]
        fetched = iter(results)
        outputs: list[Output] = []
        for node_id, name, task, text in plan:
            if task is not None:
                dest, size, ctype, meta = next(fetched)  # type: ignore[misc]
                outputs.append(Output(node_id, name, ctype, dest.name, size, meta))
            elif text is not None:
                dest = self.folder / f"{self.job_id}-{self._count}.txt"
                self._count += 1
                data = text.encode("utf-8")
                self._write(dest, data)
                outputs.append(Output(node_id, name, "text/plain", dest.name, len(data), text_meta(text)))
        return outputs

    def _write(self, dest: Path, data: bytes) -> None:
        tmp = dest.with_name(dest.name + ".part")
        fh = open(tmp, "wb")
        fh.write(data)
        finish(fh, tmp, dest, self.durable)

    def discard(self) -> None:
        """Drop every fetch not taken: stop those under way, delete the files of those done."""
        for task in self._tasks.values():
            if task.done():
                _delete_result(task)
            else:
                task.cancel()
                task.add_done_callback(_delete_result)
        self._tasks.clear()


def _delete_result(task: asyncio.Task[Fetched]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result()[0].unlink(missing_ok=True)
