"""Tasks of tests/e2e/test_durable_steps.py: a 9-step run whose step 5 can be held open."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import conveyor
from conveyor import Context, Retry, task

STEPS = 9


def _effects() -> Path:
    return Path(os.environ["E2E_DIR"]) / "step-effects.log"


def _do_step(run_id: str, number: int, attempt: int) -> int:
    """A step's side effect: one line per execution, so the test counts re-executions."""
    with open(_effects(), "a") as f:
        f.write(json.dumps({"run": run_id, "step": number, "attempt": attempt, "pid": os.getpid()}) + "\n")
    return number * number


async def _hold_step(run_id: str, number: int, attempt: int, hold: Path) -> int:
    """Step 5 on the first attempt: writes its effect, then waits until the test kills us."""
    value = _do_step(run_id, number, attempt)
    if attempt == 1:
        hold.write_text(str(os.getpid()))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    return value


@task("nine-steps", retry=Retry(max_attempts=5, min_delay=0.01, max_delay=0.05, randomize=False))
async def nine_steps(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    hold = Path(payload["hold"])
    values = []
    for number in range(STEPS):
        if number == 5:
            value = await conveyor.step(f"step-{number}", _hold_step, ctx.run.id, number, ctx.attempt.number, hold)
        else:
            value = await conveyor.step(f"step-{number}", _do_step, ctx.run.id, number, ctx.attempt.number)
        values.append(value)
    return {"values": values}
