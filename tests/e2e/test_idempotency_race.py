"""Idempotency keys under a real race (issue 3 item 10; DECISIONS.md "Idempotency"): 8 threads
in each of 4 processes trigger the same 50 keys 20 times each, while a worker completes the
runs (a COMPLETED run keeps its key)."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, defaultdict

import idem_tasks
from harness import SUPPORT, wait_until

PROCESSES, THREADS, KEYS, ROUNDS = 4, 8, 50, 20


def test_concurrent_triggers_with_one_key_make_one_run(make_cluster):
    started = time.monotonic()
    cluster = make_cluster("idem_tasks")
    worker = cluster.start_worker(concurrency=8)
    cluster.wait_ready([worker])
    go = cluster.dir / "go"
    procs = []
    for i in range(PROCESSES):
        argv = [sys.executable, str(SUPPORT / "idem_trigger.py"), "--url", cluster.url]
        argv += ["--out", str(cluster.dir / f"idem-{i}.json"), "--ready", str(cluster.dir / f"idem-{i}.ready")]
        argv += ["--go", str(go), "--threads", str(THREADS), "--keys", str(KEYS), "--rounds", str(ROUNDS)]
        argv += ["--seed", str(i)]
        procs.append(cluster.spawn(argv, "trigger"))
    wait_until(
        lambda: all((cluster.dir / f"idem-{i}.ready").exists() for i in range(PROCESSES)),
        timeout=30,
        what="the trigger processes to be ready",
    )
    go.touch()  # all 32 threads start together
    for proc, log in procs:
        wait_until(lambda proc=proc: proc.poll() is not None, timeout=80, what="the triggers to finish", interval=0.1)
        assert proc.returncode == 0, log.read_text()
    reports = [json.loads((cluster.dir / f"idem-{i}.json").read_text()) for i in range(PROCESSES)]

    assert [r["error_count"] for r in reports] == [0] * PROCESSES, [r["errors"][:3] for r in reports]
    calls = sum(r["calls"] for r in reports)
    assert calls == PROCESSES * THREADS * KEYS * ROUNDS
    seen: dict[str, Counter[str]] = defaultdict(Counter)
    for report in reports:
        for key, ids in report["ids"].items():
            seen[key].update(ids)
    rows = cluster.sql("SELECT idempotency_key, id FROM runs WHERE task_id = ?", [idem_tasks.idem.id])
    assert len(rows) == KEYS, f"{len(rows)} runs for {KEYS} keys"
    run_of_key = dict(rows)
    assert sorted(run_of_key) == sorted(f"key-{i:02d}" for i in range(KEYS))
    wrong = {key: dict(ids) for key, ids in seen.items() if set(ids) != {run_of_key[key]}}
    assert not wrong, f"callers got other run ids than the key's run: {list(wrong.items())[:3]}"
    assert sum(sum(ids.values()) for ids in seen.values()) == calls
    per_key_calls = {sum(ids.values()) for ids in seen.values()}
    assert per_key_calls == {PROCESSES * THREADS * ROUNDS}

    run_ids = list(run_of_key.values())
    wait_until(lambda: cluster.statuses(run_ids) == {"COMPLETED": KEYS}, timeout=20, what="the runs to complete")
    completed = cluster.sql(
        """SELECT count(*) FROM run_events WHERE kind = 'status' AND json_extract(data, '$.status') = 'COMPLETED'
           AND run_id IN (SELECT value FROM json_each(?))""",
        [json.dumps(run_ids)],
    )[0][0]
    assert completed == KEYS
    cluster.check_logs()
    slowest = max(r["elapsed"] for r in reports)
    print(
        f"\nidempotency race: {calls} triggers from {PROCESSES} processes x {THREADS} threads on {KEYS} keys -> "
        f"{len(rows)} runs, every caller got its key's run id; {calls / slowest:.0f} triggers/s; "
        f"{time.monotonic() - started:.1f} s"
    )
