"""The e2e harness on PostgreSQL: a `Cluster` whose store is a fresh schema of a PostgreSQL
database (`?schema=` in the URL), read directly with psycopg, so the checks of harness.py
("Tests of faults") run unchanged.

Only the two SQLite idioms of harness.py's queries are translated: `?` placeholders, and a
JSON array of ids expanded with `json_each(?)`. jsonb columns come back as text, as SQLite's
TEXT columns do, so the checks' `json.loads` applies to both.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from harness import Cluster
from psycopg import sql as pgsql
from psycopg.types.string import TextLoader


def fresh_schema() -> str:
    return f"conveyor_e2e_{os.urandom(5).hex()}"


def with_schema(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


def drop_schema(url: str, schema: str) -> None:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(pgsql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(pgsql.Identifier(schema)))


def translate(query: str) -> str:
    """harness.py's SQLite SQL -> PostgreSQL: `json_each(?)` and `?` placeholders."""
    query = query.replace("SELECT value FROM json_each(?)", "SELECT jsonb_array_elements_text(%s::jsonb)")
    return query.replace("?", "%s")


@dataclass
class PgCluster(Cluster):
    """Worker processes on one PostgreSQL schema (`server_url` without `?schema=`)."""

    server_url: str = ""
    schema: str = ""
    _pg: psycopg.Connection[Any] | None = None

    @property
    def url(self) -> str:
        return with_schema(self.server_url, self.schema)

    def sql(self, query: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        for attempt in range(2):
            if self._pg is None or self._pg.closed:
                self._pg = psycopg.connect(self.server_url, autocommit=True, connect_timeout=5)
                self._pg.adapters.register_loader("jsonb", TextLoader)
                self._pg.execute(pgsql.SQL("SET search_path TO {}").format(pgsql.Identifier(self.schema)))
            try:
                return self._pg.execute(translate(query), tuple(params)).fetchall()  # type: ignore[arg-type]
            except psycopg.OperationalError:  # the server was restarted under us: once more
                with contextlib.suppress(psycopg.Error):
                    self._pg.close()
                self._pg = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        super().close()
        if self._pg is not None:
            with contextlib.suppress(psycopg.Error):
                self._pg.close()
            self._pg = None


def make_pg_cluster(directory: Path, modules: str, server_url: str, schema: str) -> PgCluster:
    return PgCluster(directory, modules, server_url=server_url, schema=schema)
