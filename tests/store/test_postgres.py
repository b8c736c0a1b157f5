"""What only PostgreSQL has to prove: many connections at once never break a limit or an
idempotency key, concurrent `migrate` applies once, NOTIFY wakes listeners only on commit, the
database's clock in production, reconnection, and clear errors.

Concurrency tests start their threads together and check invariants, never timings.
"""

from __future__ import annotations

import json
import queue
import random
import subprocess
import sys
import textwrap
import threading
import time

import psycopg
import pytest

from conveyor.core.clock import SYSTEM_CLOCK
from conveyor.core.errors import ConfigError, SchemaMismatch, StoreError
from conveyor.core.records import ClaimRequest, MetadataOp, Outcome, OutcomeKind, QueueSpec, RunFilter, TaskRecord
from conveyor.core.status import RunStatus
from conveyor.engine import Engine, TriggerOptions
from conveyor.engine.notify import CANCEL, DELAYED, WORK
from conveyor.store import open_store
from conveyor.store.postgres import PostgresStore, migrate


def register(engine: Engine, task_id: str, queue_limit: int | None = None, **options) -> TaskRecord:
    record = TaskRecord(task_id=task_id, queue=task_id, options=options)
    engine.register([record], [QueueSpec(task_id, queue_limit)])
    return record


def trigger(engine: Engine, task: TaskRecord, **options) -> tuple[str, bool]:
    return engine.insert([engine.prepare(task, "{}", TriggerOptions.from_kwargs(**options))])[0]


