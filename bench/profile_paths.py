"""Where the time goes, per workload: the evidence behind docs/performance.md.

  profile_paths.py w1 [--py-spy]
      In this process: W1 single (N) and W1 bulk (2N): CPU µs per run, bytes written per run, every SQL statement's
      time (bench_trace), and with --py-spy the top Python functions.
  profile_paths.py w2 [--py-spy] [--task count|noop]
      N `count` runs (or no-op runs, without the Redis bookkeeping) drained by 2 workers loaded with bench_trace:
      completions/s, CPU µs per run per thread (event loop vs store thread) and of redis-server, SQL statement shares,
      exchange sizes, write-lock waits; with --py-spy, function-level profiles of both workers' threads.
  profile_paths.py w3
      LAT_N sequential runs with worker timelines: the latency split into trigger call, wake-up datagram, claim
      transaction and start.

Raw py-spy stacks go to bench/results/profiles/. Env as conveyor_bench.py (BENCH_N, CONVEYOR_BENCH_CONCURRENCY, ...).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import glob
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(BENCH_DIR, "results", "profiles")
TRACE_DIR = "/tmp/conveyor-bench/trace"
IDLE_FRAMES = ("Condition.wait", "_worker (concurrent/futures/thread.py:81)", "EpollSelector.select", "Event.wait")
os.environ.setdefault("CONVEYOR_BENCH_DB", "/tmp/conveyor-bench/profile.db")
os.environ["CONVEYOR_BENCH_TRACE_DIR"] = TRACE_DIR
sys.path.insert(0, BENCH_DIR)

import conveyor_bench as cb  # noqa: E402

common = cb.common
HZ = os.sysconf("SC_CLK_TCK")


def traced_modules() -> str:
    """The workers' modules plus bench_trace (placed before any experiment module, exp_*)."""
    modules = [m for m in cb.MODULES.split(",") if m and m != "bench_trace"]
    plain = [m for m in modules if not m.startswith("exp_")]
    return ",".join([*plain, "bench_trace", *[m for m in modules if m.startswith("exp_")]])


# --- helpers ----------------------------------------------------------------------------------------
def py_spy() -> str | None:
    found = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    return found if os.path.exists(found) else None


def proc_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of a process: the main thread (the event loop) and the others (store, heartbeat)."""
    out: dict[str, float] = collections.defaultdict(float)
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        out["event loop (main thread)" if tid == str(pid) else "store + heartbeat threads"] += (
            int(fields[11]) + int(fields[12])
        ) / HZ
    return out


def wchar(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


def redis_pid() -> int | None:
    try:
        return int(subprocess.check_output(["pgrep", "-x", "redis-server"]).split()[0])
    except (subprocess.CalledProcessError, FileNotFoundError, IndexError):
        return None


def print_sql(rows: list[tuple[str, int, float]], total: float, what: str, n: int) -> None:
    print(f"  SQL statements ({what}), share of {total * 1000:.0f} ms:")
    for sql, calls, seconds in rows:
        print(f"    {100 * seconds / total:5.1f}%  {1e6 * seconds / n:6.1f} µs/run  {calls:>7} calls  {sql}")


def spy_top(paths: list[str], predicate: Any, label: str, top: int = 20) -> None:
    """Self and inclusive shares from py-spy raw (collapsed) stacks, idle frames removed."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for path in paths:
        with open(path) as f:
            for line in f:
                stack, _, count = line.rstrip().rpartition(" ")
                frames = stack.split(";")
                if not predicate(frames) or any(frames[-1].startswith(i) for i in IDLE_FRAMES):
                    continue
                n = int(count)
                total += n
                own[frames[-1]] += n
                for frame in set(frames[1:]):
                    incl[frame] += n
    print(f"  py-spy, {label}: {total} busy samples")
    if not total:
        return
    print("    self:")
    for frame, n in own.most_common(top):
        print(f"      {100 * n / total:5.1f}%  {frame}")
    print("    inclusive (conveyor frames):")
    shown = [(f, n) for f, n in incl.most_common() if "conveyor/" in f][:top]
    for frame, n in shown:
        print(f"      {100 * n / total:5.1f}%  {frame}")


