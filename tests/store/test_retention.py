"""Retention (`Tx.run_purge`), on every driver: finished runs older than the cutoff go with their
child rows, in small batches; unfinished runs, newer runs and runs whose idempotency key is still
live stay (DECISIONS.md, "Idempotency")."""

from conveyor.core.records import LogLine, MetadataOp, Outcome, OutcomeKind, RunFilter
from conveyor.core.status import RunStatus
from conveyor.engine import engine as engine_module

DAY = 86400.0


def _children(store, run_id: str) -> dict[str, int]:
    with store.read() as tx:
        return {
            "attempts": len(tx.attempt_list(run_id)),
            "events": len(tx.event_list(run_id)),
            "logs": len(tx.log_list(run_id)),
        }


def _finish_with_children(h, task, **options) -> str:
    """A COMPLETED run with an attempt, status and metadata events, log lines and tags."""
    run_id = h.trigger(task, tags=["a", "b"], **options)
    (claimed,) = h.claim(task)
    h.engine.exchange(
        [],
        [LogLine(run_id, claimed.lease_token, 1, 1.0, "INFO", f"line {i}") for i in range(3)],
        None,
        [(run_id, claimed.lease_token, [MetadataOp("set", "k", 1)])],
    )
    assert h.complete(claimed) == [True]
    return run_id


def _purge(store, before: float, limit: int = 500) -> int:
    with store.transaction() as tx:
        return tx.run_purge(before, limit)


def _tagged(h, tag: str) -> list[str]:
    return [r.id for r in h.engine.list_runs(RunFilter(tags=[tag]))]


def _rows(store, table: str, run_id: str) -> int:
    """Rows of a child table that still name the run (read past the Tx vocabulary)."""
    if store.dialect == "sqlite":
        return store._conn().execute(f"SELECT count(*) FROM {table} WHERE run_id = ?", (run_id,)).fetchone()[0]
    with store.pool.connection() as conn:
        return conn.execute(f'SELECT count(*) FROM "{store.schema}".{table} WHERE run_id = %s', (run_id,)).fetchone()[0]


def test_purges_old_finished_runs_and_their_rows(h, store, clock):
    t = h.task("t")
    old = _finish_with_children(h, t)
    assert _children(store, old) == {"attempts": 1, "events": 4, "logs": 3}
    clock.advance(10 * DAY)
    new = _finish_with_children(h, t)
    queued = h.trigger(t, tags=["a"])
    clock.advance(25 * DAY)
    assert _purge(store, clock.now() - 30 * DAY) == 1
    assert _children(store, old) == {"attempts": 0, "events": 0, "logs": 0}
    assert [_rows(store, table, old) for table in ("run_tags", "run_events", "idempotency_keys")] == [0, 0, 0]
    assert _rows(store, "run_tags", new) == 2
    with store.read() as tx:
        assert tx.run_get("dev", old) is None
        assert tx.run_get("dev", new) is not None and tx.run_get("dev", queued) is not None
    assert _children(store, new) == {"attempts": 1, "events": 4, "logs": 3}
    assert sorted(_tagged(h, "a")) == sorted([new, queued])
    assert _purge(store, clock.now() - 30 * DAY) == 0  # nothing else is old enough


def test_never_purges_unfinished_runs(h, store, clock):
    t = h.task("t")
    queued = h.trigger(t)
    delayed = h.trigger(t, delay=3600)
    executing = h.trigger(t)
    claimed = h.claim(t, limit=1)
    assert [c.id for c in claimed] == [queued]
    clock.advance(400 * DAY)
    assert _purge(store, clock.now()) == 0
    assert {h.status(r) for r in (queued, delayed, executing)} <= {"EXECUTING", "QUEUED", "DELAYED"}


def test_every_finished_status_is_purged(h, store, clock):
    t = h.task("t", retry={"max_attempts": 1})
    done = h.trigger(t)
    h.complete(h.claim(t))
    failed = h.trigger(t)
    (c,) = h.claim(t)
    h.engine.exchange(
        [Outcome(c.id, c.lease_token, OutcomeKind.FAILED, error={"m": "x"}, status=RunStatus.FAILED)], [], None
    )
    canceled = h.engine.cancel(h.trigger(t)).id
    expired = h.trigger(t, ttl=10)
    clock.advance(11)
    h.engine.maintain()
    assert [h.status(r) for r in (done, failed, canceled, expired)] == ["COMPLETED", "FAILED", "CANCELED", "EXPIRED"]
    clock.advance(31 * DAY)
    assert _purge(store, clock.now() - 30 * DAY) == 4