def run_threads(n: int, target) -> list:
    """Start `n` threads at once (a barrier); re-raise the first error; results in thread order."""
    barrier = threading.Barrier(n)
    results: list = [None] * n
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait(30)
            results[i] = target(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    return results


class LimitMonitor:
    """Counts EXECUTING runs per queue and per (queue, key) in single statements (each one a
    consistent snapshot), as often as it can, and remembers the maxima."""

    def __init__(self, url: str, schema: str) -> None:
        self.url, self.schema = url, schema
        self.max_queue: dict[str, int] = {}
        self.max_key: dict[tuple[str, str], int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LimitMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        text = f"""SELECT queue, coalesce(concurrency_key, ''), count(*) FILTER (WHERE queue_slot),
                       count(*) FROM "{self.schema}".runs WHERE status = 'EXECUTING'
                   GROUP BY GROUPING SETS ((queue), (queue, concurrency_key))"""
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.is_set():
                per_queue: dict[str, int] = {}
                for q, key, slotted, total in conn.execute(text).fetchall():
                    if key == "":
                        per_queue[q] = max(per_queue.get(q, 0), slotted)
                    else:
                        self.max_key[(q, key)] = max(self.max_key.get((q, key), 0), total)
                for q, n in per_queue.items():
                    self.max_queue[q] = max(self.max_queue.get(q, 0), n)
                self.samples += 1


def claim_and_finish(engine: Engine, queues: list[str], task_ids: list[str], rounds: int, seed: int) -> int:
    """A worker's life in miniature: claim a few, hold them a moment, complete them."""
    rnd = random.Random(seed)
    done = 0
    for _ in range(rounds):
        k = rnd.randrange(len(queues))
        request = ClaimRequest("dev", f"w{seed}", queues[k:] + queues[:k], task_ids, rnd.randint(1, 3), 30)
        claimed = engine.claim(request)
        time.sleep(rnd.random() * 0.003)
        if claimed:
            outcomes = [Outcome(c.id, c.lease_token, OutcomeKind.COMPLETED, output="1") for c in claimed]
            assert all(engine.exchange(outcomes, [], None)[0])
            done += len(claimed)
    return done


def test_concurrent_claims_never_exceed_queue_or_key_limits(pg_store, postgres_url, pg_schema):
    engine = Engine(pg_store)
    limited = register(engine, "limited", queue_limit=3)  # queue lock path
    keyed = register(engine, "keyed", key_limit=2)  # no queue limit: per-key advisory locks
    mixed = register(engine, "mixed", queue_limit=4, key_limit=1)  # both, keys under the queue lock
    per_key = register(engine, "per_key", queue_limit=2)  # trigger-time keys: the queue's limit per key
    runs = []
    for i in range(60):
        runs.append(trigger(engine, limited)[0])
        runs.append(trigger(engine, keyed, concurrency_key=f"k{i % 3}")[0])
        runs.append(trigger(engine, mixed, concurrency_key=f"m{i % 5}")[0])
        runs.append(trigger(engine, per_key, concurrency_key=f"p{i % 2}")[0])
    queues = ["limited", "keyed", "mixed", "per_key"]
    threads = 8
    with LimitMonitor(postgres_url, pg_schema) as monitor:
        # Each thread has its own store (own pool): the claims really run side by side.
        stores = [PostgresStore(postgres_url, pg_store.clock, schema=pg_schema, pool_size=2) for _ in range(threads)]
        try:
            engines = [Engine(s) for s in stores]
            done = run_threads(threads, lambda i: claim_and_finish(engines[i], queues, queues, 400, i))
        finally:
            for s in stores:
                s.close()
        # Whatever is left (the rounds may end early): drain it on one connection.
        while claim_and_finish(engine, queues, queues, 1, 99):
            pass
    assert sum(done) > 0 and monitor.samples > 0
    assert monitor.max_queue.get("limited", 0) <= 3
    assert monitor.max_queue.get("mixed", 0) <= 4
    assert all(n <= 2 for (q, _), n in monitor.max_key.items() if q == "keyed")
    assert all(n <= 1 for (q, _), n in monitor.max_key.items() if q == "mixed")
    assert all(n <= 2 for (q, _), n in monitor.max_key.items() if q == "per_key")
    statuses = {r.status.value for r in (engine.retrieve(r) for r in runs)}
    assert statuses == {"COMPLETED"}
    assert len(runs) == len(set(runs))
    # Every run completed exactly once: one attempt, one COMPLETED event.
    with psycopg.connect(postgres_url) as conn:
        attempts = conn.execute(f'SELECT count(*), count(DISTINCT run_id) FROM "{pg_schema}".attempts').fetchone()
        completions = conn.execute(
            f"""SELECT count(*) FROM "{pg_schema}".run_events WHERE data->>'status' = 'COMPLETED'"""
        ).fetchone()
    assert attempts == (len(runs), len(runs)) and completions == (len(runs),)


def test_two_claimers_with_rotated_queues_do_not_deadlock(pg_store, postgres_url, pg_schema):
    engine = Engine(pg_store)
    a, b = register(engine, "a", queue_limit=2), register(engine, "b", queue_limit=2)
    for _ in range(100):
        trigger(engine, a)
        trigger(engine, b)
    stores = [PostgresStore(postgres_url, pg_store.clock, schema=pg_schema, pool_size=2) for _ in range(4)]
    try:
        engines = [Engine(s) for s in stores]

        def work(i: int) -> int:
            order = ["a", "b"] if i % 2 else ["b", "a"]
            done = 0
            for _ in range(150):
                claimed = engines[i].claim(ClaimRequest("dev", f"w{i}", order, ["a", "b"], 4, 30))
                outcomes = [Outcome(c.id, c.lease_token, OutcomeKind.COMPLETED, output="1") for c in claimed]
                engines[i].exchange(outcomes, [], None)
                done += len(claimed)
            return done

        run_threads(4, work)  # a deadlock would raise StoreBusy here
    finally:
        for s in stores:
            s.close()


def test_racing_triggers_with_one_idempotency_key_make_one_run(pg_store, postgres_url, pg_schema):
    engine = Engine(pg_store)
    task = register(engine, "t")
    stores = [PostgresStore(postgres_url, pg_store.clock, schema=pg_schema, pool_size=1) for _ in range(8)]
    try:
        engines = [Engine(s) for s in stores]
        results = run_threads(8, lambda i: trigger(engines[i], task, idempotency_key="same"))
    finally:
        for s in stores:
            s.close()
    assert len({run_id for run_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    with pg_store.read() as tx:
        assert len(tx.run_list("dev", RunFilter())) == 1


def test_racing_batches_sharing_keys_in_any_order_make_one_run_per_key(pg_store, postgres_url, pg_schema):
    engine = Engine(pg_store)
    task = register(engine, "t")
    keys = [f"k{i}" for i in range(20)]
    stores = [PostgresStore(postgres_url, pg_store.clock, schema=pg_schema, pool_size=1) for _ in range(8)]
    try:
        engines = [Engine(s) for s in stores]

        def batch(i: int) -> list[tuple[str, bool]]:
            mine = keys[:]
            random.Random(i).shuffle(mine)
            e = engines[i]
            return e.insert([e.prepare(task, "{}", TriggerOptions(idempotency_key=k)) for k in mine])

        results = run_threads(8, batch)
    finally:
        for s in stores:
            s.close()
    created = [run_id for result in results for run_id, made in result if made]
    assert len(created) == len(keys) == len(set(created))
    with pg_store.read() as tx:
        assert tx.run_status_many("dev", created) == dict.fromkeys(created, "QUEUED")


def test_racing_triggers_over_an_expired_key_make_one_new_run(pg_store, postgres_url, pg_schema, clock):
    engine = Engine(pg_store)
    task = register(engine, "t")
    old, _ = trigger(engine, task, idempotency_key="k", idempotency_key_ttl=60)
    claimed = engine.claim(ClaimRequest("dev", "w", ["t"], ["t"], 1, 30))
    engine.exchange([Outcome(claimed[0].id, claimed[0].lease_token, OutcomeKind.COMPLETED, output="1")], [], None)
    clock.advance(61)
    stores = [PostgresStore(postgres_url, clock, schema=pg_schema, pool_size=1) for _ in range(8)]
    try:
        engines = [Engine(s) for s in stores]
        results = run_threads(8, lambda i: trigger(engines[i], task, idempotency_key="k"))
    finally:
        for s in stores:
            s.close()
    ids = {run_id for run_id, _ in results}
    assert len(ids) == 1 and old not in ids
    assert sum(created for _, created in results) == 1


MIGRATE_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from conveyor.store.postgres import PostgresStore
    url, schema, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
    time.sleep(max(0.0, start - time.time()))
    store = PostgresStore(url, schema=schema, auto_migrate=False, check_schema=False)
    print(json.dumps(store.migrate()))
    store.close()
    """
)


def test_migrate_from_several_processes_at_once_applies_once(postgres_url, pg_schema):
    start = time.time() + 1.5  # after every interpreter has started
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATE_SCRIPT, postgres_url, pg_schema, str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    # Each migration applied exactly once, by whichever process got the lock first.
    applied = [v for out in outputs for v in out]
    assert sorted(applied) == [v for v, _, _ in migrate.available()]
    store = PostgresStore(postgres_url, schema=pg_schema)  # the schema is complete and current
    assert store.schema_version() == migrate.LATEST
    store.close()


def test_newer_schema_is_refused(pg_store, postgres_url, pg_schema, clock):
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"INSERT INTO \"{pg_schema}\".schema_migrations VALUES (999, 'future', 0)")
    with pytest.raises(SchemaMismatch, match="newer than this Conveyor knows"):
        PostgresStore(postgres_url, clock, schema=pg_schema)


def test_older_schema_asks_for_migrate_and_migrate_upgrades(pg_store, postgres_url, pg_schema, clock, monkeypatch):
    shipped = migrate.available()
    future = migrate.LATEST + 1
    extra = (future, "add_column", "ALTER TABLE runs ADD COLUMN future_column text;")
    monkeypatch.setattr(migrate, "available", lambda: [*shipped, extra])
    monkeypatch.setattr(migrate, "LATEST", future)
    with pytest.raises(SchemaMismatch, match="run `conveyor migrate`"):
        PostgresStore(postgres_url, clock, schema=pg_schema)
    store = PostgresStore(postgres_url, clock, schema=pg_schema, auto_migrate=False, check_schema=False)
    assert store.migrate() == [future] and store.migrate() == []
    assert store.schema_version() == future
    store.close()
    PostgresStore(postgres_url, clock, schema=pg_schema).close()  # now accepted


def test_missing_schema_without_auto_migrate_asks_for_migrate(postgres_url, pg_schema, clock):
    with pytest.raises(SchemaMismatch, match="run `conveyor migrate`"):
        PostgresStore(postgres_url, clock, schema=pg_schema, auto_migrate=False)


def test_notify_reaches_listeners_only_when_the_transaction_commits(pg_store):
    engine = Engine(pg_store)
    task = register(engine, "t")
    got: queue.Queue[bytes | None] = queue.Queue()
    listener = pg_store.listen("dev", "worker-1", got.put)
    try:
        with pytest.raises(RuntimeError), pg_store.transaction() as tx:
            tx.run_insert_many("dev", [engine.prepare(task, "{}", TriggerOptions())])
            assert tx.wake("dev", WORK)
            raise RuntimeError("roll back")
        time.sleep(0.3)
        assert got.empty()  # the rolled-back insert woke nobody
        run_id, _ = trigger(engine, task)  # commits: the environment's workers are woken
        assert got.get(timeout=10) == WORK
        with pg_store.transaction() as tx:  # a wake-up alone: sent at the commit, no BEGIN needed
            assert tx.wake("dev", DELAYED)
        assert _drain_until_within(got, DELAYED, 10)
        claimed = engine.claim(ClaimRequest("dev", "worker-1", ["t"], ["t"], 1, 30))
        assert [c.id for c in claimed] == [run_id]
        engine.cancel(run_id)  # the holding worker is told on its own channel
        assert _drain_until_within(got, CANCEL, 10)
    finally:
        listener.close()


def test_a_worker_channel_is_its_own(pg_store):
    got_1: queue.Queue[bytes | None] = queue.Queue()
    got_2: queue.Queue[bytes | None] = queue.Queue()
    first, second = pg_store.listen("dev", "w1", got_1.put), pg_store.listen("dev", "w2", got_2.put)
    try:
        with pg_store.transaction() as tx:
            assert tx.wake("dev", CANCEL, "w2")
        assert got_2.get(timeout=10) == CANCEL
        time.sleep(0.2)
        assert got_1.empty()
    finally:
        first.close()
        second.close()


def test_listener_reconnects_and_reports_possible_losses(pg_store, postgres_url):
    got: queue.Queue[bytes | None] = queue.Queue()
    listener = pg_store.listen("dev", "w-reconnect", got.put)
    try:
        # Kill its connection from outside, as a server restart would.
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            killed = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN %%w-reconnect%%'"
            ).fetchall()
        assert killed
        assert got.get(timeout=20) is None  # reconnected: "some may have been missed"
        with pg_store.transaction() as tx:
            tx.wake("dev", WORK, "w-reconnect")
        assert _drain_until_within(got, WORK, 10)
    finally:
        listener.close()


def _drain_until_within(q: queue.Queue, wanted: bytes, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if q.get(timeout=0.1) == wanted:
                return True
        except queue.Empty:
            continue
    return False


def test_pooled_connections_killed_while_idle_are_replaced(postgres_url, pg_schema, clock):
    """Each kind of first statement: BEGIN (sent again), a lone trigger (idempotent: sent again),
    a lone claim (never sent twice: a closed connection is noticed before it goes out)."""
    name = f"conveyor-kill-{pg_schema[-8:]}"
    store = PostgresStore(postgres_url, clock, schema=pg_schema, pool_size=2, application_name=name)

    def kill_pooled() -> None:
        """Terminate the pool's sessions and wait until they are gone (idle ones that died)."""
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (name,))
            alive = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            deadline = time.monotonic() + 10
            while conn.execute(alive, (name,)).fetchone()[0] and time.monotonic() < deadline:
                time.sleep(0.01)

    try:
        engine = Engine(store)
        task = register(engine, "t")
        request = ClaimRequest("dev", "w1", ["t"], ["t"], 5, 30)
        assert engine.claim(request) == []  # the queue is known plain now: the next claim is one statement
        kill_pooled()
        run_id, created = trigger(engine, task)  # no error: the dead connection is replaced
        assert created and engine.retrieve(run_id).status.value == "QUEUED"
        kill_pooled()
        assert [c.id for c in engine.claim(request)] == [run_id]
        kill_pooled()
        assert engine.tasks()[0].task_id == "t"  # a read
    finally:
        store.close()


def test_a_lone_trigger_sent_again_makes_one_run(pg_store, postgres_url, pg_schema):
    """A trigger of one run is one statement that commits itself; after a lost connection it is
    sent again whatever became of the first try. Sent twice, it makes the run and its tags once."""
    engine = Engine(pg_store)
    task = register(engine, "t")
    run = engine.prepare(task, '{"n": 1}', TriggerOptions.from_kwargs(tags=["a", "b"]))
    for _ in range(2):
        with pg_store.transaction() as tx:
            assert tx.run_insert_many("dev", [run]) == [(run.id, True)]
    assert engine.retrieve(run.id).payload == {"n": 1}
    assert [r.id for r in engine.list_runs(RunFilter(tags=["a"]))] == [run.id]
    with psycopg.connect(postgres_url) as conn:
        counts = conn.execute(
            f'SELECT (SELECT count(*) FROM "{pg_schema}".runs), (SELECT count(*) FROM "{pg_schema}".run_tags)'
        ).fetchone()
    assert counts == (1, 2)


def test_one_statement_claims_fall_back_for_limits_keys_and_pauses(pg_store):
    """A queue seen plain is claimed in one statement; when it gains a limit, when a keyed run is
    first in line, or when it is paused, that statement starts nothing and the usual claim does."""
    engine = Engine(pg_store)
    task = register(engine, "q", key_limit=1)
    request = ClaimRequest("dev", "w1", ["q"], ["q"], 10, 30)
    assert engine.claim(request) == []
    plain = ("dev", "q")
    assert plain in pg_store.plain_queues
    first = trigger(engine, task)[0]
    assert [c.id for c in engine.claim(request)] == [first]  # one statement
    engine.register([], [QueueSpec("q", 2)])  # now with a limit
    for _ in range(4):
        trigger(engine, task)
    assert len(engine.claim(request)) == 1 and plain not in pg_store.plain_queues  # 1 running + 1 = limit 2
    engine.register([], [QueueSpec("q", None)])
    assert len(engine.claim(request)) == 3 and plain in pg_store.plain_queues
    keyed = [trigger(engine, task, concurrency_key="user-1")[0] for _ in range(3)]
    assert [c.id for c in engine.claim(request)] == keyed[:1]  # the key's limit of 1 holds
    assert plain not in pg_store.plain_queues
    assert engine.claim(request) == []
    trigger(engine, task)  # behind the two keyed runs still queued: claimed past them
    assert len(engine.claim(request)) == 1
    engine.set_paused("q", True)
    trigger(engine, task)
    assert engine.claim(request) == []


def test_only_a_claim_alone_commits_without_waiting_for_the_flush(pg_store):
    """A claim that is its whole transaction commits with synchronous_commit off for that
    transaction only; a claim beside outcomes (a worker's exchange) keeps the session's setting,
    and no pooled session is left with it off."""
    engine = Engine(pg_store)
    task = register(engine, "q")
    request = ClaimRequest("dev", "w1", ["q"], ["q"], 1, 30)
    engine.claim(request)
    for _ in range(3):
        trigger(engine, task)
    claimed = engine.claim(request)  # alone: in autocommit, off
    assert len(claimed) == 1
    with pg_store.transaction() as tx:
        outcome = Outcome(claimed[0].id, claimed[0].lease_token, OutcomeKind.COMPLETED, output="1")
        assert tx.run_settle_many("dev", [outcome]) == [True]
        assert len(tx.run_claim(request)) == 1
        assert tx._one("SHOW synchronous_commit")[0] == "on"
    for _ in range(pg_store.pool.max_size + 1):
        with pg_store.transaction() as tx:
            assert tx._one("SHOW synchronous_commit")[0] == "on"


def test_production_uses_the_database_clock(postgres_url, pg_schema):
    store = PostgresStore(postgres_url, SYSTEM_CLOCK, schema=pg_schema)
    try:
        engine = Engine(store)
        task = register(engine, "t")
        run_id, _ = trigger(engine, task, ttl=600)
        claimed = engine.claim(ClaimRequest("dev", "w", ["t"], ["t"], 1, 45))
        assert [c.id for c in claimed] == [run_id]
        with store.transaction() as tx:
            db_now = tx.now
            lease = tx.conn.execute(
                f'SELECT lease_expires_at - started_at FROM "{pg_schema}".runs WHERE id = %s', (run_id,)
            ).fetchone()[0]
        assert lease == pytest.approx(45)
        run = engine.retrieve(run_id)
        assert run.started_at <= db_now and run.created_at <= run.started_at
        assert engine.maintain().recovered == 0
        assert engine.exchange([Outcome(run_id, claimed[0].lease_token, OutcomeKind.COMPLETED)], [], None)[0] == [True]
    finally:
        store.close()


def test_open_store_reads_the_schema_from_the_url_and_ignores_sqlite_options(postgres_url, pg_schema, clock):
    store = open_store(f"{postgres_url}?schema={pg_schema}", clock, synchronous="full")
    try:
        assert isinstance(store, PostgresStore) and store.schema == pg_schema
        assert pg_schema in store.location and "password" not in store.location
        assert store.schema_version() == migrate.LATEST
    finally:
        store.close()


def test_bad_schema_name_is_refused(postgres_url, clock):
    with pytest.raises(ConfigError, match="bad schema name"):
        PostgresStore(postgres_url, clock, schema='x"; DROP TABLE y')


def test_unreachable_server_is_a_clear_store_error(clock):
    with pytest.raises(StoreError, match="cannot reach the database postgresql://nobody@127.0.0.1:1/"):
        PostgresStore("postgresql://nobody@127.0.0.1:1/none", clock, connect_timeout=2)


def test_heartbeat_and_the_workers_exchange_do_not_deadlock(pg_store, postgres_url, pg_schema):
    """The exchange locks run B (metadata), the heartbeat wants A and B, then the exchange
    settles A: with both holding one and waiting for the other, PostgreSQL would abort one."""
    engine = Engine(pg_store)
    task = register(engine, "t")
    first, second = trigger(engine, task)[0], trigger(engine, task)[0]
    claimed = {c.id: c for c in engine.claim(ClaimRequest("dev", "w", ["t"], ["t"], 2, 30))}
    beat_store = PostgresStore(postgres_url, pg_store.clock, schema=pg_schema, pool_size=1)
    results: dict[str, object] = {}
    try:
        with pg_store.transaction() as tx:
            assert tx.metadata_apply(second, [MetadataOp("set", "k", 1)], claimed[second].lease_token) is not None

            def beat() -> None:
                results["beat"] = Engine(beat_store).heartbeat("w", 30, [first, second])

            thread = threading.Thread(target=beat)
            thread.start()
            time.sleep(0.2)  # the heartbeat is now trying (and backing off)
            assert tx.run_settle_many("dev", [Outcome(first, claimed[first].lease_token, OutcomeKind.COMPLETED)]) == [
                True
            ]
        thread.join(30)
        assert not thread.is_alive()
    finally:
        beat_store.close()
    renewed = results["beat"].renewed  # type: ignore[attr-defined]
    assert renewed == {second: claimed[second].lease_token}
    assert engine.retrieve(first).status is RunStatus.COMPLETED
