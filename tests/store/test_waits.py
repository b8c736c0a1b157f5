"""Durable waits in the store: suspension releases slots, waitpoints resume runs, children
complete their parents' waits, tokens complete once, cancel cascades. Both drivers."""

from __future__ import annotations

import json

import pytest

from conveyor.core.errors import TokenNotFound
from conveyor.core.records import NewWaitpoint, Outcome, OutcomeKind, StepRecord, WaitRequest
from conveyor.core.status import RunStatus
from conveyor.engine import TriggerOptions


def row(run, position=0, name="wait.for", output=None, attempt=1):
    data = json.dumps(output or {})
    return StepRecord(run, position, f"{name}#{position}", name, data, attempt, 10.0, 10.0)


def suspend(h, claimed, *requests):
    outcome = Outcome(claimed.id, claimed.lease_token, OutcomeKind.SUSPENDED, waits=list(requests))
    return h.engine.exchange([outcome], [], None).accepted[0]


def timer(h, claimed, seconds, position=0):
    wp = NewWaitpoint(f"wait_{claimed.id}_{position}", "time", complete_at=h.engine.now + seconds)
    return WaitRequest(row(claimed.id, position, output={"waitpoints": [wp.id]}), create=[wp], wait_on=[wp.id])


def child_request(h, parent, child_task, position=0, n=1, **options):
    runs = [
        h.engine.prepare(
            child_task,
            json.dumps({"i": i}),
            TriggerOptions.from_kwargs(**options),
            parent_id=parent.id,
            root_id=parent.id,
        )
        for i in range(n)
    ]
    wps = [NewWaitpoint(f"wait_{parent.id}_{position}_{i}", "run") for i in range(n)]
    ids = [w.id for w in wps]
    name = "trigger_and_wait:child"
    return WaitRequest(row(parent.id, position, name, {"waitpoints": ids}), create=wps, runs=runs, wait_on=ids)


def test_a_time_wait_suspends_releases_the_slot_and_resumes_the_same_attempt(h, clock):
    t = h.task("t", queue_limit=1)
    a, b = h.trigger(t), h.trigger(t)
    first = h.claim(t)[0]
    assert first.id == a and first.segment == 1
    assert suspend(h, first, timer(h, first, 5))
    assert h.status(a) == "WAITING"
    # WAITING holds no slot: the queue's single slot goes to b.
    second = h.claim(t)[0]
    assert second.id == b
    h.complete(second)
    clock.advance(5)
    result = h.engine.maintain()
    assert result.resumed == 1 and h.status(a) == "QUEUED"
    resumed = h.claim(t)[0]
    assert (resumed.id, resumed.attempt, resumed.segment) == (a, 1, 2)
    journal = h.engine.journal(a)
    assert [s.key for s in journal.steps] == ["wait.for#0"]
    assert all(w.completed for w in journal.waits.values())
    h.complete(resumed)
    statuses = [e.data["status"] for e in h.engine.events(a) if e.kind == "status"]
    assert statuses == ["QUEUED", "EXECUTING", "WAITING", "QUEUED", "EXECUTING", "COMPLETED"]
    attempts = h.engine.attempts(a)
    assert [(x.number, x.status) for x in attempts] == [(1, "COMPLETED")]


def test_maintenance_sleeps_until_the_next_timer(h, clock):
    t = h.task("t")
    h.trigger(t)
    c = h.claim(t)[0]
    suspend(h, c, timer(h, c, 30))
    assert h.engine.maintain().next_due == pytest.approx(h.engine.now + 30)


def test_executed_seconds_add_up_across_segments(h, clock):
    t = h.task("t")
    run = h.trigger(t)
    c = h.claim(t)[0]
    clock.advance(2)
    suspend(h, c, timer(h, c, 100))
    clock.advance(100)
    h.engine.maintain()
    c2 = h.claim(t)[0]
    assert c2.executed_seconds == pytest.approx(2)
    clock.advance(3)
    h.complete(c2)
    assert h.engine.retrieve(run).executed_seconds == pytest.approx(5)


def test_a_stale_lease_cannot_suspend(h, clock):
    t = h.task("t", retry={"max_attempts": 3, "min_delay": 0, "max_delay": 0, "randomize": False})
    run = h.trigger(t)
    stale = h.claim(t, lease=2)[0]
    clock.advance(3)
    h.engine.maintain()
    assert not suspend(h, stale, timer(h, stale, 5))
    assert h.engine.journal(run).steps == []
    assert h.status(run) == "QUEUED"


def test_children_complete_the_parents_wait_with_results(h, clock):
    parent_task, child_task = h.task("parent"), h.task("child")
    parent = h.trigger(parent_task)
    p = h.claim(parent_task)[0]
    assert suspend(h, p, child_request(h, p, child_task, n=2))
    children = h.claim(child_task)
    assert len(children) == 2 and h.status(parent) == "WAITING"
    h.complete(children[0], output='{"v":1}')
    assert h.status(parent) == "WAITING"  # one child still running
    failed = Outcome(children[1].id, children[1].lease_token, OutcomeKind.FAILED, error={"code": "BOOM"})
    h.engine.exchange([failed], [], None)
    assert h.status(parent) == "QUEUED"
    journal = h.engine.journal(parent)
    step = journal.steps[0]
    outputs = {w: journal.waits[w].output for w in json.loads(step.output)["waitpoints"]}
    assert sorted((o["ok"], o.get("output"), (o.get("error") or {}).get("code")) for o in outputs.values()) == [
        (False, None, "BOOM"),
        (True, {"v": 1}, None),
    ]
    assert sorted(json.loads(step.output)["runs"]) == sorted(c.id for c in children)