def test_batches_are_small_and_oldest_first(h, store, clock):
    t = h.task("t")
    ids = []
    for _ in range(5):
        ids.append(h.trigger(t))
        h.complete(h.claim(t))
        clock.advance(60)
    clock.advance(40 * DAY)
    cutoff = clock.now() - 30 * DAY
    assert _purge(store, cutoff, limit=2) == 2
    with store.read() as tx:
        assert [tx.run_get("dev", r) is None for r in ids] == [True, True, False, False, False]
    assert _purge(store, cutoff, limit=2) == 2
    assert _purge(store, cutoff, limit=2) == 1
    assert _purge(store, cutoff, limit=2) == 0


def test_a_live_idempotency_key_keeps_its_run(h, store, clock):
    t = h.task("t")
    kept = h.trigger(t, idempotency_key="k", idempotency_key_ttl=90 * DAY)
    h.complete(h.claim(t))  # COMPLETED keeps the key until its ttl
    short = h.trigger(t, idempotency_key="s", idempotency_key_ttl=60)
    h.complete(h.claim(t))
    clock.advance(31 * DAY)
    assert _purge(store, clock.now() - 30 * DAY) == 1  # `short`: its key expired long ago
    with store.read() as tx:
        assert tx.run_get("dev", short) is None and tx.run_get("dev", kept) is not None
    assert h.trigger(t, idempotency_key="k") == kept  # still live, still answered
    assert _rows(store, "idempotency_keys", short) == 0  # the purged run's key row went with it
    assert _rows(store, "idempotency_keys", kept) == 1
    fresh = h.trigger(t, idempotency_key="s")
    assert fresh != short
    clock.advance(60 * DAY)  # the key of `kept` has expired now
    assert _purge(store, clock.now() - 30 * DAY) == 1
    with store.read() as tx:
        assert tx.run_get("dev", kept) is None
    again = h.trigger(t, idempotency_key="k")
    assert again != kept and h.status(again) == "QUEUED"


def test_a_freed_key_does_not_keep_its_run(h, store, clock):
    t = h.task("t", retry={"max_attempts": 1})
    run = h.trigger(t, idempotency_key="k", idempotency_key_ttl=365 * DAY)
    (c,) = h.claim(t)
    h.engine.exchange(
        [Outcome(c.id, c.lease_token, OutcomeKind.FAILED, error={"m": "x"}, status=RunStatus.FAILED)], [], None
    )
    clock.advance(31 * DAY)
    assert _purge(store, clock.now() - 30 * DAY) == 1  # FAILED freed the key at once
    with store.read() as tx:
        assert tx.run_get("dev", run) is None


def test_maintenance_purges_one_batch_when_due(h, store, clock, monkeypatch):
    monkeypatch.setattr(engine_module, "PURGE_BATCH", 2)
    t = h.task("t")
    ids = []
    for _ in range(5):
        ids.append(h.trigger(t))
        h.complete(h.claim(t))
    h.engine.retention_days = 30
    clock.advance(31 * DAY)

    def left() -> int:
        with store.read() as tx:
            return sum(tx.run_get("dev", r) is not None for r in ids)

    h.engine.maintain()
    assert left() == 3  # one batch per pass
    h.engine.maintain()
    assert left() == 3  # a full batch: the next one waits PURGE_BACKLOG_PAUSE
    clock.advance(engine_module.PURGE_BACKLOG_PAUSE)
    h.engine.maintain()
    assert left() == 1
    clock.advance(engine_module.PURGE_BACKLOG_PAUSE)
    h.engine.maintain()
    assert left() == 0
    h.engine.retention_days = None  # retention off: maintenance purges nothing
    h.trigger(t)
    h.complete(h.claim(t))
    clock.advance(400 * DAY)
    h.engine.maintain()
    assert _purge(store, clock.now(), 10) == 1
