"""PostgreSQL at scale: the W2 drain with a large backlog, EXPLAIN of the claim, and pgbench's ceiling.

  drain     N `bench-count` runs queued, 2 x `conveyor worker --concurrency 100`, drain = N / (last start - first
            start) as in W2. Measured on an empty table (N queued) and with BACKLOG runs queued (plus FINISHED
            finished rows). --backlog-queue same (default): the backlog is in the workers' queue and each round
            drains N more of it. --backlog-queue other: the backlog waits in another queue (`other`, a task no
            worker serves) and each round queues N fresh `bench-count` runs beside it. Rows are made fast: one
            run is triggered through the SDK (so every column is what Conveyor writes), then cloned with
            INSERT ... SELECT generate_series; finished runs come with their attempts, events, tags, key rows,
            logs and steps (bench/pg_scale_data.py: statuses, 60 days of finished_at, keys, tags).
            Rounds alternate empty / backlog, so drift of the shared machine hits both alike.
  explain   EXPLAIN (ANALYZE, BUFFERS) of the claim's statements exactly as the store issues them (a claim of
            100 in a rolled-back transaction, captured), of a retention batch and of maintenance's next-due
            query, with the backlog in place (before and after the drains).
  trigger   W1 in this process, empty schema vs the big one: `trigger` one by one and `batch_trigger` of 1,000
            (a task of its own queue, deleted afterwards).
  reads     `conveyor queues` and `conveyor runs list` (12 filters) with the backlog: in-process latency, the
            CLI command's wall time, and the plan of every statement they issue (bench/pg_scale_probes.py).
  purge     retention: PURGE_BATCHES batches of 500 (Engine.purge) timed, with a trigger+claim prober beside
            them against the prober alone; the locks one batch holds before its COMMIT; and
            `conveyor runs purge --older-than 59` (every run older than that) timed.
  store     the store alone, no worker processes and no Redis: 2 threads each loop `Engine.exchange` (settle the
            previous batch COMPLETED + claim 100) over N queued runs, as a worker's store thread does. Its rate is the
            store path's ceiling; the gap to `drain` is the worker processes (event loop, task bookkeeping).
  pgbench   insert-only pgbench (one INSERT per transaction into a scratch table) with 1 and 8 clients, 10 s each:
            the server's commit ceiling, beside which the Conveyor numbers are ratios.

Everything lives in scratch schemas of --database-url / $CONVEYOR_BENCH_DATABASE_URL (default
postgresql://postgres@127.0.0.1:5432/test): `conveyor_scale_empty` and `conveyor_scale_big` (dropped at start unless
--reuse keeps a filled big one), `conveyor_scale_store` and `pgbench_scratch`; --drop drops them all at the end.
--create-database creates the URL's database if missing (keep 10M rows out of a shared database: they take ~15 GB
with their child rows and indexes).
Results: bench/results/pg-scale-<UTC time>.json (with every plan).

Usage: .venv/bin/python bench/pg_scale.py [--rounds 3] [--n 10000] [--backlog 1000000] [--finished 1000000]
       [--backlog-queue same|other] [--only pgbench,store,drain,explain,trigger,reads,purge]
       [--database-url URL] [--create-database] [--drop] [--reuse]
The 10M measurement of docs/performance.md:
  .venv/bin/python bench/pg_scale.py --database-url postgresql://postgres@127.0.0.1:5432/conveyor_scale \
      --create-database --drop --finished 10000000 --backlog 1000000 --backlog-queue other \
      --only explain,reads,trigger,drain,purge
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
OTHER_QUEUE, OTHER_TASK = "other", "other-task"  # --backlog-queue other: no worker serves it
PURGE_BATCHES = 20
CHILD_TABLES = ("attempts", "run_events", "run_logs", "run_tags", "idempotency_keys", "run_steps")


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def create_database(url: str) -> None:
    """CREATE DATABASE for the URL's database when it does not exist (connected to `postgres`)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = conninfo_to_dict(url).get("dbname")
    if not name:
        raise SystemExit(f"--create-database: no database name in {url}")
    with psycopg.connect(make_conninfo(url, dbname="postgres"), autocommit=True) as db:
        if db.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            db.execute(f'CREATE DATABASE "{name}"')
            print(f"created database {name}", flush=True)


