"""GET /history: a client's results as multipart (taken once), or the paginated generation log."""
from __future__ import annotations

import logging
import os
import time
import uuid
from contextlib import ExitStack
from typing import Any, Awaitable, Callable
from urllib.parse import quote

from tornado.iostream import StreamClosedError

from comfy.identity import client_tag
from comfy.jobdoc import output_kind
from comfy.jobs import Job, Output, State
from comfy.outputs import META_KEYS
from comfy.facade import Api

from .base import UNKNOWN_CLIENT, BaseHandler, api_error, refuse_cross_site

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
MAX_PAGE = 1000
MAX_OFFSET = 2**62  # SQLite's integers stop at 2**63 - 1; any offset past the log is an empty page anyway


class HistoryHandler(BaseHandler):
    """Results by clientId, or the log by limit/offset."""

    async def get(self) -> None:
        """Dispatch on whether a clientId was given."""
        # checked in both modes: a bad parameter is a bad request even where it would be ignored
        limit = self._int_arg("limit", 10, 1, MAX_PAGE)
        offset = self._int_arg("offset", 0, 0, None)
        again = self._flag("redeliver")
        if self.get_query_argument("clientId", None) is not None:
            client_id, scoped = self.scoped_client_id()
            await (self._again(client_id, scoped) if again else self._results(client_id, scoped))
        else:
            await self._generation_log(limit, offset)

    def _no_content(self, detail: str, scoped: str) -> None:
        # a 204 has no body on the wire, so the reason travels in a header; the log gets no clientId
        log.info("history: client %s: %s", client_tag(scoped), detail.partition(" / ")[0])
        self.set_status(204)
        self.set_header("X-Detail", detail)
        self.clear_header("Content-Type")
        self.finish()

    async def _results(self, client_id: str, scoped: str) -> None:
        """Take the client's results: exactly one of any number of concurrent requests gets them."""
        # taking is a change of state, though a GET: another site's page may not do it (an <img> would)
        refuse_cross_site(self.request, self.services.config.cors_origins)
        service = self.services.jobs
        jobs = await service.claim_results(scoped)
        if not jobs and not await service.known_client(scoped):  # results name a known client: no question
            return self._no_content(UNKNOWN_CLIENT.format(client_id), scoped)
        if jobs is None:
            raise api_error(409, "another request is receiving this clientId's results right now; if it does "
                                 "not receive them whole they can be taken again", {"Retry-After": "1"})
        if not jobs:
            return self._no_content(f"No contents with that client id / {client_id}", scoped)
        taken = False

        async def take() -> None:
            # every byte but the closing boundary is with the connection (the caller reads them while the take
            # is recorded): the results are taken now, before the caller can see a whole answer (so its next call
            # already finds them gone and its quota freed); their files stay for refetch_grace in case its side
            # lost them after all (?redeliver=1)
            nonlocal taken
            await service.taken(jobs)
            taken = True
        delivered = False
        try:
            delivered = await self._send(jobs, take)
        finally:
            if not taken:
                await service.release_results(jobs)
        if delivered:
            self.finish()

    async def _again(self, client_id: str, scoped: str) -> None:
        """?redeliver=1: the results this client took within refetch_grace, sent again (nothing is taken)."""
        jobs = await self.services.jobs.taken_results(scoped)
        if not jobs:
            return self._no_content(f"No contents with that client id / {client_id}", scoped)
        if await self._send(jobs):
            self.finish()

    async def _send(self, jobs: list[Job], before_end: Callable[[], Awaitable[None]] | None = None) -> bool:
        """Write the jobs' outputs as one multipart answer; False if the caller left before all of it was sent.
        `before_end` runs once everything but the closing boundary has been handed to the connection."""
        folder = self.services.config.results_dir
        with ExitStack() as files:
            # every file is opened before the headers go out: one that a sweep deletes meanwhile stays readable,
            # so the answer is always as long as it says
            parts: list[tuple[Job, Output, Any]] = []
            for job in jobs:
                for out in job.outputs:
                    try:
                        parts.append((job, out, files.enter_context(open(folder / out.path, "rb"))))
                    except FileNotFoundError:
                        continue
            boundary = uuid.uuid4().hex
            heads = [self._part_head(boundary, j, o) for j, o, _ in parts]
            tail = f"--{boundary}--\r\n".encode()
            total = sum(len(h) + os.fstat(fh.fileno()).st_size + 2 for h, (_, _, fh) in zip(heads, parts)) + len(tail)
            self.set_header("Content-Type", f"multipart/form-data; boundary={boundary}")
            self.set_header("Content-Length", str(total))
            self.set_header("X-Job-Ids", ",".join(j.id for j in jobs))
            try:
                buffered = 0
                for head, (_, _, fh) in zip(heads, parts):
                    self.write(head)
                    while chunk := fh.read(CHUNK):
                        self.write(chunk)
                        buffered += len(chunk)
                        if buffered >= CHUNK:  # send it and wait for room (flow control)
                            await self.paced_flush()
                            buffered = 0
                    self.write(b"\r\n")
                if before_end is not None:
                    await self.paced_flush()
                    await before_end()
                self.write(tail)
                await self.paced_flush()
            except StreamClosedError:
                log.info("history: a caller left mid-download; its results are kept")
                return False
        return True

    @staticmethod
    def _part_head(boundary: str, job: Job, out: Output) -> bytes:
        """The spec's part headers (disposition, type, length), then what the output is: X-Output-Type and
        X-Output-<Key> for each thing known of it (width, height, frames, duration ...)."""
        name = out.filename.replace('"', "_")
        typed = "".join(f"X-Output-{key.title().replace('_', '-')}: {_header_value(value)}\r\n"
                        for key, value in output_headers(out))
        return (f"--{boundary}\r\n"
                f"Content-Disposition: form-data; name=\"{job.id}/{out.node_id}\"; filename=\"{name}\"; "
                f"filename*=UTF-8''{quote(name)}\r\n"
                f"Content-Type: {out.content_type}\r\n"
                f"Content-Length: {out.size}\r\n"
                f"{typed}\r\n").encode("utf-8")

    async def _generation_log(self, limit: int, offset: int) -> None:
        """The log: every job in open mode and for admin; with keys a caller's own jobs only. It names no
        clientId; result_url is the job's resource, which only its owner (or admin) can read."""
        me = self.identity
        owner = me.name if me.key_mode and not me.admin else None
        rows, total = await self.services.jobs.log_page(limit, min(offset, MAX_OFFSET), owner)
        entries = []
        for row in rows:
            entry: dict[str, Any] = {
                "id": row["id"],
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["created_at"])),
                "workflow": row["workflow"],
                "status": row["state"],
            }
            if row["finished_at"]:
                entry["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["finished_at"]))
            if row["state"] == State.COMPLETED.value and row["stored"]:
                entry["result_url"] = f"/jobs/{row['id']}"
                if row["fetched"]:
                    entry["result_taken"] = True
            if row["expired"]:
                entry["result_expired"] = True
            if row["error"] and row["state"] != State.COMPLETED.value:
                entry["error_message"] = row["error"]
            entries.append(entry)
        self.write_json({"history": entries, "total_count": total, "page": offset // limit + 1,
                         "page_size": limit})

    def _flag(self, name: str) -> bool:
        raw = self.get_query_argument(name, None)
        if raw is None or raw.lower() in ("0", "false", "no"):
            return False
        if raw.lower() in ("", "1", "true", "yes"):
            return True
        raise api_error(400, f"{name} must be 1 or 0 (true or false), got {raw[:20]!r}")

    def _int_arg(self, name: str, default: int, low: int, high: int | None) -> int:
        raw = self.get_query_argument(name, None)
        if raw is None:  # only a missing one takes the default; "limit=" is a bad limit
            return default
        try:
            value = int(raw, 10)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            bounds = f"{low}..{high}" if high is not None else f">= {low}"
            raise api_error(400, f"{name} must be an integer {bounds}, got {raw!r}", error=f"invalid {name}")
        return value


def output_headers(out: Output) -> list[tuple[str, Any]]:
    """(key, value) pairs a part tells of its output: its type first, then its metadata in a fixed order."""
    return [("type", output_kind(out))] + [(key, out.meta[key]) for key in META_KEYS if key in out.meta]


def _header_value(value: Any) -> str:
    return "true" if value is True else str(value)


def routes(services: Api) -> list[tuple[str, type, dict[str, Any]]]:
    """URL table of this module."""
    return [(r"/history", HistoryHandler, {"services": services})]
