# Vendored copy of ../shared/peer-bench/common.py (the peer benchmark harness), verbatim below this header.
# Used only when $PEER_BENCH_DIR (default ../shared/peer-bench) is absent; see bench/_harness.py.
"""Shared harness for the peer job-queue benchmarks.

Each <system>_bench.py module defines a small adapter object and calls main(adapter).
Workloads (same for every system):
  W1  enqueue N no-op jobs from one process: one-by-one, and bulk API where one exists.
  W2  N "count" jobs pre-enqueued while no worker runs; start the workers; rate is
      N / (last job start - first job start) ("drain"), and also N / (last - worker launch)
      ("wall", includes worker boot).
  W3  idle system, workers running; 200 sequential jobs; latency = job start time.time()
      (pushed to Redis db 15 by the job) - time.time() just before the enqueue call.
Job-side bookkeeping always goes to Redis db 15 (one INCR per W2 job, one RPUSH per W3 job),
for every system, so that cost is identical across systems.
Env: BENCH_N (10000), BENCH_LAT_N (200), BENCH_RUNS (3), BENCH_ONLY (e.g. "w1,w3").
"""
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time

import redis

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
VENV_BIN = os.path.dirname(PY)
N = int(os.environ.get("BENCH_N", "10000"))
LAT_N = int(os.environ.get("BENCH_LAT_N", "200"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
ONLY = [w for w in os.environ.get("BENCH_ONLY", "w1,w2,w3").split(",") if w]
PG = "postgresql://postgres:postgres@127.0.0.1:5432/"
RESULTS_DIR = os.environ.get("BENCH_RESULTS", os.path.join(HERE, "results"))
LOG_DIR = "/tmp/peers-logs"

_sink = None


def sink():
    global _sink
    if _sink is None:
        _sink = redis.Redis(host="127.0.0.1", port=6379, db=15)
    return _sink


# ---------------- job-side helpers (run inside workers) ----------------
def job_count(n):
    t = time.time()
    c = sink().incr("b:done")
    if c == 1:
        sink().set("b:first", repr(t))
    if c == n:
        sink().set("b:last", repr(time.time()))


def job_lat():
    sink().rpush("b:lat", repr(time.time()))


# ---------------- harness ----------------
def reset_sink():
    sink().delete("b:done", "b:first", "b:last", "b:lat")


def start_workers(cmds, env=None, tag="w"):
    os.makedirs(LOG_DIR, exist_ok=True)
    procs = []
    e = dict(os.environ)
    e["PYTHONPATH"] = HERE + os.pathsep + e.get("PYTHONPATH", "")
    if env:
        e.update(env)
    for i, c in enumerate(cmds):
        log = open(os.path.join(LOG_DIR, f"{tag}-{i}.log"), "ab")
        procs.append(subprocess.Popen(c, cwd=HERE, env=e, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def stop_workers(procs, grace=10):
    # each worker was started in its own session; signal only that process group (pgid == our child's pid)
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def pct(xs, q):
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100.0
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


def w1(a):
    out = {}
    a.reset()
    el = a.w1_single(N)
    out["w1_single"] = N / el
    if getattr(a, "w1_bulk", None):
        a.reset()
        el = a.w1_bulk(N)
        out["w1_bulk"] = N / el
    a.reset()
    return out


def w2(a, timeout=600):
    a.reset()
    reset_sink()
    a.w2_fill(N)
    t_launch = time.time()
    procs = start_workers(a.worker_cmds(), getattr(a, "worker_env", None), tag=a.name + "-w2")
    try:
        s = sink()
        while s.get("b:last") is None:
            if time.time() - t_launch > timeout:
                raise RuntimeError(f"W2 timeout, done={s.get('b:done')}")
            time.sleep(0.02)
        first, last = float(s.get("b:first")), float(s.get("b:last"))
    finally:
        stop_workers(procs)
    a.reset()
    return {"w2_drain": N / (last - first), "w2_wall": N / (last - t_launch),
            "w2_boot_s": first - t_launch}


def w3(a):
    a.reset()
    reset_sink()
    procs = start_workers(a.worker_cmds(), getattr(a, "worker_env", None), tag=a.name + "-w3")
    s = sink()
    try:
        for _ in range(5):  # warm-up, also waits for workers to boot
            a.lat_enqueue()
            if s.blpop("b:lat", 120) is None:
                raise RuntimeError("W3 warm-up job never ran")
        time.sleep(0.5)
        s.delete("b:lat")
        lats = []
        for _ in range(LAT_N):
            time.sleep(random.uniform(0.0, 0.02))  # de-phase from any polling loop
            t0 = time.time()
            a.lat_enqueue()
            r = s.blpop("b:lat", 60)
            if r is None:
                raise RuntimeError("W3 job lost")
            lats.append((float(r[1]) - t0) * 1000.0)
    finally:
        stop_workers(procs)
    a.reset()
    return {"w3_p50_ms": pct(lats, 50), "w3_p95_ms": pct(lats, 95), "w3_p99_ms": pct(lats, 99)}


def main(a):
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        a.worker_main()
        return
    os.makedirs(RESULTS_DIR, exist_ok=True)
    a.setup()
    runs = []
    for r in range(RUNS):
        res = {}
        if "w1" in ONLY:
            res.update(w1(a))
        if "w2" in ONLY:
            res.update(w2(a))
        if "w3" in ONLY:
            res.update(w3(a))
        if hasattr(a, "extra"):
            res.update(a.extra())
        print(f"[{a.name}] run {r + 1}: " + json.dumps({k: round(v, 2) for k, v in res.items()}), flush=True)
        runs.append(res)
    med = {k: statistics.median([x[k] for x in runs if k in x]) for k in runs[0]}
    doc = {"system": a.name, "version": a.version, "settings": a.settings, "N": N, "LAT_N": LAT_N,
           "runs": runs, "median": med}
    suffix = os.environ.get("BENCH_TAG", "")
    with open(os.path.join(RESULTS_DIR, f"{a.name}{suffix}.json"), "w") as f:
        json.dump(doc, f, indent=1)
    print(f"[{a.name}] MEDIAN: " + json.dumps({k: round(v, 2) for k, v in med.items()}), flush=True)
    if hasattr(a, "teardown"):
        a.teardown()
