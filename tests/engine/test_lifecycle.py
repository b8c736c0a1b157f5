"""Cancel, replay, reschedule, ttl, queues; every transition checks the status it comes from."""

import pytest

from conveyor.core.errors import InvalidTransition, RunNotFound, UnknownQueue
from conveyor.core.status import RunStatus
from conveyor.engine import TriggerOptions
from helpers import register


def trigger(engine, task, payload="{}", **options):
    return engine.insert([engine.prepare(task, payload, TriggerOptions.from_kwargs(**options))])[0][0]


def test_cancel_queued_and_delayed_at_once(engine):
    t = register(engine, "t")
    queued, delayed = trigger(engine, t), trigger(engine, t, delay=60)
    assert engine.cancel(queued).status is RunStatus.CANCELED
    assert engine.cancel(delayed).status is RunStatus.CANCELED
    assert engine.cancel(queued).status is RunStatus.CANCELED  # finished: unchanged, no error
    assert [e.data["status"] for e in engine.events(queued)] == ["QUEUED", "CANCELED"]


def test_cancel_unknown_run(engine):
    with pytest.raises(RunNotFound):
        engine.cancel("run_nope")


def test_replay_copies_payload_and_options_but_not_the_key(engine):
    t = register(engine, "t")
    old = trigger(engine, t, '{"a": 1}', tags=["x"], idempotency_key="k", concurrency_key="c", priority=5)
    new = engine.replay(old)
    run = engine.retrieve(new)
    assert new != old and run.payload == {"a": 1} and run.tags == ["x"]
    assert (run.concurrency_key, run.priority, run.idempotency_key) == ("c", 5, None)


def test_reschedule_moves_a_delayed_run_only(engine, clock):
    t = register(engine, "t")
    delayed = trigger(engine, t, delay=60)
    assert engine.reschedule(delayed, 600).available_at == clock.now() + 600
    queued = trigger(engine, t)
    with pytest.raises(InvalidTransition, match="only a DELAYED run"):
        engine.reschedule(queued, 10)


def test_ttl_expires_a_run_not_started_in_time(engine, clock):
    t = register(engine, "t")
    run = trigger(engine, t, ttl=10)
    clock.advance(5)
    engine.maintain()
    assert engine.retrieve(run).status is RunStatus.QUEUED
    clock.advance(6)
    assert engine.maintain().expired == 1
    assert engine.retrieve(run).status is RunStatus.EXPIRED


def test_ttl_counts_from_when_a_delayed_run_is_queued(engine, clock):
    t = register(engine, "t")
    run = trigger(engine, t, delay=100, ttl=10)
    clock.advance(101)
    engine.maintain()
    clock.advance(9)
    engine.maintain()
    assert engine.retrieve(run).status is RunStatus.QUEUED
    clock.advance(2)
    engine.maintain()
    assert engine.retrieve(run).status is RunStatus.EXPIRED


def test_maintenance_is_idempotent_and_reports_the_next_due_time(engine, clock):
    t = register(engine, "t")
    trigger(engine, t, delay=30)
    first = engine.maintain()
    assert first.promoted == 0 and first.next_due == clock.now() + 30
    clock.advance(31)
    assert engine.maintain().promoted == 1
    assert engine.maintain().promoted == 0


def test_queues_list_and_pause(engine):
    t = register(engine, "t", queue="ai", queue_limit=3)
    trigger(engine, t)
    trigger(engine, t, delay=10)
    info = engine.queue("ai")
    assert (info.concurrency_limit, info.queued, info.delayed, info.running, info.paused) == (3, 1, 1, 0, False)
    assert engine.set_paused("ai", True).paused
    assert [q.name for q in engine.queues()] == ["ai"]
    with pytest.raises(UnknownQueue):
        engine.set_paused("nope", True)


def test_a_transaction_aborted_by_a_conflict_runs_again():
    from conveyor.core.errors import StoreBusy, StoreConflict
    from conveyor.engine.engine import _rerun_on_conflict

    calls = []

    def body():
        calls.append(1)
        if len(calls) < 3:
            raise StoreConflict("deadlock detected")
        return "done"

    assert _rerun_on_conflict(body) == "done" and len(calls) == 3
    calls.clear()

    def always():
        calls.append(1)
        raise StoreConflict("deadlock detected")

    with pytest.raises(StoreConflict):
        _rerun_on_conflict(always)
    assert len(calls) == 3

    def busy():  # waited its busy timeout already: not run again
        calls.append(1)
        raise StoreBusy("busy")

    calls.clear()
    with pytest.raises(StoreBusy):
        _rerun_on_conflict(busy)
    assert len(calls) == 1
