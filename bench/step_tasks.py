"""Tasks of bench/steps_bench.py: a workflow of N no-op steps (DBOS's W4 shape)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

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


def start_worker(database_url: str | None, name: str) -> tuple[str, subprocess.Popen[bytes]]:
    """The store URL (a fresh SQLite file unless `database_url`) and a real worker process
    (`conveyor worker --modules step_tasks --concurrency 16`) on it; this process's client is
    configured for the same store."""
    here = Path(__file__).resolve().parent
    url = database_url or f"sqlite:///{tempfile.mkdtemp(prefix=f'conveyor-{name}-')}/{name}.db"
    conveyor.configure(database_url=url)
    env = dict(os.environ, CONVEYOR_DATABASE_URL=url, PYTHONPATH=str(here))
    cli = Path(sys.executable).parent / "conveyor"
    worker = subprocess.Popen(
        [str(cli), "worker", "--modules", "step_tasks", "--concurrency", "16"],
        env=env,
        cwd=here,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return url, worker
