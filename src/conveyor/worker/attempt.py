"""One attempt of a run: hooks, the task function, and the outcome it earns.

The same coroutine runs on the worker's event loop (async tasks) and inside a pool child
(sync tasks), so retry decisions and hook order are identical for both.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any

from conveyor.core.backoff import RetryPolicy
from conveyor.core.clock import Clock
from conveyor.core.errors import AbortRun, InvalidPayload, SerializationError
from conveyor.core.records import ClaimedRun, Outcome, OutcomeKind
from conveyor.core.status import RunStatus
from conveyor.sdk import context
from conveyor.sdk.context import AttemptInfo, Context, RunInfo, TaskInfo
from conveyor.sdk.serde import error_dict, safe_str, to_json
from conveyor.sdk.task import RetryDecision, Task
from conveyor.sdk.waits import Suspend

log = logging.getLogger("conveyor.worker")

CANCELED = "canceled"
TIMED_OUT = "timed_out"
RELEASED = "released"  # graceful shutdown: hand back, no attempt spent
LEASE_LOST = "lease_lost"  # someone else owns the run now: report nothing


class StopExecution(BaseException):  # noqa: N818 - not an error: a request to stop
    """Raised into user code to stop it. A BaseException so `except Exception` cannot swallow it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def build_context(task: Task[Any, Any], run: ClaimedRun, environment: str) -> Context:
    return Context(
        run=RunInfo(
            id=run.id,
            tags=list(run.tags),
            created_at=run.created_at,
            started_at=run.started_at,
            idempotency_key=run.idempotency_key,
            concurrency_key=run.concurrency_key,
            parent_id=run.parent_id,
            root_id=run.root_id,
            batch_id=run.batch_id,
            max_attempts=run.max_attempts,
            max_duration=run.max_duration,
        ),
        attempt=AttemptInfo(number=run.attempt, started_at=run.claimed_at or run.started_at),
        task=TaskInfo(id=task.id, queue=run.queue),
        environment=environment,
        version=run.version,
        machine=run.machine,
    )


