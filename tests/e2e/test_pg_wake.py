"""Wake-ups on PostgreSQL with worker processes (store/postgres/listen.py, engine/notify.py):
no run waits while a live worker of its queue has a free slot — one idle worker is woken per new
run, and every wake-up that worker cannot serve (it is full, stopping, or was killed) reaches
another.

The workers here run with their safety poll blinded (`store.change_token` returns a constant),
so a lost wake-up is never found: the run would wait for ever and the test fail. The tasks and the
launcher are written into the cluster's folder (the workers' working directory).
"""

from __future__ import annotations

import json
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pg_harness
import psycopg
import pytest
from harness import Worker, wait_until
from pg_harness import PgCluster

from conveyor.core.records import DEFAULT_MACHINE
from conveyor.engine import TriggerOptions
from conveyor.sdk.client import get_client
from conveyor.store.postgres import listen as pg_listen

from .conftest import clusters

TASKS = """
import asyncio, json, os, time
from conveyor import Queue, task

@task("wake-run", queue=Queue("wake"))
async def wake_run(payload):
    with open(os.path.join(os.environ["E2E_DIR"], "starts.log"), "a") as f:
        f.write(json.dumps({"n": payload["n"], "t": time.time(), "pid": os.getpid()}) + "\\n")
    await asyncio.sleep(payload.get("sleep", 0))
"""

LAUNCHER = """
import asyncio, sys
from conveyor.worker.main import build_worker, serve
from conveyor.worker.worker import WorkerOptions

worker = build_worker(["wake_tasks"], WorkerOptions(concurrency=int(sys.argv[1]), lease=5.0, renew=1.0))
worker.engine.store.change_token = lambda: 0  # the safety poll never sees a change
asyncio.run(serve(worker))
"""

PROMPT = 2.0  # seconds: far above a wake-up's latency, far below "never"


@pytest.fixture
def make_cluster(tmp_path: Path, postgres_url: str) -> Iterator[Callable[..., PgCluster]]:
    def build(directory: Path) -> PgCluster:
        (directory / "wake_tasks.py").write_text(textwrap.dedent(TASKS))
        (directory / "wake_worker.py").write_text(textwrap.dedent(LAUNCHER))
        return pg_harness.make_pg_cluster(directory, "wake_tasks", postgres_url, pg_harness.fresh_schema())

    with clusters(tmp_path, build, lambda c: pg_harness.drop_schema(c.server_url, c.schema)) as make:
        yield make


def start(cluster: PgCluster, concurrency: int) -> Worker:
    proc, log = cluster.spawn([sys.executable, "wake_worker.py", str(concurrency)], "worker")
    worker = Worker(proc, log, time.monotonic())
    cluster.workers.append(worker)
    return worker


def advertising(cluster: PgCluster) -> set[int]:
    """The LISTEN sessions that advertise a free slot for queue `wake` now."""
    with psycopg.connect(cluster.server_url, autocommit=True) as conn:
        locks = pg_listen.worker_locks(conn.info.dbname, cluster.schema, "dev", "wake", DEFAULT_MACHINE, None)
        rows = conn.execute(
            "SELECT DISTINCT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 AND granted"
            " AND classid = %s::int4::oid",
            [locks.avail[0]],
        ).fetchall()
    return {r[0] for r in rows}


def up(cluster: PgCluster, workers: list[Worker]) -> None:
    """Until the workers registered and each advertises (idle, listening on its channels)."""
    cluster.wait_ready(workers)
    wait_until(lambda: len(advertising(cluster)) >= len(cluster.workers), 30, "every worker to advertise")


def starts(cluster: PgCluster) -> dict[int, dict[str, Any]]:
    path = cluster.dir / "starts.log"
    if not path.exists():
        return {}
    return {r["n"]: r for r in map(json.loads, path.read_text().splitlines())}


