"""The embedded SQLite driver: WAL, BEGIN IMMEDIATE writes, numbered migrations."""

from conveyor.store.sqlite.driver import SQLiteStore

__all__ = ["SQLiteStore"]
