"""Executes one queued prompt and emits ComfyUI's WebSocket messages in ComfyUI's order."""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import struct
import time
import uuid
from typing import TYPE_CHECKING, Any

from . import media, ops
from .ops import Interrupted, NodeError
from .profile import RAM_CACHE_ENTRIES, enrich_ui

if TYPE_CHECKING:
    from .executor import Instance

log = logging.getLogger(__name__)

# Frames of the real tracebacks, with the code elided as in the captured traces.
_TRACEBACK = [
    '  File "<comfyui>/execution.py", line 496, in execute\n    <code elided>\n',
    '  File "<comfyui>/execution.py", line 315, in get_output_data\n    <code elided>\n',
    '  File "<comfyui>/execution.py", line 289, in _async_map_node_over_list\n    <code elided>\n',
    '  File "<comfyui>/execution.py", line 277, in process_inputs\n    <code elided>\n',
]
FAIL_MESSAGE = "FakeComfy: simulated failure (the fail switch is on)"


def now_ms() -> int:
    """Epoch milliseconds, ComfyUI's message timestamp."""
    return int(time.time() * 1000)


def preview_frame(png_bytes: bytes) -> bytes:
    """Binary type 1 PREVIEW_IMAGE: [u32 1][u32 2=PNG][bytes]."""
    return struct.pack(">II", 1, 2) + png_bytes


def preview_frame_with_metadata(png_bytes: bytes, node_id: str, prompt_id: str) -> bytes:
    """Binary type 4 PREVIEW_IMAGE_WITH_METADATA: [u32 4][u32 len][json][bytes]."""
    meta = json.dumps({"node_id": node_id, "prompt_id": prompt_id, "display_node_id": node_id,
                       "parent_node_id": None, "real_node_id": node_id, "image_type": "image/png"}).encode()
    return struct.pack(">II", 4, len(meta)) + meta + png_bytes


def text_frame(node_id: str, text: str) -> bytes:
    """Binary type 3 TEXT: [u32 3][u32 len][node id][text]."""
    nid = node_id.encode()
    return struct.pack(">II", 3, len(nid)) + nid + text.encode()


def _format(value: Any) -> Any:
    """handle_execution_error's format_value: plain JSON scalars as-is, everything else str()."""
    if value is None or isinstance(value, (int, float, bool, str)):
        return value
    return str(value)


def _is_link(value: Any) -> bool:
    """An input that is a [node_id, slot] link."""
    return isinstance(value, list) and len(value) == 2


class _NodeCtx:
    """The ops.Context handed to a running node."""

    def __init__(self, run: PromptRun, node_id: str, share: float) -> None:
        self.run = run
        self.node_id = node_id
        self.share = share
        self.slow = run.slow
        self.tick_interval = run.tick
        self.prompt = run.prompt
        self.extra_data = run.extra_data
        self.dirs = run.inst.fake.dirs
        self.padding = int(run.inst.fake.padding)

    async def work(self, seconds: float) -> None:
        """Busy time: not interruptible, like a torch op between checks."""
        await asyncio.sleep(max(seconds, 0.0))

    async def nap(self, seconds: float) -> None:
        """Sleep that an interrupt cuts short."""
        await self.run.inst.nap(max(seconds, 0.0))

    async def tick(self, value: float, maximum: float, preview: bytes | None = None) -> None:
        """The progress hook: interrupt check, progress_state, progress and preview frames."""
        self.run.check_interrupt()
        self.run.progress(self.node_id, value, maximum, preview)

    def text(self, text: str) -> None:
        """send_progress_text: always broadcast."""
        self.run.inst.send_binary(text_frame(self.node_id, text), None)


