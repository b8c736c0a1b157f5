"""Durable waits: suspend -> resume latency, and what suspended runs cost a worker.

1. Latency: runs suspend on timers that fall due one by one (spaced, so each resume meets an
   idle worker); latency = when the resumed code got control back - when the timer was due.
   The worker plans its maintenance pass for the earliest due time; the pass completes the
   waitpoint and queues the run; the claim starts it; the replay returns from the wait.
2. Memory: the worker process's RSS idle, then with N runs suspended (all WAITING).

    .venv/bin/python bench/waits_bench.py [--samples 200] [--suspended 10000] [--database-url URL]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import conveyor  # noqa: E402
from conveyor import BatchItem  # noqa: E402


def rss_mib(pid: int) -> float:
    """Resident memory of a process."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def count(status: str, ids: list[str]) -> int:
    client = conveyor.get_client()
    with client.store.read() as tx:
        return sum(1 for s in tx.run_status_many(client.engine.environment, ids).values() if s == status)


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def latency(samples: int, spacing: float) -> list[float]:
    import step_tasks

    start = time.time() + 1.5  # every run suspends first (waits >= 1 s suspend)
    items = [BatchItem({"until": start + i * spacing}) for i in range(samples)]
    handles = step_tasks.sleeper.batch_trigger(items)
    out = []
    for item, handle in zip(items, handles, strict=True):
        run = handle.wait(60)
        assert run.status.value == "COMPLETED", run.error
        out.append((run.output["resumed_at"] - item.payload["until"]) * 1000)
    return out


def trigger_many(n: int, until: float) -> list[str]:
    import step_tasks

    ids: list[str] = []
    for start in range(0, n, 1000):
        batch = [BatchItem({"until": until}) for _ in range(min(1000, n - start))]
        ids += [h.id for h in step_tasks.sleeper.batch_trigger(batch)]
    return ids


def memory(n: int) -> dict[str, float]:
    """What suspended runs cost a worker, measured in this process on a worker of its own
    (so its Python heap can be traced): first n runs go through it and complete (what any n
    runs leave behind: allocator high-water, SQLite's page caches filling as the database
    grows), then n more suspend. Between the two: the RSS change, the change in objects the
    garbage collector tracks, and the traced Python heap (the run ids this process keeps as
    the producer are left out)."""
    import asyncio
    import gc
    import threading
    import tracemalloc

    import step_tasks

    from conveyor.worker.worker import Worker, WorkerOptions

    client = conveyor.get_client()
    worker = Worker(client.engine, [step_tasks.sleeper], WorkerOptions(concurrency=16, modules=["step_tasks"]))
    thread = threading.Thread(target=lambda: asyncio.run(worker.run()), daemon=True)
    thread.start()
    worker.started.wait(30)
    try:
        done = trigger_many(n, 0.0)  # due at once: they complete without suspending
        wait_for(lambda: count("COMPLETED", done) == n, 300, f"{n} runs to complete")
        gc.collect()
        objects, rss = len(gc.get_objects()), rss_mib(os.getpid())
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        waiting = trigger_many(n, time.time() + 3600)
        wait_for(lambda: count("WAITING", waiting) == n, 300, f"{n} runs to suspend")
        time.sleep(1)
        gc.collect()
        after = tracemalloc.take_snapshot()
        keep = [tracemalloc.Filter(False, "*/conveyor/core/ids.py"), tracemalloc.Filter(False, __file__)]
        heap = sum(d.size_diff for d in after.filter_traces(keep).compare_to(before.filter_traces(keep), "filename"))
        tracemalloc.stop()
        return {
            "rss": rss_mib(os.getpid()) - rss,
            "objects": len(gc.get_objects()) - objects,
            "heap": heap / 1024 / 1024,
        }
    finally:
        worker.request_stop(0)
        thread.join(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--spacing", type=float, default=0.02, help="seconds between due times")
    parser.add_argument("--suspended", type=int, default=10_000)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    import step_tasks

    url, worker = step_tasks.start_worker(args.database_url, "waits")
    try:
        latency(5, 0.05)  # warm-up, also waits for the worker
        lat = sorted(latency(args.samples, args.spacing))
        p50, p99 = statistics.median(lat), lat[int(len(lat) * 0.99) - 1]
        worker.terminate()
        mem = memory(args.suspended)
        store = "postgresql" if url.startswith("postgres") else "sqlite"
        load = os.getloadavg()[0]
        print(f"suspend->resume after the timer is due: p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {lat[-1]:.2f} ms")
        print(
            f"{args.suspended:,} runs WAITING, against as many completed: Python heap {mem['heap']:+.2f} MiB, "
            f"gc-tracked objects {mem['objects']:+,}, RSS {mem['rss']:+.1f} MiB (SQLite page caches)"
        )
        print(f"[{store}; {args.samples} samples; load {load:.1f}]")
    finally:
        worker.terminate()
        worker.wait(30)


if __name__ == "__main__":
    main()
