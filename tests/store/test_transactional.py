"""Transactional enqueue (SPEC §2): `trigger(..., connection=conn)` writes the run in the
caller's open transaction, so the run exists iff the caller commits. Every driver, with its
own library's connection (psycopg for PostgreSQL, sqlite3 for SQLite)."""

from __future__ import annotations

import queue
import sqlite3
import time

import psycopg
import pytest

from conveyor.core.errors import ConfigError
from conveyor.core.records import QueueSpec, RunFilter, TaskRecord
from conveyor.engine import Engine, TriggerOptions
from conveyor.engine.notify import WORK
from conveyor.sdk import client as client_module
from conveyor.sdk.task import task as task_decorator
from conveyor.store.postgres import PostgresStore


@pytest.fixture
def caller(request, store):
    """Open a connection of the caller's own, to the store's database, with a table of theirs."""
    opened = []

    def open_connection(**kwargs):
        if isinstance(store, PostgresStore):
            conn = psycopg.connect(request.getfixturevalue("postgres_url"), **kwargs)
            table = f'"{store.schema}".orders'
        else:
            conn = sqlite3.connect(store.path, **kwargs)
            table = "orders"
        opened.append(conn)
        return conn, table

    conn, table = open_connection()
    conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (id integer PRIMARY KEY, run_id text)")
    conn.commit()
    yield open_connection
    for c in opened:
        c.close()


def register(engine: Engine) -> TaskRecord:
    record = TaskRecord(task_id="send-receipt", queue="send-receipt")
    engine.register([record], [QueueSpec("send-receipt", None)])
    return record


def test_runs_exist_exactly_for_the_committed_transactions(store, caller):
    engine = Engine(store)
    task = register(engine)
    conn, table = caller()
    committed = []
    for i in range(20):
        run = engine.prepare(task, f'{{"order": {i}}}', TriggerOptions(tags=["tx"]))
        run_id, created = engine.insert([run], connection=conn)[0]
        assert created
        conn.execute(f"INSERT INTO {table} (id, run_id) VALUES ({i}, '{run_id}')")
        if i % 2:
            conn.rollback()
        else:
            conn.commit()
            committed.append(run_id)
    runs = engine.list_runs(RunFilter(limit=100))
    assert sorted(r.id for r in runs) == sorted(committed)
    assert all(r.status.value == "QUEUED" and r.tags == ["tx"] for r in runs)
    rows = conn.execute(f"SELECT run_id FROM {table} ORDER BY id").fetchall()
    assert [r[0] for r in rows] == committed


def test_a_keyed_trigger_in_a_rolled_back_transaction_leaves_the_key_free(store, caller):
    engine = Engine(store)
    task = register(engine)
    conn, _ = caller()
    first, _ = engine.insert([engine.prepare(task, "{}", TriggerOptions(idempotency_key="k"))], connection=conn)[0]
    conn.rollback()
    second, created = engine.insert([engine.prepare(task, "{}", TriggerOptions(idempotency_key="k"))])[0]
    assert created and second != first
    assert engine.retrieve(second).idempotency_key == "k"


def test_the_sdk_takes_connection(store, caller, clock):
    client_module.configure(store=store, clock=clock)
    try:

        @task_decorator(id="sdk-receipt")
        def receipt(payload: dict) -> None: ...

        conn, _ = caller()
        kept = receipt.trigger({"n": 1}, connection=conn)
        [batched] = receipt.batch_trigger([{"n": 2}], connection=conn)
        conn.commit()
        dropped = receipt.trigger({"n": 3}, connection=conn)
        conn.rollback()
        engine = client_module.get_client().engine
        ids = {r.id for r in engine.list_runs(RunFilter())}
        assert ids == {kept.id, batched.id} and dropped.id not in ids
    finally:
        client_module.set_client(None)


def test_connections_that_cannot_hold_the_run_are_refused(store, caller, tmp_path):
    engine = Engine(store)
    task = register(engine)
    run = engine.prepare(task, "{}", TriggerOptions())
    with pytest.raises(ConfigError, match="connection= takes a"):
        engine.insert([run], connection=object())
    if isinstance(store, PostgresStore):
        autocommit, _ = caller(autocommit=True)
    else:
        autocommit, _ = caller(isolation_level=None)
        other = sqlite3.connect(str(tmp_path / "other.db"))
        with pytest.raises(ConfigError, match="not to"):
            engine.insert([run], connection=other)
        other.close()
    with pytest.raises(ConfigError, match="needs an open transaction"):
        engine.insert([run], connection=autocommit)
    assert engine.list_runs(RunFilter()) == []


def test_postgres_wakes_workers_at_the_callers_commit_only(pg_store, postgres_url):
    engine = Engine(pg_store)
    task = register(engine)
    got: queue.Queue[bytes | None] = queue.Queue()
    listener = pg_store.listen("dev", "w", got.put)
    try:
        with psycopg.connect(postgres_url) as conn:
            engine.insert([engine.prepare(task, "{}", TriggerOptions())], connection=conn)
            time.sleep(0.3)
            assert got.empty()  # not committed yet
            conn.rollback()
            time.sleep(0.3)
            assert got.empty()  # rolled back: nobody is woken
            engine.insert([engine.prepare(task, "{}", TriggerOptions())], connection=conn)
            conn.commit()
            assert got.get(timeout=10) == WORK
    finally:
        listener.close()
