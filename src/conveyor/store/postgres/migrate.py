"""Numbered migrations for PostgreSQL: `migrations/NNNN_name.sql`, applied in order, each in its
own transaction under an advisory lock, recorded in `<schema>.schema_migrations`.

Several processes may run `migrate` at once: each takes `pg_advisory_xact_lock` (keyed by the
schema) before it reads the version, so exactly one applies a migration and the others then
find it applied.
"""

from __future__ import annotations

from importlib import resources

import psycopg
from psycopg import sql

from conveyor.core.errors import SchemaMismatch

# Advisory lock class for migrations (the two-int form keeps it apart from the claim's
# one-bigint key locks). The second int is hashtext(schema).
MIGRATE_LOCK_CLASS = 0x0C0E7E70


def available() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration file shipped with the package."""
    out = []
    for item in resources.files("conveyor.store.postgres.migrations").iterdir():
        name = item.name
        if name.endswith(".sql") and name[:4].isdigit():
            out.append((int(name[:4]), name[5:-4], item.read_text()))
    return sorted(out)


LATEST = max(v for v, _, _ in available())


def current_version(conn: psycopg.Connection, schema: str) -> int:
    """0 when the schema or its version table does not exist yet."""
    table = f"{quote(schema)}.schema_migrations"
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
    if not row or not row[0]:
        return 0
    found = conn.execute(
        sql.SQL("SELECT coalesce(max(version), 0) FROM {}.schema_migrations").format(sql.Identifier(schema))
    ).fetchone()
    return int(found[0]) if found else 0


def apply(conn: psycopg.Connection, schema: str, now: float | None) -> list[int]:
    """Apply what is pending, each migration in its own transaction. `conn` is in autocommit
    mode; `now` None means the database's clock."""
    applied = []
    ident = sql.Identifier(schema)
    for version, name, script in available():
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (MIGRATE_LOCK_CLASS, schema))
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {}.schema_migrations (version integer PRIMARY KEY, "
                    "name text NOT NULL, applied_at double precision NOT NULL)"
                ).format(ident)
            )
            have = current_version(conn, schema)
            if have > LATEST:
                raise too_new(have)
            if version <= have:
                continue
            conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(ident))
            conn.execute(script.encode())  # no parameters: one simple query, many statements
            conn.execute(
                sql.SQL(
                    "INSERT INTO {}.schema_migrations (version, name, applied_at) "
                    "VALUES (%s, %s, coalesce(%s, extract(epoch from now())::float8))"
                ).format(ident),
                (version, name, now),
            )
            applied.append(version)
    return applied


def too_new(have: int) -> SchemaMismatch:
    return SchemaMismatch(
        f"the database has schema version {have}, newer than this Conveyor knows ({LATEST}): "
        "upgrade Conveyor before using this database"
    )


def check(conn: psycopg.Connection, schema: str, location: str) -> int:
    have = current_version(conn, schema)
    if have > LATEST:
        raise too_new(have)
    if have < LATEST:
        raise SchemaMismatch(
            f"the database {location} has schema version {have}, older than this Conveyor "
            f"({LATEST}): run `conveyor migrate`"
        )
    return have


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
