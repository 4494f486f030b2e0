"""GET /jobs/{id} and /jobs/{id}/outputs/{n}: one job and its stored results, for their owner only."""
from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

from tornado.iostream import StreamClosedError

from comfy.jobs import Job, State
from comfy.facade import Api

from .base import BaseHandler, api_error, check_client_id

CHUNK = 256 * 1024


def iso(ts: float | None) -> str | None:
    """A timestamp as the API writes it (UTC, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else None


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


class JobHandler(JobResource):
    """GET /jobs/{id}: the job's state and its outputs with their URLs."""

    async def get(self, job_id: str) -> None:
        """The job document."""
        job = await self.owned_job(job_id)
        query = f"?clientId={quote(self.get_query_argument('clientId'))}" \
            if self.get_query_argument("clientId", None) and not self.identity.key_mode else ""
        doc: dict[str, Any] = {
            "id": job.id, "workflow": job.workflow, "state": job.state.value, "progress": round(job.progress, 4),
            "attempts": job.attempts, "created_at": iso(job.created_at), "started_at": iso(job.started_at),
            "finished_at": iso(job.finished_at),
        }
        pos = await self.services.jobs.position(job.id) if job.state is State.QUEUED else None
        if pos is not None:
            doc["queue_position"] = pos
        if job.error and job.state is not State.COMPLETED:
            doc["error"] = job.error
        if job.state is State.COMPLETED:
            doc["results"] = "expired" if job.expired else "taken" if job.fetched else "stored"
        doc["outputs"] = [{"index": i, "node_id": o.node_id, "filename": o.filename, "content_type": o.content_type,
                           "size": o.size, "url": f"/jobs/{job.id}/outputs/{i}{query}"}
                          for i, o in enumerate(job.outputs)]
        self.write_json(doc)


class OutputHandler(JobResource):
    """GET /jobs/{id}/outputs/{n}: one stored output's bytes (reading it takes nothing)."""

    async def get(self, job_id: str, index: str) -> None:
        """Stream the file with its content type and length."""
        job = await self.owned_job(job_id)
        if not index.isdigit() or len(index) > 6:
            raise api_error(404, f"no output {index[:20]!r}: outputs are numbered from 0")
        n = int(index)
        if job.state is not State.COMPLETED or n >= len(job.outputs):
            if job.state is State.COMPLETED and not job.outputs:
                raise api_error(410, "this job's results are no longer stored (taken and past the refetch "
                                     "grace, or expired)")
            raise api_error(404, f"job {job.id} has no output {n}")
        out = job.outputs[n]
        path = self.services.config.results_dir / out.path
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            raise api_error(410, "this output is no longer stored") from None
        with fh:
            self.set_header("Content-Type", out.content_type)
            self.set_header("Content-Length", str(path.stat().st_size))
            self.set_header("Content-Disposition", f"inline; filename*=UTF-8''{quote(out.filename)}")
            # a result is ComfyUI's bytes, not the bridge's page: never let a browser run it as one
            self.set_header("Content-Security-Policy", "sandbox")
            try:
                while chunk := fh.read(CHUNK):
                    self.write(chunk)
                    await self.paced_flush()
            except StreamClosedError:
                return
        self.finish()


def routes(services: Api) -> list[tuple[str, type, dict[str, Any]]]:
    """URL table of this module."""
    kw = {"services": services}
    return [(r"/jobs/(?P<job_id>[^/]+)", JobHandler, kw),
            (r"/jobs/(?P<job_id>[^/]+)/outputs/(?P<index>[^/]+)", OutputHandler, kw)]
