"""Claim: order, priority, queue limits, per-key limits, pause, delays, machine and version."""

from conveyor.core.records import Outcome, OutcomeKind


def test_claim_takes_runs_in_trigger_order_and_starts_them(h):
    t = h.task("t")
    ids = [h.trigger(t, f'{{"i": {i}}}') for i in range(5)]
    claimed = h.claim(t, limit=3)
    assert [c.id for c in claimed] == ids[:3]
    assert all(c.attempt == 1 and c.lease_token for c in claimed)
    assert [h.status(i) for i in ids] == ["EXECUTING"] * 3 + ["QUEUED"] * 2
    assert h.engine.attempts(ids[0])[0].status == "EXECUTING"


def test_priority_is_a_head_start_in_seconds(h, clock):
    t = h.task("t")
    old = h.trigger(t)
    clock.advance(5)
    newer = h.trigger(t)
    urgent = h.trigger(t, priority=10)  # sorts as if triggered 10 s earlier
    assert [c.id for c in h.claim(t, limit=3)] == [urgent, old, newer]


def test_queue_limit_is_enforced_across_workers(h):
    t = h.task("t", queue_limit=2)
    for _ in range(5):
        h.trigger(t)
    assert len(h.claim(t, worker="a")) == 2
    assert h.claim(t, worker="b") == []
    running = h.engine.queue("t").running
    assert running == 2


def test_a_finished_run_frees_its_slot(h):
    t = h.task("t", queue_limit=1)
    h.trigger(t)
    h.trigger(t)
    first = h.claim(t)
    assert len(first) == 1 and h.claim(t) == []
    assert h.complete(first) == [True]
    assert len(h.claim(t)) == 1


def test_per_key_limit_serialises_one_key_and_not_others(h):
    t = h.task("t", queue_limit=10, key_limit=1)
    a1 = h.trigger(t, concurrency_key="A")
    h.trigger(t, concurrency_key="A")
    b1 = h.trigger(t, concurrency_key="B")
    claimed = {c.id for c in h.claim(t)}
    assert claimed == {a1, b1}


def test_one_hot_key_never_stalls_other_keys(h):
    t = h.task("t", key_limit=1)
    for _ in range(2000):
        h.trigger(t, concurrency_key="hot")
    h.claim(t, limit=1)
    cold = h.trigger(t, concurrency_key="cold")
    assert [c.id for c in h.claim(t, limit=5)] == [cold]


def test_trigger_key_without_concurrency_gets_the_queue_limit_per_key(h):
    t = h.task("t", queue_limit=1)
    a = h.trigger(t, concurrency_key="A")
    b = h.trigger(t, concurrency_key="B")
    h.trigger(t, concurrency_key="A")
    # No queue-wide cap for keyed runs: each key gets the queue's limit (1).
    assert {c.id for c in h.claim(t)} == {a, b}


def test_paused_queue_is_not_claimed_until_resumed(h):
    t = h.task("t")
    h.trigger(t)
    h.engine.set_paused("t", True)
    assert h.claim(t) == []
    assert h.engine.queue("t").paused
    h.engine.set_paused("t", False)
    assert len(h.claim(t)) == 1


def test_machine_and_version_filters(h):
    t = h.task("t")
    small = h.trigger(t)
    large = h.trigger(t, machine="large-1x")
    v2 = h.trigger(t, version="v2")
    assert {c.id for c in h.claim(t, machine="small-1x", version="v1")} == {small}
    assert {c.id for c in h.claim(t, machine="large-1x")} == {large}
    claimed = h.claim(t, version="v2")
    assert [c.id for c in claimed] == [v2] and claimed[0].version == "v2"


def test_unversioned_run_is_bound_to_the_version_that_claims_it(h):
    t = h.task("t")
    run = h.trigger(t)
    claimed = h.claim(t, version="v7")
    assert claimed[0].version == "v7"
    assert h.engine.retrieve(run).version == "v7"


