"""GET /jobs/{id}/events and GET /events?clientId=ID: live status as server-sent events (text/event-stream)."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from comfy.facade import Api
from comfy.identity import client_tag
from comfy.jobs import Job, State
from comfy.streams import Cursor, EventStream, frame, state_messages

from .base import api_error, check_request
from .results import JobResource

log = logging.getLogger(__name__)

MAX_EVENT_ID = 200  # characters of a Last-Event-ID (the bridge's ids are a job id and three short fields)
STALL_SECONDS = 10.0  # how long a stream's reader may leave the kernel's send buffer full before it is cut off


class EventStreamHandler(JobResource):
    """One text/event-stream answer, registered with the hub like a caller socket (see comfy/streams.py)."""

    def initialize(self, services: Api) -> None:
        """Receive the bridge's services."""
        super().initialize(services)
        self._over: asyncio.Future[None] | None = None
        self._stalled_since: float | None = None
        self._client = ""  # the stream's clientId, for the log (as a tag)

    def check_auth(self) -> None:
        """As every route, but the key may also come as ?token= (a browser's EventSource sends no headers)."""
        self.identity = check_request(self, self.services, public=self.request.method == "OPTIONS",
                                      token=self.get_query_argument("token", None))

    def last_event_id(self) -> str | None:
        """Where the caller's previous stream stopped: the Last-Event-ID header, else ?lastEventId=. An id this
        bridge never sends (longer than MAX_EVENT_ID) is refused with 400; one it cannot read starts afresh."""
        header, query = self.request.headers.get("Last-Event-ID"), self.get_query_argument("lastEventId", None)
        for name, given in (("Last-Event-ID", header), ("lastEventId", query)):
            if given is not None and len(given) > MAX_EVENT_ID:
                raise api_error(400, f"{name} is at most {MAX_EVENT_ID} characters (send back an id the stream "
                                     "gave)")
        return header or query

    def check_room(self, client_id: str) -> None:
        """The bounds of caller sockets hold for streams too: per clientId and in all (sockets and streams)."""
        config, hub = self.services.config, self.services.hub
        if len(hub.sockets.get(client_id, ())) >= config.max_ws_per_client:
            raise api_error(429, f"this clientId already has {config.max_ws_per_client} open sockets and event "
                                 "streams; close one first", {"Retry-After": "5"})
        if hub.count >= config.max_ws_total:
            raise api_error(503, "the bridge has as many open sockets and event streams as it allows; try again "
                                 "later", {"Retry-After": "5"})

    async def stream(self, client_id: str, cursor: Cursor, job: Job | None) -> None:
        """Answer with the stream until it ends: the hub's messages, after what the store says now (the job's
        state, or the client's as /ws greets it, and whatever came after the caller's Last-Event-ID)."""
        hub = self.services.hub
        self._client = client_id
        self.start_answer()
        listener = EventStream(client_id, cursor, self)
        self._over = asyncio.get_running_loop().create_future()
        # no await between the room check and this, so concurrent opens cannot overshoot the bounds
        hub.add(listener, holds=job is None)
        try:
            listener.resume(await self.rebuilt(client_id, cursor, job))
            await self._over
        finally:
            hub.remove(listener)
        if not self._finished:
            self.finish()

    def start_answer(self) -> None:
        """The event stream's headers, sent at once; no Nagle (each event is one small write)."""
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")  # nginx: pass each event on as it comes
        self.connection_stream().set_nodelay(True)
        self.flush()

    async def rebuilt(self, client_id: str, cursor: Cursor, job: Job | None) -> list[tuple[str, str]]:
        """(id, message) pairs of the stored state of the stream's job, or of the job the Last-Event-ID names
        (when it is the client's): the stream tells those newer than what the caller saw."""
        jobs = self.services.jobs
        job_id = job.id if job is not None else cursor.resumed_job
        fresh = await jobs.find_job(job_id) if job_id is not None else None
        if fresh is None or fresh.client_id != client_id:
            return []
        place = await jobs.position(fresh.id) if fresh.state is State.QUEUED else None
        return state_messages(fresh, place)

    def write_event(self, data: bytes, droppable: bool) -> None:
        """Send one event or keep-alive. While the kernel's send buffer is full (the reader is behind) droppable
        ones (progress, keep-alives) are skipped; a reader that stays behind STALL_SECONDS is cut off."""
        if self._finished:
            return
        stream = self.connection_stream()
        if stream.closed():
            return
        if stream.writing():
            now = time.monotonic()
            if self._stalled_since is None:
                self._stalled_since = now
            elif now - self._stalled_since > STALL_SECONDS:
                log.warning("event stream of client %s not read for %.0fs; closing it",
                            client_tag(self._client), now - self._stalled_since)
                stream.close()
                return
            if droppable:
                return
        else:
            self._stalled_since = None
        self.write(data)
        self.flush()

    def end(self) -> None:
        """The stream is over (its job ended, the client's work is done, or the bridge stops)."""
        if self._over is not None and not self._over.done():
            self._over.set_result(None)

    def on_connection_close(self) -> None:
        """The caller went away: leave the hub (a stream of the client then counts as a closed socket)."""
        super().on_connection_close()
        self.end()


class JobEventsHandler(EventStreamHandler):
    """GET /jobs/{id}/events: one job's status messages until its final one (owner or admin only)."""

    async def get(self, job_id: str) -> None:
        """Stream the job's events; a job that already ended gets its final ones, or 204 when they were seen."""
        job = await self.owned_job(job_id)
        cursor = Cursor(job.id, self.last_event_id())
        if not job.state.active:
            if cursor.ended(job.id):  # the caller saw the end: an EventSource stops reconnecting on 204
                self.set_status(204)
                self.set_header("X-Detail", f"job {job.id} has ended; there are no events after its last one")
                self.clear_header("Content-Type")
                self.finish()
                return
            self.start_answer()
            for eid, text in state_messages(job, None):
                if cursor.admit(eid, text):
                    self.write(frame(eid, text))
            self.finish()
            return
        self.check_room(job.client_id)
        await self.stream(job.client_id, cursor, job)


class ClientEventsHandler(EventStreamHandler):
    """GET /events?clientId=ID: what /ws tells that client, as events (it keeps the client's jobs alive as a
    socket does)."""

    async def get(self) -> None:
        """Stream the client's events, as the socket would send them."""
        _, client_id = self.scoped_client_id()
        cursor = Cursor(None, self.last_event_id())
        self.check_room(client_id)
        await self.stream(client_id, cursor, None)


def routes(services: Api) -> list[tuple[str, type, dict[str, Any]]]:
    """URL table of this module."""
    kw = {"services": services}
    return [(r"/events", ClientEventsHandler, kw),
            (r"/jobs/(?P<job_id>[^/]+)/events", JobEventsHandler, kw)]

