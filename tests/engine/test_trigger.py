"""Triggering: options, validation, batches, idempotency keys and their lifetime."""

from datetime import UTC, datetime, timedelta

import pytest

from conveyor.core.errors import InvalidOptions, PayloadTooLarge, UnknownQueue, UnknownTask
from conveyor.core.records import Outcome, OutcomeKind, RunFilter
from conveyor.core.status import RunStatus
from conveyor.engine import Engine, Limits, TriggerOptions
from conveyor.engine.options import prepare_run
from helpers import register


def trigger(engine, task, payload="{}", **options):
    return engine.insert([engine.prepare(task, payload, TriggerOptions.from_kwargs(**options))])[0]


def test_trigger_records_every_option(engine, clock):
    t = register(engine, "t", retry={"max_attempts": 4})
    run_id, created = trigger(
        engine,
        t,
        '{"x": 1}',
        tags=["a", "user:42"],
        metadata={"chat": 7},
        priority=10,
        ttl=600,
        concurrency_key="user:42",
        machine="large-1x",
        version="20261124.1",
        max_attempts=5,
        idempotency_key="k1",
    )
    assert created and run_id.startswith("run_")
    run = engine.retrieve(run_id)
    assert run.status is RunStatus.QUEUED
    assert run.payload == {"x": 1} and run.tags == ["a", "user:42"] and run.metadata == {"chat": 7}
    assert (run.priority, run.ttl, run.concurrency_key, run.machine) == (10, 600, "user:42", "large-1x")
    assert (run.version, run.max_attempts, run.idempotency_key) == ("20261124.1", 5, "k1")
    assert engine.list_runs(RunFilter(tags=["user:42"]))[0].id == run_id
    assert [e.data for e in engine.events(run_id)] == [{"status": "QUEUED"}]


def test_delay_makes_a_delayed_run_and_datetime_works(engine, clock):
    t = register(engine, "t")
    run_id, _ = trigger(engine, t, delay=30)
    run = engine.retrieve(run_id)
    assert run.status is RunStatus.DELAYED and run.available_at == clock.now() + 30
    when = datetime.fromtimestamp(clock.now(), UTC) + timedelta(minutes=5)
    other, _ = trigger(engine, t, delay=when)
    assert engine.retrieve(other).available_at == when.timestamp()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"delay": -1}, "delay must be >= 0"),
        ({"ttl": 0}, "ttl must be > 0"),
        ({"tags": [f"t{i}" for i in range(11)]}, "at most 10 tags"),
        ({"tags": ["x" * 129]}, "the limit is 128"),
        ({"priority": -5}, "priority must be"),
        ({"priority": 100_000}, "priority must be"),
        ({"max_attempts": 0}, "max_attempts must be"),
        ({"metadata": {"f": object()}}, "not JSON-serialisable"),
        ({"delay": datetime(2030, 1, 1)}, "timezone-aware"),  # noqa: DTZ001 - the error under test
        ({"idempotency_key": ""}, "idempotency_key must be"),
    ],
)
def test_invalid_options_are_refused_and_nothing_is_created(engine, options, message):
    t = register(engine, "t")
    with pytest.raises(InvalidOptions, match=message):
        trigger(engine, t, **options)
    assert engine.list_runs(RunFilter()) == []


def test_unknown_option_is_refused():
    with pytest.raises(InvalidOptions, match="unknown trigger option"):
        TriggerOptions.from_kwargs(idempotencykey="x")


def test_payload_size_limit_is_configurable(engine, clock):
    t = register(engine, "t")
    big = '"' + "x" * 600_000 + '"'
    with pytest.raises(PayloadTooLarge, match="the limit is 524,288 bytes"):
        engine.prepare(t, big, TriggerOptions())
    roomy = prepare_run(t, big, TriggerOptions(), clock.now(), Limits(max_payload_bytes=1_000_000))
    assert roomy.payload == big


