"""One fake ComfyUI 'process': queue, history, WS registry, output cache and the single worker."""
from __future__ import annotations

import asyncio
import heapq
import json
import logging
from typing import TYPE_CHECKING, Any

from .run import PromptRun

if TYPE_CHECKING:
    from tornado.websocket import WebSocketHandler

    from .server import FakeComfy

log = logging.getLogger(__name__)

MAX_HISTORY = 10000  # MAXIMUM_HISTORY_SIZE in ComfyUI's execution.py


def _resolve(fut: asyncio.Future[None]) -> None:
    """Timer callback for nap(): wake the sleeper unless it was already woken."""
    if not fut.done():
        fut.set_result(None)


class Instance:
    """In-memory state that a ComfyUI restart loses; go_down() drops it, come_up() makes a new one."""

    def __init__(self, fake: FakeComfy) -> None:
        self.fake = fake
        self.number = 0  # PromptServer.number
        self.queue: list[tuple[Any, int, list[Any]]] = []  # heap of (number, seq, item)
        self._seq = 0
        self.running: dict[int, list[Any]] = {}  # task counter -> item, like PromptQueue.currently_running
        self._task_counter = 0
        self.history: dict[str, dict[str, Any]] = {}
        self.sockets: dict[str, WebSocketHandler] = {}
        self.sockets_metadata: dict[str, dict[str, Any]] = {}
        self.client_id: str | None = None  # client of the prompt executing now (or last)
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.executing: str | None = None  # prompt whose nodes are running (not yet in the history-lag phase)
        self.interrupt_flag = False
        self.cache: dict[str, dict[str, Any]] = {}  # node signature -> {"outputs", "ui"}; only the last prompt's nodes
        self.flags: dict[str, Any] = {}  # set by POST /free, acted on by the worker
        self._waiter: asyncio.Future[None] | None = None
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ---- messaging -------------------------------------------------------------------------------------
    def send(self, event: str, data: Any, sid: str | None = None) -> None:
        """send_sync: to one clientId (dropped if not connected) or, with sid None, to every socket."""
        text = json.dumps({"type": event, "data": data})
        for ws in self._targets(sid):
            self.fake._write(ws, text, binary=False)

    def send_binary(self, payload: bytes, sid: str | None = None) -> None:
        """Send one binary frame with the same addressing rules as send()."""
        for ws in self._targets(sid):
            self.fake._write(ws, payload, binary=True)

    def _targets(self, sid: str | None) -> list[WebSocketHandler]:
        """Sockets a message goes to."""
        if sid is None:
            return list(self.sockets.values())
        ws = self.sockets.get(sid)
        return [ws] if ws is not None else []

    def supports_preview_metadata(self, sid: str | None) -> bool:
        """feature_flags.supports_feature(sockets_metadata, sid, 'supports_preview_metadata')."""
        meta = self.sockets_metadata.get(sid) if sid is not None else None
        return meta is not None and meta.get("feature_flags", {}).get("supports_preview_metadata", False) is True

    def queue_remaining(self) -> int:
        """Running plus pending, as in exec_info.queue_remaining."""
        return len(self.queue) + len(self.running)

    def queue_info(self) -> dict[str, Any]:
        """The object GET /prompt returns and status frames carry."""
        return {"exec_info": {"queue_remaining": self.queue_remaining()}}

    def queue_updated(self) -> None:
        """Broadcast a status frame, as PromptServer.queue_updated does on every queue change."""
        self.send("status", {"status": self.queue_info()})

    def register(self, sid: str, ws: WebSocketHandler) -> None:
        """A socket connected: it replaces any earlier socket with the same clientId."""
        self.sockets.pop(sid, None)
        self.sockets[sid] = ws
        self.sockets_metadata[sid] = {"feature_flags": {}}

    def unregister(self, sid: str, ws: WebSocketHandler | None = None) -> None:
        """A socket closed: pops by clientId (ws None: ComfyUI's bug, a newer socket is dropped too), or only
        if ws is still the registered one (the fix proposed upstream)."""
        if ws is not None and self.sockets.get(sid) is not ws:
            return
        self.sockets.pop(sid, None)
        self.sockets_metadata.pop(sid, None)

    # ---- queue -----------------------------------------------------------------------------------------
    def put(self, item: list[Any]) -> None:
        """PromptQueue.put: push on the heap, broadcast status, wake the worker."""
        self._seq += 1
        heapq.heappush(self.queue, (item[0], self._seq, item))
        self.queue_updated()
        self._wakeup.set()

    def get_queue(self) -> dict[str, list[Any]]:
        """GET /queue: running items and the raw (unsorted) heap of pending items."""
        return {"queue_running": list(self.running.values()), "queue_pending": [e[2] for e in self.queue]}

    def delete_pending(self, prompt_id: str) -> bool:
        """Remove the first pending item with this id; running or unknown ids are a no-op."""
        for index, entry in enumerate(self.queue):
            if entry[2][1] == prompt_id:
                self.queue.pop(index)
                heapq.heapify(self.queue)
                self.queue_updated()
                return True
        return False

    def wipe_queue(self) -> list[str]:
        """Drop every pending item (the running one keeps going); return their ids."""
        ids = [entry[2][1] for entry in self.queue]
        self.queue = []
        self.queue_updated()
        return ids

    def running_ids(self) -> list[str]:
        """prompt_ids now executing (zero or one)."""
        return [item[1] for item in self.running.values()]

    # ---- interrupt -------------------------------------------------------------------------------------
    def interrupt(self, prompt_id: str | None) -> str | None:
        """POST /interrupt: global, or targeted (only if that prompt is running). Returns the id hit."""
        running = self.running_ids()
        if prompt_id:
            if prompt_id not in running:
                return None
            hit: str | None = prompt_id
        else:
            hit = running[0] if running else None
        self.interrupt_flag = True  # lost if idle or already past the last check: the next prompt clears it
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        return hit if hit is not None and hit == self.executing else None

    async def nap(self, seconds: float | None) -> None:
        """Sleep up to `seconds` (forever when None), returning early once interrupted."""
        if self.interrupt_flag:
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiter = fut
        handle = loop.call_later(seconds, _resolve, fut) if seconds is not None else None
        try:
            await fut
        finally:
            if handle is not None:
                handle.cancel()
            self._waiter = None

    # ---- history ---------------------------------------------------------------------------------------
    def get_history(self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1) -> dict[str, Any]:
        """PromptQueue.get_history, including its max_items/offset arithmetic."""
        if prompt_id is not None:
            entry = self.history.get(prompt_id)
            return {prompt_id: entry} if entry is not None else {}
        out: dict[str, dict[str, Any]] = {}
        if offset < 0 and max_items is not None:
            offset = len(self.history) - max_items
        for index, key in enumerate(self.history):
            if index >= offset:
                out[key] = self.history[key]
                if max_items is not None and len(out) >= max_items:
                    break
        return out

    def _task_done(self, task_id: int, run: PromptRun) -> None:
        """PromptQueue.task_done: write history, leave the running set, broadcast status."""
        item = self.running.pop(task_id)
        entry = {
            "prompt": item,
            "outputs": {},
            "status": {"status_str": "success" if run.success else "error", "completed": run.success,
                       "messages": [[event, data] for event, data in run.messages]},
        }
        entry.update(run.history_result)
        self.history[item[1]] = entry
        if len(self.history) > MAX_HISTORY:
            self.history.pop(next(iter(self.history)))
        self.queue_updated()

    # ---- worker ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the single prompt worker."""
        self._task = asyncio.create_task(self._worker(), name="fake-comfy-worker")

    async def stop(self) -> None:
        """Cancel the worker wherever it is (a crash: no further messages) and wait for it."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    def _apply_flags(self) -> None:
        """Act on POST /free flags the way prompt_worker does when it wakes."""
        if self.flags.pop("free_memory", False):
            self.cache.clear()
        self.flags.pop("unload_models", None)

    async def _worker(self) -> None:
        """main.py prompt_worker: one prompt at a time in `number` order."""
        fake = self.fake
        while True:
            while not self.queue:
                self._apply_flags()
                self._wakeup.clear()
                await self._wakeup.wait()
            self._apply_flags()
            _, _, item = heapq.heappop(self.queue)
            self._task_counter += 1
            task_id = self._task_counter
            self.running[task_id] = item
            prompt_id = item[1]
            record = fake.prompts.get(prompt_id)
            if record is not None:
                record["state"] = "running"
            fake.executed.append(prompt_id)
            self.queue_updated()
            run = PromptRun(self, item)
            self.executing = prompt_id
            try:
                await run.execute()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in the fake must not kill the worker
                log.exception("fake worker failed on prompt %s", prompt_id)
            finally:
                self.executing = None
            if fake.history_lag > 0:
                await asyncio.sleep(fake.history_lag)
            self._task_done(task_id, run)
            if record is not None:
                record["state"] = run.outcome
            if run.client_id is not None:
                self.send("executing", {"node": None, "prompt_id": prompt_id}, run.client_id)
