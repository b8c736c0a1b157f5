"""Experiment (prototype of an optimization, not a setting of Conveyor): a fair write lock in front of SQLite's.

SQLite's busy handler makes a writer that finds the database locked sleep 1, 2, 5, 10, ... up to 100 ms between
retries, however soon the lock is freed, and does not queue waiters: under two busy workers one of them can wait tens
of milliseconds for a lock held for 3 ms. This module, imported into every process (the harness with
CONVEYOR_BENCH_EXP=flock, workers with `--modules bench_tasks,exp_flock`), takes an exclusive flock() on
<db>.writelock around every write transaction: the kernel wakes the next waiter the moment the lock is released.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from conveyor.store.sqlite import driver
from conveyor.store.sqlite.tx import SQLiteTx

_transaction = driver.SQLiteStore.transaction
_local = threading.local()


def _lock_fd(path: str) -> int:
    """One open file description per thread and database: flock() then excludes threads of one process too."""
    fds = _local.__dict__.setdefault("fds", {})
    fd = fds.get(path)
    if fd is None:
        fd = fds[path] = os.open(path + ".writelock", os.O_RDWR | os.O_CREAT, 0o644)
    return fd


@contextmanager
def _fair_transaction(self: driver.SQLiteStore) -> Iterator[SQLiteTx]:
    fd = _lock_fd(self.path)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with _transaction(self) as tx:
            yield tx
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


driver.SQLiteStore.transaction = _fair_transaction  # type: ignore[method-assign,assignment]