# --- W1 ---------------------------------------------------------------------------------------------
def w1(args: argparse.Namespace) -> None:
    if args.py_spy and not os.environ.get("_PROFILE_UNDER_SPY"):
        spy = py_spy()
        if spy is None:
            sys.exit("py-spy not found: .venv/bin/pip install py-spy")
        os.makedirs(OUT, exist_ok=True)
        raw = os.path.join(OUT, "w1.raw")
        env = dict(os.environ, _PROFILE_UNDER_SPY="1")
        cmd = [spy, "record", "-r", "500", "-f", "raw", "-o", raw, "--", sys.executable, __file__, "w1", "--py-spy"]
        subprocess.run(cmd, env=env, check=True, stderr=subprocess.DEVNULL)
        spy_top([raw], lambda fr: any("w1_single" in f for f in fr), "W1 single")
        spy_top([raw], lambda fr: any("w1_bulk" in f for f in fr), "W1 bulk")
        return
    import bench_trace

    a = cb.A()
    a.setup()
    n = common.N
    print(f"W1 in one process, SQLite synchronous={a.synchronous}, load {cb.load()}")
    a.w1_single(min(2000, n))  # warm: imports, prepared statements, first pages
    for label, fn, count in (("single", a.w1_single, n), ("bulk", a.w1_bulk, 2 * n)):
        a.reset()
        bench_trace.reset()
        w0, c0, t0 = wchar(), time.process_time(), time.perf_counter()
        fn(count)
        wall, cpu, written = time.perf_counter() - t0, time.process_time() - c0, wchar() - w0
        print(
            f"W1 {label}: {count / wall:,.0f} runs/s wall, {1e6 * cpu / count:.1f} CPU-µs/run "
            f"({count / cpu:,.0f} runs per CPU-second), {written / count:,.0f} bytes written/run"
        )
        rows = bench_trace.sql_report(8)
        print_sql(rows, wall, f"W1 {label}", count)
        in_sql = sum(r[2] for r in rows)
        print(f"  => SQLite (statements + BEGIN/COMMIT) {100 * in_sql / wall:.0f}% of wall; the rest is Python")
    a.reset()


