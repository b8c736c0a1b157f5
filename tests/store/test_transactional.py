"""Transactional enqueue (SPEC §2): `trigger(..., connection=conn)` writes the run in the
caller's open transaction, so the run exists iff the caller commits. Every driver, with its
own library's connection (psycopg for PostgreSQL, sqlite3 for SQLite)."""

from __future__ import annotations

import queue
import sqlite3
import time

import psycopg
import pytest

from conveyor.core.errors import ConfigError, RunNotFound
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


# --- SQLAlchemy 2: a Connection or Session is unwrapped to the DBAPI connection underneath --------


@pytest.fixture
def sa_engine(request, store):
    """A SQLAlchemy engine on the store's database: `postgresql+psycopg` or `sqlite` (same file)."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    if isinstance(store, PostgresStore):
        url = "postgresql+psycopg://" + request.getfixturevalue("postgres_url").split("://", 1)[1]
    else:
        url = f"sqlite:///{store.path}"
    engine = sqlalchemy.create_engine(url)
    yield engine
    engine.dispose()


def orders_table(store) -> str:
    return f'"{store.schema}".orders' if isinstance(store, PostgresStore) else "orders"


def test_sqlalchemy_connection_runs_exist_iff_its_transaction_commits(store, caller, sa_engine):
    from sqlalchemy import text

    engine = Engine(store)
    task = register(engine)
    caller()  # creates the caller's table
    table = orders_table(store)
    committed, dropped = [], []
    for i in range(6):
        run = engine.prepare(task, f'{{"order": {i}}}', TriggerOptions(tags=["sa"]))
        if i % 2 == 0:
            with sa_engine.begin() as conn:  # commits at the end of the block
                run_id = engine.insert([run], connection=conn)[0][0]
                conn.execute(
                    text(f"INSERT INTO {table} (id, run_id) VALUES (:id, :run_id)"), {"id": i, "run_id": run_id}
                )
            committed.append(run_id)
        else:
            with sa_engine.connect() as conn:  # a transaction SQLAlchemy has not begun yet: begun for the run
                run_id = engine.insert([run], connection=conn)[0][0]
                conn.execute(
                    text(f"INSERT INTO {table} (id, run_id) VALUES (:id, :run_id)"), {"id": i, "run_id": run_id}
                )
                conn.rollback()
            dropped.append(run_id)
    with sa_engine.connect() as conn:  # commit-as-you-go: the run is written first, then committed
        run_id = engine.insert([engine.prepare(task, "{}", TriggerOptions(tags=["sa"]))], connection=conn)[0][0]
        assert conn.in_transaction()
        conn.commit()
        committed.append(run_id)
    runs = engine.list_runs(RunFilter(limit=100))
    assert sorted(r.id for r in runs) == sorted(committed)
    assert all(r.status.value == "QUEUED" and r.tags == ["sa"] for r in runs)
    with sa_engine.connect() as conn:
        rows = conn.execute(text(f"SELECT run_id FROM {table} ORDER BY id")).all()
    assert [r[0] for r in rows] == committed[:3]


def test_sqlalchemy_rollback_leaves_nothing_and_frees_the_key(store, caller, sa_engine):
    engine = Engine(store)
    task = register(engine)
    with sa_engine.connect() as conn:
        with conn.begin() as transaction:
            first = engine.insert([engine.prepare(task, "{}", TriggerOptions(idempotency_key="k"))], connection=conn)
            transaction.rollback()
        assert not conn.in_transaction()
    assert engine.list_runs(RunFilter()) == []
    with pytest.raises(RunNotFound):
        engine.retrieve(first[0][0])
    second, created = engine.insert([engine.prepare(task, "{}", TriggerOptions(idempotency_key="k"))])[0]
    assert created and second != first[0][0]


def test_sqlalchemy_session(store, caller, sa_engine, clock):
    from sqlalchemy import text
    from sqlalchemy.orm import Session, sessionmaker

    caller()
    table = orders_table(store)
    client_module.configure(store=store, clock=clock)
    try:

        @task_decorator(id="sa-receipt")
        def receipt(payload: dict) -> None: ...

        with Session(sa_engine) as session:  # the run first: triggering begins the session's transaction
            kept = receipt.trigger({"n": 1}, connection=session)
            session.execute(text(f"INSERT INTO {table} (id, run_id) VALUES (1, :run_id)"), {"run_id": kept.id})
            session.commit()
        with Session(sa_engine) as session:
            session.execute(text(f"INSERT INTO {table} (id, run_id) VALUES (2, 'x')"))
            [dropped] = receipt.batch_trigger([{"n": 2}], connection=session)
            session.rollback()
        with sessionmaker(sa_engine).begin() as session:  # commits at the end of the block
            [batched] = receipt.batch_trigger([{"n": 3}], connection=session)
        engine = client_module.get_client().engine
        assert {r.id for r in engine.list_runs(RunFilter())} == {kept.id, batched.id}
        with pytest.raises(RunNotFound):
            engine.retrieve(dropped.id)
        with Session(sa_engine) as session:
            assert session.execute(text(f"SELECT id, run_id FROM {table}")).all() == [(1, kept.id)]
    finally:
        client_module.set_client(None)


def test_sqlalchemy_objects_that_cannot_hold_the_run_are_refused(store, sa_engine, tmp_path, postgres_url):
    import sqlalchemy
    from sqlalchemy.orm import Session

    engine = Engine(store)
    task = register(engine)
    run = engine.prepare(task, "{}", TriggerOptions())
    with pytest.raises(
        ConfigError, match="connection= takes a SQLAlchemy Connection or Session.*got SQLAlchemy Engine"
    ):
        engine.insert([run], connection=sa_engine)
    with pytest.raises(ConfigError, match="connection= takes a.*got builtins|connection= takes a.*got object"):
        engine.insert([run], connection=object())
    closed = sa_engine.connect()
    closed.close()
    with pytest.raises(ConfigError, match="got a SQLAlchemy Connection that cannot be used"):
        engine.insert([run], connection=closed)
    with sa_engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        with pytest.raises(ConfigError, match=r"\(a SQLAlchemy Connection .*\) needs an open transaction"):
            engine.insert([run], connection=conn)
    if isinstance(store, PostgresStore):
        others = [
            (
                f"sqlite:///{tmp_path / 'other.db'}",
                r"takes a psycopg \(3\) Connection.*got a SQLAlchemy Connection \(sqlite",
            ),
            (
                "postgresql+psycopg://" + postgres_url.split("://", 1)[1].rsplit("/", 1)[0] + "/postgres",
                r"\(a SQLAlchemy Connection \(postgresql\+psycopg\)\) is to database 'postgres'",
            ),
        ]
    else:
        others = [(f"sqlite:///{tmp_path / 'other.db'}", r"\(a SQLAlchemy Connection \(sqlite\+pysqlite\)\) is to ")]
    for url, message in others:
        other = sqlalchemy.create_engine(url)
        try:
            with other.connect() as conn, pytest.raises(ConfigError, match=message):
                engine.insert([run], connection=conn)
            with (
                Session(other) as session,
                pytest.raises(ConfigError, match=message.replace("SQLAlchemy Connection", "SQLAlchemy Session")),
            ):
                engine.insert([run], connection=session)
        finally:
            other.dispose()
    assert engine.list_runs(RunFilter()) == []
