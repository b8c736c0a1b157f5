"""Leases, heartbeats and fencing: a stale worker cannot write for a run it no longer owns."""

from conveyor.core.records import LogLine, MetadataOp, Outcome, OutcomeKind


def test_expired_lease_is_retried_as_worker_lost(h, clock):
    t = h.task("t", retry={"max_attempts": 3, "min_delay": 1, "max_delay": 1, "factor": 1, "randomize": False})
    run = h.trigger(t)
    h.claim(t, lease=2)
    clock.advance(3)
    result = h.engine.maintain()
    assert result.recovered == 1
    r = h.engine.retrieve(run)
    assert r.status.value == "QUEUED" and r.error["code"] == "WORKER_LOST"
    assert h.engine.attempts(run)[0].status == "WORKER_LOST"
    clock.advance(1.5)
    assert h.claim(t)[0].attempt == 2


def test_expired_lease_with_no_attempts_left_is_crashed(h, clock):
    t = h.task("t", retry={"max_attempts": 1})
    run = h.trigger(t)
    h.claim(t, lease=2)
    clock.advance(3)
    h.engine.maintain()
    assert h.status(run) == "CRASHED"


def test_stale_worker_cannot_complete_fail_heartbeat_or_log(h, clock):
    t = h.task("t", retry={"max_attempts": 5, "min_delay": 0, "max_delay": 0, "randomize": False})
    run = h.trigger(t)
    stale = h.claim(t, worker="old", lease=2)[0]
    clock.advance(3)
    h.engine.maintain()
    fresh = h.claim(t, worker="new")[0]
    assert fresh.id == run and fresh.lease_token != stale.lease_token
    # The old worker wakes up late: every write is refused.
    assert h.complete(stale) == [False]
    fail = Outcome(stale.id, stale.lease_token, OutcomeKind.FAILED, error={"message": "late"})
    assert h.engine.exchange([fail], [], None)[0] == [False]
    assert h.engine.heartbeat("old", 30, [run]).renewed == {}
    with h.engine.store.transaction() as tx:
        assert tx.log_append_many([LogLine(run, stale.lease_token, 1, 0.0, "INFO", "late")]) == 0
        assert tx.metadata_apply(run, [MetadataOp("set", "k", 1)], stale.lease_token) is None
    assert h.complete(fresh) == [True]
    assert h.status(run) == "COMPLETED"
    assert h.engine.logs(run) == []


def test_heartbeat_renews_every_run_of_the_worker(h, clock):
    t = h.task("t")
    for _ in range(3):
        h.trigger(t)
    claimed = h.claim(t, lease=2)
    clock.advance(1.5)
    result = h.engine.heartbeat("w1", 2, [c.id for c in claimed])
    assert result.renewed == {c.id: c.lease_token for c in claimed}
    clock.advance(1.5)
    assert h.engine.maintain().recovered == 0


def test_a_run_the_worker_gave_up_is_not_renewed(h, clock):
    t = h.task("t")
    kept, dropped = h.trigger(t), h.trigger(t)
    h.claim(t, lease=2)
    clock.advance(1.5)
    assert set(h.engine.heartbeat("w1", 2, [kept]).renewed) == {kept}
    clock.advance(1)
    assert h.engine.maintain().recovered == 1
    assert (h.status(kept), h.status(dropped)) == ("EXECUTING", "QUEUED")


def test_heartbeat_returns_cancel_requests(h):
    t = h.task("t")
    run = h.trigger(t)
    h.claim(t)
    h.engine.cancel(run)
    assert h.engine.heartbeat("w1", 30, [run]).cancel_requested == [run]
    assert h.engine.cancel_requested("w1") == [run]


def test_graceful_release_costs_no_attempt(h):
    t = h.task("t")
    run = h.trigger(t)
    c = h.claim(t)[0]
    assert h.engine.exchange([Outcome(c.id, c.lease_token, OutcomeKind.RELEASED)], [], None)[0] == [True]
    assert h.status(run) == "QUEUED"
    again = h.claim(t, worker="w2")[0]
    assert again.attempt == 1
    assert len(h.engine.attempts(run)) == 1


def test_canceled_executing_run_keeps_its_slot_until_the_worker_confirms(h):
    t = h.task("t", queue_limit=1)
    run = h.trigger(t)
    h.trigger(t)
    c = h.claim(t)[0]
    h.engine.cancel(run)
    assert h.status(run) == "EXECUTING" and h.claim(t) == []
    confirm = Outcome(c.id, c.lease_token, OutcomeKind.FAILED, status=__import__("conveyor").RunStatus.CANCELED)
    h.engine.exchange([confirm], [], None)
    assert h.status(run) == "CANCELED"
    assert len(h.claim(t)) == 1
