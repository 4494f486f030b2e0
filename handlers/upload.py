"""POST /upload: multipart files streamed to disk under names the bridge makes up."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import uuid
from pathlib import Path
from typing import IO, Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from tornado import web

from comfy.imagecheck import HEAD_BYTES, hopeless, identify
from comfy.facade import Api

from .base import BaseHandler, api_error

log = logging.getLogger(__name__)

IDENTIFIER = re.compile(r"^[A-Za-z0-9._/ -]{1,128}$")
MULTIPART_SLACK = 64 * 1024  # room for part headers and boundaries on top of the file bytes
MAX_BOUNDARY = 70  # RFC 2046; python-multipart refuses more than 256 with an exception of its own
NOT_AN_IMAGE = "is not a PNG, JPEG, WebP or GIF image"


def sniff(head: bytes, size: int) -> tuple[str, str] | None:
    """(extension, content type) of a complete file from its first bytes and size, or None (comfy.imagecheck)."""
    return identify(head, size)


class _Part:
    """One file part being written to a temporary file (closed at its end: an upload holds one descriptor)."""

    def __init__(self, field: str, filename: str, folder: Path) -> None:
        self.field = field
        self.filename = filename
        self.tmp = folder / f".{uuid.uuid4().hex}.part"
        self.fh: IO[bytes] | None = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.size = 0
        self.head = b""

    def write(self, data: bytes) -> None:
        assert self.fh is not None
        if len(self.head) < HEAD_BYTES:
            self.head += data[:HEAD_BYTES - len(self.head)]
        self.sha.update(data)
        self.size += len(data)
        self.fh.write(data)

    def end(self) -> None:
        """The part is complete: close the file now, sync it later (sync())."""
        if self.fh is not None:
            self.fh.close()
            self.fh = None

    def sync(self) -> None:
        """Wait until the file is on disk (blocking: run it in a thread)."""
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        self.tmp.unlink(missing_ok=True)


@web.stream_request_body
class UploadHandler(BaseHandler):
    """Parses the multipart body as it arrives; never holds a whole file in memory."""

    async def prepare(self) -> None:  # type: ignore[override]  # Tornado awaits a coroutine prepare()
        """Check type and declared size before reading any of the body (and learn the caller's stored bytes)."""
        config = self.services.config
        self.parts: list[_Part] = []
        self.current: _Part | None = None
        self.error: web.HTTPError | None = None
        self.parser: MultipartParser | None = None
        self.syncing = self.gone = False
        if self.request.method != "POST":
            return super().prepare()
        self.check_auth()
        limit = config.max_upload_bytes * config.max_upload_files + MULTIPART_SLACK
        self.request.connection.set_max_body_size(limit)  # type: ignore[union-attr]
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise api_error(413, f"the upload is larger than {config.max_upload_bytes} bytes")
        self._used = await self.services.jobs.usage(self.identity.owner)  # bytes stored before this upload
        if length is not None and length.isdigit():
            self.check_quota(int(length) - MULTIPART_SLACK)
        ctype, params = parse_options_header(self.request.headers.get("Content-Type", ""))
        if ctype != b"multipart/form-data" or not params.get(b"boundary"):
            raise api_error(415, "send files as multipart/form-data, e.g. curl -F \"file=@photo.png\"")
        if len(params[b"boundary"]) > MAX_BOUNDARY:
            raise api_error(400, f"the multipart boundary is longer than {MAX_BOUNDARY} characters (RFC 2046)")
        self._part_headers: dict[str, bytes] = {}
        self._hname = self._hvalue = b""
        callbacks: Any = {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }
        self.parser = MultipartParser(params[b"boundary"], callbacks)

    def data_received(self, chunk: bytes) -> None:
        """Feed the parser; the first error is answered at once (the connection then drops the rest)."""
        if self.parser is None or self.error is not None:
            return
        try:
            self.parser.write(chunk)
        except web.HTTPError as exc:
            self._fail(exc.status_code, exc.get_message() or "bad upload")
        except (MultipartParseError, ValueError):
            self._fail(400, "the multipart body is malformed")
        except OSError as exc:  # the disk is full, or the process is out of file descriptors
            log.warning("upload not stored: %s", exc.strerror or exc)
            self._fail(503, "the bridge cannot store files right now; try again later")
        if self.error is not None and not self._finished:
            # answer now, not after the rest of a body that may be gigabytes long
            self.send_error(self.error.status_code, exc_info=(type(self.error), self.error, None))

    async def post(self) -> None:
        """Answer {identifier: saved name} once every part is on disk and recorded."""
        if self._finished:  # refused while the body arrived
            return
        try:
            if self.parser is not None and self.error is None:
                self.parser.finalize()
        except MultipartParseError:
            self._fail(400, "the multipart body is malformed")
        if self.error is None and self.current is not None:
            self._fail(400, "the multipart body ended in the middle of a file")
        if self.error is None and not self.parts:
            self._fail(400, "no file in the upload; send at least one part with a filename")
        if self.error is not None:
            raise self.error
        # fsync waits on the disk (~0.1 s for 50 MB): in a thread, so other uploads keep flowing meanwhile
        self.syncing = True
        try:
            await asyncio.to_thread(_sync_all, self.parts)
        finally:
            self.syncing = False
        if self.gone:  # the caller left while the files were synced
            self._cleanup()
            return
        self._used = await self.services.jobs.usage(self.identity.owner)
        self.check_quota(sum(part.size for part in self.parts))
        saved = {}
        for part in self.parts:
            found = sniff(part.head, part.size)
            assert found is not None
            ext, ctype = found
            name = uuid.uuid4().hex + ext
            os.replace(part.tmp, self.services.config.uploads_dir / name)
            await self.services.jobs.add_upload(name, part.sha.hexdigest(), part.size, ctype, part.filename,
                                                self.identity.owner)
            saved[part.field] = name
            self.services.metrics.upload_bytes.inc(part.size)
        # the saved names are how callers refer to their files: they stay out of the log
        log.info("stored %d upload(s), %d bytes", len(saved), sum(part.size for part in self.parts))
        self.write_json(saved)

    def check_quota(self, incoming: int) -> None:
        """413 when these bytes would take the caller past its stored-bytes quota (uploads + untaken results)."""
        quota = self.services.config.quota_bytes
        used = self._used
        if incoming > 0 and used + incoming > quota:
            raise api_error(413, f"this upload would take the caller's stored files past its quota of {quota} bytes "
                                 f"({used} in use); take results or wait for old uploads to expire "
                                 "(limits.upload_ttl)")

    def _reserve(self, size: int) -> None:
        """Count bytes as they arrive against the caller's quota, with its other uploads still arriving, so
        concurrent uploads cannot each pass the check and together go past it."""
        owner, receiving = self.identity.owner, self.services.receiving
        receiving[owner] = receiving.get(owner, 0) + size
        self._reserved = getattr(self, "_reserved", 0) + size
        quota = self.services.config.quota_bytes
        used = self._used
        if used + receiving[owner] > quota:
            raise api_error(413, f"these uploads would take the caller's stored files past its quota of {quota} "
                                 f"bytes ({used} stored, {receiving[owner]} arriving now)")

    def _release(self) -> None:
        reserved, self._reserved = getattr(self, "_reserved", 0), 0
        if reserved and hasattr(self, "identity"):
            receiving = self.services.receiving
            left = receiving.get(self.identity.owner, 0) - reserved
            if left > 0:
                receiving[self.identity.owner] = left
            else:
                receiving.pop(self.identity.owner, None)

    def on_finish(self) -> None:
        self._cleanup()

    def on_connection_close(self) -> None:
        """The caller left: drop its files and end the request (Tornado's own method ends the body wait;
        without it the handler and its task stay alive for good)."""
        super().on_connection_close()
        if getattr(self, "syncing", False):
            self.gone = True  # post() cleans up once the worker thread no longer uses the files
            return
        self._cleanup()

    def _cleanup(self) -> None:
        self._release()
        self.parser = None  # its callbacks are this handler's methods: a cycle only the collector would break
        for part in self.parts:
            if part.tmp.exists():
                part.discard()
        if self.current is not None:
            self.current.discard()
            self.current = None

    def _fail(self, code: int, detail: str) -> None:
        if self.error is None:
            self.error = api_error(code, detail)
        self._cleanup()

    # multipart callbacks ------------------------------------------------------------------------
    def _part_begin(self) -> None:
        self._part_headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def _header_end(self) -> None:
        self._part_headers[self._hname.decode("latin-1").lower()] = self._hvalue
        self._hname = self._hvalue = b""

    def _headers_finished(self) -> None:
        config = self.services.config
        _, params = parse_options_header(self._part_headers.get("content-disposition", b""))
        field = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename")
        if filename is None:
            raise api_error(400, f"part {field!r} is not a file; send files with a filename")
        if not IDENTIFIER.match(field):
            raise api_error(400, "each part needs a field name (its identifier) of 1-128 letters, "
                                     "digits and . _ / - or space")
        if any(p.field == field for p in self.parts):
            raise api_error(400, f"identifier {field!r} is used twice")
        if len(self.parts) >= config.max_upload_files:
            raise api_error(400, f"at most {config.max_upload_files} files per upload")
        # the caller's name is only kept as a note: no NUL, which no database text column takes
        original = filename.decode("utf-8", "replace").replace("\x00", "\ufffd")[:255]
        self.current = _Part(field, original, config.uploads_dir)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.current
        if part is None:
            return
        limit = self.services.config.max_upload_bytes
        if part.size + (end - start) > limit:
            raise api_error(413, f"{part.field!r} is larger than {limit} bytes")
        self._reserve(end - start)
        part.write(data[start:end])
        if hopeless(part.head):
            raise api_error(415, f"{part.field!r} {NOT_AN_IMAGE}")

    def _part_end(self) -> None:
        part, self.current = self.current, None
        if part is None:
            return
        part.end()
        if sniff(part.head, part.size) is None:
            part.discard()
            raise api_error(415, f"{part.field!r} {NOT_AN_IMAGE}")
        self.parts.append(part)  # fsynced in post(), off the event loop


def _sync_all(parts: list[_Part]) -> None:
    for part in parts:
        part.sync()


def routes(services: Api) -> list[tuple[str, type, dict[str, Any]]]:
    """URL table of this module."""
    return [(r"/upload", UploadHandler, {"services": services})]
