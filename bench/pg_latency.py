"""PostgreSQL wake-up benchmarks: interleaved A/B rounds of the harness's workloads, and a W3 timeline.

A/B (`--variants`): each round runs `bench/conveyor_bench.py` once per variant, in turn (A, B, A, B, ...), so slow
drifts of a shared machine hit every variant alike; prints each variant's rounds, medians and the load average.
A variant is `name=path`, the path holding the `conveyor` package it imports (e.g. a copy of `src/` at another
commit; `.` or `src` = this tree's `src/`). Workloads as in the peer harness (W1 one by one, W2 drain, W3 idle
latency), unchanged, on schema conveyor_bench of the database.

  .venv/bin/python bench/pg_latency.py --variants base=/tmp/base/src,new=src --rounds 3 --only w3
  .venv/bin/python bench/pg_latency.py --variants new=src --only w3 --workers 4

Timeline (`--trace`): one W3 run of this tree with `bench/pg_trace.py` loaded into the workers; for each run, when
the trigger returned, the LISTEN thread got the notification, the loop handled the datagram, the claiming exchange
began and ended, the run was started, and its code began (the harness's stamp); plus what the other workers did
for the same trigger (empty claims).

Env: BENCH_N, BENCH_LAT_N as in the harness; CONVEYOR_BENCH_CONCURRENCY (100).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
PY = sys.executable
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
KEYS = {
    "w1": ["w1_single"],
    "w2": ["w2_drain", "w2_completions_per_s"],
    "w3": ["w3_p50_ms", "w3_p95_ms", "w3_p99_ms"],
}


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def src_path(path: str) -> str:
    path, plus, pgoptions = path.partition("+")
    if path in (".", "src"):
        path = os.path.join(REPO_DIR, "src")
    return os.path.abspath(path) + plus + pgoptions


def one_round(name: str, src: str, args: argparse.Namespace, out: str, r: int) -> dict[str, float]:
    src, _, pgoptions = src.partition("+")
    env = dict(
        os.environ,
        PYTHONPATH=src,
        BENCH_RUNS="1",
        BENCH_ONLY=args.only,
        BENCH_RESULTS=out,
        BENCH_TAG=f"-{name}-r{r}",
        CONVEYOR_BENCH_DATABASE_URL=args.database_url,
        CONVEYOR_BENCH_WORKERS=str(args.workers),
    )
    if pgoptions:
        env["CONVEYOR_BENCH_WORKER_PGOPTIONS"] = pgoptions
    if args.only == "w1":  # W1 alone: skip the bulk half
        env["CONVEYOR_BENCH_W1_SINGLE_ONLY"] = "1"
    done = subprocess.run(
        [PY, os.path.join(BENCH_DIR, "conveyor_bench.py")], cwd=BENCH_DIR, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"variant {name} round {r} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    with open(os.path.join(out, f"conveyor-{name}-r{r}.json")) as f:
        return dict(json.load(f)["runs"][0])


def ab(args: argparse.Namespace) -> None:
    variants = [v.split("=", 1) for v in args.variants.split(",")]
    # name=path+PGOPTIONS: the variant's workers connect with those libpq options (an experiment)
    out = tempfile.mkdtemp(prefix="pg-latency-")
    keys = [k for w in args.only.split(",") for k in KEYS.get(w, [])]
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name, _ in variants}
    loads = [load()]
    print(f"load at start {loads[0]}; {args.rounds} rounds of {', '.join(n for n, _ in variants)}; {args.only}")
    for r in range(1, args.rounds + 1):
        order = variants if r % 2 or not args.alternate else variants[::-1]
        for name, path in order:
            before = load()
            res = one_round(name, src_path(path), args, out, r)
            rounds[name].append(res)
            shown = "  ".join(f"{k}={res[k]:,.2f}" for k in keys if k in res)
            print(f"  round {r} {name:>8} (load {before}): {shown}", flush=True)
        loads.append(load())
    print(f"load at end {load()}")
    print(f"{'median':>8}  " + "  ".join(f"{k:>22}" for k in keys))
    for name, _ in variants:
        meds = [statistics.median([x[k] for x in rounds[name] if k in x]) for k in keys]
        print(f"{name:>8}  " + "  ".join(f"{m:>22,.2f}" for m in meds))
    shutil.rmtree(out, ignore_errors=True)


# --- timeline ----------------------------------------------------------------------------------
def trace(args: argparse.Namespace) -> None:
    trace_dir = tempfile.mkdtemp(prefix="pg-trace-")
    os.environ["CONVEYOR_BENCH_DATABASE_URL"] = args.database_url
    os.environ["CONVEYOR_BENCH_MODULES"] = "bench_tasks,pg_trace"
    os.environ["CONVEYOR_BENCH_TRACE_DIR"] = trace_dir
    os.environ["CONVEYOR_BENCH_WORKERS"] = str(args.workers)
    sys.path.insert(0, BENCH_DIR)
    import conveyor_bench  # noqa: PLC0415 - reads the environment set above

    common = conveyor_bench.common
    a = conveyor_bench.A()
    a.setup()
    a.reset()
    common.reset_sink()
    procs = common.start_workers(a.worker_cmds(), a.worker_env, tag="conveyor-trace")
    s = common.sink()
    triggers: list[tuple[float, float, str, float]] = []  # t0, trigger returned, run id, code started
    try:
        for _ in range(5):
            a.lat_enqueue()
            if s.blpop("b:lat", 120) is None:
                raise RuntimeError("warm-up run never ran")
        time.sleep(0.5)
        s.delete("b:lat")
        for _ in range(common.LAT_N):
            time.sleep(random.uniform(0.0, 0.02))
            t0 = time.time()
            handle = a.tasks.lat.trigger(None)
            t1 = time.time()
            r = s.blpop("b:lat", 60)
            if r is None:
                raise RuntimeError("run lost")
            triggers.append((t0, t1, handle.id, float(r[1])))
    finally:
        common.stop_workers(procs)
    a.reset()
    workers = []
    for path in glob.glob(os.path.join(trace_dir, "*.json")):
        with open(path) as f:
            workers.append(json.load(f))
    shutil.rmtree(trace_dir, ignore_errors=True)
    report(triggers, workers)


def _last_before(events: list[list[Any]], kind: str, t: float, after: float) -> float | None:
    best = None
    for e in events:
        if e[0] == kind and after <= e[1] <= t and (best is None or e[1] > best):
            best = e[1]
    return best


def report(triggers: list[tuple[float, float, str, float]], workers: list[dict[str, Any]]) -> None:
    parts: dict[str, list[float]] = {}
    losers: list[float] = []
    overlap = 0
    for i, (t0, t1, run_id, code) in enumerate(triggers):
        nxt = triggers[i + 1][0] if i + 1 < len(triggers) else float("inf")
        for w in workers:
            ev = w["events"]
            start = next((e for e in ev if e[0] == "start" and run_id in e[3]), None)
            if start is None:
                # a worker that did not get the run: its exchanges in this trigger's window are wasted claims
                for e in ev:
                    if e[0] in ("exchange", "claim") and t0 <= e[1] < nxt and not e[3]:
                        losers.append(e[2] - e[1])
                        if e[1] < code:
                            overlap += 1
                continue
            x = next(e for e in ev if e[0] in ("exchange", "claim") and run_id in e[3])
            commit = next((e for e in ev if e[0] == "commit" and x[1] <= e[1] <= x[2]), None)
            dgram = _last_before(ev, "datagram", x[1], t0) if x[0] == "exchange" else None
            listen = _last_before(ev, "listen", dgram or x[1], t0)
            stamps = {
                "trigger (t0 -> trigger returned)": (t0, t1),
                "t0 -> LISTEN thread got it": (t0, listen),
                "LISTEN thread -> loop handled datagram": (listen, dgram),
                "datagram -> exchange begins (store thread)": (dgram, x[1]) if x[0] == "exchange" else (None, None),
                "LISTEN thread -> claim begins (same thread)": (listen, x[1]) if x[0] == "claim" else (None, None),
                "claiming exchange (or claim)": (x[1], x[2]),
                "  of which its COMMIT": (commit[1], commit[2]) if commit else (None, None),
                "claim end -> Worker._start": (x[2], start[1]),
                "Worker._start -> code starts": (start[1], code),
                "total (t0 -> code starts)": (t0, code),
            }
            for name, (a, b) in stamps.items():
                if a is not None and b is not None:
                    parts.setdefault(name, []).append((b - a) * 1000)
    slow = sorted(triggers, key=lambda x: x[3] - x[0])[-5:]
    for t0, t1, run_id, code in slow:
        print(f"slow run: total {(code - t0) * 1000:.2f} ms, trigger {(t1 - t0) * 1000:.2f} ms")
        for w in workers:
            for e in w["events"]:
                if t0 - 0.001 <= e[1] <= code + 0.001:
                    ids = "claimed" if run_id in e[3] else ",".join(e[3])[:20]
                    begin, end = (e[1] - t0) * 1000, (e[2] - t0) * 1000
                    print(f"    worker {w['pid']} {e[0]:>8} +{begin:7.2f} ms .. +{end:7.2f} {ids}")
    print(f"{len(triggers)} runs, {len(workers)} workers, load {load()}")
    print(f"{'segment, ms':<46} {'p50':>7} {'p90':>7} {'p99':>7} {'n':>5}")
    for name, xs in parts.items():
        xs.sort()
        q = [xs[min(len(xs) - 1, int(p * len(xs)))] for p in (0.5, 0.9, 0.99)]
        print(f"{name:<46} {q[0]:7.3f} {q[1]:7.3f} {q[2]:7.3f} {len(xs):5d}")
    kinds: dict[str, int] = {}
    for w in workers:
        for e in w["events"]:
            if e[0] == "listen":
                kinds[e[3][0]] = kinds.get(e[3][0], 0) + 1
    print("notifications the LISTEN threads handed on, by kind:", json.dumps(kinds, sort_keys=True))
    if losers:
        print(
            f"empty claims by the other workers: {len(losers)} ({len(losers) / len(triggers):.2f} per run), "
            f"p50 {statistics.median(losers) * 1000:.3f} ms; {overlap} began before the winner's code started"
        )
    else:
        print("empty claims by the other workers: none")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="src=src", help="name=path[,name=path...]; path holds the conveyor package")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="w3", help="w1, w2, w3 (comma-separated)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--alternate", action="store_true", help="reverse the variant order every other round")
    ap.add_argument("--trace", action="store_true", help="one W3 run with a per-run timeline (this tree)")
    ap.add_argument("--database-url", default=os.environ.get("CONVEYOR_BENCH_DATABASE_URL", DEFAULT_URL))
    args = ap.parse_args()
    if args.trace:
        trace(args)
    else:
        ab(args)


if __name__ == "__main__":
    main()
