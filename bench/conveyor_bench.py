"""Conveyor adapter for the peer benchmark harness (../shared/peer-bench/common.py).

Workloads are the harness's own functions (`common.w1`, `common.w2`, `common.w3`), unchanged, so the numbers compare
with RESULTS.md and with peers measured in the same run:

  W1 single  `noop.trigger(None)` N times from this process.
  W1 bulk    `noop.batch_trigger([None] * 1000)` N / 1000 times.
  W2         N `count` runs queued by batch_trigger while no worker runs, then 2 processes of
             `conveyor worker --modules bench_tasks --concurrency C`; drain = N / (last start - first start).
             Also completions/s: N / (last `finished_at` in the store - first start), read from the store after the
             workers stopped gracefully (every run must be COMPLETED).
  W3         200 sequential `lat.trigger(None)`, start time - time just before the trigger, workers idle.

SQLite store (WAL) at $CONVEYOR_BENCH_DB (default /tmp/conveyor-bench/bench.db), synchronous from
$CONVEYOR_SQLITE_SYNCHRONOUS (default NORMAL, Conveyor's default) and printed beside every number. Default features
are on: attempt rows, the event log, log capture and heartbeats cannot be turned off.

PostgreSQL store instead: $CONVEYOR_BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test (the schema
`conveyor_bench` unless the URL says `?schema=`; dropped and re-created at setup), or `bench/run.py --store postgres`.
Workers are woken by LISTEN/NOTIFY; `synchronous_commit` is printed beside every number.

Env: the harness's BENCH_N, BENCH_LAT_N, BENCH_RUNS, BENCH_ONLY, BENCH_RESULTS, BENCH_TAG; plus
CONVEYOR_BENCH_CONCURRENCY (per worker, default 100) and PEER_BENCH_DIR (see _harness.py).
Run: `.venv/bin/python bench/conveyor_bench.py` (or `make bench` for Conveyor next to the peers).
"""

from __future__ import annotations

import importlib
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

from _harness import load_common  # noqa: E402

common = load_common()

DB_PATH = os.path.abspath(os.environ.get("CONVEYOR_BENCH_DB", "/tmp/conveyor-bench/bench.db"))
PG_URL = os.environ.get("CONVEYOR_BENCH_DATABASE_URL", "")
if PG_URL and "schema=" not in PG_URL:
    PG_URL += ("&" if "?" in PG_URL else "?") + "schema=conveyor_bench"
SYNCHRONOUS = os.environ.get("CONVEYOR_SQLITE_SYNCHRONOUS", "normal").lower()
CONCURRENCY = int(os.environ.get("CONVEYOR_BENCH_CONCURRENCY", "100"))
WORKERS = int(os.environ.get("CONVEYOR_BENCH_WORKERS", "2"))  # the harness's workloads use 2
MODULES = os.environ.get("CONVEYOR_BENCH_MODULES", "bench_tasks")  # profiling adds ",bench_trace"
RESULTS_DIR = os.environ.get("BENCH_RESULTS", os.path.join(BENCH_DIR, "results"))
BULK = 1000
RUN_TABLES = ("runs", "attempts", "run_events", "run_logs", "run_tags", "idempotency_keys")
SYNC_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}

# The store's location and durability reach this process (configure below) and the workers (inherited env).
DB_URL = PG_URL or f"sqlite:///{DB_PATH}"
os.environ["CONVEYOR_DATABASE_URL"] = DB_URL
os.environ["CONVEYOR_SQLITE_SYNCHRONOUS"] = SYNCHRONOUS


