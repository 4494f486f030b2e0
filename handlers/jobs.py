"""Submitting and steering jobs: generate (at once, or waiting for the result), execution-info, interrupt, free,
generation-count."""
from __future__ import annotations

import asyncio
import os
from typing import Any, Callable
from urllib.parse import quote

from tornado.iostream import StreamClosedError

from comfy.facade import Api
from comfy.jobdoc import job_document, open_mode_query
from comfy.jobs import Job, State
from comfy.jobservice import InputError, NoBackend, QueueFull, QuotaExceeded
from comfy.limits import RateLimiter
from comfy.waiters import Outcome

from .base import UNKNOWN_CLIENT, BaseHandler, api_error
from .negotiate import Accept, wait_preference

CHUNK = 256 * 1024


class GenerateHandler(BaseHandler):
    """POST /generate-based-workflow?clientId=ID: queue a job; with Prefer: wait=N (or ?wait=N), answer with
    its result when it ends within N seconds."""

    def initialize(self, services: Api, limiter: RateLimiter) -> None:  # type: ignore[override]
        """Receive the services and the per-client submit rate limiter."""
        super().initialize(services)
        self.limiter = limiter
        self._hung_up: Callable[[], None] | None = None
        self._gone = False

    async def post(self) -> None:
        """Queue the job (the job service validates it); answer with its id and place in the line, or, asked to
        wait, with the job document or an output's bytes once it ends (202 with where it stands if it does
        not end in time)."""
        caller_id, client_id = self.scoped_client_id()
        wait = self.limiter.take(client_id)
        if wait:
            config = self.services.config
            raise api_error(429, f"too many submits for this clientId: {config.submit_burst} at once, then "
                                 f"{config.submit_rate:g} per second; retry in {wait:.1f}s",
                            {"Retry-After": self.limiter.retry_after(wait)})
        try:
            waiting = wait_preference(self.request.headers.get_list("Prefer"), self.get_query_argument("wait", None),
                                      self.services.config.max_wait)
        except ValueError as exc:
            raise api_error(400, str(exc)) from None
        body = self.json_body()
        try:
            queued = await self.services.jobs.submit(client_id, body, self.identity.owner,
                                                     own_uploads=self.identity.key_mode, placed=waiting is None)
        except InputError as exc:
            raise api_error(400, str(exc)) from None
        except QuotaExceeded as exc:
            raise api_error(429, str(exc), {"Retry-After": "30"}) from None
        except QueueFull as exc:
            raise api_error(429, str(exc), {"Retry-After": "5"}) from None
        if waiting is not None:
            query = open_mode_query(None if self.identity.key_mode else caller_id)
            return await self.wait_and_answer(queued.job, client_id, waiting, query)
        answer: dict[str, Any] = {"detail": f"queued / {max(queued.waiting, 1)}", "job_id": queued.job.id}
        if queued.position is not None:
            answer["queue_position"] = queued.position
        self.write_json(answer)

    async def wait_and_answer(self, job: Job, client_id: str, waiting: tuple[float, str], query: str) -> None:
        """Wait for the job's final event (or the time, or the caller hanging up), then answer. While it waits the
        submit holds the client as an open socket does: a caller that hangs up leaves this job to be cancelled
        after clients.disconnect_grace, unless another socket, stream or waiting submit of it is open."""
        hub, seconds = self.services.hub, waiting[0]
        future = hub.waiters.expect(job.id)
        timer = asyncio.get_running_loop().call_later(seconds, hub.waiters.settle, future, Outcome.TIMED_OUT)
        self._hung_up = lambda: hub.waiters.settle(future, Outcome.GONE)
        if self._gone:
            self._hung_up()
        hub.hold(client_id)
        outcome = Outcome.GONE
        try:
            outcome = await future
        finally:
            timer.cancel()
            hub.waiters.forget(job.id, future)
            self._hung_up = None
            hub.release(client_id, leaving=outcome is Outcome.GONE, job_id=job.id)
        if outcome is not Outcome.GONE:
            await self.answer_job(await self.services.jobs.find_job(job.id) or job, waiting[1], query)

    def on_connection_close(self) -> None:
        """The caller hung up: a waiting submit stops waiting."""
        super().on_connection_close()
        self._gone = True
        if self._hung_up is not None:
            self._hung_up()

    async def answer_job(self, job: Job, applied: str, query: str) -> None:
        """202 + Location while the job waits or runs; once it ended, the document, or the output the Accept
        header prefers to it (406 when it accepts neither; 422 when bytes were asked of a job that failed)."""
        location = f"/jobs/{job.id}{query}"
        self.set_header("Preference-Applied", applied)
        self.set_header("X-Job-Id", job.id)
        if job.state.active:
            place = await self.services.jobs.position(job.id) if job.state is State.QUEUED else None
            self.set_header("Location", location)
            return self.write_json(job_document(job, place, query), 202)
        accept = Accept(self.request.headers.get("Accept"))
        if not accept.bytes_first():
            return self.write_json(job_document(job, None, query))
        headers = {"Preference-Applied": applied, "X-Job-Id": job.id, "Location": location}
        if job.state is not State.COMPLETED:
            raise api_error(422, f"job {job.id} {job.state.value}: {job.error or job.state.value}; it has no "
                                 "output to answer with", headers, job=job_document(job, None, query))
        index = accept.output([o.content_type for o in job.outputs])
        if index is None:
            if accept.json_ok:
                return self.write_json(job_document(job, None, query))
            kinds = ", ".join(sorted({o.content_type for o in job.outputs})) or "none"
            raise api_error(406, f"job {job.id} has no output of a type the Accept header names (its outputs: "
                                 f"{kinds}); the job document is at the Location", headers)
        await self.send_output(job, index, query, headers)

    async def send_output(self, job: Job, index: int, query: str, headers: dict[str, str]) -> None:
        """One output's bytes as the answer; the job's results are taken once all of it but its last byte went
        out, before that byte."""
        out = job.outputs[index]
        try:
            fh = open(self.services.config.results_dir / out.path, "rb")
        except FileNotFoundError:
            raise api_error(410, f"job {job.id}'s output {index} is no longer stored", headers) from None
        ctype = out.content_type
        if ctype.startswith("text/") and "charset" not in ctype:
            ctype += "; charset=utf-8"  # the bridge writes text outputs as UTF-8
        name = out.filename.replace('"', "_")
        with fh:
            size = os.fstat(fh.fileno()).st_size
            self.set_header("Content-Type", ctype)
            self.set_header("Content-Length", str(size))
            self.set_header("Content-Disposition",
                            f"inline; filename=\"{name}\"; filename*=UTF-8''{quote(out.filename)}")
            self.set_header("Content-Location", f"/jobs/{job.id}/outputs/{index}{query}")
            self.set_header("Content-Security-Policy", "sandbox")  # ComfyUI's bytes, never the bridge's page
            stream = self.connection_stream()
            stream.set_nodelay(True)
            # the last byte waits until the results are taken: a caller that has the whole answer finds them
            # gone from /history at once; one that leaves before it keeps them untaken
            last = b""
            try:
                while (chunk := fh.read(CHUNK)) and not stream.closed():
                    if len(chunk) < CHUNK or fh.tell() == size:
                        chunk, last = chunk[:-1], chunk[-1:]
                    self.write(chunk)
                    self.flush()
                    if stream.writing():  # the kernel did not take it all at once: wait for the reader
                        await self.paced_flush()
            except StreamClosedError:
                return
        if stream.closed():
            return  # the caller left: it may not all have gone out, so the results stay untaken
        await self.services.jobs.taken([job])
        self.finish(last)


