"""A run stopped before its code took a single step (the worker's renewals went stale right as it
claimed the run, e.g. just after a database restart) must still settle, not hang in the worker."""

import worker_tasks as wt

from conveyor.worker.attempt import RELEASED


def test_a_run_stopped_before_its_code_starts_is_handed_back_and_completes(start_worker, live_client):
    worker = start_worker()
    start = worker._start
    stopped: list[str] = []

    def start_then_stop(run):
        start(run)
        if not stopped:  # the first run only, before its task has run a step
            stopped.append(run.id)
            worker._stop(run.id, RELEASED)

    worker._start = start_then_stop
    run = wt.echo.trigger({"x": 1}).wait(10)
    assert stopped == [run.id]
    assert run.status.value == "COMPLETED" and run.attempts == 1
    statuses = [e.data["status"] for e in live_client.runs.events(run.id) if e.kind == "status"]
    assert statuses == ["QUEUED", "EXECUTING", "QUEUED", "EXECUTING", "COMPLETED"]
    assert [a.status for a in live_client.runs.attempts(run.id)] == ["COMPLETED"]
