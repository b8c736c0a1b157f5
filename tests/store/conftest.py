"""The store conformance suite: every test here runs against each driver.

The PostgreSQL store of each test lives in a fresh schema of its own, dropped afterwards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psycopg
import pytest

from conveyor.core.records import ClaimRequest, Outcome, OutcomeKind, QueueSpec, TaskRecord
from conveyor.engine import Engine, TriggerOptions
from conveyor.store.postgres import PostgresStore
from conveyor.store.sqlite import SQLiteStore

DRIVERS = ["sqlite", "postgres"]


@pytest.fixture
def pg_schema(postgres_url):
    """A fresh schema name; the schema (if created) is dropped afterwards."""
    name = f"conveyor_test_{os.urandom(6).hex()}"
    yield name
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def pg_store(postgres_url, pg_schema, clock):
    s = PostgresStore(postgres_url, clock, schema=pg_schema, pool_size=4)
    yield s
    s.close()


@pytest.fixture(params=DRIVERS)
def store(request, db_path, clock):
    if request.param == "sqlite":
        s = SQLiteStore(db_path, clock)
        yield s
        s.close()
    else:
        yield request.getfixturevalue("pg_store")


@dataclass
class Harness:
    """Small verbs over the engine so tests read as scenarios."""

    engine: Engine

    def task(self, task_id: str, queue: str | None = None, **options) -> TaskRecord:
        record = TaskRecord(task_id=task_id, queue=queue or task_id, options=options)
        self.engine.register([record], [QueueSpec(record.queue, options.get("queue_limit"))])
        return record

    def trigger(self, task: TaskRecord, payload: str = "{}", **options) -> str:
        run = self.engine.prepare(task, payload, TriggerOptions.from_kwargs(**options))
        return self.engine.insert([run])[0][0]

    def claim(self, *tasks: TaskRecord, limit: int = 10, worker: str = "w1", lease: float = 30.0, **kw):
        queues = kw.pop("queues", None) or list(dict.fromkeys(t.queue for t in tasks))
        request = ClaimRequest("dev", worker, queues, [t.task_id for t in tasks], limit, lease, **kw)
        return self.engine.claim(request)

    def complete(self, claimed, output: str = "null") -> list[bool]:
        items = claimed if isinstance(claimed, list) else [claimed]
        outcomes = [Outcome(c.id, c.lease_token, OutcomeKind.COMPLETED, output=output) for c in items]
        return self.engine.exchange(outcomes, [], None)[0]

    def status(self, run_id: str) -> str:
        return self.engine.retrieve(run_id).status.value


@pytest.fixture
def h(store) -> Harness:
    return Harness(Engine(store))