# --- W2 ---------------------------------------------------------------------------------------------
def w2(args: argparse.Namespace) -> None:
    shutil.rmtree(TRACE_DIR, ignore_errors=True)
    cb.MODULES = traced_modules()
    a = cb.A()
    a.setup()
    n = common.N
    task = a.tasks.count if args.task == "count" else a.tasks.noop
    common.reset_sink()
    procs = common.start_workers(a.worker_cmds(), a.worker_env, tag="profile-w2")
    spies: list[subprocess.Popen[bytes]] = []
    try:
        deadline = time.time() + 60
        while a.db.execute("SELECT count(*) FROM workers").fetchone()[0] < 2:
            if time.time() > deadline:
                raise RuntimeError("workers did not register; see /tmp/peers-logs/profile-w2-*.log")
            time.sleep(0.1)
        a.client.engine.set_paused("bench", True)  # fill while no worker may claim
        for i in range(0, n, 1000):
            task.batch_trigger([n] * min(1000, n - i))
        if args.py_spy:
            spy = py_spy()
            if spy is None:
                sys.exit("py-spy not found: .venv/bin/pip install py-spy")
            os.makedirs(OUT, exist_ok=True)
            for i, p in enumerate(procs):
                cmd = [spy, "record", "--pid", str(p.pid), "-r", "250", "--nonblocking", "-f", "raw", "--threads"]
                cmd += ["-d", str(args.spy_seconds), "-o", os.path.join(OUT, f"w2-{args.task}-{i}.raw")]
                spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1.0)
        rpid = redis_pid()
        before = [proc_cpu(p.pid) for p in procs]
        r0 = sum(proc_cpu(rpid).values()) if rpid else 0.0
        io0 = sum(wchar(p.pid) for p in procs)
        a.client.engine.set_paused("bench", False)
        while a.db.execute("SELECT count(*) FROM runs WHERE status = 'COMPLETED'").fetchone()[0] < n:
            time.sleep(0.05)
        after = [proc_cpu(p.pid) for p in procs]
        r1 = sum(proc_cpu(rpid).values()) if rpid else 0.0
        io1 = sum(wchar(p.pid) for p in procs)
        for s in spies:
            s.wait()
    finally:
        common.stop_workers(procs)
    first, last = a.db.execute("SELECT min(started_at), max(finished_at) FROM runs").fetchone()
    wall = last - first
    cpu: dict[str, float] = collections.defaultdict(float)
    for b, e in zip(before, after, strict=True):
        for k in e:
            cpu[k] += e[k] - b.get(k, 0.0)
    print(
        f"W2 {args.task}: {n:,} runs, 2 workers x {cb.CONCURRENCY}, synchronous={a.synchronous}, load {cb.load()}: "
        f"{n / wall:,.0f} completions/s (first start -> last finish {wall:.2f} s)"
    )
    busy = sum(cpu.values()) + (r1 - r0)
    for k, v in cpu.items():
        print(f"  CPU {k}: {1e6 * v / n:.0f} µs/run ({100 * v / wall / 2:.0f}% of each worker's wall time)")
    print(f"  CPU redis-server: {1e6 * (r1 - r0) / n:.0f} µs/run; bytes written by workers: {(io1 - io0) / n:,.0f}/run")
    print(f"  => cores busy (workers + redis-server): {busy / wall:.2f} of 2")
    docs = []
    for path in glob.glob(os.path.join(TRACE_DIR, "*.json")):
        with open(path) as f:
            doc = json.load(f)
        if doc["transactions"]:  # skip the preflight probe, which imports bench_trace too
            docs.append(doc)
    sql: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for d in docs:
        for stmt, calls, seconds in d["sql"]:
            sql[stmt][0] += calls
            sql[stmt][1] += seconds
        t = d["tx_ms"]
        print(
            f"  worker {d['pid']}: {d['busy_exchanges']} exchanges carrying {d['outcomes_per_exchange']:.0f} "
            f"outcomes + {d['claimed_per_exchange']:.0f} claims; time in exchanges {d['exchange_ms_sum']:.0f} ms "
            f"({100 * d['exchange_ms_sum'] / 1000 / wall:.0f}% of wall), of which waiting for the write lock "
            f"{t['begin']['sum']:.0f} ms (p99 {t['begin']['p99']:.1f} ms), COMMIT {t['commit']['sum']:.0f} ms "
            f"(max {t['commit']['max']:.1f} ms)"
        )
    store_time = sum(d["exchange_ms_sum"] for d in docs) / 1000
    if store_time:
        rows = sorted(((k, int(v[0]), float(v[1])) for k, v in sql.items()), key=lambda r: -r[2])[:14]
        print_sql(rows, store_time, "both workers' transactions", n)
    if args.py_spy:
        raws = sorted(glob.glob(os.path.join(OUT, f"w2-{args.task}-*.raw")))
        spy_top(raws, lambda fr: "MainThread" in fr[0], "event loop (main thread)")
        spy_top(raws, lambda fr: "MainThread" not in fr[0] and any("exchange" in f for f in fr), "store thread")
    a.reset()