def test_only_runs_of_known_tasks_are_claimed(h):
    mine, other = h.task("mine", queue="shared"), h.task("other", queue="shared")
    h.trigger(other)
    m = h.trigger(mine)
    assert [c.id for c in h.claim(mine)] == [m]


def test_round_robin_over_queues_with_capacity(h):
    a, b = h.task("a"), h.task("b")
    for _ in range(3):
        h.trigger(a)
        h.trigger(b)
    claimed = h.claim(a, b, limit=4, queues=["a", "b"])
    assert sorted(c.task_id for c in claimed) == ["a", "a", "b", "b"]
    # A queue that runs dry leaves its share to the others.
    c = h.task("c")
    h.trigger(c)
    rest = h.claim(a, b, c, limit=10, queues=["c", "a", "b"])
    assert sorted(r.task_id for r in rest) == ["a", "b", "c"]


def test_round_robin_respects_each_queue_limit(h):
    a, b = h.task("a", queue_limit=1), h.task("b")
    for _ in range(5):
        h.trigger(a)
        h.trigger(b)
    claimed = h.claim(a, b, limit=6, queues=["a", "b"])
    assert sorted(c.task_id for c in claimed) == ["a"] + ["b"] * 5


def test_delayed_run_is_not_claimable_until_due(h, clock):
    t = h.task("t")
    run = h.trigger(t, delay=60)
    assert h.status(run) == "DELAYED"
    assert h.claim(t) == []
    clock.advance(61)
    assert h.engine.maintain().promoted == 1
    assert h.status(run) == "QUEUED"
    assert [c.id for c in h.claim(t)] == [run]


def test_retry_is_requeued_at_its_backoff_time(h, clock):
    t = h.task("t")
    run = h.trigger(t)
    c = h.claim(t)[0]
    h.engine.exchange(
        [Outcome(c.id, c.lease_token, OutcomeKind.RETRY, error={"message": "x"}, retry_at=clock.now() + 10)], [], None
    )
    assert h.status(run) == "QUEUED"
    assert h.claim(t) == []
    clock.advance(11)
    again = h.claim(t)
    assert [x.id for x in again] == [run] and again[0].attempt == 2


def test_trigger_key_follows_the_limit_of_the_queue_the_run_is_in(h):
    t = h.task("t", queue_limit=5)
    other = h.task("other-task", queue="narrow", queue_limit=1)
    a1 = h.trigger(t, queue="narrow", concurrency_key="A")
    h.trigger(t, queue="narrow", concurrency_key="A")
    b1 = h.trigger(t, queue="narrow", concurrency_key="B")
    claimed = h.claim(t, other, queues=["narrow"])
    assert {c.id for c in claimed} == {a1, b1}  # "narrow" allows 1 per key, not t's 5


def test_settling_many_at_once_checks_each_lease(h):
    """A worker's exchange settles its COMPLETED outcomes together; a stale lease is refused
    without holding back the others, and each settled run gets its attempt and event."""
    t = h.task("t")
    ids = [h.trigger(t) for _ in range(3)]
    claimed = h.claim(t, limit=3)
    assert sorted(c.id for c in claimed) == sorted(ids)
    outcomes = [
        Outcome(c.id, c.lease_token, OutcomeKind.COMPLETED, output=f'{{"n": {i}}}') for i, c in enumerate(claimed)
    ]
    outcomes[1] = Outcome(claimed[1].id, "stale", OutcomeKind.COMPLETED, output="1")
    assert h.engine.exchange(outcomes, [], None)[0] == [True, False, True]
    for i, c in enumerate(claimed):
        run = h.engine.retrieve(c.id)
        if i == 1:
            assert run.status.value == "EXECUTING"
            continue
        assert run.status.value == "COMPLETED" and run.output == {"n": i} and run.finished_at is not None
        assert [a.status for a in h.engine.attempts(c.id)] == ["COMPLETED"]
        assert [e.data["status"] for e in h.engine.events(c.id)] == ["QUEUED", "EXECUTING", "COMPLETED"]
