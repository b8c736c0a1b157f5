"""Tasks of tests/e2e/test_faults.py. Workers import this module (`--modules fault_tasks`)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import recorder

from conveyor import Context, Retry, task

# Fault tests: many attempts, near-zero backoff (DECISIONS.md, "Tests of faults").
HIGH = Retry(max_attempts=50, min_delay=0.01, max_delay=0.05, randomize=False)
FLAKY = Retry(max_attempts=10, factor=2.0, min_delay=0.05, max_delay=0.4, randomize=False)
TWICE = Retry(max_attempts=2, factor=2.0, min_delay=0.05, max_delay=1.0, randomize=False)
CRASHY = Retry(max_attempts=2, factor=2.0, min_delay=0.3, max_delay=1.0, randomize=False)


def expected_output(n: int) -> dict[str, Any]:
    return {"n": n, "square": n * n}


@task("e2e-kill", retry=HIGH)
async def kill_task(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """A few ms of work so that kills land mid-run; the side effect keyed by run id."""
    recorder.start(ctx)
    await asyncio.sleep(payload["ms"] / 1000)
    value = expected_output(payload["n"])
    recorder.effect(ctx, value)
    recorder.end(ctx)
    return value


@task("e2e-kill-sync", retry=HIGH)
def kill_task_sync(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """The same as a sync task: it runs in a pool child of the worker."""
    recorder.start(ctx)
    time.sleep(payload["ms"] / 1000)
    value = expected_output(payload["n"])
    recorder.effect(ctx, value)
    recorder.end(ctx)
    return value


@task("e2e-hang-sync", retry=CRASHY)
def hang_sync(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """A sync task whose first attempt runs far longer than the lease; later ones finish at once."""
    recorder.start(ctx)
    if ctx.attempt.number == 1:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.01)
    value = expected_output(payload["n"])
    recorder.effect(ctx, value)
    recorder.end(ctx)
    return value


@task("e2e-stale", retry=HIGH)
async def stale(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Its output names the attempt that produced it."""
    recorder.start(ctx)
    await asyncio.sleep(payload["ms"] / 1000)
    value = {"n": payload["n"], "attempt": ctx.attempt.number}
    recorder.effect(ctx, value)
    recorder.end(ctx)
    return value


@task("e2e-stale-sync", retry=HIGH)
def stale_sync(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """The same in a pool child: it can finish while its worker is frozen."""
    recorder.start(ctx)
    time.sleep(payload["ms"] / 1000)
    value = {"n": payload["n"], "attempt": ctx.attempt.number}
    recorder.effect(ctx, value)
    recorder.end(ctx)
    return value


class PlannedFailure(Exception):
    pass


@task("e2e-flaky", retry=FLAKY)
async def flaky(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Fails deterministically while attempt <= fail_times, then succeeds."""
    recorder.start(ctx)
    await asyncio.sleep(payload["ms"] / 1000)
    if ctx.attempt.number <= payload["fail_times"]:
        recorder.end(ctx, failed=True)
        raise PlannedFailure(f"planned failure of attempt {ctx.attempt.number}")
    value = expected_output(payload["n"])
    recorder.effect(ctx, value)
    recorder.end(ctx)
    return value


@task("e2e-always-fail", retry=TWICE)
async def always_fail(payload: dict[str, Any], ctx: Context) -> None:
    recorder.start(ctx)
    await asyncio.sleep(payload["ms"] / 1000)
    recorder.end(ctx, failed=True)
    raise PlannedFailure(f"always fails (attempt {ctx.attempt.number})")


@task("e2e-crashy", retry=CRASHY)
async def crashy(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Hangs in its first attempt (the test kills its worker), succeeds in later ones."""
    recorder.start(ctx)
    if ctx.attempt.number == 1:
        await asyncio.sleep(300)
    value = expected_output(payload["n"])
    recorder.effect(ctx, value)
    recorder.end(ctx)
    return value


@task("e2e-slow", retry=HIGH)
async def slow(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Its first execution takes `first_s` (or waits for the file `until` to exist, then takes
    `then_s`); a later one finishes at once."""
    recorder.start(ctx)
    if not recorder.first_execution(ctx):
        await asyncio.sleep(0.01)
    elif "until" in payload:
        deadline = time.monotonic() + 60
        while not os.path.exists(payload["until"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(payload["then_s"])
    else:
        await asyncio.sleep(payload["first_s"])
    value = expected_output(payload["n"])
    recorder.effect(ctx, value)
    recorder.end(ctx)
    return value


@task("e2e-slow-sync", retry=HIGH)
def slow_sync(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """The same in a sync task: it runs in a pool child and is stopped with a signal."""
    recorder.start(ctx)
    time.sleep(payload["first_s"] if recorder.first_execution(ctx) else 0.01)
    value = expected_output(payload["n"])
    recorder.effect(ctx, value)
    recorder.end(ctx)
    return value
