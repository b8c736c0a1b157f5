"""Tasks of bench/steps_bench.py: a workflow of N no-op steps (DBOS's W4 shape)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import conveyor
from conveyor import task


def noop(i: int) -> int:
    return i


@task("ten-steps")
async def ten_steps(payload: dict) -> int:
    for i in range(payload["steps"]):
        await conveyor.step("noop", noop, i)
    return payload["steps"]


@task("sleeper")
async def sleeper(payload: dict) -> dict:
    """Suspends until `until` (epoch seconds); reports when its resumed code got control back."""
    await conveyor.wait.until(datetime.fromtimestamp(payload["until"], UTC))
    return {"resumed_at": time.time()}
