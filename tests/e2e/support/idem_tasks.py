"""The task of tests/e2e/test_idempotency_race.py (triggered by idem_trigger.py, run by a worker)."""

from __future__ import annotations

from typing import Any

from conveyor import Retry, task


@task("e2e-idem", retry=Retry(max_attempts=5, min_delay=0.01, max_delay=0.05, randomize=False))
async def idem(payload: dict[str, Any]) -> dict[str, Any]:
    return {"key": payload["key"]}
