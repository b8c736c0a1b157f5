"""Opt-in instrumentation for profiling runs (`conveyor worker --modules bench_tasks,bench_trace`, or imported into
the measuring process). Changes nothing unless imported.

It wraps, without reimplementing anything:
  - every store connection (`SQLiteStore._conn`): each statement's time by its text (execute + fetch), BEGIN IMMEDIATE
    (= waiting for the write lock) and COMMIT per call;
  - `Engine.exchange`: outcomes and claims per exchange, and its duration;
  - the worker's wake-ups: datagrams handled, fallback polls that found a change (missed wake-ups);
  - with CONVEYOR_BENCH_TIMELINE=1, a timeline of datagrams and exchanges (W3 latency breakdown).
A worker process writes a JSON summary to $CONVEYOR_BENCH_TRACE_DIR/<pid>.json at exit.
Its Python wrapper adds a few µs per statement: use its shares, not its absolute rates.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from typing import Any

from conveyor.engine.engine import Engine
from conveyor.store.sqlite import driver
from conveyor.worker.worker import Worker

OUT_DIR = os.environ.get("CONVEYOR_BENCH_TRACE_DIR", "/tmp/conveyor-bench/trace")
TIMELINE = bool(os.environ.get("CONVEYOR_BENCH_TIMELINE"))
_lock = threading.Lock()
_started = time.time()
_sql: dict[str, list[float]] = {}  # statement -> [calls, seconds]
_tx: dict[str, list[float]] = {"begin": [], "commit": []}  # per call, seconds
_exchanges: list[tuple[int, int, int, float]] = []  # (outcomes, claim limit, claimed, seconds)
_wakes = {"datagrams": 0, "poll_timeouts": 0, "poll_found_change": 0}
_timeline: list[tuple[str, float, float, int]] = []  # (event, wall start, wall end, runs claimed)


def _key(sql: str) -> str:
    return " ".join(sql.split())[:90]


def _note(sql: str, seconds: float) -> None:
    key = _key(sql)
    with _lock:
        entry = _sql.setdefault(key, [0, 0.0])
        entry[0] += 1
        entry[1] += seconds
        if key.startswith("BEGIN IMMEDIATE"):
            _tx["begin"].append(seconds)
        elif key == "COMMIT":
            _tx["commit"].append(seconds)


def _add(sql: str, seconds: float) -> None:
    with _lock:
        _sql.setdefault(_key(sql), [0, 0.0])[1] += seconds


class _TimedCursor:
    def __init__(self, cursor: Any, sql: str) -> None:
        self._cursor, self._sql = cursor, sql

    def fetchone(self) -> Any:
        t = time.perf_counter()
        row = self._cursor.fetchone()
        _add(self._sql, time.perf_counter() - t)
        return row

    def fetchall(self) -> Any:
        t = time.perf_counter()
        rows = self._cursor.fetchall()
        _add(self._sql, time.perf_counter() - t)
        return rows

    def __iter__(self) -> Any:
        return iter(self.fetchall())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


class TimedConnection:
    """Forwards to a sqlite3 connection, timing every statement (execute + fetch) by its text."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Any = ()) -> Any:
        t = time.perf_counter()
        cursor = self._conn.execute(sql, params)
        _note(sql, time.perf_counter() - t)
        return _TimedCursor(cursor, sql)

    def executemany(self, sql: str, rows: Any) -> Any:
        rows = list(rows)
        t = time.perf_counter()
        cursor = self._conn.executemany(sql, rows)
        _note(sql, time.perf_counter() - t)
        return cursor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


_wrapped: dict[int, TimedConnection] = {}
_conn = driver.SQLiteStore._conn


def _timed_conn(self: driver.SQLiteStore) -> Any:
    raw = _conn(self)
    wrapper = _wrapped.get(id(raw))
    if wrapper is None or wrapper._conn is not raw:
        wrapper = _wrapped[id(raw)] = TimedConnection(raw)
    return wrapper


def sql_report(top: int = 15) -> list[tuple[str, int, float]]:
    """(statement, calls, seconds) by time; BEGIN IMMEDIATE includes the wait for the write lock."""
    with _lock:
        rows = [(k, int(v[0]), float(v[1])) for k, v in _sql.items()]
    return sorted(rows, key=lambda r: -r[2])[:top]


def reset() -> None:
    with _lock:
        _sql.clear()
        for values in _tx.values():
            values.clear()
        _exchanges.clear()


_exchange = Engine.exchange


def _traced_exchange(self: Engine, outcomes: Any, logs: Any, claim: Any, metadata: Any = (), steps: Any = ()) -> Any:
    t0, w0 = time.perf_counter(), time.time()
    result = _exchange(self, outcomes, logs, claim, metadata, steps)
    claimed = result.claimed
    if TIMELINE:
        _timeline.append(("exchange", w0, time.time(), len(claimed)))
    with _lock:
        _exchanges.append((len(outcomes), claim.limit if claim else 0, len(claimed), time.perf_counter() - t0))
    return result


_on_datagram = Worker._on_datagram
_change_token = driver.SQLiteStore.change_token


def _traced_on_datagram(self: Worker, wake_socket: Any) -> None:
    _wakes["datagrams"] += 1
    if TIMELINE:
        now = time.time()
        _timeline.append(("datagram", now, now, 0))
    _on_datagram(self, wake_socket)


def _traced_change_token(self: Any) -> int:
    # Called when the worker's idle wait timed out (the fallback poll); a new token means a missed wake-up.
    token = _change_token(self)
    _wakes["poll_timeouts"] += 1
    if token != getattr(self, "_bench_last_token", None):
        _wakes["poll_found_change"] += 1
        self._bench_last_token = token
    return token


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def _dump() -> None:
    os.makedirs(OUT_DIR, exist_ok=True)
    busy = [e for e in _exchanges if e[0] or e[2]]
    doc = {
        "pid": os.getpid(),
        "seconds": time.time() - _started,
        "transactions": len(_tx["begin"]),
        "tx_ms": {
            k: {"sum": 1000 * sum(v), "p50": 1000 * _pct(v, 50), "p99": 1000 * _pct(v, 99), "max": 1000 * max(v or [0])}
            for k, v in _tx.items()
        },
        "wakes": _wakes,
        "sql": sql_report(25),
        "timeline": _timeline,
        "exchanges": len(_exchanges),
        "busy_exchanges": len(busy),
        "outcomes_per_exchange": sum(e[0] for e in busy) / max(1, len(busy)),
        "claimed_per_exchange": sum(e[2] for e in busy) / max(1, len(busy)),
        "exchange_ms_sum": 1000 * sum(e[3] for e in _exchanges),
        "exchange_ms_p50": 1000 * _pct([e[3] for e in busy], 50),
    }
    with open(os.path.join(OUT_DIR, f"{os.getpid()}.json"), "w") as f:
        json.dump(doc, f, indent=1)


driver.SQLiteStore._conn = _timed_conn  # type: ignore[method-assign,assignment]
driver.SQLiteStore.change_token = _traced_change_token  # type: ignore[method-assign]
Engine.exchange = _traced_exchange  # type: ignore[method-assign]
Worker._on_datagram = _traced_on_datagram  # type: ignore[method-assign]
atexit.register(_dump)
