"""`conveyor worker` as a process: logging to stderr, a ready line, and (under `conveyor dev`)
stopping when the parent process goes away."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time

from conveyor.worker.main import build_worker, serve
from conveyor.worker.worker import Worker, WorkerOptions

READY = "conveyor worker ready"
STOPPED = "conveyor worker stopped"

log = logging.getLogger("conveyor.worker")


class _NotRunLogs(logging.Filter):
    """Log lines of runs belong to the runs (`conveyor runs logs`); the console gets the worker's."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "conveyor.task" or record.name.startswith("conveyor.task."))


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.setLevel(logging.INFO)
    handler.addFilter(_NotRunLogs())
    logging.getLogger("conveyor").addHandler(handler)


def announce(worker: Worker) -> None:
    options = worker.options
    line = (
        f"{READY}: pid {os.getpid()}, tasks {', '.join(sorted(worker.tasks))}; "
        f"queues {', '.join(worker.queues) or '-'}; concurrency {options.concurrency}; "
        f"machine {options.machine}; version {options.version or 'any'}; "
        f"environment {worker.engine.environment}; database {worker.engine.store.location}"
    )
    print(line, file=sys.stderr, flush=True)


def _watch_parent(worker: Worker, parent_pid: int) -> None:
    """Stop (handing running runs back at once) when the process that started us is gone."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    log.warning("the parent process %s is gone; stopping", parent_pid)
    worker.request_stop(0)


def run(modules: list[str], options: WorkerOptions, parent_pid: int | None = None) -> None:
    """Import the modules, serve until SIGTERM/SIGINT. Raises ModuleImportError (with the
    traceback in its message) when a module fails to import."""
    configure_logging()
    worker = build_worker(modules, options)

    async def main() -> None:
        serving = asyncio.ensure_future(serve(worker))
        while not worker.started.is_set() and not serving.done():
            await asyncio.sleep(0.01)
        if worker.started.is_set():
            announce(worker)
            if parent_pid is not None:
                threading.Thread(target=_watch_parent, args=(worker, parent_pid), daemon=True).start()
        await serving

    asyncio.run(main())
    print(STOPPED, file=sys.stderr, flush=True)
