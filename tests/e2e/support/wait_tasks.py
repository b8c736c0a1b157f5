"""Tasks of tests/e2e/test_waits.py: runs that suspend on a timer, recorded per segment."""

from __future__ import annotations

from typing import Any

import recorder

import conveyor
from conveyor import Context, task


@task("nap", queue=conveyor.Queue("naps", concurrency_limit=4))
async def nap(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    recorder.start(ctx)
    try:
        await conveyor.wait.for_(seconds=payload["seconds"])
    finally:  # runs at the suspension too: the log shows every execution segment
        recorder.end(ctx)
    return {"attempt": ctx.attempt.number}
