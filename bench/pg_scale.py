"""PostgreSQL at scale: the W2 drain with a large backlog, EXPLAIN of the claim, and pgbench's ceiling.

  drain     N `bench-count` runs queued, 2 x `conveyor worker --concurrency 100`, drain = N / (last start - first
            start) as in W2. Measured on an empty table (N queued) and with BACKLOG runs queued (plus FINISHED
            finished rows): the workers take the first N of them. Rows are made fast: one run is triggered through
            the SDK (so every column is what Conveyor writes), then cloned with INSERT ... SELECT generate_series.
            The backlog is made once; rounds alternate empty / backlog (each backlog round drains N more of it), so
            drift of the shared machine hits both alike.
  explain   EXPLAIN (ANALYZE, BUFFERS) of the claim's candidate query, of the purge batch and of maintenance's
            next-due query, with the backlog in place.
  store     the store alone, no worker processes and no Redis: 2 threads each loop `Engine.exchange` (settle the
            previous batch COMPLETED + claim 100) over N queued runs, as a worker's store thread does. Its rate is the
            store path's ceiling; the gap to `drain` is the worker processes (event loop, task bookkeeping).
  pgbench   insert-only pgbench (one INSERT per transaction into a scratch table) with 1 and 8 clients, 10 s each:
            the server's commit ceiling, beside which the Conveyor numbers are ratios.

Everything lives in scratch schemas of $CONVEYOR_BENCH_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test):
`conveyor_scale_empty` and `conveyor_scale_big` (dropped at start) and `pgbench_scratch`.
Results: bench/results/pg-scale-<UTC time>.json.

Usage: .venv/bin/python bench/pg_scale.py [--rounds 3] [--n 10000] [--backlog 1000000] [--finished 1000000]
       [--only pgbench,store,drain,explain]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

from _harness import load_common  # noqa: E402

common = load_common()

BASE_URL = os.environ.get("CONVEYOR_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test").split("?")[0]
SCHEMA = "conveyor_scale"  # + _empty and _big
CONCURRENCY = int(os.environ.get("CONVEYOR_BENCH_CONCURRENCY", "100"))


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class Scale:
    """One scratch schema (dropped and re-created here) and how to fill and drain it."""

    def __init__(self, schema: str) -> None:
        import psycopg

        self.schema = schema
        self.url = f"{BASE_URL}?schema={schema}"
        self.db = psycopg.connect(BASE_URL, autocommit=True)
        self.db.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        self.client = self.use()
        self.t = f'"{schema}"'

    def use(self) -> Any:
        """Point this process's SDK (and the workers started next) at this schema."""
        import conveyor

        os.environ["CONVEYOR_DATABASE_URL"] = self.url
        client = conveyor.configure(database_url=self.url)
        client.engine  # noqa: B018 - creates the schema
        return client

    def clear(self) -> None:
        self.db.execute(f"TRUNCATE {self.t}.runs, {self.t}.attempts, {self.t}.run_events, {self.t}.run_logs")

    def fill(self, queued: int, finished: int, n: int) -> float:
        """`queued` QUEUED runs of bench-count (payload n) and `finished` COMPLETED ones. -> seconds taken."""
        import bench_tasks

        self.use()
        self.clear()
        started = time.perf_counter()
        template = bench_tasks.count.trigger(n).id
        cols = [
            r[0]
            for r in self.db.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = 'runs' "
                "ORDER BY ordinal_position",
                (self.schema,),
            )
        ]
        override = {
            "id": "'run_scale_' || lpad(g::text, 9, '0')",
            "sort_key": "sort_key + g * 1e-6",
            "available_at": "available_at + g * 1e-6",
        }
        select = ", ".join(override.get(c, c) for c in cols)
        self.db.execute(
            f"INSERT INTO {self.t}.runs ({', '.join(cols)}) SELECT {select} FROM {self.t}.runs, "
            f"generate_series(1, %s) AS g WHERE id = %s",
            (queued - 1, template),
        )
        if finished:
            done = dict(
                override,
                id="'run_done_' || lpad(g::text, 9, '0')",
                status="'COMPLETED'",
                output="'null'::jsonb",
                attempt_count="1",
                started_at="created_at - 86400 * 40 + g * 1e-3",
                finished_at="created_at - 86400 * 40 + g * 1e-3 + 0.001",
                queued_at="NULL",
            )
            select = ", ".join(done.get(c, c) for c in cols)
            self.db.execute(
                f"INSERT INTO {self.t}.runs ({', '.join(cols)}) SELECT {select} FROM {self.t}.runs, "
                f"generate_series(1, %s) AS g WHERE id = %s",
                (finished, template),
            )
        self.db.execute(f"VACUUM ANALYZE {self.t}.runs")
        return time.perf_counter() - started

    def drain(self, n: int) -> dict[str, float]:
        self.use()
        common.reset_sink()
        t_launch = time.time()
        cmd = [
            os.path.join(common.VENV_BIN, "conveyor"),
            "worker",
            "--modules",
            "bench_tasks",
            "--concurrency",
            str(CONCURRENCY),
        ]
        path = os.pathsep.join(p for p in (BENCH_DIR, common.HERE, os.environ.get("PYTHONPATH", "")) if p)
        procs = common.start_workers([cmd, list(cmd)], {"PYTHONPATH": path}, tag="conveyor-scale")
        try:
            s = common.sink()
            while s.get("b:last") is None:
                if time.time() - t_launch > 600:
                    raise RuntimeError(f"drain timeout, done={s.get('b:done')}")
                time.sleep(0.02)
            first, last = float(s.get("b:first")), float(s.get("b:last"))
        finally:
            common.stop_workers(procs)
        return {"drain": n / (last - first), "boot_s": first - t_launch}

    def explain(self) -> dict[str, str]:
        out = {}
        claim = (
            f"SELECT id, concurrency_key, key_limit, queue_slot FROM {self.t}.runs "
            "WHERE environment = 'dev' AND queue = 'bench' AND status = 'QUEUED' "
            "AND available_at <= extract(epoch from now())::float8 AND machine = 'small-1x' "
            "AND (NULL::text IS NULL OR version IS NULL) "
            "AND task_id = ANY(ARRAY['bench-count','bench-noop','bench-lat']) "
            "AND (concurrency_key IS NULL OR concurrency_key <> ALL(ARRAY[]::text[])) "
            "AND id <> ALL(ARRAY[]::text[]) ORDER BY sort_key, id LIMIT 100 FOR UPDATE SKIP LOCKED"
        )
        from conveyor.store.postgres import sql as q

        statements = {
            "claim_candidates": claim,
            "purge_batch": q.render(q.PURGE, self.schema, True)
            .replace("%(before)s", "extract(epoch from now())::float8 - 30 * 86400")
            .replace("%(limit)s", "500"),
            "next_due": q.render(q.NEXT_DUE, self.schema, True),
        }
        for name, text in statements.items():
            self.db.execute("BEGIN")
            try:
                rows = self.db.execute(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {text}").fetchall()
            finally:
                self.db.execute("ROLLBACK")
            out[name] = "\n".join(r[0] for r in rows)
        return out


def store_only(n: int) -> dict[str, float]:
    """2 threads looping Engine.exchange over n queued runs (see the module docstring)."""
    import threading

    from conveyor.core.records import ClaimRequest, Outcome, OutcomeKind, QueueSpec, TaskRecord
    from conveyor.engine import Engine, TriggerOptions
    from conveyor.store.postgres import PostgresStore

    scratch = Scale(f"{SCHEMA}_store")
    store = PostgresStore(scratch.url)
    engine = Engine(store)
    task = TaskRecord(task_id="bench-count", queue="bench")
    engine.register([task], [QueueSpec("bench", None)])
    for _ in range(0, n, 1000):
        engine.insert([engine.prepare(task, "0", TriggerOptions()) for _ in range(1000)])
    done = [0, 0]
    exchange_s: list[float] = []

    def worker(w: int) -> None:
        outcomes: list[Outcome] = []
        while True:
            t = time.perf_counter()
            claimed = engine.exchange(
                outcomes, [], ClaimRequest("dev", f"w{w}", ["bench"], ["bench-count"], 100, 30.0)
            )[1]
            exchange_s.append(time.perf_counter() - t)
            done[w] += len(outcomes)
            outcomes = [Outcome(c.id, c.lease_token, OutcomeKind.COMPLETED, output="null") for c in claimed]
            if not claimed and not outcomes:
                return

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - started
    store.close()
    return {"store_rate": sum(done) / took, "exchange_ms_p50": 1000 * statistics.median(exchange_s)}


def pgbench(clients: int, seconds: int = 10) -> float:
    exe = shutil.which("pgbench")
    if exe is None:
        raise SystemExit("pgbench not found (apt-get install postgresql-contrib)")
    import psycopg

    with psycopg.connect(BASE_URL, autocommit=True) as db:
        db.execute("CREATE SCHEMA IF NOT EXISTS pgbench_scratch")
        db.execute("DROP TABLE IF EXISTS pgbench_scratch.ins")
        db.execute(
            "CREATE TABLE pgbench_scratch.ins (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v integer, "
            "payload jsonb, created_at timestamptz DEFAULT now())"
        )
    script = os.path.join("/tmp", "conveyor-pgbench-insert.sql")
    with open(script, "w") as f:
        f.write("\\set v random(1, 1000000)\nINSERT INTO pgbench_scratch.ins (v, payload) VALUES (:v, 'null');\n")
    done = subprocess.run(
        [exe, "-n", "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds), "-f", script, BASE_URL],
        capture_output=True,
        text=True,
        check=True,
    )
    for line in done.stdout.splitlines():
        if line.startswith("tps ="):
            return float(line.split()[2])
    raise RuntimeError(done.stdout + done.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--backlog", type=int, default=1_000_000)
    ap.add_argument("--finished", type=int, default=1_000_000)
    ap.add_argument("--only", default="pgbench,store,drain,explain")
    args = ap.parse_args()
    only = set(args.only.split(","))
    result: dict[str, Any] = {"n": args.n, "backlog": args.backlog, "finished": args.finished, "load": [load()]}
    print(f"pg_scale: {BASE_URL} (schemas {SCHEMA}_empty, {SCHEMA}_big), load {load()}", flush=True)
    if "pgbench" in only:
        for clients in (1, 8):
            tps = [pgbench(clients) for _ in range(args.rounds)]
            result[f"pgbench_{clients}"] = statistics.median(tps)
            print(f"pgbench insert-only, {clients} client(s): {tps} -> median {statistics.median(tps):,.0f} tps")
            print(f"  (load {load()})", flush=True)
    if "store" in only:
        rates = [store_only(args.n) for _ in range(args.rounds)]
        result["store_rate"] = statistics.median(r["store_rate"] for r in rates)
        result["store_exchange_ms_p50"] = statistics.median(r["exchange_ms_p50"] for r in rates)
        print(f"store alone, 2 threads x exchange(settle + claim 100): {rates} (load {load()})", flush=True)
    if "drain" in only or "explain" in only:
        big = Scale(f"{SCHEMA}_big")
        took = big.fill(args.backlog, args.finished, args.n)
        print(f"filled {args.backlog:,} queued + {args.finished:,} finished runs in {took:.1f} s", flush=True)
    if "drain" in only:
        small = Scale(f"{SCHEMA}_empty")
        empty, backlog = [], []
        for r in range(args.rounds):  # interleaved, so drift hits both alike
            small.fill(args.n, 0, args.n)
            res = small.drain(args.n)
            empty.append(res["drain"])
            print(f"round {r + 1}: empty table, {args.n:,} queued: {res} (load {load()})", flush=True)
            res = big.drain(args.n)
            backlog.append(res["drain"])
            queued = big.db.execute(f"SELECT count(*) FROM {big.t}.runs WHERE status = 'QUEUED'").fetchone()[0]
            print(f"round {r + 1}: {queued:,} queued + {args.finished:,} finished: {res} (load {load()})", flush=True)
        result["drain_empty"] = statistics.median(empty)
        result["drain_backlog"] = statistics.median(backlog)
        result["drain_rounds"] = {"empty": empty, "backlog": backlog}
        ratio = result["drain_backlog"] / result["drain_empty"]
        print(f"drain median: empty {result['drain_empty']:,.0f}/s, backlog {result['drain_backlog']:,.0f}/s ", end="")
        print(f"({100 * (ratio - 1):+.1f} %; gate: within 20 %)")
    if "explain" in only:
        result["explain"] = big.explain()
        for name, plan in result["explain"].items():
            print(f"--- EXPLAIN {name}\n{plan}")
    result["load"].append(load())
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    os.makedirs(os.path.join(BENCH_DIR, "results"), exist_ok=True)
    path = os.path.join(BENCH_DIR, "results", f"pg-scale-{stamp}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