class Scale:
    """One scratch schema (dropped and re-created here) and how to fill and drain it."""

    def __init__(self, schema: str, drop: bool = True) -> None:
        import psycopg

        self.schema = schema
        self.url = f"{BASE_URL}?schema={schema}"
        self.db = psycopg.connect(BASE_URL, autocommit=True)
        if drop:
            self.db.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        self.client = self.use()
        self.t = f'"{schema}"'
        self.rounds = 0

    def use(self) -> Any:
        """Point this process's SDK (and the workers started next) at this schema."""
        import conveyor

        os.environ["CONVEYOR_DATABASE_URL"] = self.url
        client = conveyor.configure(database_url=self.url)
        client.engine  # noqa: B018 - creates the schema
        self.client = client
        return client

    def tables(self) -> list[str]:
        have = {r[0] for r in self.db.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (self.schema,))}
        return [t for t in ("runs", *CHILD_TABLES) if t in have]

    def clear(self) -> None:
        self.db.execute(f"TRUNCATE {', '.join(f'{self.t}.{t}' for t in self.tables())}")

    def fill(self, queued: int, finished: int, n: int, backlog_queue: str = "same") -> float:
        """`queued` QUEUED runs (bench-count with payload n in the workers' queue, or other-task in the
        `other` queue) and `finished` finished ones with their child rows. -> seconds taken."""
        import bench_tasks
        import pg_scale_data

        self.use()
        self.clear()
        started = time.perf_counter()
        template = bench_tasks.count.trigger(n).id
        if finished:
            made = pg_scale_data.fill_finished(
                self.db, self.schema, template, finished, progress=lambda m: print(m, flush=True)
            )
            print(f"  rows made: {made}", flush=True)
            # The queues the finished runs name are registered, as a deployment's would be.
            self.db.execute(
                f"INSERT INTO {self.t}.queues (environment, name, concurrency_limit, paused, updated_at) "
                "SELECT 'dev', 'queue-' || i, NULL, false, extract(epoch from now()) FROM generate_series(0, 9) AS i "
                "ON CONFLICT DO NOTHING"
            )
        if backlog_queue == "same":
            pg_scale_data.fill_queued(self.db, self.schema, template, queued - 1, queue="bench", task_id="bench-count")
        else:
            pg_scale_data.fill_queued(self.db, self.schema, template, queued, queue=OTHER_QUEUE, task_id=OTHER_TASK)
            self.db.execute(f"DELETE FROM {self.t}.runs WHERE id = %s", (template,))
        for table in self.tables():
            self.db.execute(f"VACUUM ANALYZE {self.t}.{table}")
        return time.perf_counter() - started

    def add_round(self, n: int) -> None:
        """n fresh `bench-count` runs in the workers' queue (--backlog-queue other), analyzed as fill's are."""
        import bench_tasks
        import pg_scale_data

        self.use()
        self.rounds += 1
        template = bench_tasks.count.trigger(n).id
        pg_scale_data.fill_queued(
            self.db, self.schema, template, n - 1, queue="bench", task_id="bench-count", offset=self.rounds * 10**9
        )
        self.db.execute(f"ANALYZE {self.t}.runs")

    def count(self, where: str) -> int:
        return int(self.db.execute(f"SELECT count(*) FROM {self.t}.runs WHERE {where}").fetchone()[0])

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
        """Plans of the statements a claim of 100 (the workers' request), a retention batch and
        maintenance's next-due query issue, captured as the store sends them."""
        import pg_scale_probes as probes

        from conveyor.core.records import ClaimRequest
        from conveyor.store.postgres import sql as q

        class Rollback(Exception):
            pass

        added = not self.count("queue = 'bench' AND status = 'QUEUED'")
        if added:  # --backlog-queue other between rounds: 100 runs for the claim to find, deleted after
            self.add_round(100)
        store = self.use().engine.store
        out: dict[str, str] = {}
        request = ClaimRequest("dev", "explain", ["bench"], ["bench-noop", "bench-count", "bench-lat"], 100, 30.0)
        # The usual claim (queue read and candidates, then CLAIM_START), then the one-statement
        # claim of a queue known to have no limit (CLAIM_ALONE).
        for plain in (False, True):
            (store.plain_queues.add if plain else store.plain_queues.discard)(("dev", "bench"))
            try:
                with store.transaction() as tx:
                    assert tx.now  # begun: an idle claim alone would commit itself
                    with probes.captured() as seen:
                        tx.run_claim(request)
                    raise Rollback
            except Rollback:
                pass
            setup = ""
            for i, (text, params) in enumerate(seen):
                name = "claim_start" if "INSERT INTO" in text else f"claim_{i + 1}_candidates"
                out["claim_alone" if plain else name] = probes.explain(self.db, text, params, setup=setup)
                setup += psycopg_render(self.db, text, params) + ";\n"
        with probes.captured() as seen:
            try:
                with store.transaction() as tx:
                    tx.run_purge(tx.now - 30 * 86400.0, 500)
                    raise Rollback
            except Rollback:
                pass
        text, params = next((t, p) for t, p in seen if "DELETE" in t)
        out["purge_batch"] = probes.explain(self.db, text, params)
        out["next_due"] = probes.explain(self.db, q.render(q.NEXT_DUE, self.schema, True))
        if added:
            self.db.execute(f"DELETE FROM {self.t}.runs WHERE queue = 'bench' AND status = 'QUEUED'")
        return out