def trigger(n: int, sleep: float = 0.0) -> float:
    at = time.time()
    get_client().trigger("wake-run", {"n": n, "sleep": sleep})
    return at


def started_within(cluster: PgCluster, triggered: dict[int, float], seconds: float) -> dict[int, float]:
    """Wait (up to 60 s) until every triggered run started; -> each run's trigger -> start
    latency, all checked against `seconds`."""
    wait_until(lambda: set(triggered) <= set(starts(cluster)), 60, "every run to start")
    got = starts(cluster)
    late = {n: got[n]["t"] - at for n, at in triggered.items() if got[n]["t"] - at > seconds}
    assert not late, f"runs that waited: {late}"
    return {n: got[n]["t"] - at for n, at in triggered.items()}


def test_each_new_run_starts_at_once_on_one_idle_worker(make_cluster):
    cluster = make_cluster()
    up(cluster, [start(cluster, 4) for _ in range(3)])
    triggered = {}
    for n in range(40):
        triggered[n] = trigger(n)
        wait_until(lambda n=n: n in starts(cluster), 30, f"run {n} to start")
        time.sleep(0.01)
    latencies = started_within(cluster, triggered, PROMPT)
    print(f"p50 {sorted(latencies.values())[len(latencies) // 2] * 1000:.1f} ms over {len(latencies)} runs")
    # A batch wakes every worker of the queue.
    engine = get_client().engine
    record = engine.task("wake-run")
    batch = [engine.prepare(record, json.dumps({"n": n}), TriggerOptions()) for n in range(100, 130)]
    at = time.time()
    engine.insert(batch)
    started_within(cluster, dict.fromkeys(range(100, 130), at), PROMPT)


def test_a_run_for_a_full_worker_goes_to_one_with_a_free_slot(make_cluster):
    """Workers of one slot each; three runs triggered at the same instant mostly pick the same
    idle worker (the lowest advertised slot, before it can withdraw): it takes one and must pass
    the others on, or they would wait for its run to finish (1.5 s)."""
    cluster = make_cluster()
    up(cluster, [start(cluster, 1) for _ in range(3)])
    triggered: dict[int, float] = {}
    for round_ in range(4):
        barrier = threading.Barrier(3)

        def fire(n: int, barrier: threading.Barrier) -> None:
            barrier.wait(10)
            triggered[n] = trigger(n, sleep=1.5)

        threads = [threading.Thread(target=fire, args=(round_ * 3 + i, barrier)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        started_within(cluster, {n: at for n, at in triggered.items() if n >= round_ * 3}, 1.0)
        wait_until(lambda: len(advertising(cluster)) == 3, 30, "the workers to be idle again")


def test_a_killed_worker_does_not_swallow_wake_ups(make_cluster):
    cluster = make_cluster()
    workers = [start(cluster, 4) for _ in range(2)]
    up(cluster, workers)
    before = advertising(cluster)
    cluster.kill9(workers[0])
    # Its LISTEN session ends with it, and its adverts with the session.
    wait_until(lambda: len(advertising(cluster)) == 1, 10, "the dead worker's adverts to go")
    assert advertising(cluster) < before
    triggered = {}
    for n in range(20):
        triggered[n] = trigger(n)
        wait_until(lambda n=n: n in starts(cluster), 30, f"run {n} to start")
    started_within(cluster, triggered, PROMPT)
    assert {r["pid"] for r in starts(cluster).values()} == {workers[1].pid}


def test_a_stopping_worker_passes_on_what_it_was_picked_for(make_cluster):
    cluster = make_cluster()
    workers = [start(cluster, 4) for _ in range(2)]
    up(cluster, workers)
    triggered = {}
    for n in range(60):
        triggered[n] = trigger(n, sleep=0.02)
        if n == 20:
            workers[0].proc.terminate()  # graceful: withdraws, waits for its pickers, forwards
        time.sleep(0.01)
    workers[0].proc.wait(30)
    started_within(cluster, triggered, PROMPT)
