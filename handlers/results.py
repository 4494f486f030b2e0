"""/jobs/{id} and /jobs/{id}/outputs/{n}: one job and its stored results, for their owner only.

GET /jobs/{id} is the job document; DELETE cancels the job or discards its results. An output streams with its
content type, length, a strong ETag and single byte ranges (players seek in videos)."""
from __future__ import annotations

import os
import re
import time
from email.utils import formatdate, mktime_tz, parsedate_tz
from typing import IO, Any
from urllib.parse import quote

from tornado.iostream import StreamClosedError

from comfy.jobdoc import job_document, open_mode_query
from comfy.jobs import Job, Output, State
from comfy.facade import Api

from .base import BaseHandler, api_error, check_client_id

CHUNK = 256 * 1024
DIGITS = re.compile(r"[0-9]+")
INDEX = re.compile(r"[0-9]{1,6}")
FAR = 10**19  # what a byte position of 19 digits or more stands for: past the end of any file


class Unsatisfiable(Exception):
    """The Range names no byte of the file (416)."""


class JobResource(BaseHandler):
    """Shared by the job routes: find a job the caller may see, or 404 (whether it exists stays unsaid)."""

    async def owned_job(self, job_id: str) -> Job:
        """The job if it is the caller's: same key (or admin); without keys, the request's clientId is the
        job's. Anyone else learns nothing, not even that the id exists."""
        job = await self.services.jobs.find_job(job_id)
        me = self.identity
        if job is not None:
            if me.key_mode:
                mine = me.admin or job.owner == me.name
            else:
                given = self.get_query_argument("clientId", None)
                mine = given is not None and check_client_id(given, self.services.config.max_client_id_length) \
                    == job.client_id
            if mine:
                return job
        hint = "" if me.key_mode else " (without keys, add the job's ?clientId=)"
        raise api_error(404, f"no job {job_id[:40]!r} of yours{hint}")

    async def write_document(self, job: Job, status: int = 200) -> None:
        """Answer the job document (URLs carry the ?clientId= that open mode needs)."""
        query = open_mode_query(None if self.identity.key_mode else self.get_query_argument("clientId", None))
        pos = await self.services.jobs.position(job.id) if job.state is State.QUEUED else None
        self.write_json(job_document(job, pos, query), status)


class JobHandler(JobResource):
    """GET /jobs/{id}: the job document. DELETE /jobs/{id}: cancel it, or discard its results."""

    async def get(self, job_id: str) -> None:
        """The job document: state, inputs, place, progress, times, outputs with their URLs."""
        await self.write_document(await self.owned_job(job_id))

    async def delete(self, job_id: str) -> None:
        """Waiting or running: cancel that job wherever it runs (202 while its backend stops it, 200 once it is
        cancelled). Completed with untaken results: delete them now (200). Anything else is left as it is (200)."""
        job = await self.owned_job(job_id)
        job = await self.services.jobs.drop(job, f"cancelled with DELETE /jobs/{job.id}")
        await self.write_document(job, 202 if job.state.active else 200)


