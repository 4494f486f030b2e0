"""GET /jobs/{id} and /jobs/{id}/outputs/{n}: one job and its stored results, for their owner only."""
from __future__ import annotations

from typing import Any
from urllib.parse import quote

from tornado.iostream import StreamClosedError

from comfy.jobdoc import job_document, open_mode_query
from comfy.jobs import Job, State
from comfy.facade import Api

from .base import BaseHandler, api_error, check_client_id

CHUNK = 256 * 1024


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
    """GET /jobs/{id}: the job document (state, inputs, place, progress, times, outputs with their URLs)."""

    async def get(self, job_id: str) -> None:
        """The job document."""
        job = await self.owned_job(job_id)
        query = open_mode_query(None if self.identity.key_mode else self.get_query_argument("clientId", None))
        pos = await self.services.jobs.position(job.id) if job.state is State.QUEUED else None
        self.write_json(job_document(job, pos, query))


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
