"""The worker process: import task modules, start a Worker, stop it gracefully on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
import traceback
from dataclasses import replace
from typing import Any

from conveyor.core.errors import ConveyorError
from conveyor.sdk import client as client_module
from conveyor.sdk.registry import REGISTRY
from conveyor.worker.worker import Worker, WorkerOptions

log = logging.getLogger("conveyor.worker")


class ModuleImportError(ConveyorError):
    code = "MODULE_IMPORT_ERROR"


def import_modules(modules: list[str]) -> list[Any]:
    """Import each task module; an error names the module and carries the full traceback."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            raise ModuleImportError(f"importing task module {name!r} failed:\n{detail}") from None
    return REGISTRY.all()


def build_worker(modules: list[str], options: WorkerOptions, client: client_module.Client | None = None) -> Worker:
    tasks = import_modules(modules)
    if not tasks:
        raise ConveyorError(f"no tasks found in {', '.join(modules) or '(no modules given)'}")
    client = client or client_module.get_client()
    options = replace(
        options,
        modules=list(modules),
        database_url=options.database_url or client.config.resolved_database_url,
        version=options.version or client.config.version,
        max_step_bytes=client.config.max_step_bytes,
        log_level=logging.getLevelName(client.config.log_level.upper())
        if isinstance(logging.getLevelName(client.config.log_level.upper()), int)
        else logging.INFO,
    )
    return Worker(client.engine, tasks, options)


async def serve(worker: Worker) -> None:
    """Run until SIGTERM/SIGINT (graceful); a second signal releases running runs at once."""
    loop = asyncio.get_running_loop()
    signals = {"count": 0}

    def on_signal() -> None:
        signals["count"] += 1
        worker.request_stop(None if signals["count"] == 1 else 0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await worker.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run_worker(modules: list[str], options: WorkerOptions) -> None:
    worker = build_worker(modules, options)
    asyncio.run(serve(worker))
