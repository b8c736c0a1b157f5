"""A database that is locked, read-only, damaged, of another schema, or on a network disk:
a clear error that names the file, and nothing lost."""

import os
import sqlite3
import subprocess

import pytest

from conveyor.core.errors import SchemaMismatch, StoreBusy, StoreError, StoreReadOnly
from conveyor.engine import Engine, TriggerOptions
from conveyor.store.sqlite import SQLiteStore, connection, migrate
from helpers import register


def test_locked_database_is_store_busy_naming_the_file_and_loses_nothing(db_path, clock):
    store = SQLiteStore(db_path, clock, busy_timeout=0.2)
    engine = Engine(store)
    task = register(engine, "t")
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreBusy, match=f"the database {db_path} stayed locked"):
        engine.insert([engine.prepare(task, "{}", TriggerOptions())])
    blocker.execute("ROLLBACK")
    run_id, created = engine.insert([engine.prepare(task, "{}", TriggerOptions())])[0]
    assert created and engine.retrieve(run_id)


def test_newer_schema_is_refused(db_path, clock):
    SQLiteStore(db_path, clock).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (999, 'future', 0)")
    with pytest.raises(SchemaMismatch, match="newer than this Conveyor knows"):
        SQLiteStore(db_path, clock)


def test_older_schema_asks_for_migrate_and_migrate_upgrades(db_path, clock, monkeypatch):
    SQLiteStore(db_path, clock).close()
    shipped = migrate.available()
    future = migrate.LATEST + 1
    extra = (future, "add_column", "ALTER TABLE runs ADD COLUMN future_column TEXT;")
    monkeypatch.setattr(migrate, "available", lambda: [*shipped, extra])
    monkeypatch.setattr(migrate, "LATEST", future)
    with pytest.raises(SchemaMismatch, match="run `conveyor migrate`"):
        SQLiteStore(db_path, clock)
    store = SQLiteStore(db_path, clock, auto_migrate=False, check_schema=False)
    assert store.migrate() == [future] and store.migrate() == []
    assert store.schema_version() == future
    SQLiteStore(db_path, clock).close()  # now accepted


def test_concurrent_migrations_apply_once(tmp_path, clock):
    path = str(tmp_path / "m.db")
    stores = [SQLiteStore(path, clock, auto_migrate=False, check_schema=False) for _ in range(4)]
    applied = [s.migrate() for s in stores]
    assert sorted(map(len, applied)) == [0, 0, 0, migrate.LATEST]


def test_a_file_that_is_not_a_database(tmp_path, clock):
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=f"{path} is not a Conveyor SQLite database"):
        SQLiteStore(str(path), clock)


def test_network_file_systems_are_refused(tmp_path, clock, monkeypatch):
    monkeypatch.setattr(connection, "file_system_type", lambda path: "nfs4")
    with pytest.raises(StoreError, match="network file system \\(nfs4\\)"):
        SQLiteStore(str(tmp_path / "n.db"), clock)


def test_bad_synchronous_mode(tmp_path, clock):
    with pytest.raises(StoreError, match="synchronous must be one of"):
        SQLiteStore(str(tmp_path / "s.db"), clock, synchronous="sometimes")


def make_read_only(path: str) -> None:
    """chmod is enough for a normal user; root ignores file modes, so root marks the file
    immutable instead (the kernel then refuses every write, also to root)."""
    os.chmod(path, 0o444)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", path], check=True)


def test_read_only_database_file(tmp_path, clock):
    path = str(tmp_path / "ro.db")
    store = SQLiteStore(path, clock)
    register(Engine(store), "t")
    store.close()
    make_read_only(path)
    try:
        with pytest.raises(StoreReadOnly, match=f"the database {path} is read-only"):
            reader = SQLiteStore(path, clock)
            engine = Engine(reader)
            engine.insert([engine.prepare(engine.task("t"), "{}", TriggerOptions())])
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", path], check=True)
        os.chmod(path, 0o644)


def test_store_read_only_error_type_is_exported():
    assert issubclass(StoreReadOnly, StoreError)