def test_trigger_by_id_uses_the_registry(engine):
    register(engine, "known")
    run_id, _ = engine.trigger_by_id("known", "{}", TriggerOptions())
    assert engine.retrieve(run_id).task_id == "known"
    with pytest.raises(UnknownTask, match="no task 'nope'"):
        engine.trigger_by_id("nope", "{}", TriggerOptions())
    with pytest.raises(UnknownQueue, match="no queue 'elsewhere'"):
        engine.trigger_by_id("known", "{}", TriggerOptions(queue="elsewhere"))


def test_batch_is_atomic_ordered_and_dedupes_keys(engine):
    t = register(engine, "t")
    existing, _ = trigger(engine, t, idempotency_key="old")
    runs = [
        engine.prepare(t, f'{{"i": {i}}}', TriggerOptions(idempotency_key=k))
        for i, k in enumerate(["a", None, "a", "old", None])
    ]
    results = engine.insert(runs)
    ids = [r for r, _ in results]
    assert ids[0] == ids[2] and ids[3] == existing
    assert [c for _, c in results] == [True, True, False, False, True]
    batch = engine.retrieve(ids[1]).batch_id
    assert batch and all(engine.retrieve(i).batch_id == batch for i in (ids[0], ids[1], ids[4]))


def test_batch_limits(engine):
    t = register(engine, "t")
    with pytest.raises(InvalidOptions, match="at most 1,000 items"):
        engine.insert([engine.prepare(t, "{}", TriggerOptions()) for _ in range(1001)])
    assert engine.list_runs(RunFilter()) == []


class TestIdempotencyKeyLifetime:
    def test_live_key_returns_the_existing_run(self, engine):
        t = register(engine, "t")
        first, created = trigger(engine, t, idempotency_key="k")
        second, created_again = trigger(engine, t, idempotency_key="k")
        assert created and not created_again and first == second

    def test_key_is_scoped_to_the_task(self, engine):
        a, b = register(engine, "a"), register(engine, "b")
        assert trigger(engine, a, idempotency_key="k")[0] != trigger(engine, b, idempotency_key="k")[0]

    def test_completed_run_keeps_the_key_until_ttl(self, engine, clock):
        t = register(engine, "t")
        first, _ = trigger(engine, t, idempotency_key="k", idempotency_key_ttl=60)
        complete(engine, t)
        clock.advance(59)
        assert trigger(engine, t, idempotency_key="k")[0] == first
        clock.advance(2)
        assert trigger(engine, t, idempotency_key="k")[0] != first

    def test_key_never_expires_while_the_run_is_unfinished(self, engine, clock):
        t = register(engine, "t")
        first, _ = trigger(engine, t, idempotency_key="k", idempotency_key_ttl=60)
        clock.advance(3600)
        assert trigger(engine, t, idempotency_key="k")[0] == first

    @pytest.mark.parametrize("final", [RunStatus.FAILED, RunStatus.TIMED_OUT, RunStatus.CRASHED])
    def test_failure_frees_the_key_at_once(self, engine, final):
        t = register(engine, "t")
        first, _ = trigger(engine, t, idempotency_key="k")
        c = claim(engine, t)[0]
        engine.exchange([Outcome(c.id, c.lease_token, OutcomeKind.FAILED, status=final, error={})], [], None)
        assert trigger(engine, t, idempotency_key="k")[0] != first

    def test_canceled_run_keeps_the_key(self, engine):
        t = register(engine, "t")
        first, _ = trigger(engine, t, idempotency_key="k")
        engine.cancel(first)
        assert trigger(engine, t, idempotency_key="k")[0] == first

    def test_expired_run_frees_the_key(self, engine, clock):
        t = register(engine, "t")
        first, _ = trigger(engine, t, idempotency_key="k", ttl=10)
        clock.advance(11)
        engine.maintain()
        assert engine.retrieve(first).status is RunStatus.EXPIRED
        assert trigger(engine, t, idempotency_key="k")[0] != first


def claim(engine: Engine, t, limit=10):
    from conveyor.core.records import ClaimRequest

    return engine.claim(ClaimRequest("dev", "w", [t.queue], [t.task_id], limit, 30))


def complete(engine: Engine, t):
    claimed = claim(engine, t)
    engine.exchange([Outcome(c.id, c.lease_token, OutcomeKind.COMPLETED, output="1") for c in claimed], [], None)
    return claimed
