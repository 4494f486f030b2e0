"""Run one fake ComfyUI until Ctrl-C: python -m comfy.fake --port 8188."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from .profile import PROFILES
from .server import FakeComfy

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m comfy.fake", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=8188, help="port (0 picks a free one)")
    parser.add_argument("--duration", type=float, default=0.05, help="seconds one prompt takes")
    parser.add_argument("--history-lag", type=float, default=0.0, help="delay before history is written")
    parser.add_argument("--tick", type=float, default=0.01, help="interval between progress messages")
    parser.add_argument("--workdir", default=None, help="input/output/temp root (a tempdir if omitted)")
    parser.add_argument("--no-cache", action="store_true", help="behave like ComfyUI --cache-none")
    parser.add_argument("--profile", choices=PROFILES, default="0.3.64",
                        help="ComfyUI release to imitate: 0.3.64, or current (0.38: jobs API, UUID prompt ids, ...)")
    parser.add_argument("--no-reconnect-bug", action="store_true",
                        help="a closing socket never drops a newer one with the same clientId")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    return parser.parse_args(argv)


async def main(argv: list[str] | None = None) -> None:
    """Start the fake, wait for SIGINT/SIGTERM, stop it."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fake = FakeComfy(host=args.host, port=args.port, duration=args.duration, history_lag=args.history_lag,
                     tick=args.tick, workdir=args.workdir, cache=not args.no_cache, profile=args.profile)
    fake.reconnect_bug = not args.no_reconnect_bug
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await fake.start()
    print(f"fake ComfyUI {fake.profile.version} listening on {fake.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await fake.stop()


if __name__ == "__main__":
    asyncio.run(main())