async def call_hook(hook: Callable[..., Any] | None, *args: Any) -> Any:
    if hook is None:
        return None
    result = hook(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


async def _quiet_hook(task: Task[Any, Any], name: str, *args: Any) -> None:
    """Hooks after the outcome is known must not change it; their errors go to the run's log."""
    try:
        await call_hook(task.hooks.get(name), *args)
    except StopExecution:
        raise
    except Exception as exc:
        log.error("%s hook of %s raised %s", name, task.id, safe_str(exc), exc_info=True)


async def run_attempt(
    task: Task[Any, Any],
    run: ClaimedRun,
    ctx: Context,
    clock: Clock,
    call: Callable[[Any], Any],
    stop_reason: Callable[[], str | None],
) -> Outcome | None:
    """Run one execution segment and decide its outcome. `call(payload)` invokes the function
    (awaited if it returns an awaitable); `stop_reason()` says why the code was stopped."""
    try:
        payload = task.payload_type.load(run.payload)
    except InvalidPayload as exc:
        return _failed(run, error_dict(exc, "INVALID_PAYLOAD"))
    outcome: Outcome | None
    try:
        try:
            if run.attempt == 1 and run.segment == 1:  # once per run, not per resume
                await call_hook(task.hooks.get("on_start"), payload, ctx)
            result = call(payload)
            if inspect.isawaitable(result):
                result = await result
        except Suspend:
            return _suspended(run)
        except (asyncio.CancelledError, StopExecution) as exc:
            reason = exc.reason if isinstance(exc, StopExecution) else stop_reason()
            return await _stopped(task, run, ctx, payload, reason or CANCELED)
        except AbortRun as exc:
            if _suspending():  # the code caught its suspension and went on: it suspends all the same
                return _suspended(run)
            outcome = _failed(run, error_dict(exc, "ABORTED"))
        except Exception as exc:
            if _suspending():
                return _suspended(run)
            diverged = _diverged()
            if diverged is not None:
                outcome = _failed(run, error_dict(diverged, "NON_DETERMINISTIC"))
            else:
                outcome = await _after_error(task, run, ctx, clock, exc)
        else:
            reason = stop_reason()
            if reason is not None:  # the code swallowed its cancellation and returned
                return await _stopped(task, run, ctx, payload, reason)
            if _suspending():
                return _suspended(run)
            diverged = _diverged()
            if diverged is not None:  # the code caught the error and went on: the run still fails
                outcome = _failed(run, error_dict(diverged, "NON_DETERMINISTIC"))
                await _quiet_hook(task, "on_failure", payload, outcome.error, ctx)
                return outcome
            try:
                output = to_json(result, f"the return value of {task.id}")
            except SerializationError as exc:
                outcome = _failed(run, error_dict(exc, "OUTPUT_NOT_SERIALIZABLE"))
            else:
                await _quiet_hook(task, "on_success", payload, result, ctx)
                return Outcome(run.id, run.lease_token, OutcomeKind.COMPLETED, output=output)
        if outcome.kind == OutcomeKind.FAILED:
            await _quiet_hook(task, "on_failure", payload, outcome.error, ctx)
        return outcome
    finally:
        try:
            await _quiet_hook(task, "cleanup", payload, ctx)
        except StopExecution:
            pass


async def _stopped(task: Task[Any, Any], run: ClaimedRun, ctx: Context, payload: Any, reason: str) -> Outcome | None:
    if reason == CANCELED:
        await _quiet_hook(task, "on_cancel", payload, ctx)
        return Outcome(
            run.id,
            run.lease_token,
            OutcomeKind.FAILED,
            status=RunStatus.CANCELED,
            error={"code": "CANCELED", "message": "the run was canceled", "type": "Canceled"},
        )
    if reason == TIMED_OUT:
        error = {
            "code": "MAX_DURATION_EXCEEDED",
            "type": "TimedOut",
            "message": f"the run exceeded its max_duration of {run.max_duration:g} s",
        }
        await _quiet_hook(task, "on_failure", payload, error, ctx)
        return Outcome(run.id, run.lease_token, OutcomeKind.FAILED, status=RunStatus.TIMED_OUT, error=error)
    if reason == RELEASED:
        return Outcome(run.id, run.lease_token, OutcomeKind.RELEASED)
    return None  # LEASE_LOST: the run is someone else's now


def _suspending() -> bool:
    execution = context.current()
    return execution is not None and execution.suspending


def _suspended(run: ClaimedRun) -> Outcome:
    """The run waits without a worker: WAITING after its wait requests are applied."""
    execution = context.current()
    waits = list(execution.suspend_requests) if execution is not None else []
    return Outcome(run.id, run.lease_token, OutcomeKind.SUSPENDED, waits=waits)


def _diverged() -> Exception | None:
    """The non-determinism a replay hit in this execution, if any (it fails the run, no retry)."""
    execution = context.current()
    return None if execution is None else execution.nondeterministic


def _failed(run: ClaimedRun, error: dict[str, Any]) -> Outcome:
    return Outcome(run.id, run.lease_token, OutcomeKind.FAILED, error=error, status=RunStatus.FAILED)


async def _after_error(task: Task[Any, Any], run: ClaimedRun, ctx: Context, clock: Clock, exc: Exception) -> Outcome:
    error = error_dict(exc)
    decision: Any = None
    handler = task.hooks.get("handle_error")
    if handler is not None:
        try:
            decision = await call_hook(handler, exc, ctx)
        except AbortRun as abort:
            return _failed(run, error_dict(abort, "ABORTED"))
        except Exception as hook_exc:
            log.error("handle_error of %s raised %s", task.id, safe_str(hook_exc), exc_info=True)
    if isinstance(decision, RetryDecision) and decision.abort:
        return _failed(run, error)
    if run.attempt >= run.max_attempts:
        return _failed(run, error)
    if isinstance(decision, RetryDecision) and decision.retry_at is not None:
        retry_at = decision.retry_at
    else:
        retry_at = clock.now() + RetryPolicy.from_dict(run.retry).delay_after(run.attempt)
    return Outcome(run.id, run.lease_token, OutcomeKind.RETRY, error=error, retry_at=retry_at)
