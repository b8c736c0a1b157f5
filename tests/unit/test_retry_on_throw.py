"""`conveyor.retry.on_throw`: one block retried with backoff, in async and sync code. No real
sleeping: the module's sleep hooks are replaced by recorders."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import conveyor
from conveyor.core.errors import InvalidOptions, NonDeterministic
from conveyor.sdk import context
from conveyor.sdk import retry as retry_module
from conveyor.sdk.context import AttemptInfo, Context, Execution, RunInfo, TaskInfo


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float]]:
    """Every wait between tries, as ("async" | "sync", seconds); time does not pass."""
    waits: list[tuple[str, float]] = []

    async def fake_sleep(seconds: float) -> None:
        waits.append(("async", seconds))

    def fake_sleep_sync(seconds: float) -> None:
        waits.append(("sync", seconds))

    monkeypatch.setattr(retry_module, "sleep", fake_sleep)
    monkeypatch.setattr(retry_module, "sleep_sync", fake_sleep_sync)
    return waits


class Flaky:
    """Fails `failures` times with `error_type`, then returns `value`. Counts its calls."""

    def __init__(self, failures: int, value: Any = "ok", error_type: type[BaseException] = ConnectionError) -> None:
        self.failures, self.value, self.error_type = failures, value, error_type
        self.calls = 0
        self.errors: list[BaseException] = []

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        self.args = args
        if self.calls <= self.failures:
            error = self.error_type(f"boom {self.calls}")
            self.errors.append(error)
            raise error
        return self.value


class AsyncFlaky(Flaky):
    async def __call__(self, *args: Any) -> Any:  # type: ignore[override]
        await asyncio.sleep(0)
        return Flaky.__call__(self, *args)


class _NullChannel:
    def log(self, level: str, message: str, attributes: dict[str, Any] | None, ts: float) -> None:
        pass

    def metadata(self, ops: list[Any]) -> None:
        pass


@pytest.fixture
def in_run() -> Iterator[Any]:
    """`in_run(sync=...)` enters a fake run's execution (for the rest of the test)."""
    tokens = []

    def enter(sync: bool) -> Execution:
        ctx = Context(
            run=RunInfo(id="run_test", tags=[], created_at=0.0, started_at=0.0),
            attempt=AttemptInfo(number=1, started_at=0.0),
            task=TaskInfo(id="t", queue="t"),
            environment="dev",
            version=None,
            machine="small-1x",
        )
        execution = Execution(ctx=ctx, channel=_NullChannel(), sync=sync)  # type: ignore[arg-type]
        tokens.append(context.enter(execution))
        return execution

    yield enter
    for token in reversed(tokens):
        context.leave(token)


NO_JITTER = {"randomize": False}


def run_async(fn: Any, *args: Any, **options: Any) -> Any:
    """`await conveyor.retry.on_throw(fn, *args, **options)` in a coroutine (async code)."""

    async def main() -> Any:
        pending = conveyor.retry.on_throw(fn, *args, **options)
        assert asyncio.iscoroutine(pending)
        return await pending

    return asyncio.run(main())


# --- async -------------------------------------------------------------------------------------


def test_returns_the_value_at_once_without_waiting(slept):
    fn = AsyncFlaky(0, value={"a": 1})
    assert run_async(fn) == {"a": 1}
    assert fn.calls == 1 and slept == []


def test_retries_with_the_retry_policy_backoff(slept):
    fn = AsyncFlaky(3, value=42)
    result = run_async(fn, max_attempts=4, min_delay=1, factor=2, max_delay=30, **NO_JITTER)
    assert result == 42 and fn.calls == 4
    assert slept == [("async", 1.0), ("async", 2.0), ("async", 4.0)]


def test_the_delay_is_capped_by_max_delay(slept):
    fn = AsyncFlaky(5)
    run_async(fn, max_attempts=6, min_delay=1, factor=3, max_delay=5, **NO_JITTER)
    assert [s for _, s in slept] == [1, 3, 5, 5, 5]


def test_randomized_delays_stay_within_one_to_two_times_the_base(slept):
    fn = AsyncFlaky(3)
    run_async(fn, max_attempts=4, min_delay=0.5, factor=2, max_delay=30)
    for (_, seconds), base in zip(slept, (0.5, 1.0, 2.0), strict=True):
        assert base <= seconds < 2 * base


def test_the_last_error_propagates_unchanged(slept):
    fn = AsyncFlaky(10, error_type=TimeoutError)
    with pytest.raises(TimeoutError) as raised:
        run_async(fn, max_attempts=3, **NO_JITTER)
    assert raised.value is fn.errors[-1] and str(raised.value) == "boom 3"
    assert fn.calls == 3 and len(slept) == 2  # no wait after the last try
    assert raised.value.__cause__ is None


def test_max_attempts_one_means_a_single_try(slept):
    fn = AsyncFlaky(1)
    with pytest.raises(ConnectionError):
        run_async(fn, max_attempts=1)
    assert fn.calls == 1 and slept == []


def test_a_sync_fn_and_its_args_work_from_async_code(slept):
    fn = Flaky(1, value="done")
    assert run_async(fn, "a", 2, **NO_JITTER) == "done"
    assert fn.args == ("a", 2) and fn.calls == 2


def test_a_fn_returning_an_awaitable_is_awaited(slept):
    calls = []

    def make() -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("first")
        return asyncio.sleep(0, result="late")

    assert run_async(make, **NO_JITTER) == "late"