class PromptRun:
    """One execution of a queued item [number, prompt_id, prompt, extra_data, outputs_to_execute]."""

    def __init__(self, inst: Instance, item: list[Any]) -> None:
        fake = inst.fake
        self.inst = inst
        self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs = item
        self.client_id: str | None = self.extra_data.get("client_id") if "client_id" in self.extra_data else None
        self.fail = bool(fake.fail)
        self.hang = bool(fake.hang)
        self.slow = float(fake.slow)
        self.tick = float(fake.tick)
        self.duration = float(fake.duration) * self.slow
        self.use_cache = bool(fake.cache) and not (self.fail or self.hang)
        self.registry = fake.registry
        self.profile = fake.profile
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.success = False
        self.outcome = "error"
        self.history_result: dict[str, Any] = {"outputs": {}, "meta": {}}
        self.states: dict[str, dict[str, Any]] = {}
        self.values: dict[str, tuple[Any, ...]] = {}
        self.ui: dict[str, dict[str, Any]] = {}
        self.executed: list[str] = []

    # ---- messages --------------------------------------------------------------------------------------
    def add_message(self, event: str, data: dict[str, Any], broadcast: bool = False) -> None:
        """PromptExecutor.add_message: kept for history; sent if there is a client_id (or broadcast)."""
        self.messages.append((event, data))
        if self.client_id is not None or broadcast:
            self.inst.send(event, data, self.client_id)

    def _send_states(self) -> None:
        """progress_state carries every node that is not pending."""
        self.inst.send("progress_state", {"prompt_id": self.prompt_id, "nodes": self.states}, self.client_id)

    def _set_state(self, nid: str, value: float, maximum: float, state: str) -> None:
        """Update one node's entry in the progress map and send the whole map."""
        self.states[nid] = {"value": value, "max": maximum, "state": state, "node_id": nid,
                            "prompt_id": self.prompt_id, "display_node_id": nid, "parent_node_id": None,
                            "real_node_id": nid}
        self._send_states()

    def progress(self, nid: str, value: float, maximum: float, preview: bytes | None) -> None:
        """One progress tick; type-4 previews precede the progress frame, type-1 ones follow it."""
        self._set_state(nid, value, maximum, "running")
        with_meta = self.inst.supports_preview_metadata(self.client_id)
        if preview is not None and with_meta:
            self.inst.send_binary(preview_frame_with_metadata(preview, nid, self.prompt_id), self.client_id)
        self.inst.send("progress", {"value": value, "max": maximum, "prompt_id": self.prompt_id, "node": nid},
                       self.client_id)
        if preview is not None and not with_meta:
            self.inst.send_binary(preview_frame(preview), self.client_id)

    def _finish(self, nid: str) -> None:
        """finish_progress: state finished, value set to max."""
        maximum = self.states.get(nid, {}).get("max", 1.0)
        self._set_state(nid, maximum, maximum, "finished")

    def check_interrupt(self) -> None:
        """throw_exception_if_processing_interrupted."""
        if self.inst.interrupt_flag:
            self.inst.interrupt_flag = False
            raise Interrupted()

    # ---- graph -----------------------------------------------------------------------------------------
    def _signatures(self) -> dict[str, str]:
        """Cache keys: class, literal inputs and upstream keys (plus IS_CHANGED stand-ins)."""
        memo: dict[str, str] = {}

        def sig(nid: Any, stack: tuple[Any, ...]) -> str:
            """Key of one node; cycles and dangling links get a unique (never cached) key."""
            if nid in memo:
                return memo[nid]
            if nid in stack or nid not in self.prompt:
                return f"broken-{uuid.uuid4().hex}"
            node = self.prompt[nid]
            node_def = self.registry.get(node.get("class_type"))
            parts: list[Any] = [node.get("class_type")]
            for name in sorted(node.get("inputs", {})):
                value = node["inputs"][name]
                if _is_link(value):
                    parts.append([name, "link", sig(value[0], stack + (nid,)), value[1]])
                else:
                    parts.append([name, value])
            if node_def is not None and node_def.always_changed:
                parts.append(["is_changed", time.time(), uuid.uuid4().hex])
            for name in node_def.file_inputs if node_def is not None else ():
                path = ops.annotated_path(str(node.get("inputs", {}).get(name, "")), self.inst.fake.dirs)
                parts.append([name, ops.file_digest(path)])
            memo[nid] = hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()
            return memo[nid]

        return {nid: sig(nid, ()) for nid in self.prompt}

    def _plan(self, cached: set[str]) -> None:
        """TopologicalSort.add_node for every output: pending order and blocking links."""
        self.pending: dict[str, bool] = {}
        self.blocking: dict[str, dict[str, bool]] = {}
        self.block_count: dict[str, int] = {}
        for output in self.outputs:
            stack, links = [output], []
            while stack:
                nid = stack.pop()
                if nid in self.pending:
                    continue
                self.pending[nid] = True
                self.block_count[nid] = 0
                self.blocking.setdefault(nid, {})
                for value in self.prompt[nid]["inputs"].values():
                    if _is_link(value) and value[0] not in cached:
                        stack.append(value[0])
                        links.append((value[0], nid))
            for src, dst in links:
                if dst not in self.blocking.setdefault(src, {}):
                    self.blocking[src][dst] = True
                    self.block_count[dst] += 1

    def _is_output(self, nid: str) -> bool:
        """Whether the node's class is an output node."""
        return self.registry[self.prompt[nid]["class_type"]].output_node

    def _pick(self) -> str:
        """ux_friendly_pick_node: outputs first, then nodes feeding outputs (one or two hops)."""
        ready = [nid for nid in self.pending if self.block_count[nid] == 0]
        if not ready:
            raise NodeError("comfy_execution.graph.DependencyCycleError", "Dependency cycle detected")
        for nid in ready:
            if self._is_output(nid):
                return nid
        for nid in ready:
            if any(self._is_output(b) for b in self.blocking[nid]):
                return nid
        for nid in ready:
            if any(self._is_output(b1) for b in self.blocking[nid] for b1 in self.blocking.get(b, {})):
                return nid
        return ready[0]

    def _shares(self, to_run: list[str]) -> dict[str, float]:
        """Spread the run time over the nodes that really run (TestSleep brings its own time)."""
        defs = {nid: self.registry[self.prompt[nid]["class_type"]] for nid in to_run}
        if any(d.name == "TestSleep" for d in defs.values()):
            return {nid: 0.0 for nid in to_run}
        total = sum(d.weight for d in defs.values()) or 1.0
        return {nid: self.duration * d.weight / total for nid, d in defs.items()}

    # ---- execution -------------------------------------------------------------------------------------
    async def execute(self) -> None:
        """PromptExecutor.execute_async, minus torch."""
        inst = self.inst
        inst.client_id = self.client_id
        inst.interrupt_flag = False
        inst.last_prompt_id = self.prompt_id
        self.add_message("execution_start", {"prompt_id": self.prompt_id, "timestamp": now_ms()})
        sigs = self._signatures()
        cached: list[str] = []
        if self.use_cache:
            keep = set(sigs.values())
            if not self.profile.ram_cache:  # classic cache: only the previous prompt's results survive
                inst.cache = {k: v for k, v in inst.cache.items() if k in keep}
            elif len(inst.cache) > RAM_CACHE_ENTRIES:  # the RAM-pressure cache keeps them until memory runs low
                inst.cache = dict(list(inst.cache.items())[-RAM_CACHE_ENTRIES // 2:])
            cached = [nid for nid in self.prompt if sigs[nid] in inst.cache]
            for nid in cached:
                self.values[nid] = inst.cache[sigs[nid]]["outputs"]
        self.add_message("execution_cached", {"nodes": cached, "prompt_id": self.prompt_id, "timestamp": now_ms()})
        current: str | None = None
        try:
            self._plan(set(cached))
            to_run = [nid for nid in self.pending if nid not in cached]
            shares = self._shares(to_run)
            hung = False
            while self.pending:
                nid = current = self._pick()
                last = len(self.pending) == 1
                if nid in cached:
                    self._replay(nid, inst.cache[sigs[nid]])
                else:
                    await self._start(nid)
                    if self.hang and not hung:  # sits in queue_running until interrupted
                        hung = True
                        await inst.nap(None)
                        self.check_interrupt()
                    await self._run_node(nid, shares.get(nid, 0.0), sigs[nid], last and self.fail)
                self.executed.append(nid)
                del self.pending[nid]
                for dst in self.blocking.get(nid, {}):
                    self.block_count[dst] -= 1
        except Interrupted:
            self.outcome = "interrupted"
            self.add_message("execution_interrupted", {
                "prompt_id": self.prompt_id, "node_id": current,
                "node_type": self.prompt[current]["class_type"] if current else None,
                "executed": list(self.executed), "timestamp": now_ms()}, broadcast=True)
        except NodeError as ex:
            self._error(current, ex.exception_type, str(ex))
        else:
            self.success = True
            self.outcome = "done"
            self.add_message("execution_success", {"prompt_id": self.prompt_id, "timestamp": now_ms()})
        outputs = {nid: self.ui[nid] for nid in self.prompt if nid in self.ui}
        meta = {nid: {"node_id": nid, "display_node": nid, "parent_node": None, "real_node_id": nid}
                for nid in outputs}
        self.history_result = {"outputs": outputs, "meta": meta}
        inst.last_node_id = None

    def _replay(self, nid: str, entry: dict[str, Any]) -> None:
        """A cached node in the execution list: `executed` replays its UI (None if it had none)."""
        ui = self._entries(entry["ui"])
        if self.client_id is not None:
            self.inst.send("executed", {"node": nid, "display_node": nid, "output": ui,
                                        "prompt_id": self.prompt_id}, self.client_id)
        self._finish(nid)
        self.values[nid] = entry["outputs"]
        if ui:
            self.ui[nid] = ui

    def _entries(self, ui: dict[str, Any] | None) -> dict[str, Any] | None:
        """Output entries as this profile writes them (current: asset ids, registered anew per prompt)."""
        return enrich_ui(ui, self.inst.fake.dirs) if self.profile.asset_outputs else ui

    async def _start(self, nid: str) -> None:
        """start_progress, `executing`, then the pre-execute interrupt check."""
        self._set_state(nid, 0.0, 1.0, "running")
        if self.client_id is not None:
            self.inst.last_node_id = nid
            self.inst.send("executing", {"node": nid, "display_node": nid, "prompt_id": self.prompt_id},
                           self.client_id)
        await asyncio.sleep(0)
        self.check_interrupt()

    async def _run_node(self, nid: str, share: float, sig: str, fail: bool) -> None:
        """Run one node, cache its result, send `executed` for UI output, finish its progress."""
        node = self.prompt[nid]
        args = {}
        for name, value in node["inputs"].items():
            args[name] = self.values[value[0]][value[1]] if _is_link(value) else value
        self._args = args
        ctx = _NodeCtx(self, nid, share)
        try:
            if fail:
                await ctx.work(share)
                raise NodeError("RuntimeError", FAIL_MESSAGE)
            run = media.run if node["class_type"] in media.CLASSES else ops.run
            outputs, ui = await run(ctx, node["class_type"], args)
        except (Interrupted, NodeError, asyncio.CancelledError):
            raise
        except Exception as ex:  # a node bug becomes an execution_error, as in ComfyUI
            raise NodeError(type(ex).__name__, str(ex)) from ex
        self.values[nid] = outputs
        if self.use_cache:
            self.inst.cache[sig] = {"outputs": outputs, "ui": ui or None}
        ui = self._entries(ui)
        if ui:
            self.ui[nid] = ui
            if self.client_id is not None:
                self.inst.send("executed", {"node": nid, "display_node": nid, "output": ui,
                                            "prompt_id": self.prompt_id}, self.client_id)
        self._finish(nid)

    def _error(self, nid: str | None, exception_type: str, message: str) -> None:
        """handle_execution_error for a real error: execution_error, not broadcast."""
        self.outcome = "error"
        node: dict[str, Any] = self.prompt.get(nid, {}) if nid else {}
        args = getattr(self, "_args", {}) if nid else {}
        inputs = {name: [_format(args.get(name, value))] for name, value in node.get("inputs", {}).items()}
        node_def = self.registry.get(node.get("class_type", ""))
        for hidden in (node_def.hidden if node_def else {}):
            if hidden == "prompt":
                inputs[hidden] = [str(self.prompt)]
            elif hidden == "extra_pnginfo":
                inputs[hidden] = [self.extra_data.get("extra_pnginfo")]
            elif hidden == "unique_id":
                inputs[hidden] = [nid]
        self.add_message("execution_error", {
            "prompt_id": self.prompt_id, "node_id": nid, "node_type": node.get("class_type"),
            "executed": list(self.executed), "exception_message": f"{message}\n", "exception_type": exception_type,
            "traceback": list(_TRACEBACK), "current_inputs": inputs, "current_outputs": list(self.prompt),
            "timestamp": now_ms()})
