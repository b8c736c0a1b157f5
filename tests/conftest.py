"""Shared fixtures: a fresh SQLite store on a fake clock, an engine over it, a client."""

from __future__ import annotations

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
