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

from comfy.check import run_check
from comfy.config import Config, ConfigError, load_config
from comfy.connlimits import ConnLimits, make_server
from comfy.demo import demo_info, start_demo_backends
from comfy.jobstore import StoreUnavailable
from comfy.listener import raise_open_file_limit
from comfy.logs import configure_logging, log_request
from comfy.partfiles import remove_part_files
from comfy.services import Services
from comfy.starter import write_starter
from handlers import backends, docs, events, history, jobs, ops, results, upload, webhooks, workflows, ws
from handlers.base import NotFoundHandler

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
    api = services.api
    for module in (workflows, upload, jobs, history, results, events, ws, backends, webhooks, ops, docs):
        table += module.routes(api)
    static = HERE / "static"
    if (static / "index.html").exists():
        table += [(r"/()", docs.StaticHandler, {"path": str(static), "default_filename": "index.html"}),
                  (r"/static/(.*)", docs.StaticHandler, {"path": str(static)})]
    return web.Application(
        table,
        default_handler_class=NotFoundHandler,
        default_handler_args={"services": api},
        websocket_ping_interval=config.ws_ping_interval,
        websocket_ping_timeout=config.ws_ping_timeout,
        websocket_max_message_size=64 * 1024,
        log_function=log_request,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line: --config, --host, --port, --demo, --log-level, --log-format, --check."""
    p = argparse.ArgumentParser(prog="bridge.py", description=__doc__,
                                epilog="'bridge.py init DIR' writes a starter settings.yaml and workflows/ into DIR.")
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
                   help="check the settings, data_dir, the catalog and every backend (node classes and the model "
                        "files each workflow names), print a report and exit 1 on any problem; with --demo, "
                        "check the demo set-up")
    return p.parse_args(argv)


async def main(argv: list[str] | None = None) -> int:
    """Load the config, start the services and the server, run until SIGINT/SIGTERM."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["init"]:
        return write_starter(argv[1:])
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    overrides = {"host": args.host, "port": args.port}
    if args.check:
        ok, lines = await run_check(args.config, overrides, demo=args.demo)
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
    except (OSError, ConfigError) as exc:  # data_dir unusable or held by another bridge, or no store driver
        print(f"bridge: cannot start: {exc}", file=sys.stderr)
        for fake in fakes:
            await fake.stop()
        return 2
    # only now, holding data_dir's lock: what a killed bridge was writing (uploads, downloaded results) is
    # incomplete and nothing refers to it, while another live bridge's files would be in use (so never with
    # PostgreSQL, whose bridges share data_dir)
    removed = remove_part_files(config.uploads_dir, config.results_dir) if services.lock is not None else 0
    if removed:
        log.info("removed %d unfinished temporary file(s) left by an earlier run", removed)
    soft, hard = raise_open_file_limit()
    limits = ConnLimits.from_config(config, soft)
    capped = limits.max_connections < config.max_connections  # worth a warning: raise LimitNOFILE
    log.log(logging.WARNING if capped else logging.INFO, "open-file limit %d (hard %d): up to %d client connections%s",
            soft, hard, limits.max_connections,
            f" (server.max_connections {config.max_connections} does not fit under it)" if capped else "")
    if args.demo:
        services.demo = demo_info()
    try:
        await services.start()
    except StoreUnavailable as exc:
        print(f"bridge: cannot start: the job store is unreachable: {exc}", file=sys.stderr)
        await services.stop()
        for fake in fakes:
            await fake.stop()
        return 2
    server = make_server(make_app(config, services), config, limits)
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
    """The fixed, bounded order: stop accepting, drain running jobs (their sockets hear how they end), tell the
    remaining sockets the server stops, stop services."""
    config = services.config
    log.info("shutdown 1/5: no longer accepting connections or new jobs")
    server.stop()
    services.shutting_down = True
    running = services.dispatcher.running()
    # callers' sockets stay open meanwhile, so a job that finishes now is reported as it ends (closed/error)
    log.info("shutdown 2/5: letting %d running job(s) finish (up to %gs)", running, config.drain_timeout)
    left = await services.drain(config.drain_timeout)
    if left:
        log.warning("shutdown: %d job(s) still running; they resume at the next start", left)
    log.info("shutdown 3/5: telling %d client WebSocket(s) of unfinished jobs that the server stops; closing "
             "them with 1001", services.hub.count)
    await services.hub.stop("server shutting down")
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
