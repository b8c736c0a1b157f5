"""Durable waits on a real worker: suspension and resume, children and their Results, tokens,
cancellation down the tree, metadata up the tree, journaled triggers, sync tasks."""

import os

import psycopg
import pytest
import worker_tasks as wt

import conveyor
from conveyor import RunStatus
from helpers import wait_until


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    """Every test here runs on both stores (the PostgreSQL one in a schema of its own)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'worker.db'}"
        return
    base = request.getfixturevalue("postgres_url")
    schema = f"conveyor_worker_{os.urandom(5).hex()}"
    yield f"{base}{'&' if '?' in base else '?'}schema={schema}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def statuses(client, run_id):
    return [e.data["status"] for e in client.runs.events(run_id) if e.kind == "status"]


def test_a_time_wait_suspends_and_resumes_the_same_attempt(start_worker, live_client):
    start_worker()
    wt.WAIT_SIDE_EFFECTS.clear()
    wt.EVENTS.clear()
    handle = wt.wait_then_finish.trigger({"seconds": 1.2})
    wait_until(lambda: live_client.runs.retrieve(handle.id).status is RunStatus.WAITING)
    run = handle.wait(10)
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output == {"before": "b", "after": "a", "attempt": 1}
    assert wt.WAIT_SIDE_EFFECTS == ["before", "after"]  # steps before the wait are not run again
    assert [e for e in wt.EVENTS if e[0] == "on_start"] == [("on_start", None)]  # once per run
    assert statuses(live_client, run.id) == ["QUEUED", "EXECUTING", "WAITING", "QUEUED", "EXECUTING", "COMPLETED"]
    assert [(a.number, a.status) for a in live_client.runs.attempts(run.id)] == [(1, "COMPLETED")]


def test_a_short_wait_stays_in_process(start_worker, live_client):
    start_worker()
    run = wt.wait_then_finish.trigger({"seconds": 0.05}).wait(10)
    assert run.status is RunStatus.COMPLETED
    assert "WAITING" not in statuses(live_client, run.id)
    assert [s.key for s in live_client.runs.steps(run.id)] == ["before#0", "wait.for#0", "after#0"]


def test_children_results_and_a_failed_child_the_parent_decides_about(start_worker):
    start_worker(concurrency=2)
    run = wt.parent_of_children.trigger({"x": 5}).wait(20)
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output == {"one": 10, "many": [0, 2, 4], "failed": {"ok": False, "code": "ABORTED"}}
    children = conveyor.runs.list(parent_id=run.id, limit=10)
    assert len(children) == 5 and all(c.root_id == run.id for c in children)


def test_sync_tasks_wait_and_trigger_and_wait_from_a_pool_child(start_worker):
    start_worker()
    run = wt.sync_waiter.trigger({"x": 4}).wait(30)
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output == 8


def test_a_token_completed_twice_resumes_the_run_once(start_worker, live_client):
    start_worker()
    handle = wt.token_waiter.trigger({})
    token = wait_until(lambda: live_client.runs.retrieve(handle.id).metadata.get("token"))
    wait_until(lambda: live_client.runs.retrieve(handle.id).status is RunStatus.WAITING)
    assert conveyor.wait.complete_token(token, {"approved": True}) is True
    assert conveyor.wait.complete_token(token, {"approved": False}) is False  # refused, says so
    run = handle.wait(10)
    assert run.output == {"ok": True, "output": {"approved": True}, "error": None}
    assert statuses(live_client, run.id).count("WAITING") == 1
    assert conveyor.wait.retrieve_token(token).output == {"ok": True, "output": {"approved": True}}


def test_a_token_that_times_out_gives_a_timeout_result(start_worker):
    start_worker()
    run = wt.times_out_waiting.trigger().wait(15)
    assert run.output == {"ok": False, "code": "TIMEOUT", "raised": "WaitTimeout"}


def test_cancel_a_parent_cancels_its_waiting_and_executing_children(start_worker, live_client):
    start_worker(concurrency=8)
    wt.EVENTS.clear()
    handle = wt.parent_of_mixed.trigger()
    wait_until(lambda: live_client.runs.retrieve(handle.id).status is RunStatus.WAITING)
    children = lambda: live_client.runs.list(parent_id=handle.id, limit=10).data  # noqa: E731
    wait_until(lambda: sorted(c.status.value for c in children()) == ["EXECUTING"] + ["WAITING"] * 3)
    live_client.runs.cancel(handle.id)
    wait_until(lambda: all(c.status is RunStatus.CANCELED for c in children()), timeout=5)
    assert live_client.runs.retrieve(handle.id).status is RunStatus.CANCELED
    assert [e for e in wt.EVENTS if e[0] == "on_cancel"] == [("on_cancel", None)]  # the executing child's
    assert not [e for e in wt.EVENTS if e[0].endswith("went-on")]  # nothing ran after the cancel
    assert live_client.runs.retrieve(handle.id).status is RunStatus.CANCELED


def test_metadata_parent_and_root_from_children(start_worker):
    start_worker(concurrency=4)
    run = wt.collects_reports.trigger().wait(20)
    assert run.status is RunStatus.COMPLETED
    assert run.metadata["done"] == 3 and sorted(run.metadata["seen"]) == [1, 2, 3]


def test_a_trigger_inside_a_run_is_not_repeated_by_a_retry(start_worker):
    start_worker()
    run = wt.triggers_then_fails.trigger().wait(20)
    assert run.status is RunStatus.COMPLETED and run.attempts == 2
    children = conveyor.runs.list(parent_id=run.id, limit=10).data
    assert [c.id for c in children] == [run.output]


def test_a_replay_that_meets_a_step_where_a_wait_was_is_non_deterministic(start_worker):
    start_worker()
    run = wt.diverging_waits.trigger().wait(20)
    assert run.status is RunStatus.FAILED
    assert run.error["code"] == "NON_DETERMINISTIC" and "wait.for#0" in run.error["message"]


def test_handle_wait_inside_a_run_points_to_trigger_and_wait(live_client):
    from conveyor.core.errors import ConveyorError
    from conveyor.sdk import context

    token = context.enter(object())  # type: ignore[arg-type]  # any execution: "inside a run"
    try:
        with pytest.raises(ConveyorError, match="trigger_and_wait"):
            conveyor.RunHandle("run_x", live_client).wait()
    finally:
        context.leave(token)
