"""`make bench`: Conveyor against the issue's gates and, in the same run, against the peers.

Rounds (default 3): each round runs the Conveyor adapter once, then each peer once (pgqueuer and huey by default, when
/tmp/peers-venv exists - create it with `bash ../shared/peer-bench/setup.sh`), so slow drifts of a shared machine hit
every system alike. Each system's number is the median of its rounds. Then bench/rss.py (worker memory).

Prints one table: Conveyor's medians, each peer's medians and the ratio (> 1 means Conveyor is better: higher
throughput or lower latency), the gate and PASS/FAIL; the SQLite synchronous mode and the load average (`uptime`)
beside the numbers. Everything lands in bench/results/<UTC time>/ (gitignored): one JSON per system and round, the
peers' logs, summary.json.

Usage: .venv/bin/python bench/run.py [--rounds 3] [--peers pgqueuer,huey | --no-peers] [--no-rss] [--only w1,w2,w3]
       .venv/bin/python bench/run.py --store postgres [--database-url postgresql://postgres@127.0.0.1:5432/test]
         (Conveyor on PostgreSQL, schema conveyor_bench, beside pgqueuer on the same server; no RSS by default)
Env: BENCH_N (10000), BENCH_LAT_N (200), CONVEYOR_BENCH_CONCURRENCY (100), CONVEYOR_SQLITE_SYNCHRONOUS (normal),
PEER_BENCH_DIR (../shared/peer-bench), PEERS_VENV (/tmp/peers-venv).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

from _harness import peer_dir  # noqa: E402

PY = sys.executable
PEERS_VENV = os.environ.get("PEERS_VENV", "/tmp/peers-venv")
TIMEOUT = 1200  # seconds per system per round

# metric, label, unit, gate, higher is better
METRICS = [
    ("w1_single", "W1 enqueue one by one", "runs/s", 5_000, True),
    ("w1_bulk", "W1 enqueue batch (1,000/call)", "runs/s", 40_000, True),
    ("w2_drain", "W2 drain, 2 workers (starts)", "runs/s", 5_000, True),
    ("w2_completions_per_s", "W2 completions, 2 workers", "runs/s", None, True),
    ("w2_wall", "W2 incl. worker boot", "runs/s", None, True),
    ("w3_p50_ms", "W3 latency p50", "ms", 3.0, False),
    ("w3_p95_ms", "W3 latency p95", "ms", None, False),
    ("w3_p99_ms", "W3 latency p99", "ms", 15.0, False),
]


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def run_logged(cmd: list[str], cwd: str, env: dict[str, str], tag: str, log_path: str) -> int:
    """Run one benchmark process, echo its lines with a tag, stop it with SIGINT (so the harness cleans up its
    workers) if it overruns."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + TIMEOUT
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                log.write(raw)
                line = raw.decode(errors="replace").rstrip()
                if line:
                    print(f"  {tag}| {line}", flush=True)
                if time.time() > deadline:
                    raise TimeoutError
            return proc.wait()
        except (TimeoutError, KeyboardInterrupt):
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise


def medians(paths: list[str]) -> tuple[dict[str, float], dict[str, Any]]:
    docs = []
    for path in paths:
        with open(path) as f:
            docs.append(json.load(f))
    runs = [r for d in docs for r in d["runs"]]
    keys = list(dict.fromkeys(k for r in runs for k in r))
    return {k: statistics.median([r[k] for r in runs if k in r]) for k in keys}, (docs[0] if docs else {})


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.2f}" if unit == "ms" else f"{value:,.0f}"


def ratio(ours: float | None, theirs: float | None, higher_better: bool) -> str:
    if not ours or not theirs:
        return "-"
    return f"{(ours / theirs) if higher_better else (theirs / ours):.2f}x"


