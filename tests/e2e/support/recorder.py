"""What e2e tasks write, outside the Conveyor store: an execution log and keyed side effects.

Both live under the directory named by `E2E_DIR` (set by the test for its worker processes):

- `exec.log`: one JSON line per event, appended with a single `write()` on an `O_APPEND` file,
  so lines from many processes never interleave and the file order is the real order of
  events. `{"k": "S"|"E", "run", "pid", "attempt", "t", "key", "queue", ...}`: S when the
  code starts, E when it is about to return or raise.
- `effects.db`: a SQLite file apart from the store; the side effect is written keyed by run
  id with INSERT OR IGNORE, so a re-execution after a crash changes nothing.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from typing import Any

_fd: dict[int, int] = {}
_db: dict[int, sqlite3.Connection] = {}

EFFECTS_SCHEMA = """CREATE TABLE IF NOT EXISTS effects (
    run_id TEXT PRIMARY KEY, value TEXT NOT NULL, pid INTEGER NOT NULL, attempt INTEGER NOT NULL, t REAL NOT NULL)"""


def directory() -> str:
    return os.environ["E2E_DIR"]


def _log_fd() -> int:
    pid = os.getpid()
    fd = _fd.get(pid)
    if fd is None:  # per process: a forked child opens its own
        fd = os.open(os.path.join(directory(), "exec.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _fd.clear()
        _fd[pid] = fd
    return fd


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def record(kind: str, ctx: Any, **extra: Any) -> None:
    ppid = os.getppid()
    event = {
        "k": kind,
        "run": ctx.run.id,
        "pid": os.getpid(),
        # A sync task runs in a pool child of a forkserver of the worker: its grandparent.
        "ancestors": [ppid, _parent(ppid)],
        "attempt": ctx.attempt.number,
        "t": time.time(),
        "key": ctx.run.concurrency_key,
        "queue": ctx.task.queue,
        "task": ctx.task.id,
        **extra,
    }
    os.write(_log_fd(), (json.dumps(event, separators=(",", ":")) + "\n").encode())


def start(ctx: Any, **extra: Any) -> None:
    record("S", ctx, **extra)


def end(ctx: Any, **extra: Any) -> None:
    record("E", ctx, **extra)


def effects_db() -> sqlite3.Connection:
    pid = os.getpid()
    conn = _db.get(pid)
    if conn is None:
        conn = sqlite3.connect(os.path.join(directory(), "effects.db"), timeout=60, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 60000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = OFF")  # a process crash loses nothing; only power loss would
        conn.execute(EFFECTS_SCHEMA)
        _db.clear()
        _db[pid] = conn
    return conn


def effect(ctx: Any, value: Any) -> None:
    """The side effect, keyed by run id: a second execution of the run changes nothing."""
    effects_db().execute(
        "INSERT OR IGNORE INTO effects (run_id, value, pid, attempt, t) VALUES (?, ?, ?, ?, ?)",
        (ctx.run.id, json.dumps(value, sort_keys=True), os.getpid(), ctx.attempt.number, time.time()),
    )


def first_execution(ctx: Any) -> bool:
    """True the first time any process executes this run (kept in effects.db)."""
    conn = effects_db()
    conn.execute("CREATE TABLE IF NOT EXISTS seen (run_id TEXT PRIMARY KEY)")
    return conn.execute("INSERT OR IGNORE INTO seen (run_id) VALUES (?)", (ctx.run.id,)).rowcount == 1
