"""Opening SQLite files safely, and turning SQLite's errors into clear Conveyor errors."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from conveyor.core.errors import StoreBusy, StoreError, StoreReadOnly

# File systems where SQLite's locking is unreliable, so two processes could both write.
NETWORK_FILE_SYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "afs", "ceph", "glusterfs"}

SYNCHRONOUS_MODES = {"off", "normal", "full", "extra"}


def file_system_type(path: str) -> str | None:
    """The type of the file system holding `path`, from /proc/mounts (Linux), else None."""
    try:
        with open("/proc/mounts") as mounts:
            entries = [line.split() for line in mounts]
    except OSError:
        return None
    target = os.path.realpath(path)
    best, best_type = "", None
    for entry in entries:
        if len(entry) < 3:
            continue
        mount_point = entry[1].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > len(best):
            best, best_type = mount_point, entry[2]
    return best_type


def check_local_file_system(path: str) -> None:
    fs = file_system_type(os.path.dirname(os.path.abspath(path)) or ".")
    if fs in NETWORK_FILE_SYSTEMS:
        raise StoreError(
            f"{path} is on a network file system ({fs}); SQLite cannot lock it safely. "
            "Put the database on a local disk or use PostgreSQL."
        )


def connect(path: str, busy_timeout: float, synchronous: str) -> sqlite3.Connection:
    """A connection in autocommit mode (we issue BEGIN ourselves) with the pragmas we rely on."""
    try:
        conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    except sqlite3.OperationalError as exc:
        raise translate(exc, path, busy_timeout) from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"could not switch {path} to WAL mode (got {mode})")
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        conn.execute("PRAGMA wal_autocheckpoint = 1000")
        conn.execute("PRAGMA journal_size_limit = 67108864")
        conn.execute("PRAGMA cache_size = -16000")
        conn.execute("PRAGMA temp_store = MEMORY")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise translate(exc, path, busy_timeout) from exc
    return conn


def translate(exc: sqlite3.Error, path: str, busy_timeout: float) -> Exception:
    """Map SQLite's error text onto our hierarchy; every message names the file."""
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return StoreBusy(
            f"the database {path} stayed locked for {busy_timeout:g} s: another process holds "
            "a write transaction. Try again, or raise busy_timeout."
        )
    if "readonly" in text or "read-only" in text:
        return StoreReadOnly(
            f"the database {path} is read-only: Conveyor needs write access to the file and "
            "its directory (for the -wal and -shm files)."
        )
    if "unable to open" in text:
        return StoreError(f"cannot open the database {path}: {exc}")
    if "not a database" in text or "malformed" in text:
        return StoreError(f"{path} is not a Conveyor SQLite database or is damaged: {exc}")
    return StoreError(f"database error on {path}: {exc}")


@contextmanager
def translated(path: str, busy_timeout: float) -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as exc:
        raise translate(exc, path, busy_timeout) from exc
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.IntegrityError):
            raise
        raise translate(exc, path, busy_timeout) from exc
