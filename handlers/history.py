"""GET /history: a client's results as multipart (taken once), or the paginated generation log."""
from __future__ import annotations

import logging
import time
import uuid
from typing import Any
from urllib.parse import quote

from tornado.iostream import StreamClosedError

from comfy.jobs import Job, Output, State
from comfy.services import Services

from .base import BaseHandler, api_error

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
        if self.get_query_argument("clientId", None) is not None:
            await self._results(self.client_id())
        else:
            self._generation_log(limit, offset)

    def _no_content(self, detail: str) -> None:
        # a 204 has no body on the wire, so the reason travels in a header (and the log)
        log.info("history: %s", detail)
        self.set_status(204)
        self.set_header("X-Detail", detail)
        self.clear_header("Content-Type")
        self.finish()

    async def _results(self, client_id: str) -> None:
        scheduler = self.services.scheduler
        if not scheduler.known_client(client_id):
            return self._no_content("The client ID has not been submitted to the server before. "
                                    f"It is not recognized. / {client_id}")
        folder = self.services.config.results_dir
        jobs = [j for j in scheduler.unfetched(client_id) if j.outputs]
        parts = [(j, o) for j in jobs for o in j.outputs if (folder / o.path).is_file()]
        if not parts:
            empty = [j for j in scheduler.unfetched(client_id) if not j.outputs]
            if empty:
                scheduler.mark_fetched(empty)  # finished with nothing to hand over
            return self._no_content(f"No contents with that client id / {client_id}")
        boundary = uuid.uuid4().hex
        heads = [self._part_head(boundary, j, o) for j, o in parts]
        tail = f"--{boundary}--\r\n".encode()
        total = sum(len(h) + (folder / o.path).stat().st_size + 2 for h, (_, o) in zip(heads, parts)) + len(tail)
        self.set_header("Content-Type", f"multipart/form-data; boundary={boundary}")
        self.set_header("Content-Length", str(total))
        self.set_header("X-Job-Ids", ",".join(j.id for j in jobs))
        try:
            buffered = 0
            for head, (_, out) in zip(heads, parts):
                self.write(head)
                with open(folder / out.path, "rb") as fh:
                    while chunk := fh.read(CHUNK):
                        self.write(chunk)
                        buffered += len(chunk)
                        if buffered >= CHUNK:  # send it and wait for room (flow control)
                            await self.flush()
                            buffered = 0
                self.write(b"\r\n")
            self.write(tail)
            await self.flush()  # small results leave in this one write
        except StreamClosedError:
            log.info("history: client %s… left mid-download; its results are kept", client_id[:8])
            return
        # only now, with every byte handed to the connection, are the results deleted
        scheduler.mark_fetched(jobs)
        self.finish()

    @staticmethod
    def _part_head(boundary: str, job: Job, out: Output) -> bytes:
        name = out.filename.replace('"', "_")
        return (f"--{boundary}\r\n"
                f"Content-Disposition: form-data; name=\"{job.id}/{out.node_id}\"; filename=\"{name}\"; "
                f"filename*=UTF-8''{quote(name)}\r\n"
                f"Content-Type: {out.content_type}\r\n"
                f"Content-Length: {out.size}\r\n\r\n").encode("utf-8")

    def _generation_log(self, limit: int, offset: int) -> None:
        rows, total = self.services.store.log_page(limit, min(offset, MAX_OFFSET))
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
            if row["state"] == State.COMPLETED.value and not row["fetched"]:
                entry["result_url"] = f"/history?clientId={quote(row['client_id'])}"
            if row["expired"]:
                entry["result_expired"] = True
            if row["error"] and row["state"] != State.COMPLETED.value:
                entry["error_message"] = row["error"]
            entries.append(entry)
        self.write_json({"history": entries, "total_count": total, "page": offset // limit + 1,
                         "page_size": limit})

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


def routes(services: Services) -> list[tuple[str, type, dict[str, Any]]]:
    """URL table of this module."""
    return [(r"/history", HistoryHandler, {"services": services})]
