"""A real worker executing real code: outcomes, hooks, logs, metadata, retries, stops."""

import threading
import time

import worker_tasks as wt

from conveyor.core.errors import StoreError
from helpers import wait_until


def test_async_run_completes_with_context_metadata_and_logs(start_worker, live_client):
    start_worker()
    run = wt.echo.trigger({"x": 3}).wait(10)
    assert run.status.value == "COMPLETED"
    assert run.output == {"x": 3, "attempt": 1, "run": run.id, "task": "echo"}
    assert run.metadata == {"progress": 0.5, "count": 2, "seen": [3]}
    lines = live_client.runs.logs(run.id)
    assert [(ln.level, ln.message) for ln in lines] == [("INFO", "echo 3"), ("WARNING", "stdlib line")]
    assert lines[0].attributes == {"chat": 7} and lines[1].attributes == {"logger": "thirdparty"}
    statuses = [e.data["status"] for e in live_client.runs.events(run.id) if e.kind == "status"]
    assert statuses == ["QUEUED", "EXECUTING", "COMPLETED"]


def test_sync_run_in_a_pool_child(start_worker, live_client):
    start_worker()
    run = wt.sync_ok.trigger(21).wait(20)
    assert run.status.value == "COMPLETED" and run.output == {"double": 42, "attempt": 1}
    assert run.metadata == {"pid_seen": True}
    assert [ln.message for ln in live_client.runs.logs(run.id)] == ["from the child"]


def test_cancel_stops_async_code_within_a_second_and_runs_hooks(start_worker, live_client):
    start_worker()
    wt.EVENTS.clear()
    handle = wt.sleepy_async.trigger({"seconds": 60})
    wait_until(lambda: live_client.runs.retrieve(handle.id).status.value == "EXECUTING")
    started = time.monotonic()
    live_client.runs.cancel(handle.id)
    run = handle.wait(5)
    assert run.status.value == "CANCELED"
    assert time.monotonic() - started < 1.0
    assert [name for name, _ in wt.EVENTS] == ["on_start", "on_cancel", "cleanup"]


def test_cancel_stops_sync_code_in_time_sleep(start_worker, live_client):
    start_worker()
    handle = wt.limited.trigger(60)
    wait_until(lambda: live_client.runs.retrieve(handle.id).status.value == "EXECUTING", 20)
    started = time.monotonic()
    live_client.runs.cancel(handle.id)
    assert handle.wait(5).status.value == "CANCELED"
    assert time.monotonic() - started < 2.0


def test_max_duration_ends_a_sync_task_stuck_in_sleep_and_frees_the_slot(start_worker, live_client):
    start_worker(concurrency=1)
    stuck = wt.sleepy_sync.trigger({"seconds": 60})
    after = wt.sync_ok.trigger(1)
    run = stuck.wait(10)
    assert run.status.value == "TIMED_OUT" and run.error["code"] == "MAX_DURATION_EXCEEDED"
    assert run.duration is not None and run.duration < 1 + 2
    assert after.wait(10).status.value == "COMPLETED"  # the only slot was freed


def test_max_duration_ends_a_task_stuck_in_a_c_call(start_worker, live_client):
    start_worker(concurrency=1)
    handle = wt.busy_c_call.trigger({})
    wait_until(lambda: live_client.runs.retrieve(handle.id).started_at, 20)
    run = handle.wait(10)
    assert run.status.value == "TIMED_OUT"
    assert run.finished_at - run.started_at < 1 + 2 + 0.5
    assert "killed" in run.error["message"]
    assert wt.sync_ok.trigger(2).wait(20).output["double"] == 4  # a new child replaced the killed one


def test_unserialisable_output_fails_the_run_and_the_worker_goes_on(start_worker):
    start_worker()
    run = wt.bad_output.trigger({}).wait(10)
    assert run.status.value == "FAILED" and run.error["code"] == "OUTPUT_NOT_SERIALIZABLE"
    assert "not JSON-serialisable" in run.error["message"]
    assert wt.echo.trigger({"x": 1}).wait(10).status.value == "COMPLETED"


def test_exceptions_that_cannot_be_printed_or_pickled(start_worker):
    start_worker()
    run = wt.unprintable.trigger({}).wait(10)
    assert run.status.value == "FAILED" and run.error["type"] == "Unprintable"
    assert "unprintable" in run.error["message"].lower() or "Unprintable" in run.error["message"]
    run = wt.unpicklable_sync.trigger({}).wait(20)
    assert run.status.value == "FAILED" and run.error["message"] == "holds a lock"
    assert "Unpicklable" in run.error["stack"]