def code_version() -> str:
    """Which Conveyor is measured: the git commit of the source tree it is imported from (+dirty) and its path."""
    import conveyor

    src = os.path.dirname(os.path.dirname(os.path.abspath(conveyor.__file__)))
    try:
        rev = subprocess.run(
            ["git", "-C", src, "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{rev or 'unknown commit'} ({src})"


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class A:
    name = "conveyor"

    def __init__(self) -> None:
        import conveyor

        self.version = conveyor.__version__
        store = (
            "PostgreSQL store (psycopg 3, LISTEN/NOTIFY wake-ups)"
            if PG_URL
            else f"SQLite WAL file store, synchronous={SYNCHRONOUS.upper()}"
        )
        wake = "NOTIFY" if PG_URL else "UDP"
        self.settings = (
            f"{store}; 2 x `conveyor worker --concurrency "
            f"{CONCURRENCY}` processes (async tasks, one queue); {wake} wake-ups; "
            "attempt rows, event log, log capture, "
            "heartbeats on (always)"
        )
        self.db: Any = None  # sqlite3 or psycopg connection, beside the store's own
        self._w2_open = False
        self._w2_stats: dict[str, float] = {}
        if os.environ.get("CONVEYOR_BENCH_W1_SINGLE_ONLY"):  # the harness skips a falsy w1_bulk
            self.w1_bulk = None  # type: ignore[method-assign,assignment]

    # --- harness interface --------------------------------------------------------------------------
    def setup(self) -> None:
        experiment = os.environ.get("CONVEYOR_BENCH_EXP", "")
        if experiment:  # prototypes of optimizations (bench/exp_*.py); workers need --modules ...,exp_<name> too
            importlib.import_module(f"exp_{experiment}")

        import conveyor

        if PG_URL:
            import psycopg

            from conveyor.store.postgres.driver import split_url

            conninfo, schema = split_url(PG_URL)
            self.schema = schema or "conveyor_bench"
            self.db = psycopg.connect(conninfo, autocommit=True)
            self.db.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
            self.client = conveyor.configure(database_url=PG_URL)
        else:
            os.makedirs(os.path.dirname(DB_PATH), exist_ok=True)
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(DB_PATH + suffix):
                    os.remove(DB_PATH + suffix)
            self.client = conveyor.configure(database_url=f"sqlite:///{DB_PATH}", synchronous=SYNCHRONOUS)
        import bench_tasks

        self.tasks = bench_tasks
        self.client.engine  # noqa: B018 - open (and create) the store now, not inside a timed loop
        if not PG_URL:
            self.db = sqlite3.connect(DB_PATH, timeout=30, isolation_level=None)
        self.synchronous = self.store_synchronous()
        self.code = code_version()
        self.preflight()

    def preflight(self) -> None:
        """Fail in seconds, not after the harness's 600 s W2 timeout, if a worker cannot even import its modules."""
        env = dict(os.environ, **self.worker_env)
        probe = [sys.executable, "-c", f"import conveyor.cli.main, conveyor.worker.main; import {MODULES}"]
        done = subprocess.run(probe, cwd=common.HERE, env=env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise SystemExit(f"a worker could not start (import failed):\n{done.stderr[-3000:]}")

    def store_synchronous(self) -> str:
        """The synchronous mode as the store's own connection reports it."""
        if PG_URL:
            row = self.db.execute("SHOW synchronous_commit").fetchone()
            return f"pg:synchronous_commit={row[0] if row else '?'}"
        conn = self.client.store._conn()  # type: ignore[attr-defined]
        return SYNC_NAMES.get(int(conn.execute("PRAGMA synchronous").fetchone()[0]), "?")

    def reset(self) -> None:
        if self._w2_open:
            self._w2_open = False
            self._w2_stats = self._completion_stats()
        if PG_URL:
            tables = ", ".join(f'"{self.schema}".{t}' for t in RUN_TABLES)
            self.db.execute(f"TRUNCATE {tables}")
            return
        present = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table in RUN_TABLES:
            if table in present:  # the schema may grow or rename tables; clear what holds runs
                self.db.execute(f"DELETE FROM {table}")
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def w1_single(self, n: int) -> float:
        trigger = self.tasks.noop.trigger
        t = time.perf_counter()
        for _ in range(n):
            trigger(None)
        return time.perf_counter() - t

    def w1_bulk(self, n: int) -> float:
        batch = self.tasks.noop.batch_trigger
        t = time.perf_counter()
        for i in range(0, n, BULK):
            batch([None] * min(BULK, n - i))
        return time.perf_counter() - t

    def w2_fill(self, n: int) -> None:
        for i in range(0, n, BULK):
            self.tasks.count.batch_trigger([n] * min(BULK, n - i))
        self._w2_open = True
        self._w2_n = n

    def worker_cmds(self) -> list[list[str]]:
        cmd = [
            os.path.join(common.VENV_BIN, "conveyor"),
            "worker",
            "--modules",
            MODULES,
            "--concurrency",
            str(CONCURRENCY),
        ]
        return [list(cmd) for _ in range(WORKERS)]

    @property
    def worker_env(self) -> dict[str, str]:
        path = os.pathsep.join(p for p in (BENCH_DIR, common.HERE, os.environ.get("PYTHONPATH", "")) if p)
        env = {"PYTHONPATH": path}
        # Experiments: libpq options for the workers' sessions only (e.g. "-c synchronous_commit=off").
        if os.environ.get("CONVEYOR_BENCH_WORKER_PGOPTIONS"):
            env["PGOPTIONS"] = os.environ["CONVEYOR_BENCH_WORKER_PGOPTIONS"]
        return env

    def lat_enqueue(self) -> None:
        self.tasks.lat.trigger(None)

    def extra(self) -> dict[str, float]:
        stats, self._w2_stats = self._w2_stats, {}
        return stats

    # --- W2 completions ------------------------------------------------------------------------------
    def _completion_stats(self) -> dict[str, float]:
        """After the W2 workers stopped (gracefully: in-flight runs finish): how fast runs reached COMPLETED."""
        n = self._w2_n
        table = f'"{self.schema}".runs' if PG_URL else "runs"
        completed, last_finished, first_started = self.db.execute(
            f"SELECT count(*), max(finished_at), min(started_at) FROM {table} WHERE status = 'COMPLETED'"
        ).fetchone()
        first = common.sink().get("b:first")
        start = float(first) if first is not None else first_started
        out = {"w2_completed_frac": completed / n}
        if completed and last_finished and last_finished > start:
            out["w2_completions_per_s"] = completed / (last_finished - start)
        return out


def main() -> None:
    a = A()
    os.makedirs(RESULTS_DIR, exist_ok=True)
    a.setup()
    print(
        f"[conveyor] {'' if PG_URL else 'SQLite '}synchronous={a.synchronous}, N={common.N}, LAT_N={common.LAT_N}, "
        f"concurrency {CONCURRENCY} x 2 workers, db {a.client.store.location}, code {a.code}",
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    loads: list[dict[str, str]] = []
    for r in range(common.RUNS):
        res: dict[str, float] = {}
        load_before = load()
        if "w1" in common.ONLY:
            res.update(common.w1(a))
        if "w2" in common.ONLY:
            res.update(common.w2(a))
        if "w3" in common.ONLY:
            res.update(common.w3(a))
        res.update(a.extra())
        loads.append({"before": load_before, "after": load()})
        shown = json.dumps({k: round(v, 2) for k, v in res.items()})
        print(f"[conveyor sync={a.synchronous}] run {r + 1} (load {load_before}): {shown}", flush=True)
        runs.append(res)
    keys = list(dict.fromkeys(k for x in runs for k in x))
    med = {k: statistics.median([x[k] for x in runs if k in x]) for k in keys}
    doc = {
        "system": a.name,
        "version": a.version,
        "settings": a.settings,
        "synchronous": a.synchronous,
        "code": a.code,
        "concurrency": CONCURRENCY,
        "N": common.N,
        "LAT_N": common.LAT_N,
        "load": loads,
        "runs": runs,
        "median": med,
    }
    suffix = os.environ.get("BENCH_TAG", "")
    with open(os.path.join(RESULTS_DIR, f"{a.name}{suffix}.json"), "w") as f:
        json.dump(doc, f, indent=1)
    shown = json.dumps({k: round(v, 2) for k, v in med.items()})
    print(f"[conveyor sync={a.synchronous}] MEDIAN: {shown}", flush=True)


if __name__ == "__main__":
    main()