# --- W3 ---------------------------------------------------------------------------------------------
def w3(args: argparse.Namespace) -> None:
    shutil.rmtree(TRACE_DIR, ignore_errors=True)
    os.environ["CONVEYOR_BENCH_TIMELINE"] = "1"
    cb.MODULES = traced_modules()
    from conveyor.engine import notify

    a = cb.A()
    a.setup()
    import bench_trace  # the trigger side's SQL, in this process

    sent: list[tuple[float, int]] = []
    wake = notify.Notifier.wake_workers

    def counted(self: Any, message: bytes = notify.WORK) -> None:
        sent.append((time.time(), len(self._targets())))
        wake(self, message)

    notify.Notifier.wake_workers = counted  # type: ignore[method-assign]
    common.reset_sink()
    procs = common.start_workers(a.worker_cmds(), a.worker_env, tag="profile-w3")
    s = common.sink()
    marks: list[tuple[float, float, float]] = []
    try:
        for _ in range(5):
            a.lat_enqueue()
            s.blpop("b:lat", 120)
        time.sleep(0.5)
        s.delete("b:lat")
        bench_trace.reset()
        for _ in range(common.LAT_N):
            time.sleep(random.uniform(0.0, 0.02))
            t0 = time.time()
            a.lat_enqueue()
            t1 = time.time()
            r = s.blpop("b:lat", 60)
            if r is None:
                raise RuntimeError("W3 run lost")
            marks.append((t0, t1, float(r[1])))
    finally:
        common.stop_workers(procs)
    trigger_sql = bench_trace.sql_report(6)
    timeline: list[tuple[str, float, float, int]] = []
    worker_sql: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for path in glob.glob(os.path.join(TRACE_DIR, "*.json")):
        with open(path) as f:
            doc = json.load(f)
        timeline += [tuple(e) for e in doc["timeline"]]  # type: ignore[misc]
        for stmt, calls, seconds in doc["sql"]:
            worker_sql[stmt][0] += calls
            worker_sql[stmt][1] += seconds
    timeline.sort(key=lambda e: e[1])
    starts = [e[1] for e in timeline]
    parts: dict[str, list[float]] = {
        k: []
        for k in (
            "trigger call (insert tx + commit + datagrams)",
            "commit -> worker handles datagram",
            "datagram -> claim transaction starts",
            "claim exchange (store thread)",
            "claim done -> task code starts",
            "total",
        )
    }
    for t0, t1, ts in marks:
        i = bisect.bisect_left(starts, t0)
        dgram = next((e for e in timeline[i:] if e[0] == "datagram"), None)
        claim = next((e for e in timeline[i:] if e[0] == "exchange" and e[3] > 0), None)
        if dgram is None or claim is None or claim[1] > ts or dgram[1] > claim[1]:
            continue
        for key, value in zip(
            parts,
            (t1 - t0, dgram[1] - t1, claim[1] - dgram[1], claim[2] - claim[1], ts - claim[2], ts - t0),
            strict=True,
        ):
            parts[key].append(value)
    lat = sorted(1000 * (ts - t0) for t0, _, ts in marks)
    print(
        f"W3: {len(marks)} sequential runs, synchronous={a.synchronous}, load {cb.load()}: "
        f"p50 {common.pct(lat, 50):.2f} p95 {common.pct(lat, 95):.2f} p99 {common.pct(lat, 99):.2f} "
        f"max {lat[-1]:.1f} ms"
    )
    for key, values in parts.items():
        if values:
            values.sort()
            print(
                f"  {key:46s} p50 {1000 * statistics.median(values):6.3f} ms   p90 "
                f"{1000 * values[int(0.9 * (len(values) - 1))]:6.3f} ms"
            )
    n = len(marks)
    print_sql(trigger_sql, sum(r[2] for r in trigger_sql), "trigger side, per trigger call", n)
    rows = sorted(((k, int(v[0]), float(v[1])) for k, v in worker_sql.items()), key=lambda r: -r[2])[:10]
    print_sql(rows, sum(r[2] for r in rows), "both workers (claims, settles, empty claims of the losing worker)", n)
    unmatched = len(marks) - len(parts["total"])
    if unmatched:
        print(f"  {unmatched} runs not matched to a datagram + claim (e.g. picked up by a worker's fallback poll)")
    blind = [i for i, (_, k) in enumerate(sent) if k == 0]
    if blind:
        print(
            f"  triggers that woke no worker (the producer's cached worker list was empty): indices {blind} "
            f"of {len(sent)} (the first 5 are the warm-up)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", choices=["w1", "w2", "w3"])
    ap.add_argument("--py-spy", action="store_true", help="also sample with py-spy (pip install py-spy)")
    ap.add_argument("--spy-seconds", type=int, default=6)
    ap.add_argument("--task", choices=["count", "noop"], default="count", help="W2: with or without Redis bookkeeping")
    args = ap.parse_args()
    {"w1": w1, "w2": w2, "w3": w3}[args.workload](args)


if __name__ == "__main__":
    main()
