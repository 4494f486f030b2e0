"""Saving a job's outputs into a folder, each under its own name, never over an existing file. A download that
breaks off is tried again (from where it stopped, with Range) for as long as the follower waits for a lost bridge;
one that cannot be finished leaves no partial file behind."""
from __future__ import annotations

import http.client
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

from .api import LOST_AFTER, PASSING, Bridge, BridgeError, Reconnects, Unreachable, bounded
from .inputs import UsageError

CHUNK = 256 * 1024
DOWNLOAD_SILENCE = 60.0  # seconds a download may go without a byte before that try counts as broken off


class SaveFailed(Exception):
    """An output could not be saved (those before it were: Saver.saved). `lost`: the download kept breaking off
    for LOST_AFTER seconds, as a bridge that is gone would."""

    def __init__(self, message: str, lost: bool = False) -> None:
        super().__init__(message)
        self.lost = lost


class BrokenOff(Exception):
    """One try of a download ended before all of the output came: it is tried again."""


def safe_name(name: Any, index: int) -> str:
    """The output's file name without any folder part; a name that is empty or hidden gets a plain one."""
    base = Path(str(name or "").replace("\\", "/")).name
    return base if base and not base.startswith(".") else f"output_{index}"


def check_folder(folder: Path) -> None:
    """UsageError unless `folder` is a folder files can be created in, or can be made as one: its nearest
    existing part must be a folder in which a (nameless, at once removed) file can be created. Checked before
    the job is submitted; nothing is made here."""
    probe = folder
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot save the outputs into {folder}: {probe} is not a folder")
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as err:
        raise UsageError(f"cannot save the outputs into {folder}: cannot create a file in {probe} "
                         f"({err.strerror or err})") from None


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


@dataclass
class Download:
    """One output's download so far: its URL, the size the job document gives, the bytes written, the whole
    length the answer announced, and its ETag (a resumed try asks for the rest of that same file)."""

    url: str
    size: int | None = None
    have: int = 0
    total: int | None = None
    etag: str | None = None


def content_range_start(answer: http.client.HTTPResponse) -> tuple[int, int | None] | None:
    """(first byte, whole length) of a 206 answer's Content-Range, or None when it has none that parses."""
    unit, _, spec = (answer.headers.get("Content-Range") or "").partition(" ")
    span, _, whole = spec.partition("/")
    first = span.partition("-")[0]
    if unit.lower() != "bytes" or not first.isdigit():
        return None
    return int(first), int(whole) if whole.isdigit() else None


def fetch(bridge: Bridge, download: Download, fh: IO[bytes], timeout: float) -> None:
    """One try: GET the output, from byte `have` on (Range, If-Range) when earlier tries saved some, and write
    what comes to `fh`. BrokenOff when the answer ends before the length it announced (Content-Length, else
    the output's size): http.client reads a body cut short by the server as a plain end."""
    headers = {"Range": f"bytes={download.have}-"} if download.have else {}
    if download.have and download.etag:
        headers["If-Range"] = download.etag
    try:
        with bridge.open("GET", download.url, headers=headers, timeout=timeout) as answer:
            length = answer.headers.get("Content-Length")
            start = content_range_start(answer) if answer.status == 206 else None
            if start is not None and start[0] == download.have:  # the rest, as asked
                download.total = start[1]
            else:  # the whole file (a first try, or the file is not the one the earlier tries had)
                fh.seek(0)
                fh.truncate()
                download.have = 0
                download.total = int(length) if length and length.isdigit() else download.size
                if answer.status == 206:  # a range not asked for: the next try asks for the whole file
                    download.etag = None
                    raise BrokenOff(f"the answer was the range {answer.headers.get('Content-Range')!r}, "
                                    "not the one asked for")
            download.etag = answer.headers.get("ETag") or download.etag
            while chunk := answer.read(CHUNK):
                fh.write(chunk)
                download.have += len(chunk)
    except (ConnectionError, socket.timeout, http.client.HTTPException) as err:
        raise BrokenOff(str(err) or type(err).__name__) from None
    if download.total is not None and download.have < download.total:
        raise BrokenOff(f"the answer ended after {download.have} of its {download.total} bytes")


class Saver:
    """Saves a finished job's outputs into one folder, in order; `saved`: the paths saved so far. `note` shows a
    message on stderr; `left` gives the seconds --timeout leaves (None without one) and raises once it passed."""

    def __init__(self, bridge: Bridge, folder: Path, note: Callable[[str], None],
                 left: Callable[[], float | None]) -> None:
        self.bridge = bridge
        self.folder = folder
        self.note = note
        self.left = left
        self.saved: list[Path] = []

    def save_all(self, outputs: list[dict[str, Any]]) -> list[Path]:
        """Every output saved into the folder (made if missing); SaveFailed at the first that cannot be."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SaveFailed(f"the folder {self.folder} cannot be made ({err.strerror or err})") from None
        for output in outputs:
            self.saved.append(self.save(output))
        return self.saved

    def save(self, output: dict[str, Any]) -> Path:
        """Download one output (its `url` in the job document) into the folder; the path it was saved to. A
        download that cannot be finished leaves no partial file behind."""
        index = int(output.get("index", 0))
        size = output.get("size")
        download = Download(str(output.get("url") or ""), size if isinstance(size, int) else None)
        try:
            path, fh = create_new(self.folder, safe_name(output.get("name"), index))
        except OSError as err:
            raise SaveFailed(f"output {index} cannot be saved in {self.folder} ({err.strerror or err})") from None
        try:
            with fh:
                self.download(download, fh, index)
        except OSError as err:  # the network's errors are BrokenOff by now: this is the local file
            path.unlink(missing_ok=True)
            raise SaveFailed(f"output {index} cannot be written to {path} ({err.strerror or err})") from None
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    def download(self, download: Download, fh: IO[bytes], index: int) -> None:
        """Fetch until the whole output is in `fh`. A try that breaks off, or a bridge that cannot be reached or
        says it is passing (502/503/504), is tried again after a pause, from where it stopped, until LOST_AFTER
        seconds went by without a byte gained; another error status ends it at once."""
        retries = Reconnects()
        while True:
            remaining = self.left()
            before = download.have
            try:
                fetch(self.bridge, download, fh, bounded(DOWNLOAD_SILENCE, remaining))
                return
            except BridgeError as err:
                if err.status not in PASSING:
                    raise SaveFailed(f"the bridge answered {err.status} to the download of output {index}: "
                                     f"{err.detail}") from None
                reason: Exception = err
            except (BrokenOff, Unreachable) as err:
                reason = err
            if download.have > before:  # that try gained bytes: the bridge is there
                retries.reset()
            if retries.failed():
                self.note(f"the download of output {index} broke off ({reason}); retrying")
            elif retries.gone:
                raise SaveFailed(f"the download of output {index} broke off ({reason}) and could not be resumed "
                                 f"for {LOST_AFTER:.0f}s", lost=True)
            retries.pause(self.left())