def anchor(name: str) -> dict[str, float]:
    """The peer's published medians (RESULTS.md), used when the peer is not measured in this run."""
    path = os.path.join(peer_dir(), "results", f"{name}.json")
    try:
        with open(path) as f:
            return dict(json.load(f)["median"])
    except (OSError, ValueError, KeyError):
        return {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "3")))
    ap.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument(
        "--database-url",
        default=os.environ.get("CONVEYOR_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        help="with --store postgres",
    )
    ap.add_argument("--peers", default=None, help="default: pgqueuer,huey (sqlite), pgqueuer (postgres)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--only", default=os.environ.get("BENCH_ONLY", "w1,w2,w3"))
    args = ap.parse_args()

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = os.path.join(BENCH_DIR, "results", stamp)
    os.makedirs(out, exist_ok=True)
    pdir = peer_dir()
    postgres = args.store == "postgres"
    if args.peers is None:
        args.peers = "pgqueuer" if postgres else "pgqueuer,huey"
    if postgres:
        args.no_rss = True
    peers = [] if args.no_peers else [p for p in args.peers.split(",") if p]
    skipped: dict[str, str] = {}
    if peers and not os.path.isdir(PEERS_VENV):
        skipped.update({p: f"{PEERS_VENV} missing (bash {pdir}/setup.sh creates it)" for p in peers})
        peers = []
    for p in list(peers):
        if not os.path.isfile(os.path.join(pdir, f"{p}_bench.py")):
            skipped[p] = f"no {p}_bench.py in {pdir}"
            peers.remove(p)
        elif p in ("pgqueuer", "procrastinate", "dbos") and not reachable(5432):
            skipped[p] = "PostgreSQL is not listening on 127.0.0.1:5432"
            peers.remove(p)
    if not reachable(6379):
        print("Redis is not listening on 127.0.0.1:6379: the harness needs it for job bookkeeping", file=sys.stderr)
        return 2

    base_env = dict(os.environ, BENCH_RUNS="1", BENCH_RESULTS=out, BENCH_ONLY=args.only)
    if postgres:
        base_env["CONVEYOR_BENCH_DATABASE_URL"] = args.database_url
    else:
        base_env.pop("CONVEYOR_BENCH_DATABASE_URL", None)
    load_start = load()
    print(f"bench: {args.rounds} rounds of conveyor{''.join(', ' + p for p in peers)}; results in {out}")
    print(f"load average at start: {load_start}")
    for r in range(1, args.rounds + 1):
        env = dict(base_env, BENCH_TAG=f"-r{r}")
        print(f"--- round {r}/{args.rounds} (load {load()})", flush=True)
        code = run_logged(
            [PY, os.path.join(BENCH_DIR, "conveyor_bench.py")],
            BENCH_DIR,
            env,
            "conveyor",
            os.path.join(out, "conveyor.log"),
        )
        if code != 0:
            print(f"conveyor benchmark failed (exit {code}); see {out}/conveyor.log", file=sys.stderr)
            return 1
        for p in peers:
            code = run_logged(
                [os.path.join(PEERS_VENV, "bin", "python"), f"{p}_bench.py"],
                pdir,
                env,
                p,
                os.path.join(out, f"{p}.log"),
            )
            if code != 0:
                skipped[p] = f"failed in round {r} (exit {code}); see {out}/{p}.log"
                peers.remove(p)

    ours, doc = medians(sorted(glob.glob(os.path.join(out, "conveyor-r*.json"))))
    theirs = {p: medians(sorted(glob.glob(os.path.join(out, f"{p}-r*.json"))))[0] for p in peers}
    anchors = {p: anchor(p) for p in (("pgqueuer",) if postgres else ("pgqueuer", "huey")) if p not in theirs}
    metrics = METRICS
    if postgres:
        # The PostgreSQL gates (issue 5): drain at least pgqueuer's on the same server (its rate measured
        # in this run, else its published ~4,900/s); the latency gates as on SQLite; no enqueue gates.
        pgq = theirs.get("pgqueuer", {}).get("w2_drain") or anchors.get("pgqueuer", {}).get("w2_drain") or 4_900
        pg_gates = {"w1_single": None, "w1_bulk": None, "w2_drain": round(pgq)}
        metrics = [(k, label, unit, pg_gates.get(k, gate), hi) for k, label, unit, gate, hi in METRICS]
    rss: dict[str, Any] | None = None
    if not args.no_rss:
        print(f"--- worker memory (load {load()})", flush=True)
        code = run_logged(
            [PY, os.path.join(BENCH_DIR, "rss.py")],
            BENCH_DIR,
            dict(os.environ, BENCH_RESULTS=out),
            "rss",
            os.path.join(out, "rss.log"),
        )
        if code == 0:
            with open(os.path.join(out, "conveyor-rss.json")) as f:
                rss = json.load(f)
    load_end = load()

    sync = doc.get("synchronous", "?")
    print()
    where = "PostgreSQL" if postgres else "SQLite WAL"
    print(f"== Conveyor {doc.get('version', '?')} - {where}, synchronous={sync}, N={doc.get('N')}, ", end="")
    print(f"{doc.get('concurrency')} x 2 workers; median of {args.rounds} rounds; load {load_start} -> {load_end}")
    print(f"   code: {doc.get('code', '?')}")
    cols = ["metric", f"conveyor (sync={sync})"]
    for p in theirs:
        cols += [p, f"vs {p}"]
    for p, a in anchors.items():
        if a:
            cols += [f"{p} (RESULTS.md)", f"vs {p}*"]
    cols += ["gate", "status"]
    rows = []
    gates: dict[str, bool] = {}
    for key, label, unit, gate, higher in metrics:
        value = ours.get(key)
        if value is None:
            continue
        row = [f"{label} ({unit})", fmt(value, unit)]
        for m in theirs.values():
            row += [fmt(m.get(key), unit), ratio(value, m.get(key), higher)]
        for a in anchors.values():
            if a:
                row += [fmt(a.get(key), unit), ratio(value, a.get(key), higher)]
        if gate is None:
            row += ["", ""]
        else:
            ok = value >= gate if higher else value <= gate
            gates[key] = ok
            row += [f"{'>=' if higher else '<='} {gate:,}", "PASS" if ok else "FAIL"]
        rows.append(row)
    if rss is not None:
        idle = max(rss["idle_mb"])
        growth = rss["growth_idle_to_final"]
        gates["rss_idle"], gates["rss_growth"] = rss["idle_ok"], rss["growth_ok"]
        pad = ["-"] * (len(cols) - 4)
        rows.append(["worker RSS idle (MB)", f"{idle:.1f}", *pad, "<= 80", "PASS" if rss["idle_ok"] else "FAIL"])
        rows.append(
            [
                f"RSS growth over {rss['runs']:,} runs",
                f"{100 * growth:+.1f} %",
                *pad,
                "< 10 %",
                "PASS" if rss["growth_ok"] else "FAIL",
            ]
        )
    widths = [max(len(str(r[i])) for r in [cols, *rows]) for i in range(len(cols))]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(
            "  ".join(
                str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    print("ratio: > 1 means Conveyor is better (throughput ours/theirs, latency theirs/ours).", end="")
    print(" * = peer's published median, not measured in this run." if any(anchors.values()) else "")
    for p, why in skipped.items():
        print(f"peer {p} not measured: {why}")
    if doc.get("N") != 10_000 or doc.get("LAT_N") != 200 or args.rounds < 3:
        print("note: the gates are defined for N=10,000, LAT_N=200 and the median of 3 rounds; this run differs")
    failed = [k for k, ok in gates.items() if not ok]
    print(f"gates: {len(gates) - len(failed)}/{len(gates)} pass" + (f"; missed: {', '.join(failed)}" if failed else ""))
    summary = {
        "time": stamp,
        "load": {"start": load_start, "end": load_end},
        "store": args.store,
        "synchronous": sync,
        "code": doc.get("code"),
        "rounds": args.rounds,
        "conveyor": ours,
        "peers": theirs,
        "anchors": anchors,
        "rss": rss,
        "gates": gates,
        "skipped": skipped,
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"results: {out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
