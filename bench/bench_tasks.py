"""The tasks the benchmarks run (imported by `conveyor worker --modules bench_tasks`).

All async and on one queue, like the peers' entrypoints. `count` and `lat` do the harness's job-side bookkeeping
(one Redis INCR / RPUSH on db 15), the same cost every peer pays.
"""

from __future__ import annotations

from typing import Any

from _harness import load_common

from conveyor import Queue, task

common = load_common()
QUEUE = Queue("bench")


@task("bench-noop", queue=QUEUE)
async def noop(payload: Any) -> None:
    return None


@task("bench-count", queue=QUEUE)
async def count(payload: Any) -> None:
    common.job_count(payload)


@task("bench-lat", queue=QUEUE)
async def lat(payload: Any) -> None:
    common.job_lat()
