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


# --- durable waits -------------------------------------------------------------------------------
WAIT_SIDE_EFFECTS: list[str] = []


@task("wait-then-finish", on_start=_hook("on_start"))
async def wait_then_finish(payload, ctx):
    before = await conveyor.step("before", lambda: WAIT_SIDE_EFFECTS.append("before") or "b")
    await conveyor.wait.for_(seconds=payload.get("seconds", 1.2))
    after = await conveyor.step("after", lambda: WAIT_SIDE_EFFECTS.append("after") or "a")
    return {"before": before, "after": after, "attempt": ctx.attempt.number}


@task("child-double")
async def child_double(payload):
    if payload.get("fail"):
        raise AbortRun("child says no")
    if payload.get("sleep"):
        await asyncio.sleep(payload["sleep"])
    return payload["x"] * 2


@task("parent-of-children")
async def parent_of_children(payload):
    one = await child_double.trigger_and_wait({"x": payload["x"]})
    many = await child_double.batch_trigger_and_wait([{"x": i} for i in range(payload.get("n", 3))])
    failed = await child_double.trigger_and_wait({"x": 0, "fail": True})
    return {
        "one": one.unwrap(),
        "many": [r.output for r in many],
        "failed": {"ok": failed.ok, "code": failed.error["code"] if failed.error else None},
    }


@task("sync-waiter")
def sync_waiter(payload):
    result = child_double.trigger_and_wait({"x": payload["x"]})
    conveyor.wait.for_(seconds=1.1)
    return result.unwrap()


@task("token-waiter")
async def token_waiter(payload):
    token = await conveyor.wait.create_token(timeout=payload.get("timeout", 60), tags=["approval"])
    conveyor.metadata.set("token", token.id)
    result = await conveyor.wait.for_token(token)
    return {"ok": result.ok, "output": result.output, "error": (result.error or {}).get("code")}


@task("mixed-child", on_cancel=_hook("on_cancel"))
async def mixed_child(payload):
    if payload == "token":  # waits (WAITING) for a token nobody completes
        await conveyor.wait.for_token(await conveyor.wait.create_token())
    else:  # executes for a long time
        await asyncio.sleep(60)
    EVENTS.append(("child-went-on", payload))


@task("parent-of-mixed", on_cancel=_hook("on_cancel"))
async def parent_of_mixed(payload):
    await mixed_child.batch_trigger_and_wait(["token", "token", "token", "sleep"])
    EVENTS.append(("parent-went-on", None))


@task("reports-to-parent")
async def reports_to_parent(payload):
    conveyor.metadata.parent.increment("done", 1)
    conveyor.metadata.root.append("seen", payload)
    return payload


@task("collects-reports")
async def collects_reports(payload):
    await reports_to_parent.batch_trigger_and_wait([1, 2, 3])
    return "ok"


@task("triggers-then-fails", retry=Retry(max_attempts=2, min_delay=0.01, max_delay=0.01, randomize=False))
async def triggers_then_fails(payload, ctx):
    handle = child_double.trigger({"x": 1})
    if ctx.attempt.number == 1:
        raise RuntimeError("fail after triggering")
    return handle.id


@task("diverging-waits", retry=Retry(max_attempts=2, min_delay=0.01, max_delay=0.01, randomize=False))
async def diverging_waits(payload, ctx):
    if ctx.attempt.number == 1:
        await conveyor.wait.for_(seconds=1.05)
        raise RuntimeError("retry me")
    await conveyor.step("not-a-wait", lambda: 1)


@task("times-out-waiting")
async def times_out_waiting(payload):
    token = await conveyor.wait.create_token(timeout=1.05)
    result = await conveyor.wait.for_token(token)
    try:
        result.unwrap()
    except conveyor.WaitTimeout as exc:
        return {"ok": result.ok, "code": result.error["code"], "raised": type(exc).__name__}
    return "completed?"
