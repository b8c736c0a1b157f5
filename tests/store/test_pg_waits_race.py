"""PostgreSQL only: what SQLite's single writer gives for free. Parents suspend on waits that
other connections complete at the same time (children finishing on four "workers", tokens
completed by an app, timers ended by maintenance): no parent may stay WAITING once everything
it waits for has completed (a lost resume), none may resume twice, and no transaction may fail
with a deadlock.

The children exist before their parent suspends (a trigger inside the run, then a wait on the
waitpoints it created), so a child can finish in the very moment its parent suspends.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time

import psycopg

from conveyor.core.records import (
    ClaimRequest,
    NewWaitpoint,
    Outcome,
    OutcomeKind,
    QueueSpec,
    StepRecord,
    TaskRecord,
    WaitRequest,
)
from conveyor.core.status import RunStatus
from conveyor.engine import Engine, TriggerOptions
from conveyor.store.postgres import PostgresStore

PARENTS = 200
CHILDREN = 2  # per parent: two children of one parent may finish at once on two workers
CHILD_WORKERS = 4


def step(run_id: str, position: int, name: str, output: dict) -> StepRecord:
    return StepRecord(run_id, position, f"{name}#{position}", name, json.dumps(output), 1, 10.0, 10.0)


def test_parents_suspending_while_their_waits_complete_are_never_left_waiting(postgres_url, pg_schema, clock):
    store = PostgresStore(postgres_url, clock, schema=pg_schema, pool_size=12)
    try:
        engine = Engine(store)
        parent_task, child_task = TaskRecord("parent", "parent"), TaskRecord("child", "child")
        engine.register([parent_task, child_task], [QueueSpec("parent", None), QueueSpec("child", None)])
        opts = TriggerOptions.from_kwargs()
        engine.insert([engine.prepare(parent_task, "{}", opts) for _ in range(PARENTS)])
        parents = engine.claim(ClaimRequest("dev", "pw", ["parent"], ["parent"], PARENTS, 600.0))
        assert len(parents) == PARENTS

        # Each parent triggers its children (committed: they can be claimed at once) and, for some,
        # a token and a timer already due exist; it waits for all of them only later.
        waits: dict[str, list[str]] = {}
        for n, p in enumerate(parents):
            children = [
                engine.prepare(child_task, json.dumps({"n": n, "i": i}), opts, parent_id=p.id, root_id=p.id)
                for i in range(CHILDREN)
            ]
            run_waits = [NewWaitpoint(f"w_{p.id}_{i}", "run") for i in range(CHILDREN)]
            request = WaitRequest(step(p.id, 0, "trigger:child", {}), create=run_waits, runs=children)
            assert len(engine.apply_wait(request, p.lease_token) or []) == CHILDREN
            waits[p.id] = [w.id for w in run_waits]
            extra = []
            if n % 3 == 0:
                extra.append(NewWaitpoint(f"tok_{p.id}", "token"))
            if n % 5 == 0:
                extra.append(NewWaitpoint(f"time_{p.id}", "time", complete_at=engine.now))
            if extra:
                engine.create_waitpoints(extra)
                waits[p.id] += [w.id for w in extra]
        tokens = [f"tok_{p.id}" for n, p in enumerate(parents) if n % 3 == 0]

        errors: list[BaseException] = []
        barrier = threading.Barrier(2 + CHILD_WORKERS + 2)
        settled = itertools.count(1)
        children_done = threading.Event()
        others_done = threading.Event()

        def guarded(body):
            def run(*args):
                try:
                    barrier.wait(30)
                    body(*args)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    children_done.set()

            return run

        @guarded
        def suspend_parents(k: int) -> None:
            mine = parents[k::2]
            i = 0
            while i < len(mine):
                batch = mine[i : i + 1 + (i % 3)]  # one to three suspensions per exchange
                i += len(batch)
                outcomes = [
                    Outcome(
                        p.id,
                        p.lease_token,
                        OutcomeKind.SUSPENDED,
                        waits=[
                            WaitRequest(step(p.id, 1, "wait.all", {"waitpoints": waits[p.id]}), wait_on=waits[p.id])
                        ],
                    )
                    for p in batch
                ]
                assert engine.exchange(outcomes, [], None).accepted == [True] * len(batch)

        @guarded
        def run_children(k: int) -> None:
            rng = random.Random(k)
            while not children_done.is_set():
                claimed = engine.claim(ClaimRequest("dev", f"cw{k}", ["child"], ["child"], rng.randint(1, 3), 600.0))
                if not claimed:
                    time.sleep(0.001)
                    continue
                outcomes = [
                    Outcome(c.id, c.lease_token, OutcomeKind.COMPLETED, output=json.dumps({"from": k}))
                    if rng.random() < 0.8
                    else Outcome(
                        c.id, c.lease_token, OutcomeKind.FAILED, error={"code": "BOOM"}, status=RunStatus.FAILED
                    )
                    for c in claimed
                ]
                assert engine.exchange(outcomes, [], None).accepted == [True] * len(claimed)
                for _ in claimed:
                    if next(settled) == PARENTS * CHILDREN:
                        children_done.set()

        @guarded
        def complete_tokens() -> None:
            for token in tokens:
                assert engine.complete_token(token, json.dumps({"ok": True, "output": token})) is True

        @guarded
        def maintain() -> None:
            while not others_done.is_set():
                engine.maintain()
            engine.maintain()  # one pass after everything else: no timer is left due

        threads = [threading.Thread(target=suspend_parents, args=(k,)) for k in range(2)]
        threads += [threading.Thread(target=run_children, args=(k,)) for k in range(CHILD_WORKERS)]
        threads += [threading.Thread(target=complete_tokens), threading.Thread(target=maintain)]
        for t in threads:
            t.start()
        for t in threads[:-1]:
            t.join(120)
        others_done.set()
        threads[-1].join(120)
        assert not errors, errors  # a deadlock would be a StoreBusy here
        assert not any(t.is_alive() for t in threads), "a thread did not finish"

        with psycopg.connect(postgres_url, autocommit=True) as conn:
            lost = conn.execute(
                f"""SELECT r.id FROM "{pg_schema}".runs r WHERE r.status = 'WAITING'
                    AND NOT EXISTS (SELECT 1 FROM "{pg_schema}".run_waits w
                                    JOIN "{pg_schema}".waitpoints p ON p.id = w.waitpoint_id
                                    WHERE w.run_id = r.id AND p.status = 'PENDING')"""
            ).fetchall()
            pending = conn.execute(f"""SELECT count(*) FROM "{pg_schema}".waitpoints WHERE status = 'PENDING'""")
            assert pending.fetchone() == (0,)
        assert lost == [], f"{len(lost)} parents left WAITING with nothing pending"

        # Every parent resumed exactly once, and continues its attempt.
        for p in parents:
            statuses = [e.data["status"] for e in engine.events(p.id) if e.kind == "status"]
            assert statuses == ["QUEUED", "EXECUTING", "WAITING", "QUEUED"], (p.id, statuses)
        resumed = engine.claim(ClaimRequest("dev", "pw2", ["parent"], ["parent"], PARENTS, 600.0))
        assert len(resumed) == PARENTS and {(c.attempt, c.segment) for c in resumed} == {(1, 2)}
        journal = engine.journal(resumed[0].id)
        assert all(w.completed for w in journal.waits.values()) and len(journal.waits) == len(waits[resumed[0].id])
    finally:
        store.close()


def test_cancel_cascades_racing_children_that_finish_do_not_deadlock(postgres_url, pg_schema, clock):
    """A cancel locks a parent, then its children; a child's settle locks the child, then its
    parent: the cancel takes its runs all at once, so the two never wait for each other."""
    store = PostgresStore(postgres_url, clock, schema=pg_schema, pool_size=12)
    try:
        engine = Engine(store)
        parent_task, child_task = TaskRecord("parent", "parent"), TaskRecord("child", "child")
        engine.register([parent_task, child_task], [QueueSpec("parent", None), QueueSpec("child", None)])
        opts = TriggerOptions.from_kwargs()
        n_parents = 60
        engine.insert([engine.prepare(parent_task, "{}", opts) for _ in range(n_parents)])
        parents = engine.claim(ClaimRequest("dev", "pw", ["parent"], ["parent"], n_parents, 600.0))
        # Each parent suspends on three children created with the suspension (trigger_and_wait).
        for p in parents:
            children = [
                engine.prepare(child_task, json.dumps({"i": i}), opts, parent_id=p.id, root_id=p.id) for i in range(3)
            ]
            ids = [f"w_{p.id}_{i}" for i in range(3)]
            request = WaitRequest(
                step(p.id, 0, "batch_trigger_and_wait:child", {"waitpoints": ids}),
                create=[NewWaitpoint(w, "run") for w in ids],
                runs=children,
                wait_on=ids,
            )
            outcome = Outcome(p.id, p.lease_token, OutcomeKind.SUSPENDED, waits=[request])
            assert engine.exchange([outcome], [], None).accepted == [True]

        errors: list[BaseException] = []
        barrier = threading.Barrier(CHILD_WORKERS + 1)
        stop = threading.Event()

        def run_children(k: int) -> None:
            try:
                barrier.wait(30)
                while not stop.is_set():
                    claimed = engine.claim(ClaimRequest("dev", f"cw{k}", ["child"], ["child"], 2, 600.0))
                    if not claimed:
                        time.sleep(0.001)
                        continue
                    outcomes = [Outcome(c.id, c.lease_token, OutcomeKind.COMPLETED, output="1") for c in claimed]
                    engine.exchange(outcomes, [], None)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        def cancel_parents() -> None:
            try:
                barrier.wait(30)
                for p in parents[::2]:
                    engine.cancel(p.id)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run_children, args=(k,)) for k in range(CHILD_WORKERS)]
        threads.append(threading.Thread(target=cancel_parents))
        for t in threads:
            t.start()
        threads[-1].join(120)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and engine.list_runs(_filter(["QUEUED"], "child")):
            time.sleep(0.01)
        stop.set()
        for t in threads:
            t.join(120)
        assert not errors, errors  # a deadlock would be a StoreBusy here
        canceled = {p.id for p in parents[::2]}
        for p in parents:
            status = engine.retrieve(p.id).status
            if p.id in canceled:
                # Canceled, unless all of its children finished first (then it had resumed).
                assert status in (RunStatus.CANCELED, RunStatus.QUEUED), (p.id, status)
            else:
                assert status is RunStatus.QUEUED, (p.id, status)
        assert not engine.list_runs(_filter(["WAITING"], "parent"))
    finally:
        store.close()


def _filter(statuses: list[str], task: str):
    from conveyor.core.records import RunFilter

    return RunFilter(status=statuses, task=task, limit=1000)


def test_a_wait_on_an_existing_child_racing_its_end_is_never_lost(postgres_url, pg_schema, clock):
    """An idempotency key gives a parent's trigger_and_wait an existing child that is finishing
    on another connection at that moment (COMPLETED in bulk, or FAILED, which frees the key the
    parent holds): the child's end completes the parent's new waitpoint, or the parent sees the
    child done; the parent never waits for nothing."""
    store = PostgresStore(postgres_url, clock, schema=pg_schema, pool_size=12)
    try:
        engine = Engine(store)
        parent_task, child_task = TaskRecord("parent", "parent"), TaskRecord("child", "child")
        engine.register([parent_task, child_task], [QueueSpec("parent", None), QueueSpec("child", None)])
        n = 150
        engine.insert([engine.prepare(parent_task, "{}", TriggerOptions.from_kwargs()) for _ in range(n)])
        parents = engine.claim(ClaimRequest("dev", "pw", ["parent"], ["parent"], n, 600.0))
        # The children exist first, triggered outside any run (no parent), each with its own key.
        engine.insert(
            [engine.prepare(child_task, "{}", TriggerOptions.from_kwargs(idempotency_key=f"k{i}")) for i in range(n)]
        )
        errors: list[BaseException] = []
        barrier = threading.Barrier(4)
        stop = threading.Event()

        def suspend_parents(k: int) -> None:
            try:
                barrier.wait(30)
                for i in range(k, n, 2):
                    p = parents[i]
                    options = TriggerOptions.from_kwargs(idempotency_key=f"k{i}")
                    child = engine.prepare(child_task, "{}", options, parent_id=p.id, root_id=p.id)
                    wp = NewWaitpoint(f"w_{p.id}", "run")
                    request = WaitRequest(
                        step(p.id, 0, "trigger_and_wait:child", {"waitpoints": [wp.id]}),
                        create=[wp],
                        runs=[child],
                        wait_on=[wp.id],
                    )
                    outcome = Outcome(p.id, p.lease_token, OutcomeKind.SUSPENDED, waits=[request])
                    assert engine.exchange([outcome], [], None).accepted == [True]
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        def run_children(k: int) -> None:
            rng = random.Random(k)
            try:
                barrier.wait(30)
                while not stop.is_set():
                    claimed = engine.claim(
                        ClaimRequest("dev", f"cw{k}", ["child"], ["child"], rng.randint(1, 3), 600.0)
                    )
                    if not claimed:
                        time.sleep(0.0005)
                        continue
                    outcomes = [
                        Outcome(c.id, c.lease_token, OutcomeKind.COMPLETED, output="1")
                        if rng.random() < 0.5
                        else Outcome(
                            c.id, c.lease_token, OutcomeKind.FAILED, error={"code": "X"}, status=RunStatus.FAILED
                        )
                        for c in claimed
                    ]
                    engine.exchange(outcomes, [], None)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=suspend_parents, args=(k,)) for k in range(2)]
        threads += [threading.Thread(target=run_children, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads[:2]:
            t.join(120)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and engine.list_runs(_filter(["QUEUED", "EXECUTING"], "child")):
            time.sleep(0.01)
        stop.set()
        for t in threads[2:]:
            t.join(120)
        assert not errors, errors
        assert {engine.retrieve(p.id).status for p in parents} == {RunStatus.QUEUED}
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            pending = conn.execute(f"""SELECT count(*) FROM "{pg_schema}".waitpoints WHERE status = 'PENDING'""")
            assert pending.fetchone() == (0,)
    finally:
        store.close()
