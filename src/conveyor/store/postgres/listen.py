"""The worker's end of LISTEN/NOTIFY: a thread holding one connection that listens on the
environment's channel and the worker's own channel, and hands each notification's payload on.

The connection is its own (not pooled): LISTEN belongs to a session. When it breaks (a server
restart) the thread reconnects with a growing pause and then reports `None`, "wake-ups may
have been missed", so the worker checks for everything at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg
from psycopg import sql

log = logging.getLogger("conveyor.store")

_POLL = 0.5  # how often the thread looks at its stop flag
_MAX_PAUSE = 5.0


class PostgresListener:
    def __init__(
        self,
        conninfo: str,
        channels: list[str],
        deliver: Callable[[bytes | None], None],
        connect_timeout: float = 10.0,
        on_close: Callable[[PostgresListener], None] | None = None,
        application_name: str = "conveyor",
    ) -> None:
        self.conninfo = conninfo
        self.channels = channels
        self.deliver = deliver
        self.connect_timeout = connect_timeout
        self._on_close = on_close
        self.application_name = application_name
        self._stop = threading.Event()
        self._conn: psycopg.Connection | None = self._connect()  # the first one fails loudly
        self._thread = threading.Thread(target=self._run, name="conveyor-listen", daemon=True)
        self._thread.start()

    def _connect(self) -> psycopg.Connection:
        conn = psycopg.connect(
            self.conninfo,
            autocommit=True,
            connect_timeout=max(1, round(self.connect_timeout)),
            application_name=self.application_name,
        )
        try:
            for channel in self.channels:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self) -> None:
        pause = _POLL
        while not self._stop.is_set():
            try:
                if self._conn is None:
                    self._conn = self._connect()
                    pause = _POLL
                    self.deliver(None)  # notifications sent while we were away are lost
                for note in self._conn.notifies(timeout=_POLL):
                    self.deliver(note.payload.encode())
            except Exception as exc:  # psycopg's errors; anything else is logged the same way
                if self._stop.is_set():
                    break
                log.warning("lost the LISTEN connection, reconnecting in %.1f s: %s", pause, exc)
                self._drop()
                self._stop.wait(pause)
                pause = min(pause * 2, _MAX_PAUSE)
        self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=_POLL * 4)
        if self._on_close is not None:
            self._on_close(self)
