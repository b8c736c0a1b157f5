"""SQLiteStore: one connection per thread, writes in BEGIN IMMEDIATE transactions."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from conveyor.core.clock import SYSTEM_CLOCK, Clock
from conveyor.core.errors import ConfigError, StoreError
from conveyor.store import common
from conveyor.store.base import Store
from conveyor.store.sqlite import migrate
from conveyor.store.sqlite.connection import (
    SYNCHRONOUS_MODES,
    check_local_file_system,
    connect,
    translated,
)
from conveyor.store.sqlite.tx import SQLiteTx


class SQLiteStore(Store):
    dialect = "sqlite"

    def __init__(
        self,
        path: str,
        clock: Clock = SYSTEM_CLOCK,
        *,
        busy_timeout: float = 10.0,
        synchronous: str = "normal",
        auto_migrate: bool = True,
        check_schema: bool = True,
    ) -> None:
        """`auto_migrate` creates the schema in a new, empty database; an existing database at
        another version is refused unless `check_schema` is off (for `conveyor migrate`)."""
        if synchronous.lower() not in SYNCHRONOUS_MODES:
            raise StoreError(f"synchronous must be one of {sorted(SYNCHRONOUS_MODES)}, got {synchronous!r}")
        self.path = os.path.abspath(path)
        self.location = self.path
        self.clock = clock
        self.busy_timeout = busy_timeout
        self.synchronous = synchronous.lower()
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        directory = os.path.dirname(self.path)
        if directory and not os.path.isdir(directory):
            os.makedirs(directory, exist_ok=True)
        check_local_file_system(self.path)
        conn = self._conn()
        with translated(self.path, busy_timeout):
            if auto_migrate and migrate.current_version(conn) == 0:
                migrate.apply(conn, clock.now(), self.path)
            if check_schema:
                migrate.check(conn, self.path)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, self.busy_timeout, self.synchronous)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[SQLiteTx]:
        conn = self._conn()
        with translated(self.path, self.busy_timeout):
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield SQLiteTx(conn, self.clock.now())
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[SQLiteTx]:
        conn = self._conn()
        with translated(self.path, self.busy_timeout):
            conn.execute("BEGIN")
            try:
                yield SQLiteTx(conn, self.clock.now())
            finally:
                conn.execute("COMMIT")

    @contextmanager
    def transaction_on(self, connection: object) -> Iterator[SQLiteTx]:
        """A Tx in the caller's transaction on a connection to this file: a sqlite3 Connection, or a
        SQLAlchemy 2 `Connection` or `Session` (sync, `sqlite` dialect) unwrapped to the sqlite3
        connection underneath (SQLAlchemy is recognised by its classes' module, never imported).
        The caller commits (the sqlite3 module opens the transaction at the first write, unless
        the connection is in autocommit mode, where the caller must have run BEGIN)."""
        connection, what = common.dbapi_connection(connection)
        if not isinstance(connection, sqlite3.Connection):
            raise ConfigError(
                f"connection= takes a sqlite3.Connection, or a SQLAlchemy Connection or Session on the sqlite "
                f"dialect, to {self.path}; got {what}"
            )
        with translated(self.path, self.busy_timeout):
            files = [row[2] for row in connection.execute("PRAGMA database_list") if row[1] == "main"]
        if not files or os.path.realpath(files[0]) != os.path.realpath(self.path):
            raise ConfigError(
                f"connection= ({what}) is to {files[0] if files else 'another database'}, not to {self.path}"
            )
        autocommit = getattr(connection, "autocommit", None) is True or connection.isolation_level is None
        if autocommit and not connection.in_transaction:
            raise ConfigError(
                f"connection= ({what}) needs an open transaction (run BEGIN first, or leave the sqlite3 module's "
                "transaction handling on; SQLAlchemy: not the AUTOCOMMIT isolation level), or the run would be "
                "committed on its own"
            )
        with translated(self.path, self.busy_timeout):
            yield SQLiteTx(connection, self.clock.now())

    def schema_version(self) -> int:
        with translated(self.path, self.busy_timeout):
            return migrate.current_version(self._conn())

    def migrate(self) -> list[int]:
        with translated(self.path, self.busy_timeout):
            return migrate.apply(self._conn(), self.clock.now(), self.path)

    def change_token(self) -> int:
        with translated(self.path, self.busy_timeout):
            return int(self._conn().execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"
