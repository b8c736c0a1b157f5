"""Durable waits with real processes: waiting runs hold no worker slot and no memory."""

from __future__ import annotations

import time

from harness import wait_until
from wait_tasks import nap

from conveyor import BatchItem


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def most_at_once(executions: list[dict]) -> int:
    """The largest number of execution segments open at the same moment (file order is time order)."""
    open_now = peak = 0
    for rec in executions:
        open_now += 1 if rec["k"] == "S" else -1
        peak = max(peak, open_now)
    return peak


def test_1000_waiting_runs_release_their_slots_and_hold_no_memory(make_cluster):
    cluster = make_cluster("wait_tasks")
    worker = cluster.start_worker(concurrency=4)
    cluster.wait_ready([worker])
    nap.trigger({"seconds": 0}).wait(30)  # warm up: the worker has run the task once
    time.sleep(0.5)
    idle = rss_kib(worker.pid)

    started = time.monotonic()
    handles = nap.batch_trigger([BatchItem({"seconds": 2}) for _ in range(1000)])
    ids = [h.id for h in handles]
    seen_all_waiting = wait_until(
        lambda: cluster.statuses(ids).get("WAITING") == 1000 and time.monotonic(), 10, "all 1,000 runs WAITING"
    )
    waiting_rss = rss_kib(worker.pid)
    wait_until(lambda: cluster.statuses(ids).get("COMPLETED") == 1000, 10, "all 1,000 runs to complete")
    done = time.monotonic() - started

    segments = [e for e in cluster.executions() if e["run"] in set(ids)]
    assert len(segments) == 2 * 2 * 1000  # S and E for the first segment and for the resumed one
    assert most_at_once(segments) <= 4
    assert done < 10
    assert all(r[0] == 1 for r in cluster.sql("SELECT attempt_count FROM runs WHERE status = 'COMPLETED'"))
    assert waiting_rss - idle <= 5 * 1024, f"RSS grew {waiting_rss - idle} KiB with 1,000 runs waiting"
    cluster.check_logs()
    print(
        f"1,000 waits: all WAITING at {seen_all_waiting - started:.2f} s, all done at {done:.2f} s; "
        f"worker RSS idle {idle / 1024:.1f} MiB, with 1,000 waiting {waiting_rss / 1024:.1f} MiB"
    )