def test_a_child_done_before_the_parent_suspends_resumes_it_at_once(h):
    parent_task, child_task = h.task("parent"), h.task("child")
    parent = h.trigger(parent_task)
    p = h.claim(parent_task)[0]
    key = "same-child"
    # An idempotency key returns a child that already finished: the wait is over immediately.
    earlier = h.trigger(child_task, idempotency_key=key)
    h.complete(h.claim(child_task)[0], output="7")
    assert suspend(h, p, child_request(h, p, child_task, idempotency_key=key))
    assert h.status(parent) == "QUEUED"
    journal = h.engine.journal(parent)
    assert json.loads(journal.steps[0].output)["runs"] == [earlier]
    assert [w.output["output"] for w in journal.waits.values()] == [7]


def test_a_parent_on_a_limit_1_queue_does_not_block_its_child_on_that_queue(h):
    shared = h.task("parent", queue="one", queue_limit=1)
    child = h.task("child", queue="one", queue_limit=1)
    parent = h.trigger(shared)
    p = h.claim(shared, child)[0]
    suspend(h, p, child_request(h, p, child))
    c = h.claim(shared, child)
    assert [x.task_id for x in c] == ["child"]  # the waiting parent holds no slot
    h.complete(c)
    assert h.status(parent) == "QUEUED"
    assert h.claim(shared, child)[0].id == parent


def test_a_token_completes_once_and_times_out(h, clock):
    t = h.task("t")
    run = h.trigger(t)
    c = h.claim(t)[0]
    token = NewWaitpoint("token_a", "token", complete_at=h.engine.now + 60)
    h.engine.create_waitpoints([token])
    request = WaitRequest(row(run, 0, "wait.for_token", {"waitpoints": ["token_a"]}), wait_on=["token_a"])
    suspend(h, c, request)
    assert h.status(run) == "WAITING"
    assert h.engine.complete_token("token_a", '{"ok":true,"output":1}') is True
    assert h.engine.complete_token("token_a", '{"ok":true,"output":2}') is False
    assert h.status(run) == "QUEUED"
    assert h.engine.waitpoint("token_a").output == {"ok": True, "output": 1}
    with pytest.raises(TokenNotFound):
        h.engine.complete_token("token_nope", "{}")
    # A second token that nobody completes times out.
    h.engine.create_waitpoints([NewWaitpoint("token_b", "token", complete_at=h.engine.now + 5)])
    clock.advance(6)
    h.engine.maintain()
    assert h.engine.waitpoint("token_b").output["error"]["code"] == "TIMEOUT"
    assert h.engine.complete_token("token_b", "{}") is False


def test_create_token_inside_a_run_is_fenced_and_journaled(h, clock):
    t = h.task("t", retry={"max_attempts": 3, "min_delay": 0, "max_delay": 0, "randomize": False})
    run = h.trigger(t)
    c = h.claim(t, lease=2)[0]
    token = NewWaitpoint("token_c", "token")
    request = WaitRequest(row(run, 0, "wait.create_token", {"token": {"id": "token_c"}}), create=[token])
    assert h.engine.apply_wait(request, c.lease_token) == []
    assert h.engine.waitpoint("token_c").status == "PENDING"
    clock.advance(3)
    h.engine.maintain()
    late = WaitRequest(row(run, 1, "wait.create_token"), create=[NewWaitpoint("token_d", "token")])
    assert h.engine.apply_wait(late, c.lease_token) is None
    with pytest.raises(TokenNotFound):
        h.engine.waitpoint("token_d")


def test_a_trigger_inside_a_run_records_the_run_ids(h):
    parent_task, child_task = h.task("parent"), h.task("child")
    parent = h.trigger(parent_task)
    p = h.claim(parent_task)[0]
    request = child_request(h, p, child_task, n=2)
    request = WaitRequest(row(parent, 0, "trigger:child"), runs=request.runs)
    ids = h.engine.apply_wait(request, p.lease_token)
    assert len(ids) == 2 and all(h.status(i) == "QUEUED" for i in ids)
    assert json.loads(h.engine.journal(parent).steps[0].output) == {"runs": ids}
    assert h.status(parent) == "EXECUTING"


