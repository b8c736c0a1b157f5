"""Tasks of tests/e2e/test_limits.py. Workers import this module (`--modules limit_tasks`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import recorder

from conveyor import Concurrency, Context, Queue, Retry, task

HIGH = Retry(max_attempts=50, min_delay=0.01, max_delay=0.05, randomize=False)
LIMITED_QUEUE = Queue("e2e-limited", concurrency_limit=3)
HOT_QUEUE = Queue("e2e-hot", concurrency_limit=10)


def expected_output(n: int) -> dict[str, Any]:
    return {"n": n, "square": n * n}


@task("e2e-limited", queue=LIMITED_QUEUE, retry=HIGH, concurrency=Concurrency(limit=1, key=lambda p: p["key"]))
async def limited(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    recorder.start(ctx)
    await asyncio.sleep(payload["ms"] / 1000)
    value = expected_output(payload["n"])
    recorder.effect(ctx, value)
    recorder.end(ctx)
    return value


@task("e2e-hot", queue=HOT_QUEUE, retry=HIGH, concurrency=Concurrency(limit=1, key=lambda p: p["key"]))
async def hot(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    recorder.start(ctx)
    await asyncio.sleep(payload["ms"] / 1000)
    recorder.end(ctx)
    return {"n": payload["n"]}


@task("e2e-limited-sync", queue=LIMITED_QUEUE, retry=HIGH, concurrency=Concurrency(limit=1, key=lambda p: p["key"]))
def limited_sync(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """The same as a sync task: it runs in a pool child of the worker, in steps of 10 ms."""
    recorder.start(ctx)
    deadline = time.monotonic() + payload["ms"] / 1000
    while time.monotonic() < deadline:
        time.sleep(0.01)
    value = expected_output(payload["n"])
    recorder.effect(ctx, value)
    recorder.end(ctx)
    return value
