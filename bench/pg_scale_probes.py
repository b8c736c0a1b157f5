"""Measurements of bench/pg_scale.py beside the drain: triggers, reads (`conveyor queues`, `conveyor runs
list`), retention purges, and EXPLAIN (ANALYZE, BUFFERS) of the exact statements they issue.

Statements are captured as the store issues them (`PostgresTx._exec` wrapped in this process only), then
rendered with their parameters (psycopg's client-side binding) and explained inside a transaction that is
rolled back, so an explained UPDATE or DELETE changes nothing.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

# `conveyor runs list` filters measured at scale (CLI flags -> Runs.list keywords). Rare and absent
# statuses matter most: a filter that matches few rows must not walk the whole table to find them.
RUN_LISTS: list[tuple[str, list[str], dict[str, Any]]] = [
    ("newest 20", [], {}),
    ("--status FAILED (5 %)", ["--status", "FAILED"], {"status": ["FAILED"]}),
    ("--status EXPIRED (0.5 %)", ["--status", "EXPIRED"], {"status": ["EXPIRED"]}),
    ("--status DELAYED (none)", ["--status", "DELAYED"], {"status": ["DELAYED"]}),
    ("--status QUEUED (1M, other queue)", ["--status", "QUEUED"], {"status": ["QUEUED"]}),
    ("--status FAILED,CRASHED", ["--status", "FAILED,CRASHED"], {"status": ["FAILED", "CRASHED"]}),
    ("--status COMPLETED (90 %)", ["--status", "COMPLETED"], {"status": ["COMPLETED"]}),
    ("--task task-07", ["--task", "task-07"], {"task": "task-07"}),
    (
        "--task task-07 --status FAILED",
        ["--task", "task-07", "--status", "FAILED"],
        {"task": "task-07", "status": ["FAILED"]},
    ),
    ("--task nosuch", ["--task", "nosuch"], {"task": "nosuch"}),
    ("--tag tenant:42 (20k runs)", ["--tag", "tenant:42"], {"tags": ["tenant:42"]}),
    ("--tag priority (400k runs)", ["--tag", "priority"], {"tags": ["priority"]}),
]


def _median_ms(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    out, times = None, []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times), out


@contextmanager
def captured() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """The (statement, parameters) the PostgreSQL store issues in this process while inside."""
    from conveyor.store.postgres.tx import PostgresTx

    seen: list[tuple[str, dict[str, Any]]] = []
    original = PostgresTx._exec

    def _exec(self: Any, text: str, params: dict[str, Any] | None = None) -> Any:
        seen.append((self._sql(text), self._params(dict(params or {}))))
        return original(self, text, params)

    PostgresTx._exec = _exec  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        PostgresTx._exec = original  # type: ignore[method-assign]


def explain(db: psycopg.Connection, statement: str, params: dict[str, Any] | None = None, setup: str = "") -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of one statement with its parameters, in a rolled-back transaction."""
    text = psycopg.ClientCursor(db).mogrify(statement, params or None) if params else statement
    db.execute("BEGIN")
    try:
        if setup:
            db.execute(setup)
        rows = db.execute(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {text}").fetchall()
    finally:
        db.execute("ROLLBACK")
    return "\n".join(r[0] for r in rows)


def summary(plan: str) -> str:
    """The plan's scans and its execution time, on one line."""
    nodes = []
    for line in plan.splitlines():
        s = line.strip().lstrip("-> ").strip()
        if any(k in s for k in ("Scan", "Aggregate", "Sort ", "Hash Join", "Nested Loop", "Merge")):
            nodes.append(s.split("  (")[0].split(" (actual")[0])
        if s.startswith("Execution Time"):
            nodes.append(s)
    return "; ".join(nodes)


def reads(client: Any, db: psycopg.Connection, url: str, venv_bin: str, repeat: int = 5) -> dict[str, Any]:
    """Latency of `conveyor queues` / `conveyor runs list` (in-process median of `repeat`, and the CLI
    command's wall time, which adds the Python start) and the plans of every statement they issue."""
    out: dict[str, Any] = {}
    env = dict(os.environ, CONVEYOR_DATABASE_URL=url)

    def cli(args: list[str]) -> float:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            subprocess.run([os.path.join(venv_bin, "conveyor"), *args], env=env, capture_output=True, check=True)
            times.append(1000 * (time.perf_counter() - t))
        return statistics.median(times)

    cases: list[tuple[str, list[str], Callable[[], Any]]] = [
        ("conveyor queues", ["queues"], client.queues.list),
        ("conveyor queues (a live worker)", ["queues"], client.queues.list),
    ]
    for name, flags, kwargs in RUN_LISTS:
        cases.append(
            (f"runs list {name}", ["runs", "list", *flags], lambda kw=kwargs: client.runs.list(limit=20, **kw))
        )
    schema = client.engine.store.schema
    for name, args, call in cases:
        # With a live worker, `unservable` compares each queue's queued runs with the workers'
        # machines and versions (QUEUED_BY_MACHINE); with none, it counts them (QUEUED_COUNT).
        live = "live worker" in name
        db.execute(f'DELETE FROM "{schema}".workers')
        if live:
            db.execute(
                f'INSERT INTO "{schema}".workers (id, environment, host, pid, address, queues, machine, version, '
                "started_at, last_seen_at) VALUES ('worker_probe', 'dev', 'probe', 1, NULL, '[]', 'small-1x', NULL, "
                "extract(epoch from now()), extract(epoch from now()) + 3600)"
            )
        call()  # warm: prepared connections, caches
        ms, result = _median_ms(call, repeat)
        with captured() as seen:
            call()
        plans = [explain(db, text, params) for text, params in seen if text.lstrip().upper().startswith("SELECT")]
        rows = len(result) if isinstance(result, list) else len(result.data)
        out[name] = {
            "ms": round(ms, 2),
            "cli_ms": round(cli(args), 1),
            "rows": rows,
            "plans": plans,
            "summary": [summary(p) for p in plans],
        }
        if live:
            db.execute(f'DELETE FROM "{schema}".workers')
    return out


def triggers(task: Any, one_by_one: int, batches: int) -> dict[str, float]:
    """W1 in this process: `task.trigger` one by one, then `batch_trigger` of 1,000 `batches` times."""
    t = time.perf_counter()
    for i in range(one_by_one):
        task.trigger(i)
    single = one_by_one / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(batches):
        task.batch_trigger(list(range(1000)))
    batch = batches * 1000 / (time.perf_counter() - t)
    return {"w1_single": single, "w1_batch": batch}


def purge(engine: Any, db: psycopg.Connection, schema: str, days: float, batches: int) -> dict[str, Any]:
    """`batches` retention batches of 500 (Engine.purge: one transaction each), timed; one more batch
    inside an open transaction, to list the locks it holds at its end; and a prober (one trigger and
    one claim of another queue, back to back) beside the purges, against the same prober alone."""
    from conveyor.core.records import ClaimRequest, QueueSpec, TaskRecord
    from conveyor.engine import TriggerOptions

    task = TaskRecord(task_id="purge-probe", queue="purge-probe")
    engine.register([task], [QueueSpec("purge-probe", None)])

    def probe(stop: threading.Event, lat: list[float]) -> None:
        while not stop.is_set():
            t = time.perf_counter()
            engine.insert([engine.prepare(task, "0", TriggerOptions())])
            engine.claim(ClaimRequest("dev", "probe", ["purge-probe"], ["purge-probe"], 1, 30.0))
            lat.append(1000 * (time.perf_counter() - t))

    def probed(work: Callable[[], Any], seconds: float | None = None) -> tuple[list[float], Any]:
        stop, lat = threading.Event(), []  # type: ignore[var-annotated]
        th = threading.Thread(target=probe, args=(stop, lat))
        th.start()
        try:
            result = work() if seconds is None else time.sleep(seconds)
        finally:
            stop.set()
            th.join()
        return lat, result

    def pct(xs: list[float], p: float) -> float:
        return sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")

    baseline, _ = probed(lambda: None, seconds=5.0)
    batch_ms: list[float] = []
    purged: list[int] = []

    def run_batches() -> None:
        for _ in range(batches):
            t = time.perf_counter()
            purged.append(engine.purge(days, 500))
            batch_ms.append(1000 * (time.perf_counter() - t))

    beside, _ = probed(run_batches)
    # One batch by hand, to read its own locks before COMMIT: relation locks only (row locks are
    # on the tuples and show in pg_locks only when someone waits for them).
    store = engine.store
    with store.transaction() as tx:
        t = time.perf_counter()
        n = tx.run_purge(engine.now - days * 86400.0, 500)
        held_ms = 1000 * (time.perf_counter() - t)
        locks = tx.conn.execute(
            "SELECT coalesce(c.relname, l.locktype), l.mode FROM pg_locks l "
            "LEFT JOIN pg_class c ON c.oid = l.relation WHERE l.pid = pg_backend_pid() AND l.granted "
            "AND l.locktype IN ('relation', 'advisory', 'tuple', 'object') ORDER BY 1"
        ).fetchall()
    modes = sorted({m for _, m in locks})
    return {
        "batches": batches,
        "purged": sum(purged),
        "batch_ms_p50": statistics.median(batch_ms),
        "batch_ms_max": max(batch_ms),
        "batch_ms_all": [round(x, 1) for x in batch_ms],
        "hand_batch": {"purged": n, "ms": round(held_ms, 1), "lock_modes": modes, "locks": [list(x) for x in locks]},
        "probe_alone_ms": {
            "n": len(baseline),
            "p50": statistics.median(baseline),
            "p99": pct(baseline, 0.99),
            "max": max(baseline),
        },
        "probe_beside_purge_ms": {
            "n": len(beside),
            "p50": statistics.median(beside),
            "p99": pct(beside, 0.99),
            "max": max(beside),
        },
    }


def purge_cli(url: str, venv_bin: str, older_than_days: float) -> dict[str, Any]:
    """`conveyor runs purge --older-than D --json`, timed (wall, including the Python start)."""
    env = dict(os.environ, CONVEYOR_DATABASE_URL=url)
    t = time.perf_counter()
    done = subprocess.run(
        [os.path.join(venv_bin, "conveyor"), "runs", "purge", "--older-than", str(older_than_days), "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return {"wall_s": time.perf_counter() - t, "output": done.stdout.strip()}
