"""comfy-bridge: a small, stable REST + WebSocket API in front of one or many ComfyUI servers."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from tornado import web
from tornado.httpserver import HTTPServer

from comfy.catalog import CatalogError
from comfy.config import BackendConfig, Config, ConfigError, load_config
from comfy.services import Services
from handlers import backends, history, jobs, upload, workflows, ws
from handlers.base import NotFoundHandler

log = logging.getLogger("bridge")
HERE = Path(__file__).resolve().parent


def make_app(config: Config, services: Services) -> web.Application:
    """The Tornado application: every module's URL table, static files last."""
    table: list[Any] = []
    for module in (workflows, upload, jobs, history, ws, backends):
        table += module.routes(services)
    static = HERE / "static"
    if (static / "index.html").exists():
        table += [(r"/()", web.StaticFileHandler, {"path": str(static), "default_filename": "index.html"}),
                  (r"/static/(.*)", web.StaticFileHandler, {"path": str(static)})]
    return web.Application(
        table,
        default_handler_class=NotFoundHandler,
        default_handler_args={"services": services},
        websocket_ping_interval=20,
        websocket_ping_timeout=20,
        websocket_max_message_size=64 * 1024,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line: --config, --host, --port, --demo, --log-level."""
    p = argparse.ArgumentParser(prog="bridge.py", description=__doc__)
    p.add_argument("--config", help="settings file (default: settings.yaml beside bridge.py)")
    p.add_argument("--host", help="address to listen on (overrides server.host)")
    p.add_argument("--port", type=int, help="port to listen on (overrides server.port)")
    p.add_argument("--demo", action="store_true",
                   help="run with two SIMULATED ComfyUI backends on loopback (no GPU, no ComfyUI needed)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p.parse_args(argv)


async def start_demo_backends(config: Config) -> tuple[Config, list[Any]]:
    """Start two simulated ComfyUI servers and point the config at them."""
    from comfy.fake import FakeComfy

    fakes = [FakeComfy(duration=3.0, tick=0.05) for _ in range(2)]
    for fake in fakes:
        await fake.start()
    log.warning("DEMO MODE: the backends are SIMULATED ComfyUI servers at %s; no real images are generated",
                ", ".join(f.url for f in fakes))
    backends = tuple(BackendConfig(url=f.url, name=f"simulated-{i + 1}") for i, f in enumerate(fakes))
    return config.replace(backends=backends, data_dir=config.data_dir / "demo"), fakes


async def main(argv: list[str] | None = None) -> int:
    """Load the config, start the services and the server, run until SIGINT/SIGTERM."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    try:
        config = load_config(args.config, overrides={"host": args.host, "port": args.port})
    except ConfigError as exc:
        print(f"bridge: bad settings: {exc}", file=sys.stderr)
        return 2
    fakes: list[Any] = []
    if args.demo:
        config, fakes = await start_demo_backends(config)
    try:
        services = Services.build(config)
    except (CatalogError, OSError) as exc:
        print(f"bridge: cannot start: {exc}", file=sys.stderr)
        for fake in fakes:
            await fake.stop()
        return 2
    await services.start()
    server = HTTPServer(make_app(config, services), max_body_size=config.max_body_bytes * 2 + 1024)
    try:
        server.listen(config.port, address=config.host)
    except OSError as exc:
        print(f"bridge: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        await services.stop()
        return 2
    log.info("comfy-bridge listening on http://%s:%d", config.host, config.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    server.stop()
    await services.stop()
    await server.close_all_connections()
    for fake in fakes:
        await fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
