"""comfy-bridge: a small, stable REST + WebSocket API in front of one or many ComfyUI servers."""
from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from tornado import web
from tornado.httpserver import HTTPServer

from comfy.catalog import CatalogError
from comfy.check import run_check
from comfy.config import BackendConfig, Config, ConfigError, load_config
from comfy.services import Services
from handlers import backends, docs, history, jobs, ops, upload, workflows, ws
from handlers.base import NotFoundHandler
from handlers.ops import configure_logging, log_request

log = logging.getLogger("bridge")
HERE = Path(__file__).resolve().parent
# Python's default (700, 10, 10) makes a full collection every few seconds while thousands of sockets
# stream progress, and on 2,000 sockets each full pass held the loop for 60-180 ms (bench/README.md).
GC_THRESHOLDS = (20_000, 20, 50)


def tune_gc() -> None:
    """Fewer, shorter collector pauses: what start-up made is never scanned again, and young objects (a
    message's futures and callbacks) get time to die before they are promoted to the old generation."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def make_app(config: Config, services: Services) -> web.Application:
    """The Tornado application: every module's URL table, static files last."""
    table: list[Any] = []
    for module in (workflows, upload, jobs, history, ws, backends, ops, docs):
        table += module.routes(services)
    static = HERE / "static"
    if (static / "index.html").exists():
        table += [(r"/()", docs.StaticHandler, {"path": str(static), "default_filename": "index.html"}),
                  (r"/static/(.*)", docs.StaticHandler, {"path": str(static)})]
    return web.Application(
        table,
        default_handler_class=NotFoundHandler,
        default_handler_args={"services": services},
        websocket_ping_interval=20,
        websocket_ping_timeout=20,
        websocket_max_message_size=64 * 1024,
        log_function=log_request,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line: --config, --host, --port, --demo, --log-level."""
    p = argparse.ArgumentParser(prog="bridge.py", description=__doc__)
    p.add_argument("--config", help="settings file (default: settings.yaml beside bridge.py)")
    p.add_argument("--host", help="address to listen on (overrides server.host)")
    p.add_argument("--port", type=int, help="port to listen on (overrides server.port)")
    p.add_argument("--demo", action="store_true",
                   help="run with two SIMULATED ComfyUI backends on loopback (no GPU, no ComfyUI needed)")
    p.add_argument("--demo-profile", default="mixed", choices=["mixed", "0.3.64", "current"],
                   help="the ComfyUI release the simulated backends imitate (mixed: one 0.3.64, one current)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-format", default="text", choices=["text", "json"], help="plain lines or JSON lines")
    p.add_argument("--check", action="store_true",
                   help="check the settings, the catalog and every backend, print a report and exit")
    return p.parse_args(argv)


async def start_demo_backends(config: Config, profile: str = "mixed") -> tuple[Config, list[Any]]:
    """Start two simulated ComfyUI servers (of one release, or one old and one current) and point the config
    at them."""
    from comfy.fake import FakeComfy

    profiles = ["0.3.64", "current"] if profile == "mixed" else [profile] * 2
    fakes = [FakeComfy(duration=3.0, tick=0.05, profile=p) for p in profiles]
    for fake in fakes:
        await fake.start()
    log.warning("DEMO MODE: the backends are SIMULATED ComfyUI servers at %s; no real images are generated",
                ", ".join(f.url for f in fakes))
    backends = tuple(BackendConfig(url=f.url, name=f"simulated-{i + 1}") for i, f in enumerate(fakes))
    return config.replace(backends=backends, data_dir=config.data_dir / "demo"), fakes


async def main(argv: list[str] | None = None) -> int:
    """Load the config, start the services and the server, run until SIGINT/SIGTERM."""
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    overrides = {"host": args.host, "port": args.port}
    if args.check:
        ok, lines = await run_check(args.config, overrides)
        print("\n".join(lines))
        print("check: OK" if ok else "check: FAILED")
        return 0 if ok else 1
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"bridge: bad settings: {exc}", file=sys.stderr)
        return 2
    fakes: list[Any] = []
    if args.demo:
        config, fakes = await start_demo_backends(config, args.demo_profile)
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
    tune_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(name: str) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now; unfinished jobs resume at the next start", name)
            os._exit(1)
        log.info("%s received: shutting down (send it again to exit at once)", name)
        stop.set()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)
    loop.add_signal_handler(signal.SIGHUP, services.reload_catalog)
    await stop.wait()
    await shutdown(server, services, fakes)
    return 0


async def shutdown(server: HTTPServer, services: Services, fakes: list[Any]) -> None:
    """The fixed, bounded order: stop accepting, tell sockets, drain running jobs, stop services."""
    config = services.config
    log.info("shutdown 1/5: no longer accepting connections or new jobs")
    server.stop()
    services.shutting_down = True
    log.info("shutdown 2/5: closing %d client WebSocket(s) with 1001", services.hub.count)
    await services.hub.stop("server shutting down")
    running = sum(len(b.running) for b in services.backends)
    log.info("shutdown 3/5: letting %d running job(s) finish (up to %gs)", running, config.drain_timeout)
    left = await services.scheduler.drain(config.drain_timeout)
    if left:
        log.warning("shutdown: %d job(s) still running; they resume at the next start", left)
    log.info("shutdown 4/5: stopping services (queued jobs stay queued in the store)")
    await services.stop()
    log.info("shutdown 5/5: closing open connections")
    try:
        await asyncio.wait_for(server.close_all_connections(), 5)
    except asyncio.TimeoutError:
        log.warning("shutdown: some connections did not close in 5 s")
    for fake in fakes:
        await fake.stop()
    log.info("shutdown complete")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