def test_cancel_cascades_to_waited_children_and_theirs(h):
    top_t, mid_t, leaf_t, plain_t = h.task("top"), h.task("mid"), h.task("leaf"), h.task("plain")
    top = h.trigger(top_t)
    t = h.claim(top_t)[0]
    suspend(h, t, child_request(h, t, mid_t, n=2))
    mids = h.claim(mid_t, limit=1)  # one child executing, one queued
    m = mids[0]
    # The executing child waits for a grandchild of its own; a plain trigger is not waited on.
    suspend(h, m, child_request(h, m, leaf_t))
    plain = h.trigger(plain_t)
    h.engine.cancel(top)
    assert h.status(top) == "CANCELED"
    kids = [r for r in h.engine.list_runs(_all_runs()) if r.task_id in ("mid", "leaf")]
    assert {r.status.value for r in kids} == {"CANCELED"} and len(kids) == 3
    assert h.status(plain) == "QUEUED"


def test_cancel_of_an_executing_child_asks_its_worker_to_stop(h):
    top_t, mid_t = h.task("top"), h.task("mid")
    top = h.trigger(top_t)
    t = h.claim(top_t)[0]
    suspend(h, t, child_request(h, t, mid_t))
    m = h.claim(mid_t)[0]
    h.engine.cancel(top)
    child = h.engine.retrieve(m.id)
    assert child.status.value == "EXECUTING" and child.cancel_requested
    stop = Outcome(m.id, m.lease_token, OutcomeKind.FAILED, status=RunStatus.CANCELED)
    assert h.engine.exchange([stop], [], None).accepted == [True]
    assert h.status(top) == "CANCELED"


def test_a_released_resumed_segment_keeps_its_attempt(h, clock):
    t = h.task("t")
    run = h.trigger(t)
    c = h.claim(t)[0]
    suspend(h, c, timer(h, c, 1))
    clock.advance(1)
    h.engine.maintain()
    c2 = h.claim(t)[0]
    h.engine.exchange([Outcome(c2.id, c2.lease_token, OutcomeKind.RELEASED)], [], None)
    c3 = h.claim(t)[0]
    assert (c3.attempt, c3.segment) == (1, 2)
    h.complete(c3)
    assert [(a.number, a.status) for a in h.engine.attempts(run)] == [(1, "COMPLETED")]


def test_a_lost_lease_after_a_resume_is_a_new_attempt_that_replays(h, clock):
    t = h.task("t", retry={"max_attempts": 3, "min_delay": 0, "max_delay": 0, "randomize": False})
    run = h.trigger(t)
    c = h.claim(t)[0]
    suspend(h, c, timer(h, c, 1))
    clock.advance(1)
    h.engine.maintain()
    h.claim(t, lease=2)
    clock.advance(3)
    h.engine.maintain()
    again = h.claim(t)[0]
    assert (again.attempt, again.segment) == (2, 1)
    # The journal is kept: the replay finds the wait done.
    assert all(w.completed for w in h.engine.journal(run).waits.values())


def _all_runs():
    from conveyor.core.records import RunFilter

    return RunFilter(limit=100)


def test_a_resumed_run_goes_back_to_the_version_that_started_it(h, clock):
    t = h.task("t")
    run = h.trigger(t)
    c = h.claim(t, version="v1")[0]
    suspend(h, c, timer(h, c, 1))
    clock.advance(1)
    h.engine.maintain()
    assert h.claim(t, version="v2") == []  # a deploy of other code never resumes it
    resumed = h.claim(t, version="v1")[0]
    assert (resumed.id, resumed.version, resumed.segment) == (run, "v1", 2)


def test_a_run_triggered_outside_any_run_can_be_waited_for_by_key(h):
    parent_task, child_task = h.task("parent"), h.task("child")
    parent = h.trigger(parent_task)
    p = h.claim(parent_task)[0]
    h.trigger(child_task, idempotency_key="shared")  # no parent: an app triggered it
    running = h.claim(child_task)[0]
    assert suspend(h, p, child_request(h, p, child_task, idempotency_key="shared"))
    assert h.status(parent) == "WAITING"
    h.complete(running, output="5")
    assert h.status(parent) == "QUEUED"


def test_a_cancel_that_races_the_suspension_cancels_the_run_and_its_new_children(h):
    parent_task, child_task = h.task("parent"), h.task("child")
    parent = h.trigger(parent_task)
    p = h.claim(parent_task)[0]
    h.engine.cancel(parent)  # asked while EXECUTING: its worker has not stopped the code yet
    assert suspend(h, p, child_request(h, p, child_task, n=2))  # the code suspended first
    assert h.status(parent) == "CANCELED"
    children = [r for r in h.engine.list_runs(_all_runs()) if r.task_id == "child"]
    assert len(children) == 2 and {c.status.value for c in children} == {"CANCELED"}


def test_a_relative_wait_falls_due_by_the_store_clock(h, clock):
    t = h.task("t")
    run = h.trigger(t)
    c = h.claim(t)[0]
    wp = NewWaitpoint("wait_rel", "time", delay=5)  # the store adds it to its own now
    suspend(h, c, WaitRequest(row(run, 0, output={"waitpoints": [wp.id]}), create=[wp], wait_on=[wp.id]))
    assert h.engine.maintain().next_due == pytest.approx(h.engine.now + 5)
    clock.advance(4.9)
    h.engine.maintain()
    assert h.status(run) == "WAITING"
    clock.advance(0.1)
    h.engine.maintain()
    assert h.status(run) == "QUEUED"
