"""Tasks of bench/steps_bench.py: a workflow of N no-op steps (DBOS's W4 shape)."""

from __future__ import annotations

import conveyor
from conveyor import task


def noop(i: int) -> int:
    return i


@task("ten-steps")
async def ten_steps(payload: dict) -> int:
    for i in range(payload["steps"]):
        await conveyor.step("noop", noop, i)
    return payload["steps"]
