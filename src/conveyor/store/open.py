"""Choosing a driver from a database URL."""

from __future__ import annotations

from conveyor.core.clock import SYSTEM_CLOCK, Clock
from conveyor.core.errors import ConfigError
from conveyor.store.base import Store


def sqlite_path(url: str) -> str:
    """`sqlite:///relative.db`, `sqlite:////abs/path.db` or a bare path -> the file path."""
    if url.startswith("sqlite:///"):
        return url[len("sqlite:///") :] if not url.startswith("sqlite:////") else url[len("sqlite:///") :]
    if url.startswith("sqlite://"):
        raise ConfigError(f"bad SQLite URL {url!r}: use sqlite:///relative/path.db or sqlite:////absolute/path.db")
    return url


# Options that only mean something to SQLite (callers pass them whatever the URL).
_SQLITE_ONLY = ("synchronous", "busy_timeout")


def open_store(url: str, clock: Clock = SYSTEM_CLOCK, **options: object) -> Store:
    """`sqlite:///path.db` (or a bare path) opens SQLiteStore; `postgresql://...` or
    `postgres://...` opens PostgresStore, in the schema named by `?schema=` or `schema=`."""
    if url.startswith(("postgresql://", "postgres://")):
        from conveyor.store.postgres import PostgresStore

        pg_options = {k: v for k, v in options.items() if k not in _SQLITE_ONLY}
        return PostgresStore(url, clock, **pg_options)  # type: ignore[arg-type]
    if "://" in url and not url.startswith("sqlite:"):
        raise ConfigError(f"unsupported database URL {url!r}: use sqlite:///path.db or postgresql://...")
    from conveyor.store.sqlite import SQLiteStore

    return SQLiteStore(sqlite_path(url), clock, **options)  # type: ignore[arg-type]
