"""Opt-in timeline of one worker's wake-up path on PostgreSQL (`conveyor worker --modules bench_tasks,pg_trace`).

Changes nothing unless imported. Wraps, without reimplementing anything:
  - the LISTEN thread's `PostgresListener._handle` (or, in older code, its hand-off to the worker): when each
    notification arrived (`t`: for this worker alone);
  - `Worker._on_datagram`: when the loop handled the wake datagram;
  - `Engine.exchange` (the store thread) and `Engine.claim` (a claim the LISTEN thread makes for an idle
    worker): start, end, and the ids claimed; their COMMITs;
  - `Worker._start`: when a claimed run was handed to its task.
At exit the worker writes `$CONVEYOR_BENCH_TRACE_DIR/<pid>.json` (wall-clock `time.time()` stamps, comparable with
the harness's, which are `time.time()` too). `bench/pg_latency.py --trace` joins them with the trigger times.
"""

from __future__ import annotations

import atexit
import inspect
import json
import os
import threading
import time
from typing import Any

from conveyor.engine.engine import Engine
from conveyor.store.postgres import listen as pg_listen
from conveyor.store.postgres.driver import PostgresStore
from conveyor.worker.worker import Worker

OUT_DIR = os.environ.get("CONVEYOR_BENCH_TRACE_DIR", "/tmp/conveyor-bench/pg-trace")
_lock = threading.Lock()
_events: list[tuple[str, float, float, list[str]]] = []  # (kind, start, end, run ids or the message)


def _note(kind: str, start: float, end: float = 0.0, ids: list[str] | None = None) -> None:
    with _lock:
        _events.append((kind, start, end or start, ids or []))


if hasattr(pg_listen.PostgresListener, "_handle"):
    _handle = pg_listen.PostgresListener._handle

    def _traced_handle(self: Any, channel: str, payload: str, pid: int) -> None:
        targeted = channel in getattr(self, "_slot_channels", {})
        _note("listen", time.time(), 0.0, ["t" if targeted else payload])
        _handle(self, channel, payload, pid)

    pg_listen.PostgresListener._handle = _traced_handle  # type: ignore[attr-defined]
else:  # an older listener (every notification handed on as it came): time the hand-off
    _init = pg_listen.PostgresListener.__init__

    def _traced_init(self: Any, conninfo: str, channels: Any, deliver: Any, *args: Any, **kwargs: Any) -> None:
        def timed(message: bytes | None) -> None:
            _note("listen", time.time(), 0.0, [(message or b"-").decode()])
            deliver(message)

        _init(self, conninfo, channels, timed, *args, **kwargs)

    pg_listen.PostgresListener.__init__ = _traced_init  # type: ignore[method-assign]

_on_datagram = Worker._on_datagram


def _traced_on_datagram(self: Worker, wake_socket: Any) -> None:
    _note("datagram", time.time())
    _on_datagram(self, wake_socket)


Worker._on_datagram = _traced_on_datagram  # type: ignore[method-assign]

_exchange = Engine.exchange


def _traced_exchange(self: Engine, *args: Any, **kwargs: Any) -> Any:
    start = time.time()
    result = _exchange(self, *args, **kwargs)
    _note("exchange", start, time.time(), [c.id for c in result.claimed])
    return result


Engine.exchange = _traced_exchange  # type: ignore[method-assign]

_claim = Engine.claim


def _traced_claim(self: Engine, *args: Any, **kwargs: Any) -> Any:
    start = time.time()
    claimed = _claim(self, *args, **kwargs)
    _note("claim", start, time.time(), [c.id for c in claimed])
    return claimed


Engine.claim = _traced_claim  # type: ignore[method-assign]

_commit = PostgresStore._commit
_static = isinstance(inspect.getattr_static(PostgresStore, "_commit"), staticmethod)  # older code


def _traced_commit(*args: Any, **kwargs: Any) -> Any:
    start = time.time()
    try:
        return _commit(*args, **kwargs)
    finally:
        _note("commit", start, time.time())


PostgresStore._commit = staticmethod(_traced_commit) if _static else _traced_commit  # type: ignore[method-assign,assignment]

_start = Worker._start


def _traced_start(self: Worker, run: Any) -> None:
    _note("start", time.time(), 0.0, [run.id])
    _start(self, run)


Worker._start = _traced_start  # type: ignore[method-assign]


@atexit.register
def _dump() -> None:
    os.makedirs(OUT_DIR, exist_ok=True)
    with _lock, open(os.path.join(OUT_DIR, f"{os.getpid()}.json"), "w") as f:
        json.dump({"pid": os.getpid(), "events": _events}, f)
