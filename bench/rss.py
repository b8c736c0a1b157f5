"""Worker memory: RSS when idle, and its growth over 100,000 runs.

Starts 2 `conveyor worker --modules bench_tasks --concurrency C` processes on a fresh SQLite store, waits until both
are registered and idle, reads VmRSS from /proc/<pid>/status, then pushes BENCH_RSS_RUNS (100,000) no-op runs through
them in waves of 10,000 (batch_trigger, 1,000 per call) and reads VmRSS after each wave, once every run of the wave is
COMPLETED. Growth is reported two ways:
  idle -> final   (the gate: < 10 %)
  warm -> final   (after the first wave, when caches such as SQLite's page cache are full; a leak shows here)
Gates: idle <= 80 MB, growth < 10 %.

Run: `.venv/bin/python bench/rss.py` (also part of `make bench`). Env: BENCH_RSS_RUNS, BENCH_RSS_WAVE,
CONVEYOR_BENCH_CONCURRENCY, CONVEYOR_SQLITE_SYNCHRONOUS, BENCH_RESULTS.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.environ.get("BENCH_RESULTS", os.path.join(BENCH_DIR, "results"))
DB_PATH = os.path.abspath(os.environ.get("CONVEYOR_BENCH_RSS_DB", "/tmp/conveyor-bench/rss.db"))
TOTAL = int(os.environ.get("BENCH_RSS_RUNS", "100000"))
WAVE = int(os.environ.get("BENCH_RSS_WAVE", "10000"))
CONCURRENCY = int(os.environ.get("CONVEYOR_BENCH_CONCURRENCY", "100"))
SYNCHRONOUS = os.environ.get("CONVEYOR_SQLITE_SYNCHRONOUS", "normal").lower()
IDLE_GATE_MB = 80.0
GROWTH_GATE = 0.10

os.environ["CONVEYOR_DATABASE_URL"] = f"sqlite:///{DB_PATH}"
os.environ["CONVEYOR_SQLITE_SYNCHRONOUS"] = SYNCHRONOUS
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)


def status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def rss_mb(pid: int) -> float:
    return status_kb(pid, "VmRSS") / 1024.0


def wait_for(predicate, timeout: float, what: str, every: float = 0.1) -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(every)


def main() -> dict[str, object]:
    os.makedirs(os.path.dirname(DB_PATH), exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(DB_PATH + suffix):
            os.remove(DB_PATH + suffix)
    import conveyor

    conveyor.configure(database_url=f"sqlite:///{DB_PATH}", synchronous=SYNCHRONOUS)
    import bench_tasks

    conveyor.get_client().engine  # noqa: B018 - creates the schema before the workers start
    db = sqlite3.connect(DB_PATH, timeout=30, isolation_level=None)
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "conveyor"),
        "worker",
        "--modules",
        "bench_tasks",
        "--concurrency",
        str(CONCURRENCY),
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (BENCH_DIR, env.get("PYTHONPATH", "")) if p)
    os.makedirs("/tmp/conveyor-bench", exist_ok=True)
    logs = [open(f"/tmp/conveyor-bench/rss-worker-{i}.log", "ab") for i in range(2)]  # noqa: SIM115
    procs = [
        subprocess.Popen(cmd, cwd=BENCH_DIR, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        for log in logs
    ]
    pids = [p.pid for p in procs]
    try:
        wait_for(lambda: db.execute("SELECT count(*) FROM workers").fetchone()[0] >= 2, 60, "2 workers to register")
        time.sleep(3.0)  # idle: registered, maintenance ran, nothing to do
        idle = [rss_mb(pid) for pid in pids]
        print(f"[rss] idle VmRSS per worker: {', '.join(f'{x:.1f} MB' for x in idle)} (load {load()})", flush=True)
        waves: list[dict[str, object]] = []
        done = 0
        t_start = time.time()
        while done < TOTAL:
            n = min(WAVE, TOTAL - done)
            for i in range(0, n, 1000):
                bench_tasks.noop.batch_trigger([None] * min(1000, n - i))
            done += n
            wait_for(
                lambda target=done: (
                    db.execute("SELECT count(*) FROM runs WHERE status = 'COMPLETED'").fetchone()[0] >= target
                ),
                600,
                f"{done} runs to complete",
                every=0.2,
            )
            rss = [rss_mb(pid) for pid in pids]
            waves.append({"runs": done, "rss_mb": rss})
            print(f"[rss] after {done:>7,} runs: {', '.join(f'{x:.1f} MB' for x in rss)}", flush=True)
        elapsed = time.time() - t_start
        hwm = [status_kb(pid, "VmHWM") / 1024.0 for pid in pids]
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, 15)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()
        for log in logs:
            log.close()
    warm = waves[0]["rss_mb"]
    final = waves[-1]["rss_mb"]
    growth_idle = max(f / i - 1 for f, i in zip(final, idle, strict=True))  # type: ignore[arg-type]
    growth_warm = max(f / w - 1 for f, w in zip(final, warm, strict=True))  # type: ignore[arg-type]
    doc: dict[str, object] = {
        "synchronous": SYNCHRONOUS.upper(),
        "concurrency": CONCURRENCY,
        "runs": TOTAL,
        "seconds": elapsed,
        "idle_mb": idle,
        "waves": waves,
        "hwm_mb": hwm,
        "growth_idle_to_final": growth_idle,
        "growth_warm_to_final": growth_warm,
        "idle_ok": max(idle) <= IDLE_GATE_MB,
        "growth_ok": growth_idle < GROWTH_GATE,
        "load": load(),
    }
    print(
        f"[rss sync={SYNCHRONOUS.upper()}] idle max {max(idle):.1f} MB (gate <= {IDLE_GATE_MB:.0f}): "
        f"{'PASS' if doc['idle_ok'] else 'FAIL'}; growth over {TOTAL:,} runs idle->final {100 * growth_idle:+.1f} % "
        f"(gate < {100 * GROWTH_GATE:.0f} %): {'PASS' if doc['growth_ok'] else 'FAIL'}; warm->final "
        f"{100 * growth_warm:+.1f} %; peak (VmHWM) {max(hwm):.1f} MB",
        flush=True,
    )
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, "conveyor-rss.json"), "w") as f:
        json.dump(doc, f, indent=1)
    return doc


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


if __name__ == "__main__":
    main()