def test_retries_with_backoff_and_hooks_once(start_worker, live_client):
    start_worker()
    wt.EVENTS.clear()
    run = wt.flaky.trigger({"succeed_on": 3}).wait(10)
    assert run.status.value == "COMPLETED" and run.output == 3 and run.attempts == 3
    attempts = live_client.runs.attempts(run.id)
    assert [a.status for a in attempts] == ["FAILED", "FAILED", "COMPLETED"]
    retry_at = [e.data["retry_at"] for e in live_client.runs.events(run.id) if e.data.get("retry_at")]
    assert len(retry_at) == 2
    for failed_attempt, due, next_attempt in zip(attempts, retry_at, attempts[1:], strict=False):
        assert due - failed_attempt.started_at >= 0.05  # the backoff (0.05 s, not randomized)
        assert next_attempt.started_at >= due
    assert [name for name, _ in wt.EVENTS] == ["on_start", "on_success"]
    wt.EVENTS.clear()
    failed = wt.flaky.trigger({"succeed_on": 9}).wait(10)
    assert failed.status.value == "FAILED" and failed.attempts == 3
    assert [name for name, _ in wt.EVENTS] == ["on_start", "on_failure"]


def test_handle_error_decides_retry_time_or_failure(start_worker, live_client):
    start_worker()
    run = wt.rate_limited.trigger("429").wait(10)  # backoff would be 30 s; the hook says 0.2 s
    assert run.status.value == "COMPLETED" and run.output == 2
    attempts = live_client.runs.attempts(run.id)
    assert 0.15 <= attempts[1].started_at - attempts[0].finished_at < 5
    failed = wt.rate_limited.trigger("value-error").wait(10)
    assert failed.status.value == "FAILED" and failed.attempts == 1


def test_abort_run_fails_at_once(start_worker):
    start_worker()
    run = wt.aborts.trigger({}).wait(10)
    assert (run.status.value, run.attempts, run.error["code"]) == ("FAILED", 1, "ABORTED")
    assert run.error["message"] == "invalid update"


def test_graceful_stop_hands_back_running_runs_without_spending_an_attempt(start_worker, live_client):
    worker = start_worker()
    handle = wt.sleepy_async.trigger({"seconds": 60})
    wait_until(lambda: live_client.runs.retrieve(handle.id).status.value == "EXECUTING")
    worker.request_stop(0.1)
    run = wait_until(lambda: (r := live_client.runs.retrieve(handle.id)).status.value == "QUEUED" and r)
    assert run.attempts == 0
    start_worker()
    wait_until(lambda: live_client.runs.retrieve(handle.id).status.value == "EXECUTING")
    assert [a.number for a in live_client.runs.attempts(handle.id)] == [1]
    live_client.runs.cancel(handle.id)


def test_a_sync_task_that_swallows_its_stop_still_times_out(start_worker):
    start_worker()
    run = wt.swallows_stop.trigger({}).wait(20)
    assert run.status.value == "TIMED_OUT" and run.output is None


def test_ctx_attempt_started_at_is_this_attempts_start(start_worker, live_client):
    start_worker()
    run = wt.attempt_times.trigger({}).wait(10)
    attempts = live_client.runs.attempts(run.id)
    assert run.output["attempt_started"] == attempts[1].started_at
    assert run.output["run_started"] == attempts[0].started_at < attempts[1].started_at


def test_steps_run_once_and_replay_from_the_journal(start_worker, live_client):
    start_worker()
    wt.STEP_CALLS.clear()
    run = wt.steps_async.trigger({"fail_until": 3}).wait(10)
    assert run.status.value == "COMPLETED" and run.attempts == 3
    # Every step ran once although the function ran three times from the top.
    assert wt.STEP_CALLS == ["first", "second", "item-0", "item-1", "item-2", "third"]
    assert run.output["items"] == [{"step": f"item-{i}", "n": 3 + i} for i in range(3)]
    journal = live_client.runs.steps(run.id)
    assert [s.key for s in journal] == ["first#0", "second#0", "item#0", "item#1", "item#2", "third#0"]
    assert [s.attempt for s in journal] == [1, 1, 1, 1, 1, 3]
    assert all(s.finished_at >= s.started_at for s in journal)


def test_a_replay_that_diverges_fails_as_non_deterministic(start_worker):
    start_worker()
    run = wt.diverges.trigger({}).wait(10)
    assert (run.status.value, run.attempts, run.error["code"]) == ("FAILED", 2, "NON_DETERMINISTIC")
    assert "'b#0' at position 0" in run.error["message"] and "'a#0'" in run.error["message"]


def test_a_step_result_over_the_limit_is_a_clear_error(start_worker):
    start_worker()
    run = wt.huge_step.trigger({}).wait(10)
    assert run.status.value == "FAILED" and "the limit is 1,048,576 bytes" in run.error["message"]


