"""`conveyor.retry.on_throw(...)`: retry one block of code, not the whole run.

    reply = await conveyor.retry.on_throw(call_llm, prompt, max_attempts=4, min_delay=0.5)

`fn(*args)` is called; if it raises an `Exception`, the block waits the backoff of
`conveyor.Retry` (DECISIONS.md: `min(max_delay, min_delay * factor**(n-1))`, times `1 + U[0,1)`
when randomized) and calls it again, up to `max_attempts` calls in all (the first counts). The
last error propagates unchanged. `AbortRun`, a replay that diverged (`NonDeterministic`) and
every `BaseException` (cancellation, a stop or a suspension of the run) propagate at once and
are never retried. Each failed try is logged through `conveyor.logger` (a warning).

The waits between tries happen in process (the run keeps its worker slot): this is for short,
flaky calls. The block is not journaled by itself; wrap it in a step to keep its result across
retries and resumes of the run: `await conveyor.step("charge", conveyor.retry.on_throw, charge)`.

One name for both kinds of code: in an `async def` task (or any coroutine outside a run) the
call returns a coroutine to await; in a plain `def` task (or a thread without an event loop)
it blocks and returns the value. Inside a run the task's kind decides (`Execution.sync`), not
the presence of an event loop: a sync task in a pool child runs on a thread that has one.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from conveyor.core.backoff import RetryPolicy
from conveyor.core.errors import AbortRun, NonDeterministic
from conveyor.sdk import context
from conveyor.sdk.logs import logger
from conveyor.sdk.serde import safe_str

# The waits between tries. Module-level so tests move time instead of sleeping:
# `monkeypatch.setattr(conveyor.sdk.retry, "sleep", fake)` (and `sleep_sync` for the blocking form).
sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep
sleep_sync: Callable[[float], Any] = time.sleep


class RetryHelpers:
    """`conveyor.retry`."""

    def on_throw(
        self,
        fn: Callable[..., Any],
        *args: Any,
        max_attempts: int = 3,
        min_delay: float = 1.0,
        max_delay: float = 30.0,
        factor: float = 2.0,
        randomize: bool = True,
    ) -> Any:
        """Call `fn(*args)` (awaited if it returns an awaitable) until it returns, retrying
        on exceptions with backoff. Returns a coroutine in async code, the value in sync code
        (see the module's docstring). Bad options raise `InvalidOptions` at the call."""
        if not callable(fn):
            raise TypeError(f"retry.on_throw needs a callable, got {fn!r}")
        policy = RetryPolicy(
            max_attempts=max_attempts, factor=factor, min_delay=min_delay, max_delay=max_delay, randomize=randomize
        )
        if blocking():
            return _on_throw_sync(fn, args, policy)
        return _on_throw_async(fn, args, policy)

    def __repr__(self) -> str:
        return "<conveyor.retry>"


retry = RetryHelpers()


def blocking() -> bool:
    """Whether a durable call made here should block and return its value (sync code) rather
    than return an awaitable: when the running task is a plain `def`, or when this thread runs
    no event loop (outside a run, or code an async task sent to a thread)."""
    execution = context.current()
    if execution is not None and execution.sync:
        return True
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return True
    return False


async def _on_throw_async(fn: Callable[..., Any], args: tuple[Any, ...], policy: RetryPolicy) -> Any:
    attempt = 1
    while True:
        try:
            result = fn(*args)
            if inspect.isawaitable(result):
                result = await result
            return result
        except Exception as exc:
            delay = _after_failure(fn, exc, attempt, policy)
            if delay is None:
                raise  # unchanged, with its own traceback
        await sleep(delay)
        attempt += 1


def _on_throw_sync(fn: Callable[..., Any], args: tuple[Any, ...], policy: RetryPolicy) -> Any:
    attempt = 1
    while True:
        try:
            result = fn(*args)
            if inspect.isawaitable(result):
                result = _await_blocking(result)
            return result
        except Exception as exc:
            delay = _after_failure(fn, exc, attempt, policy)
            if delay is None:
                raise
        sleep_sync(delay)
        attempt += 1


def _after_failure(fn: Callable[..., Any], exc: Exception, attempt: int, policy: RetryPolicy) -> float | None:
    """Log the failed try and return the delay before the next one, or None when `exc` must
    propagate: it is never retried, or this was the last try."""
    if isinstance(exc, AbortRun | NonDeterministic):
        return None
    execution = context.current()
    if execution is not None and execution.nondeterministic is not None:
        return None  # the replay diverged inside the block: the run fails, retrying cannot help
    name = getattr(fn, "__qualname__", None) or repr(fn)
    extra = {
        "attempt": attempt,
        "max_attempts": policy.max_attempts,
        "error_type": type(exc).__name__,
        "error": safe_str(exc),
    }
    if attempt >= policy.max_attempts:
        logger.warning(
            "retry.on_throw: %s failed on attempt %d of %d: %s: %s; giving up",
            name,
            attempt,
            policy.max_attempts,
            type(exc).__name__,
            safe_str(exc),
            extra=extra,
        )
        return None
    delay = policy.delay_after(attempt)
    logger.warning(
        "retry.on_throw: %s failed on attempt %d of %d: %s: %s; retrying in %.2f s",
        name,
        attempt,
        policy.max_attempts,
        type(exc).__name__,
        safe_str(exc),
        delay,
        extra={**extra, "retry_in": round(delay, 3)},
    )
    return delay


def _await_blocking(awaitable: Awaitable[Any]) -> Any:
    """Run an awaitable to completion from sync code. With no event loop in this thread, on a
    new one here; inside a sync task in a pool child (whose thread runs a loop that the task
    blocks), on a helper thread, in a copy of this context so `conveyor.*` calls still see the run."""

    async def wait() -> Any:
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wait())
    ctx = contextvars.copy_context()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = ctx.run(asyncio.run, wait())
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    helper = threading.Thread(target=target, name="conveyor-retry-await", daemon=True)
    helper.start()
    helper.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
