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


def open_store(url: str, clock: Clock = SYSTEM_CLOCK, **options: object) -> Store:
    if url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("the PostgreSQL store is not built yet; use a sqlite:/// URL")
    if "://" in url and not url.startswith("sqlite:"):
        raise ConfigError(f"unsupported database URL {url!r}: use sqlite:///path.db")
    from conveyor.store.sqlite import SQLiteStore

    return SQLiteStore(sqlite_path(url), clock, **options)  # type: ignore[arg-type]