def psycopg_render(db: Any, text: str, params: dict[str, Any]) -> str:
    import psycopg

    return psycopg.ClientCursor(db).mogrify(text, params) if params else text


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
    global BASE_URL
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--backlog", type=int, default=1_000_000)
    ap.add_argument("--finished", type=int, default=1_000_000)
    ap.add_argument("--backlog-queue", choices=["same", "other"], default="same")
    ap.add_argument("--only", default="pgbench,store,drain,explain")
    ap.add_argument("--database-url", default=BASE_URL)
    ap.add_argument("--create-database", action="store_true")
    ap.add_argument("--drop", action="store_true", help="drop the scratch schemas at the end")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="keep the big schema a previous run filled (same sizes) instead of refilling",
    )
    args = ap.parse_args()
    BASE_URL = args.database_url.split("?")[0]
    if args.create_database:
        create_database(BASE_URL)
    only = set(args.only.split(","))
    result: dict[str, Any] = {
        "n": args.n,
        "backlog": args.backlog,
        "finished": args.finished,
        "backlog_queue": args.backlog_queue,
        "load": [load()],
    }
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
    big = small = None
    if only & {"drain", "explain", "trigger", "reads", "purge"}:
        big = Scale(f"{SCHEMA}_big", drop=not args.reuse)
        if args.reuse:
            print(f"reusing {big.schema}: {big.count('true'):,} runs", flush=True)
        else:
            took = big.fill(args.backlog, args.finished, args.n, args.backlog_queue)
            result["fill_s"] = took
            where = "the workers' queue" if args.backlog_queue == "same" else f"queue {OTHER_QUEUE!r}"
            print(f"filled {args.backlog:,} queued ({where}) + {args.finished:,} finished runs in {took:.1f} s")
        result["sizes"] = sizes(big)
        print(f"  sizes: {result['sizes']} (load {load()})", flush=True)
    if "explain" in only:
        result["explain_before_drains"] = big.explain()
        for name, plan in result["explain_before_drains"].items():
            print(f"--- EXPLAIN {name} (before the drains)\n{plan}", flush=True)
    if "reads" in only:
        import pg_scale_probes as probes

        big.use()
        result["reads"] = probes.reads(big.client, big.db, big.url, common.VENV_BIN)
        for name, r in result["reads"].items():
            print(f"{name}: {r['ms']} ms in-process, {r['cli_ms']} ms CLI, {r['rows']} rows", flush=True)
            for line in r["summary"]:
                print(f"    {line}")
        print(f"  (load {load()})", flush=True)
    if "trigger" in only or "drain" in only:
        small = Scale(f"{SCHEMA}_empty")
    if "trigger" in only:
        result["trigger"] = trigger_rounds(small, big, args.rounds)
    if "drain" in only:
        empty, backlog = [], []
        for r in range(args.rounds):  # interleaved, so drift hits both alike
            small.fill(args.n, 0, args.n)
            res = small.drain(args.n)
            empty.append(res["drain"])
            print(f"round {r + 1}: empty table, {args.n:,} queued: {res} (load {load()})", flush=True)
            if args.backlog_queue == "other":
                big.add_round(args.n)
            before = big.count("finished_at IS NOT NULL")
            res = big.drain(args.n)
            backlog.append(res["drain"])
            res["purged_by_workers"] = before + args.n - big.count("finished_at IS NOT NULL")
            queued = big.count("status = 'QUEUED'")
            print(f"round {r + 1}: {queued:,} queued + {args.finished:,} finished: {res} (load {load()})", flush=True)
        result["drain_empty"] = statistics.median(empty)
        result["drain_backlog"] = statistics.median(backlog)
        result["drain_rounds"] = {"empty": empty, "backlog": backlog}
        ratio = result["drain_backlog"] / result["drain_empty"]
        print(f"drain median: empty {result['drain_empty']:,.0f}/s, backlog {result['drain_backlog']:,.0f}/s ", end="")
        print(f"({100 * (ratio - 1):+.1f} %; gate: within 20 %)", flush=True)
    if "explain" in only and "drain" in only:
        result["explain"] = big.explain()
        for name, plan in result["explain"].items():
            print(f"--- EXPLAIN {name} (after the drains)\n{plan}", flush=True)
    if "purge" in only:
        import pg_scale_probes as probes

        engine = big.use().engine
        result["purge"] = probes.purge(engine, big.db, big.schema, 30.0, PURGE_BATCHES)
        p = result["purge"]
        print(
            f"purge: {p['batches']} batches, {p['purged']:,} runs, batch p50 {p['batch_ms_p50']:.1f} ms max "
            f"{p['batch_ms_max']:.1f} ms; one batch held {p['hand_batch']['lock_modes']} for "
            f"{p['hand_batch']['ms']} ms; prober alone {p['probe_alone_ms']}, beside {p['probe_beside_purge_ms']}",
            flush=True,
        )
        before = big.count("true")
        result["purge_cli"] = probes.purge_cli(big.url, common.VENV_BIN, 59)
        result["purge_cli"]["runs_gone"] = before - big.count("true")
        print(f"conveyor runs purge --older-than 59: {result['purge_cli']} (load {load()})", flush=True)
    result["load"].append(load())
    if args.drop:
        import psycopg

        with psycopg.connect(BASE_URL, autocommit=True) as db:
            for schema in (f"{SCHEMA}_big", f"{SCHEMA}_empty", f"{SCHEMA}_store", "pgbench_scratch"):
                db.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    os.makedirs(os.path.join(BENCH_DIR, "results"), exist_ok=True)
    path = os.path.join(BENCH_DIR, "results", f"pg-scale-{stamp}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"results: {path}")
    return 0


def sizes(scale: Scale) -> dict[str, str]:
    """Rows (estimated) and total size (with indexes) per table."""
    out = {}
    for table in scale.tables():
        rows, size = scale.db.execute(
            "SELECT c.reltuples::bigint, pg_size_pretty(pg_total_relation_size(c.oid)) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
            (scale.schema, table),
        ).fetchone()
        out[table] = f"{rows:,} rows, {size}"
    return out


def trigger_rounds(small: Scale, big: Scale, rounds: int) -> dict[str, Any]:
    """W1 in-process, interleaved empty / big; the runs go to a queue of their own and are deleted."""
    import pg_scale_probes as probes

    from conveyor import Queue, task

    @task("scale-trigger", queue=Queue("scale-trigger"))
    async def scale_trigger(payload: Any) -> None:
        return None

    out: dict[str, Any] = {"empty": [], "big": []}
    for r in range(rounds):
        for name, scale in (("empty", small), ("big", big)):
            scale.use()
            res = probes.triggers(scale_trigger, 2000, 10)
            scale.db.execute(f"DELETE FROM {scale.t}.runs WHERE queue = 'scale-trigger'")
            out[name].append(res)
            print(f"round {r + 1}: trigger into the {name} schema: {res} (load {load()})", flush=True)
    for name in ("empty", "big"):
        for k in ("w1_single", "w1_batch"):
            out[f"{name}_{k}"] = statistics.median(x[k] for x in out[name])
    return out


if __name__ == "__main__":
    sys.exit(main())
