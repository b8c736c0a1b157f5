"""Durable step overhead: a workflow of 10 no-op steps against one of 0 steps.

ms per step = (time per 10-step run - time per 0-step run) / 10, sequentially (one run at a
time, as DBOS's W4) and with 8 runs in flight. A real worker process, default features on.

    .venv/bin/python bench/steps_bench.py [--runs 300] [--database-url URL]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def timed(runs: int, steps: int, concurrency: int) -> float:
    """Seconds per workflow: wall time of `runs` workflows, `concurrency` in flight."""
    import step_tasks

    def one(_: int) -> None:
        run = step_tasks.ten_steps.trigger({"steps": steps}).wait(60)
        assert run.status.value == "COMPLETED", run.error

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(runs)))
    return (time.perf_counter() - start) / runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    import step_tasks

    url, worker = step_tasks.start_worker(args.database_url, "steps")
    try:
        timed(20, 10, 1)  # warm-up, also waits for the worker
        results = {}
        for label, concurrency in (("sequential", 1), ("8 concurrent", 8)):
            per_step = []
            for _ in range(args.repeats):
                base = timed(args.runs, 0, concurrency)
                ten = timed(args.runs, 10, concurrency)
                per_step.append((ten - base) / 10 * 1000)
                wf_per_s = concurrency / ten if concurrency == 1 else 1 / ten
            results[label] = (statistics.median(per_step), wf_per_s)
        load = os.getloadavg()[0]
        store = "postgresql" if url.startswith("postgres") else "sqlite (synchronous=NORMAL)"
        for label, (ms, wf) in results.items():
            print(f"{label:13s} {ms:.3f} ms per step; {wf:.0f} ten-step workflows/s  [{store}; load {load:.1f}]")
    finally:
        worker.terminate()
        worker.wait(30)


if __name__ == "__main__":
    main()