@pytest.mark.parametrize(
    "error_type", [conveyor.AbortRun, NonDeterministic, KeyboardInterrupt, asyncio.CancelledError, SystemExit]
)
def test_abort_nondeterministic_and_base_exceptions_are_never_retried(slept, error_type):
    fn = AsyncFlaky(5, error_type=error_type)
    with pytest.raises(error_type):
        run_async(fn, max_attempts=5)
    assert fn.calls == 1 and slept == []


def test_a_diverged_replay_inside_the_block_is_not_retried(slept, in_run):
    execution = in_run(sync=False)

    def diverge() -> None:
        execution.nondeterministic = NonDeterministic("diverged")
        raise ValueError("the step raised something else on top")

    with pytest.raises(ValueError):
        run_async(diverge, max_attempts=5)
    assert slept == []


def test_cancelling_during_the_wait_stops_the_block(monkeypatch):
    fn = AsyncFlaky(10)

    async def main() -> None:
        entered = asyncio.Event()

        async def sleep_forever(seconds: float) -> None:
            entered.set()
            await asyncio.Event().wait()

        monkeypatch.setattr(retry_module, "sleep", sleep_forever)
        task = asyncio.ensure_future(conveyor.retry.on_throw(fn, max_attempts=5))
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert fn.calls == 1


def test_each_failed_try_is_logged_as_a_warning(slept, caplog):
    fn = AsyncFlaky(10, error_type=ConnectionResetError)
    with caplog.at_level(logging.WARNING, logger="conveyor.task"), pytest.raises(ConnectionResetError):
        run_async(fn, max_attempts=3, **NO_JITTER)
    records = [r for r in caplog.records if r.name == "conveyor.task"]
    assert [r.levelno for r in records] == [logging.WARNING] * 3
    assert [r.__dict__["attempt"] for r in records] == [1, 2, 3]
    assert [r.__dict__["error"] for r in records] == ["boom 1", "boom 2", "boom 3"]
    assert all(r.__dict__["max_attempts"] == 3 and r.__dict__["error_type"] == "ConnectionResetError" for r in records)
    assert "attempt 1 of 3" in records[0].getMessage() and "retrying in 1.00 s" in records[0].getMessage()
    assert "giving up" in records[2].getMessage()


def test_bad_options_are_refused_at_the_call():
    with pytest.raises(InvalidOptions):
        conveyor.retry.on_throw(lambda: 1, max_attempts=0)
    with pytest.raises(InvalidOptions):
        conveyor.retry.on_throw(lambda: 1, min_delay=10, max_delay=1)
    with pytest.raises(TypeError):
        conveyor.retry.on_throw("not callable")  # type: ignore[arg-type]


# --- sync ---------------------------------------------------------------------------------------


def test_without_an_event_loop_it_blocks_and_returns_the_value(slept):
    fn = Flaky(2, value=7)
    assert conveyor.retry.on_throw(fn, max_attempts=3, **NO_JITTER) == 7
    assert slept == [("sync", 1.0), ("sync", 2.0)]


def test_sync_form_last_error_and_abort(slept):
    fn = Flaky(5, error_type=KeyError)
    with pytest.raises(KeyError) as raised:
        conveyor.retry.on_throw(fn, max_attempts=2, **NO_JITTER)
    assert raised.value is fn.errors[-1] and fn.calls == 2
    abort = Flaky(5, error_type=conveyor.AbortRun)
    with pytest.raises(conveyor.AbortRun):
        conveyor.retry.on_throw(abort, max_attempts=5)
    assert abort.calls == 1


def test_sync_form_runs_an_async_fn_to_completion(slept):
    fn = AsyncFlaky(1, value="from a coroutine")
    assert conveyor.retry.on_throw(fn, **NO_JITTER) == "from a coroutine"
    assert fn.calls == 2 and slept == [("sync", 1.0)]


def test_a_sync_task_blocks_even_on_a_thread_that_runs_an_event_loop(slept, in_run):
    """A sync task in a pool child runs on the thread of the child's event loop: the task's
    kind decides, not the loop."""
    execution = in_run(sync=True)
    seen: list[Any] = []

    async def fetch() -> str:
        seen.append((context.current(), threading.current_thread().name))
        return "fetched"

    async def pool_child() -> tuple[Any, Any]:
        plain = conveyor.retry.on_throw(Flaky(1, value="plain"), **NO_JITTER)
        awaited = conveyor.retry.on_throw(fetch)
        return plain, awaited

    assert asyncio.run(pool_child()) == ("plain", "fetched")
    assert slept == [("sync", 1.0)]
    # The coroutine ran on a helper thread, still inside the run's context.
    assert seen[0][0] is execution and seen[0][1] == "conveyor-retry-await"


def test_an_async_task_gets_a_coroutine(slept, in_run):
    in_run(sync=False)

    async def task_body() -> Any:
        pending = conveyor.retry.on_throw(Flaky(1, value="v"), **NO_JITTER)
        assert asyncio.iscoroutine(pending)
        return await pending

    assert asyncio.run(task_body()) == "v"
    assert slept == [("async", 1.0)]


def test_an_async_tasks_worker_thread_blocks(slept, in_run):
    """Code of an async task sent to a thread (asyncio.to_thread) has no loop there: it blocks."""
    in_run(sync=False)

    async def task_body() -> Any:
        return await asyncio.to_thread(conveyor.retry.on_throw, Flaky(1, value="t"), **NO_JITTER)

    assert asyncio.run(task_body()) == "t"
    assert slept == [("sync", 1.0)]


def test_exported():
    assert "retry" in conveyor.__all__
    assert conveyor.retry is retry_module.retry
    assert conveyor.Retry is not conveyor.retry  # the policy class stays `Retry`
