"""Numbered migrations: `migrations/NNNN_name.sql`, applied in order, recorded in schema_migrations."""

from __future__ import annotations

import sqlite3
from importlib import resources

from conveyor.core.errors import SchemaMismatch


def available() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration file shipped with the package."""
    out = []
    for item in resources.files("conveyor.store.sqlite.migrations").iterdir():
        name = item.name
        if name.endswith(".sql") and name[:4].isdigit():
            out.append((int(name[:4]), name[5:-4], item.read_text()))
    return sorted(out)


LATEST = max(v for v, _, _ in available())


def statements(script: str) -> list[str]:
    """Split a script into statements (sqlite3.complete_statement knows where one ends)."""
    out, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                out.append(current.strip())
            current = ""
    if current.strip() and not current.strip().startswith("--"):
        out.append(current.strip())
    return out


def current_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'").fetchone()
    if row is None:
        return 0
    return conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]


def apply(conn: sqlite3.Connection, now: float, location: str) -> list[int]:
    """Apply what is pending, each migration in its own IMMEDIATE transaction. Safe when many
    processes call it at once: the version is re-read under the write lock."""
    applied = []
    for version, name, sql in available():
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            have = current_version(conn)
            if have > LATEST:
                raise too_new(have, location)
            if version <= have:
                conn.execute("COMMIT")
                continue
            for statement in statements(sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (version, name, now),
            )
            conn.execute("COMMIT")
            applied.append(version)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return applied


def too_new(have: int, location: str) -> SchemaMismatch:
    return SchemaMismatch(
        f"the database {location} has schema version {have}, newer than this Conveyor knows ({LATEST}): "
        "upgrade Conveyor before using this database"
    )


def check(conn: sqlite3.Connection, location: str) -> int:
    have = current_version(conn)
    if have > LATEST:
        raise too_new(have, location)
    if have < LATEST:
        raise SchemaMismatch(
            f"the database {location} has schema version {have}, older than this Conveyor "
            f"({LATEST}): run `conveyor migrate`"
        )
    return have