class OutputHandler(JobResource):
    """GET/HEAD /jobs/{id}/outputs/{n}: one stored output's bytes, whole or one byte range (reading takes
    nothing)."""

    async def get(self, job_id: str, index: str) -> None:
        """Stream the file, or the range asked for."""
        await self._answer(job_id, index)

    async def head(self, job_id: str, index: str) -> None:
        """The headers GET would send, without the body."""
        await self._answer(job_id, index)

    async def _answer(self, job_id: str, index: str) -> None:
        job = await self.owned_job(job_id)
        n, out = self._output(job, index)
        try:
            fh = open(self.services.config.results_dir / out.path, "rb")
        except FileNotFoundError:
            raise api_error(410, "this output is no longer stored") from None
        with fh:
            await self._send(fh, f'"{job.id}.{n}.{out.size:x}"', out)

    @staticmethod
    def _output(job: Job, index: str) -> tuple[int, Output]:
        if not INDEX.fullmatch(index):
            raise api_error(404, f"no output {index[:20]!r}: outputs are numbered from 0")
        n = int(index)
        if job.state is not State.COMPLETED:
            raise api_error(404, f"job {job.id} is {job.state.value}: outputs exist once it completed")
        if n < len(job.outputs):
            return n, job.outputs[n]
        if not job.outputs and (job.fetched or job.expired):
            raise api_error(410, "this job's results are no longer stored (taken and past the refetch grace, "
                                 "discarded, or expired)")
        raise api_error(404, f"job {job.id} has no output {n} (it has {len(job.outputs)})")

    async def _send(self, fh: IO[bytes], etag: str, out: Output) -> None:
        """The validators, then 304, 416, 206 with one range, or 200 with the whole file."""
        stat = os.fstat(fh.fileno())
        size = stat.st_size
        self.set_header("ETag", etag)
        self.set_header("Last-Modified", formatdate(stat.st_mtime, usegmt=True))
        self.set_header("Accept-Ranges", "bytes")
        self.set_header("Cache-Control", "private, no-cache")  # ask again each time: it may be discarded
        self.set_header("Content-Disposition", f"inline; filename*=UTF-8''{quote(out.filename)}")
        # a result is ComfyUI's bytes, not the bridge's page: never let a browser run it as one
        self.set_header("Content-Security-Policy", "sandbox")
        headers = self.request.headers
        if not_modified(headers.get("If-None-Match"), headers.get("If-Modified-Since"), etag, stat.st_mtime):
            self.set_status(304)
            self.finish()
            return
        span = None
        if range_applies(headers.get("If-Range"), etag, stat.st_mtime):
            try:
                span = byte_range(headers.get("Range"), size)
            except Unsatisfiable:
                raise api_error(416, f"the range {headers.get('Range', '')[:60]!r} is outside the output's "
                                     f"{size} bytes", {"Content-Range": f"bytes */{size}",
                                                       "Accept-Ranges": "bytes", "ETag": etag}) from None
        start, length = (0, size) if span is None else (span[0], span[1] - span[0] + 1)
        if span is not None:
            self.set_status(206)
            self.set_header("Content-Range", f"bytes {span[0]}-{span[1]}/{size}")
        self.set_header("Content-Type", out.content_type)
        self.set_header("Content-Length", str(length))
        if self.request.method == "HEAD":
            self.finish()
            return
        fh.seek(start)
        try:
            while length > 0:  # a chunk at a time, each sent before the next is read
                chunk = fh.read(min(CHUNK, length))
                if not chunk:
                    break
                self.write(chunk)
                length -= len(chunk)
                await self.paced_flush()
        except StreamClosedError:
            return
        self.finish()


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range a Range header asks for, as (first, last) inclusive; None to send the whole file
    (no header, another unit, several ranges, or a header that does not parse, which RFC 9110 lets a server
    ignore). Raises Unsatisfiable when it names no byte of the file."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if unit.strip().lower() != "bytes" or not dash or "," in spec:
        return None
    if not (DIGITS.fullmatch(first) or first == "") or not (DIGITS.fullmatch(last) or last == ""):
        return None
    if first == "":  # the last n bytes
        if last == "" or _position(last) == 0 or size == 0:
            raise Unsatisfiable()
        return max(0, size - _position(last)), size - 1
    start = _position(first)
    end = _position(last) if last else max(start, size - 1)
    if end < start:  # "bytes=9-2" is no range at all
        return None
    if start >= size:
        raise Unsatisfiable()
    return start, min(end, size - 1)


def _position(digits: str) -> int:
    return int(digits) if len(digits) < 19 else FAR


def range_applies(if_range: str | None, etag: str, mtime: float) -> bool:
    """If-Range: the range is sent only while the file is the one the caller has part of (its strong ETag, or
    its Last-Modified date exactly); otherwise the whole file."""
    if if_range is None:
        return True
    value = if_range.strip()
    if value.startswith(('"', "W/")):
        return value == etag
    return _http_date(value) == int(mtime)


def not_modified(if_none_match: str | None, if_modified_since: str | None, etag: str, mtime: float) -> bool:
    """True when the caller's copy is current: its ETag is listed (weak comparison), or, with no
    If-None-Match, it is no older than the file."""
    if if_none_match is not None:
        tags = [t.strip() for t in if_none_match.split(",")]
        return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)
    since = _http_date(if_modified_since) if if_modified_since else None
    return since is not None and int(mtime) <= since <= time.time()


def _http_date(value: str) -> int | None:
    try:
        parsed = parsedate_tz(value)
        return int(mktime_tz(parsed)) if parsed is not None else None
    except (ValueError, OverflowError):
        return None


def routes(services: Api) -> list[tuple[str, type, dict[str, Any]]]:
    """URL table of this module."""
    kw = {"services": services}
    return [(r"/jobs/(?P<job_id>[^/]+)", JobHandler, kw),
            (r"/jobs/(?P<job_id>[^/]+)/outputs/(?P<index>[^/]+)", OutputHandler, kw)]
