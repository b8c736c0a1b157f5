"""Experiment (prototype of an optimization, not a setting of Conveyor): checkpoints off the hot path.

Imported into a process (the harness with CONVEYOR_BENCH_EXP=bg_checkpoint, workers with
`--modules bench_tasks,exp_bg_checkpoint`), it makes every store connection of that process open with
`PRAGMA wal_autocheckpoint = 0` and starts one daemon thread that runs `PRAGMA wal_checkpoint(PASSIVE)` every
CONVEYOR_BENCH_CKPT_MS (200) ms. With synchronous=NORMAL the checkpoint is where SQLite calls fdatasync, so this moves
every fsync out of trigger/claim/settle commits. Compare with and without to size the gain (docs/performance.md).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time

from conveyor.store.open import sqlite_path
from conveyor.store.sqlite import connection, driver

_connect = connection.connect
INTERVAL = float(os.environ.get("CONVEYOR_BENCH_CKPT_MS", "200")) / 1000.0


def _connect_no_autocheckpoint(path: str, busy_timeout: float, synchronous: str) -> sqlite3.Connection:
    conn = _connect(path, busy_timeout, synchronous)
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    return conn


def _checkpointer(path: str) -> None:
    conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
    while True:
        time.sleep(INTERVAL)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error:
            pass


driver.connect = _connect_no_autocheckpoint  # type: ignore[assignment]
_url = os.environ.get("CONVEYOR_DATABASE_URL", "")
if _url.startswith("sqlite:"):
    threading.Thread(target=_checkpointer, args=(sqlite_path(_url),), name="bench-checkpointer", daemon=True).start()
