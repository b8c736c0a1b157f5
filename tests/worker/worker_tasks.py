"""Tasks the worker tests run. Importable by name, so sync tasks can run in pool children."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

import conveyor
from conveyor import AbortRun, Retry, RetryDecision, task

EVENTS: list[tuple[str, object]] = []  # hook calls of async tasks (they run in the worker process)


@task("echo")
async def echo(payload, ctx):
    conveyor.logger.info("echo %s", payload["x"], extra={"chat": 7})
    logging.getLogger("thirdparty").warning("stdlib line")
    conveyor.metadata.set("progress", 0.5)
    conveyor.metadata.increment("count", 2)
    conveyor.metadata.append("seen", payload["x"])
    return {"x": payload["x"], "attempt": ctx.attempt.number, "run": ctx.run.id, "task": ctx.task.id}


def _hook(name):
    def hook(*args):
        EVENTS.append((name, args[-2] if name in ("on_success", "on_failure") else None))

    return hook


@task("sleepy-async", on_cancel=_hook("on_cancel"), cleanup=_hook("cleanup"), on_start=_hook("on_start"))
async def sleepy_async(payload):
    await asyncio.sleep(payload["seconds"])
    return "woke"


@task("sleepy-sync", max_duration=1, retry=Retry(max_attempts=1))
def sleepy_sync(payload):
    time.sleep(payload["seconds"])
    return "woke"


@task("busy-c-call", max_duration=1, retry=Retry(max_attempts=1))
def busy_c_call(payload):
    # One long C call: no Python bytecode runs, so no signal handler can interrupt it.
    return hashlib.pbkdf2_hmac("sha256", b"x", b"salt", 50_000_000).hex()


@task("sync-ok")
def sync_ok(payload, ctx):
    conveyor.metadata.set("pid_seen", True)
    logging.getLogger("child").info("from the child")
    return {"double": payload * 2, "attempt": ctx.attempt.number}


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("cannot print me")


class Unpicklable(Exception):
    def __init__(self, lock):
        super().__init__("holds a lock")
        self.lock = lock

    def __reduce__(self):
        raise TypeError("cannot pickle")


@task("bad-output", retry=Retry(max_attempts=1))
async def bad_output(payload):
    return {"when": object()}


@task("unprintable", retry=Retry(max_attempts=1))
async def unprintable(payload):
    raise Unprintable()


@task("unpicklable-sync", retry=Retry(max_attempts=1))
def unpicklable_sync(payload):
    import threading

    raise Unpicklable(threading.Lock())


@task(
    "flaky",
    retry=Retry(max_attempts=3, min_delay=0.05, max_delay=0.05, randomize=False),
    on_start=_hook("on_start"),
    on_success=_hook("on_success"),
    on_failure=_hook("on_failure"),
)
async def flaky(payload, ctx):
    if ctx.attempt.number < payload["succeed_on"]:
        raise RuntimeError(f"attempt {ctx.attempt.number} fails")
    return ctx.attempt.number


def _rate_limited(error, ctx):
    if isinstance(error, RateLimited):
        return RetryDecision.retry_in(error.retry_after)
    if isinstance(error, ValueError):
        return RetryDecision.fail()
    return None


class RateLimited(Exception):
    def __init__(self, retry_after):
        super().__init__(f"429, retry after {retry_after}s")
        self.retry_after = retry_after


@task("rate-limited", retry=Retry(max_attempts=3, min_delay=30, max_delay=30), handle_error=_rate_limited)
async def rate_limited(payload, ctx):
    if payload == "value-error":
        raise ValueError("bad input")
    if ctx.attempt.number == 1:
        raise RateLimited(0.2)
    return ctx.attempt.number


@task("aborts", retry=Retry(max_attempts=5))
async def aborts(payload):
    raise AbortRun("invalid update")


@task("limited", retry=Retry(max_attempts=1))
def limited(payload):
    time.sleep(payload)
    return "done"


@task("swallows-stop", max_duration=1, retry=Retry(max_attempts=1))
def swallows_stop(payload):
    try:
        time.sleep(30)
    except BaseException:  # a task must not do this; the run still ends TIMED_OUT
        return "swallowed"


@task("attempt-times", retry=Retry(max_attempts=2, min_delay=0.3, max_delay=0.3, randomize=False))
async def attempt_times(payload, ctx):
    if ctx.attempt.number == 1:
        raise RuntimeError("first attempt fails")
    return {"attempt_started": ctx.attempt.started_at, "run_started": ctx.run.started_at}


STEP_CALLS: list[str] = []  # executions of step functions in async tasks (they run in this process)


def _count(name):
    STEP_CALLS.append(name)
    return {"step": name, "n": len(STEP_CALLS)}


@task("steps-async", retry=Retry(max_attempts=3, min_delay=0.01, max_delay=0.01, randomize=False))
async def steps_async(payload, ctx):
    first = await conveyor.step("first", _count, "first")
    second = await conveyor.step("second", _count, "second")
    items = [await conveyor.step("item", _count, f"item-{i}") for i in range(3)]
    if ctx.attempt.number < payload["fail_until"]:
        raise RuntimeError(f"fail after the steps, attempt {ctx.attempt.number}")
    third = await conveyor.step("third", _count, "third")
    return {"first": first, "second": second, "items": items, "third": third}


@task("diverges", retry=Retry(max_attempts=3, min_delay=0.01, max_delay=0.01, randomize=False))
async def diverges(payload, ctx):
    await conveyor.step("a" if ctx.attempt.number == 1 else "b", _count, "x")
    if ctx.attempt.number == 1:
        raise RuntimeError("retry me")
    return "unreachable"


@task("huge-step", retry=Retry(max_attempts=1))
async def huge_step(payload):
    return await conveyor.step("big", lambda: "x" * (1024 * 1024 + 1))


@task("steps-sync", retry=Retry(max_attempts=3, min_delay=0.01, max_delay=0.01, randomize=False))
def steps_sync(payload, ctx):
    def record(name):
        with open(payload["log"], "a") as f:
            f.write(name + "\n")
        return name.upper()

    values = [conveyor.step_sync(f"s{i}", record, f"s{i}") for i in range(3)]
    if ctx.attempt.number < 2:
        raise RuntimeError("fail once after the steps")
    return values
