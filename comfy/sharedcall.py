"""One call in flight, shared by everyone who asks for it meanwhile, and its success reused for a while."""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Hashable


class SharedCall:
    """Callers who ask while the call runs share it; those who ask within `reuse` seconds after it succeeded
    share that success too, as long as `stamp()` still gives what it gave when the call started (for /free:
    no prompt posted since, so there is nothing new to unload)."""

    def __init__(self, call: Callable[[], Awaitable[None]], stamp: Callable[[], Hashable], reuse: float) -> None:
        self.call = call
        self.stamp = stamp
        self.reuse = reuse
        self._running: asyncio.Future[None] | None = None
        self._done: tuple[Hashable, float] | None = None  # (stamp, loop time) of the last success

    async def __call__(self) -> None:
        """Run the call, or join (or reuse) the one that covers this request."""
        now = asyncio.get_running_loop().time()
        if self._running is None or self._running.done():
            if self._done is not None and self._done[0] == self.stamp() and now - self._done[1] < self.reuse:
                return
            self._running = asyncio.ensure_future(self._once())
            # retrieved here too, so a failure whose callers all left is not reported as never retrieved
            self._running.add_done_callback(lambda f: f.cancelled() or f.exception())
        await asyncio.shield(self._running)  # a caller that goes away does not cancel the others' call

    async def _once(self) -> None:
        stamp = self.stamp()
        await self.call()
        self._done = (stamp, asyncio.get_running_loop().time())