def test_sync_steps_in_a_pool_child_replay_too(start_worker, tmp_path):
    start_worker()
    log = tmp_path / "steps.log"
    run = wt.steps_sync.trigger({"log": str(log)}).wait(20)
    assert run.status.value == "COMPLETED" and run.output == ["S0", "S1", "S2"] and run.attempts == 2
    assert log.read_text().split() == ["s0", "s1", "s2"]


def _journal_fails(monkeypatch, engine, times: int | None, after: int = 0) -> dict[str, int]:
    """engine.journal raises StoreError (a database that does not answer) `times` times for each
    run (None: always), once `after` reads of it went well; -> the failures per run id."""
    real = engine.journal
    failures: dict[str, int] = {}
    reads: dict[str, int] = {}

    def journal(run_id: str):
        reads[run_id] = reads.get(run_id, 0) + 1
        if reads[run_id] > after and (times is None or failures.get(run_id, 0) < times):
            failures[run_id] = failures.get(run_id, 0) + 1
            raise StoreError("cannot reach the database (a test)")
        return real(run_id)

    monkeypatch.setattr(engine, "journal", journal)
    return failures


def _cancel_when_refused_twice(client, handle, failures: dict[str, int]) -> None:
    """Once the run's journal was refused twice, cancel it: it must end CANCELED."""
    wait_until(lambda: failures.get(handle.id, 0) >= 2, timeout=20)
    client.runs.cancel(handle.id)
    assert handle.wait(10).status.value == "CANCELED"


def test_a_replay_waits_out_a_store_that_does_not_answer(start_worker, live_client, monkeypatch, tmp_path):
    """Loading the journal before a retry's code begins: a store error is asked again, not a
    failure of the run (async tasks, and sync ones whose pool child waits for the answer)."""
    failures = _journal_fails(monkeypatch, live_client.engine, 3)
    start_worker()
    wt.STEP_CALLS.clear()
    async_run = wt.steps_async.trigger({"fail_until": 2}).wait(20)
    sync_run = wt.steps_sync.trigger({"log": str(tmp_path / "steps.log")}).wait(20)
    assert (async_run.status.value, async_run.attempts) == ("COMPLETED", 2)
    assert (sync_run.status.value, sync_run.attempts) == ("COMPLETED", 2)
    assert failures == {async_run.id: 3, sync_run.id: 3}


def test_a_replay_stopped_while_the_store_does_not_answer_settles(start_worker, live_client, monkeypatch, tmp_path):
    """Canceled while the journal of its retry cannot be read, before its code began: the run
    ends CANCELED (it is not held, renewed, forever), and the pool child that was waiting for the
    journal takes the next run. (Attempt 1 reads the journal at its first step.)"""
    failures = _journal_fails(monkeypatch, live_client.engine, None, after=1)
    start_worker()
    handles = [
        wt.steps_sync.trigger({"log": str(tmp_path / "steps.log")}),
        wt.steps_async.trigger({"fail_until": 2}),
    ]
    for handle in handles:
        _cancel_when_refused_twice(live_client, handle, failures)
    monkeypatch.undo()
    assert wt.sync_ok.trigger(21).wait(20).output["double"] == 42


def test_an_async_replay_stopped_while_its_journal_loads_settles(start_worker, live_client, monkeypatch):
    """A stop (here a cancel) that lands while an async run's journal is loading, before its code
    began: the run is settled (CANCELED), not left held by the worker for good."""
    real = live_client.engine.journal
    loading = threading.Event()
    calls: list[str] = []

    def slow_journal(run_id: str):
        calls.append(run_id)
        if len(calls) == 2:  # attempt 1 read it at its first step; attempt 2 before its code
            loading.set()
            time.sleep(1.0)
        return real(run_id)

    monkeypatch.setattr(live_client.engine, "journal", slow_journal)
    start_worker()
    handle = wt.steps_async.trigger({"fail_until": 2})
    assert loading.wait(20), "attempt 2 never loaded its journal"
    live_client.runs.cancel(handle.id)
    run = handle.wait(10)
    assert (run.status.value, run.attempts) == ("CANCELED", 2)


def test_a_sync_run_stopped_in_a_step_while_the_store_does_not_answer(start_worker, live_client, monkeypatch, tmp_path):
    """A sync run waiting in its first step for a journal the store cannot give, then canceled:
    the worker answers the child "stopped" and signals it too, since its code had begun. The
    child stops once (the late signal must not raise again while it reports the stop, which
    ended the process) and takes the next run."""
    failures = _journal_fails(monkeypatch, live_client.engine, None)
    start_worker(concurrency=1)
    for _ in range(3):
        _cancel_when_refused_twice(live_client, wt.steps_sync.trigger({"log": str(tmp_path / "steps.log")}), failures)
    monkeypatch.undo()
    assert wt.sync_ok.trigger(21).wait(20).output["double"] == 42