class ExecutionInfoHandler(BaseHandler):
    """GET /execution-info?clientId=ID: the client's status, for polling."""

    async def get(self) -> None:
        """The latest active job's state, else the latest job's outcome."""
        client_id, scoped = self.scoped_client_id()
        jobs = self.services.jobs
        job = await jobs.status_job(scoped)
        if job is None:  # a clientId is known once it has a job
            raise api_error(400, UNKNOWN_CLIENT.format(client_id))
        status, text = job.client_status()
        answer: dict[str, Any] = {"status": status, "details": text, "detail": text, "job_id": job.id,
                                  "state": job.state.value}
        pos = await jobs.position(job.id) if job.state is State.QUEUED else None
        if pos is not None:
            answer["queue_position"] = pos
        self.write_json(answer)


class InterruptHandler(BaseHandler):
    """POST /interrupt?clientId=ID: cancel the client's queued and running work."""

    async def post(self) -> None:
        """Drop queued jobs; interrupt a running one on its backend (only that prompt), wherever it runs."""
        client_id, scoped = await self.known_client_id()
        count = await self.services.jobs.cancel_client(scoped, "interrupted by the client")
        self.write_json({"detail": f"interrupted that clientId will be ignored. / {client_id}",
                         "cancelled": count})


class FreeHandler(BaseHandler):
    """POST /free[?clientId=ID]: ask backends to unload models and free memory."""

    async def post(self) -> None:
        """Free every backend, or the one the client's job was assigned to (wherever a bridge drives it)."""
        scoped = None
        if self.get_query_argument("clientId", None) is None:
            # unloading every backend's models slows every caller's next job: the bridge's business, not one caller's
            self.require_operator()
            target = "ALL"
        else:
            target, scoped = await self.known_client_id()
        try:
            _, freed = await self.services.jobs.free(scoped)
        except InputError as exc:
            raise api_error(400, f"{exc} / {target}") from None
        except NoBackend as exc:
            raise api_error(503, str(exc)) from None
        self.write_json({"detail": f"server memory free now / {target}", "freed": freed})


class GenerationCountHandler(BaseHandler):
    """GET /generation-count: how many jobs have run, across restarts."""

    async def get(self) -> None:
        """The persistent job counter as a bare number."""
        self.write_json(await self.services.jobs.generation_count())


def routes(services: Api) -> list[tuple[str, type, dict[str, Any]]]:
    """URL table of this module."""
    kw = {"services": services}
    limiter = RateLimiter(services.config.submit_rate, services.config.submit_burst)
    return [
        (r"/generate-based-workflow", GenerateHandler, {**kw, "limiter": limiter}),
        (r"/execution-info", ExecutionInfoHandler, kw),
        (r"/interrupt", InterruptHandler, kw),
        (r"/free", FreeHandler, kw),
        (r"/generation-count", GenerationCountHandler, kw),
    ]
