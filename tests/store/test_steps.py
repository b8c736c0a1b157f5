"""The step journal: stored in call order, fenced by the run's lease."""

from conveyor.core.records import StepRecord


def step(run_id, token, position, name="s", output='{"v":1}'):
    return StepRecord(run_id, position, f"{name}#{position}", name, output, 1, 10.0, 11.0, token)


def test_steps_are_stored_in_order_with_timings(h):
    t = h.task("t")
    run = h.trigger(t)
    c = h.claim(t)[0]
    with h.engine.store.transaction() as tx:
        assert tx.step_append_many([step(run, c.lease_token, 1, "b"), step(run, c.lease_token, 0, "a")]) == [
            True,
            True,
        ]
    journal = h.engine.steps(run)
    assert [(s.position, s.key, s.output) for s in journal] == [(0, "a#0", '{"v":1}'), (1, "b#1", '{"v":1}')]
    assert (journal[0].started_at, journal[0].finished_at, journal[0].attempt) == (10.0, 11.0, 1)


def test_a_stale_lease_cannot_store_a_step(h, clock):
    t = h.task("t", retry={"max_attempts": 3, "min_delay": 0, "max_delay": 0, "randomize": False})
    run = h.trigger(t)
    stale = h.claim(t, lease=2)[0]
    clock.advance(3)
    h.engine.maintain()
    fresh = h.claim(t)[0]
    with h.engine.store.transaction() as tx:
        assert tx.step_append_many([step(run, stale.lease_token, 0)]) == [False]
        assert tx.step_append_many([step(run, fresh.lease_token, 0)]) == [True]
    assert len(h.engine.steps(run)) == 1


def test_a_finished_run_takes_no_more_steps(h):
    t = h.task("t")
    run = h.trigger(t)
    c = h.claim(t)[0]
    h.complete(c)
    with h.engine.store.transaction() as tx:
        assert tx.step_append_many([step(run, c.lease_token, 0)]) == [False]
    assert h.engine.steps(run) == []


def test_exchange_writes_steps_before_the_outcome(h):
    from conveyor.core.records import Outcome, OutcomeKind

    t = h.task("t")
    run = h.trigger(t)
    c = h.claim(t)[0]
    done = Outcome(c.id, c.lease_token, OutcomeKind.COMPLETED, output="1")
    result = h.engine.exchange([done], [], None, steps=[step(run, c.lease_token, 0)])
    assert result.accepted == [True] and result.steps_accepted == [True]
    assert h.status(run) == "COMPLETED" and len(h.engine.steps(run)) == 1
