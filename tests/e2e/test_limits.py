"""Concurrency limits with real processes, checked by an independent monitor (issue 3 item 10;
DECISIONS.md "Concurrency" and "Tests of faults").

The monitor (tests/e2e/support/monitor.py) is its own process: it reads only the execution log
the tasks append to, counting an execution as running from its start record to its end record
or the death of its pid.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import defaultdict

import harness
import limit_tasks
from harness import SUPPORT, check_exactly_once, wait_until

QUEUE = limit_tasks.LIMITED_QUEUE.name
QUEUE_LIMIT = limit_tasks.LIMITED_QUEUE.concurrency_limit


def _start_monitor(cluster: harness.Cluster) -> tuple[harness.subprocess.Popen[bytes], str, str]:
    out, stop = str(cluster.dir / "monitor.json"), str(cluster.dir / "monitor.stop")
    argv = [sys.executable, str(SUPPORT / "monitor.py"), "--log", str(cluster.exec_log_path), "--out", out]
    argv += ["--stop", stop, "--queue-limit", f"{QUEUE}={QUEUE_LIMIT}", "--key-limit", f"{QUEUE}=1"]
    proc, _ = cluster.spawn(argv, "monitor")
    wait_until(lambda: (cluster.dir / "monitor.json.ready").exists(), timeout=10, what="the monitor to start")
    return proc, out, stop


def _store_overlaps(cluster: harness.Cluster, run_ids: list[str]) -> tuple[int, int]:
    """The store's own record, checked apart from the monitor: attempts (claimed -> settled or
    recovered) of one key never overlap, and at most QUEUE_LIMIT overlap in the queue.
    Returns (max at once in the queue, max at once per key)."""
    rows = cluster.sql(
        """SELECT r.concurrency_key, a.started_at, a.finished_at FROM attempts a JOIN runs r ON r.id = a.run_id
           WHERE r.id IN (SELECT value FROM json_each(?))""",
        [json.dumps(run_ids)],
    )
    points: list[tuple[float, int, str]] = []
    for key, started, finished in rows:
        assert finished is not None, "an attempt never finished"
        points += [(started, 1, key), (finished, -1, key)]
    points.sort(key=lambda p: (p[0], p[1]))  # at a tie, the end first: a slot freed and retaken in one instant
    queue_now = queue_max = key_max = 0
    per_key: dict[str, int] = defaultdict(int)
    for _, delta, key in points:
        queue_now += delta
        per_key[key] += delta
        queue_max = max(queue_max, queue_now)
        key_max = max(key_max, per_key[key])
    return queue_max, key_max


def test_monitor_never_sees_limits_exceeded(make_cluster):
    """3 workers, queue limit 3, Concurrency(limit=1) per key over 8 keys (some keys given at
    trigger), workers kill -9-ed mid-run: the monitor never sees more than 3 running in the
    queue nor two runs of one key at once; every run still COMPLETED exactly once."""
    started = time.monotonic()
    cluster = make_cluster("limit_tasks")
    monitor, out, stop = _start_monitor(cluster)
    rnd = random.Random(3)
    workers = [cluster.start_worker(concurrency=8) for _ in range(3)]
    cluster.wait_ready(workers)
    keys = harness.LIMIT_KEYS
    expected = harness.trigger_limit_workload(rnd)
    ids = list(expected)

    kills_mid_run = harness.kill_while_running(cluster, rnd, 6, ids, started)
    (cluster.dir / "monitor.stop").touch()
    wait_until(lambda: monitor.poll() is not None, timeout=10, what="the monitor to finish")
    with open(out) as f:
        report = json.load(f)

    assert report["violations"] == [], json.dumps(report["violations"][:5], indent=1)
    assert report["still_open"] == 0 and report["unmatched_ends"] == 0, report
    assert report["max_queue"][QUEUE] == QUEUE_LIMIT, f"the queue never reached its limit: {report['max_queue']}"
    assert max(report["max_key"].values()) == 1, report["max_key"]
    assert report["closed_by_death"] >= 1, "no kill landed while a run was executing"
    queue_max, key_max = _store_overlaps(cluster, ids)
    assert (queue_max, key_max) == (QUEUE_LIMIT, 1), f"attempts overlap: {queue_max} in the queue, {key_max} per key"
    stats = check_exactly_once(cluster, expected)
    by_key = defaultdict(int)
    for rec in cluster.executions():
        if rec["k"] == "S":
            by_key[rec["key"]] += 1
    assert set(by_key) == set(keys), by_key
    warnings = cluster.check_logs()
    print(
        f"\nlimit monitor: {report['starts']} executions of {len(ids)} runs over {len(keys)} keys, max running "
        f"{report['max_queue'][QUEUE]} (limit {QUEUE_LIMIT}), max per key {max(report['max_key'].values())}, "
        f"0 violations; {len(cluster.killed)} kills ({kills_mid_run} mid-run, {report['closed_by_death']} executions "
        f"ended by death), {stats['worker_lost_attempts']} WORKER_LOST; store attempts agree "
        f"({queue_max}/{key_max}); {warnings} worker warnings; {time.monotonic() - started:.1f} s"
    )


HOT_BACKLOG = 10_000


def test_hot_key_never_stalls_other_keys(make_cluster):
    """10,000 runs queued on key A (limit 1): a run on key B (then C, D) starts at once."""
    started = time.monotonic()
    cluster = make_cluster("limit_tasks")
    t = time.monotonic()
    backlog = []
    for first in range(0, HOT_BACKLOG, 1000):
        batch = [{"n": n, "key": "A", "ms": 20} for n in range(first, first + 1000)]
        backlog += [h.id for h in limit_tasks.hot.batch_trigger(batch)]
    enqueue_s = time.monotonic() - t
    workers = [cluster.start_worker(concurrency=8) for _ in range(2)]
    cluster.wait_ready(workers)
    wait_until(lambda: any(r["key"] == "A" for r in cluster.executions()), timeout=15, what="key A to start executing")
    latencies = {}
    for n, key in enumerate(["B", "C", "D"], start=HOT_BACKLOG):
        triggered = time.time()
        run_id = limit_tasks.hot.trigger({"n": n, "key": key, "ms": 20}).id

        def started_record(run_id: str = run_id) -> dict | None:
            return next((r for r in cluster.executions() if r["run"] == run_id and r["k"] == "S"), None)

        record = wait_until(started_record, timeout=10, what=f"the run on key {key} to start", interval=0.005)
        latencies[key] = record["t"] - triggered
    queued_a = cluster.statuses(backlog)["QUEUED"]
    assert queued_a > HOT_BACKLOG - 1000, f"only {queued_a} runs of key A still queued"
    assert all(v < 1.0 for v in latencies.values()), latencies
    running_a = max_a = 0
    for rec in cluster.executions():
        if rec["key"] == "A":
            running_a += 1 if rec["k"] == "S" else -1
            max_a = max(max_a, running_a)
    assert max_a == 1, f"{max_a} runs of key A at once"
    cluster.check_logs()
    print(
        f"\nhot key: {HOT_BACKLOG} runs queued on A (enqueued in {enqueue_s:.2f} s), {queued_a} still queued; "
        + ", ".join(f"{k} started {v * 1000:.0f} ms after trigger" for k, v in latencies.items())
        + f"; {time.monotonic() - started:.1f} s"
    )


def test_monitor_sees_an_overlap(tmp_path):
    """The monitor itself: it flags two runs of one key at once and a queue over its limit,
    and ends an execution when its pid dies (so it is not vacuous)."""
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    log = tmp_path / "exec.log"

    def rec(kind: str, run: str, pid: int, key: str) -> str:
        return json.dumps({"k": kind, "run": run, "pid": pid, "attempt": 1, "key": key, "queue": QUEUE}) + "\n"

    log.write_text(
        rec("S", "r1", dead.pid, "a")  # its process died without an end record: not running any more
        + rec("S", "r2", 1, "a")  # pid 1 stays alive: r2 runs until its end record
        + rec("S", "r3", 1, "a")  # a second run of key a while r2 runs
        + rec("S", "r4", 1, "b")
        + rec("S", "r5", 1, "c")  # 4 running in the queue
        + rec("E", "r2", 1, "a")
    )
    out, stop = tmp_path / "report.json", tmp_path / "stop"
    stop.touch()
    argv = [sys.executable, str(SUPPORT / "monitor.py"), "--log", str(log), "--out", str(out), "--stop", str(stop)]
    argv += ["--queue-limit", f"{QUEUE}=3", "--key-limit", f"{QUEUE}=1"]
    subprocess.run(argv, check=True, timeout=30)
    report = json.loads(out.read_text())
    whats = [v["what"] for v in report["violations"]]
    assert any("key 'a'" in w for w in whats) and any("running in queue" in w for w in whats), whats
    assert report["closed_by_death"] == 1 and report["still_open"] == 3, report
