"""Waking workers on PostgreSQL (store/postgres/listen.py): per-queue channels, one idle worker
woken per new run, and every way a wake-up addressed to one worker is passed on when that worker
cannot serve it — so none is lost while another worker of the queue could take the run.

Listeners here are the store's own (`PostgresStore.listen`), fed what a worker would tell them
(`serve`, `resolve`); tests/e2e/test_pg_wake.py runs the same with worker processes.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from conveyor.core.records import DEFAULT_MACHINE, QueueSpec, TaskRecord
from conveyor.engine import Engine, TriggerOptions
from conveyor.engine.notify import TARGETED, WORK, Notifier
from conveyor.store.postgres import listen as pg_listen
from conveyor.store.postgres.driver import PostgresStore

QUIET = 0.3  # how long "nothing arrives" is watched for


class Worker:
    """A listener and what it delivered."""

    def __init__(self, store: PostgresStore, name: str) -> None:
        self.name = name
        self.got: queue.Queue[bytes | None] = queue.Queue()
        self.listener = store.listen("dev", name, self.got.put)

    def serve(self, queues: list[str], task_ids: list[str], available: bool = True, version: str | None = None) -> None:
        self.listener.serve(queues, task_ids, DEFAULT_MACHINE, version, available)

    def advertising(self, *queues: str) -> None:
        wait_for(lambda: self.listener.advertised == frozenset(queues), f"{self.name} to advertise {queues}")
        self.drain()  # the catch-up WORK of newly listened queues

    def drain(self) -> list[bytes | None]:
        out = []
        while True:
            try:
                out.append(self.got.get(timeout=0.05))
            except queue.Empty:
                return out

    def next(self, timeout: float = 10.0) -> bytes | None:
        return self.got.get(timeout=timeout)

    def quiet(self, seconds: float = QUIET) -> bool:
        try:
            self.got.get(timeout=seconds)
        except queue.Empty:
            return True
        return False


def wait_for(condition: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def engine(pg_store: PostgresStore) -> Engine:
    return Engine(pg_store)


@pytest.fixture
def workers(pg_store: PostgresStore) -> Iterator[Any]:
    made: list[Worker] = []

    def make(name: str) -> Worker:
        w = Worker(pg_store, name)
        made.append(w)
        return w

    yield make
    for w in made:
        w.listener.close()


def task(engine: Engine, task_id: str, queue_name: str) -> TaskRecord:
    record = TaskRecord(task_id=task_id, queue=queue_name, options={})
    engine.register([record], [QueueSpec(queue_name, None)])
    return record


def trigger(engine: Engine, record: TaskRecord, n: int = 1, **options: Any) -> None:
    opts = TriggerOptions.from_kwargs(**options)
    engine.insert([engine.prepare(record, "{}", opts) for _ in range(n)])


def test_a_new_run_wakes_one_idle_worker_of_its_queue_and_a_batch_wakes_them_all(engine, workers):
    t = task(engine, "t", "q")
    a, b = workers("a"), workers("b")
    for w in (a, b):
        w.serve(["q"], ["t"])
    a.advertising("q")
    b.advertising("q")
    woken = []
    for _ in range(6):
        trigger(engine, t)
        wait_for(lambda: not (a.got.empty() and b.got.empty()), "a wake-up")
        picked, other = (a, b) if not a.got.empty() else (b, a)
        picked.listener.resolve(time.monotonic(), served=True)  # as its worker would, at once
        assert picked.drain() == [TARGETED]
        assert other.quiet(0.1)  # one worker, once
        woken.append(picked)
    first = woken[0]
    assert all(w is first for w in woken)  # the idle worker in the lowest slot
    assert first.listener.slots["q"] < (b if first is a else a).listener.slots["q"]
    second = b if first is a else a
    first.serve(["q"], ["t"], available=False)
    wait_for(lambda: not first.listener.advertised, "the first to withdraw")
    first.drain()
    trigger(engine, t)
    assert second.next() == TARGETED
    second.listener.resolve(time.monotonic(), served=True)
    assert first.quiet()
    first.serve(["q"], ["t"])
    first.advertising("q")
    trigger(engine, t, n=2)  # a batch: every worker of the queue
    assert a.next() == WORK
    assert b.next() == WORK


def test_a_worker_is_woken_only_for_the_queues_it_serves(engine, workers):
    ta, tb = task(engine, "ta", "qa"), task(engine, "tb", "qb")
    a = workers("a")
    a.serve(["qa"], ["ta"], available=False)  # not advertising: woken by the queue's channel
    wait_for(lambda: a.listener.listened == ("qa",), "the queue channels")
    a.drain()
    trigger(engine, tb)
    trigger(engine, tb, n=3)
    assert a.quiet()
    trigger(engine, ta)
    assert a.next() == WORK


def test_a_worker_without_a_free_slot_is_not_picked(engine, workers):
    t = task(engine, "t", "q")
    full, idle = workers("full"), workers("idle")
    full.serve(["q"], ["t"], available=False)
    idle.serve(["q"], ["t"])
    idle.advertising("q")
    wait_for(lambda: full.listener.listened == ("q",), "the queue channels")
    full.drain()
    for _ in range(5):
        trigger(engine, t)
        assert idle.next() == TARGETED
        idle.listener.resolve(time.monotonic(), served=True)
    assert full.quiet()


def test_with_no_idle_worker_every_worker_of_the_queue_is_woken(engine, workers):
    t = task(engine, "t", "q")
    a, b = workers("a"), workers("b")
    for w in (a, b):
        w.serve(["q"], ["t"], available=False)
    wait_for(lambda: a.listener.listened == b.listener.listened == ("q",), "the queue channels")
    a.drain(), b.drain()
    trigger(engine, t)
    assert a.next() == WORK
    assert b.next() == WORK


def test_a_wake_up_the_worker_could_not_serve_goes_to_the_others(engine, workers):
    t = task(engine, "t", "q")
    a, b = idle_and_busy(workers)
    trigger(engine, t)
    assert a.next() == TARGETED
    assert b.quiet(0.1)  # (the watchdog would forward it after 0.25 s)
    a.listener.resolve(time.monotonic(), served=False)  # e.g. it filled up, or claimed nothing
    assert b.next() == WORK
    assert a.quiet()  # its own forward is not handed back to it


def test_a_wake_up_never_reported_is_passed_on(engine, workers):
    """A worker whose loop is blocked never reports: the listener forwards after _WATCHDOG."""
    t = task(engine, "t", "q")
    a, b = idle_and_busy(workers)
    trigger(engine, t)
    assert a.next() == TARGETED
    started = time.monotonic()
    assert b.next(timeout=5) == WORK
    assert time.monotonic() - started >= pg_listen._WATCHDOG * 0.8


def test_reports_cover_only_the_wake_ups_received_before_them(engine, workers):
    t = task(engine, "t", "q")
    a, b = idle_and_busy(workers)
    before = time.monotonic()
    trigger(engine, t)
    assert a.next() == TARGETED
    a.listener.resolve(before, served=False)  # a report older than the wake-up: not about it
    a.listener.resolve(time.monotonic(), served=True)
    time.sleep(pg_listen._WATCHDOG)
    assert b.quiet()  # neither forwarded, nor passed on by the watchdog


def test_a_pick_committed_after_the_worker_filled_up_is_passed_on(engine, workers, pg_store, postgres_url):
    """The producer chose `a` (its advert was up) but commits after `a` withdrew it."""
    task(engine, "t", "q")
    a, b = idle_and_busy(workers)
    with psycopg.connect(postgres_url) as producer:
        pick(producer, pg_store, "q")  # chooses a (the only advert), pins it, not committed
        a.serve(["q"], ["t"], available=False)
        wait_for(lambda: not a.listener.advertised, "a to withdraw")
        producer.commit()
    assert b.next() == WORK  # a forwarded it
    assert a.quiet()


def test_a_closing_worker_waits_for_the_producers_that_picked_it_and_passes_their_runs_on(
    engine, workers, pg_store, postgres_url
):
    t = task(engine, "t", "q")
    a, b = idle_and_busy(workers)
    with psycopg.connect(postgres_url) as producer:
        pick(producer, pg_store, "q")
        closing = threading.Thread(target=a.listener.close)
        closing.start()
        time.sleep(0.3)
        assert closing.is_alive()  # waiting for the pin
        assert b.quiet()
        producer.commit()
    closing.join(5)
    assert not closing.is_alive()
    assert b.next() == WORK
    # And once it is gone, nobody picks it: a new run goes to every worker of the queue.
    trigger(engine, t)
    assert b.next() == WORK


def test_a_pick_of_a_closing_worker_goes_to_the_queue(engine, workers, pg_store, postgres_url):
    """A producer that reads the advert while the worker closes cannot pin it: it notifies the
    queue's channel instead."""
    t = task(engine, "t", "q")
    a, b = idle_and_busy(workers)
    with psycopg.connect(postgres_url, autocommit=True) as closing:
        # As the closing listener does, before it stops listening: take its slot's pin.
        locks = pg_listen.worker_locks(closing.info.dbname, pg_store.schema, "dev", "q", DEFAULT_MACHINE, None)
        closing.execute("SELECT pg_advisory_lock(%s::int4, %s::int4)", [locks.pin, a.listener.slots["q"]])
        assert a.listener.advertised == frozenset({"q"})  # the advert is still up
        trigger(engine, t)
        assert b.next() == WORK  # the queue's channel, not `a` alone: its pin was taken
        assert a.next() == WORK


def test_a_dead_session_is_not_picked(engine, workers, postgres_url):
    t = task(engine, "t", "q")
    a, b = workers("a"), workers("b")
    for w in (a, b):
        w.serve(["q"], ["t"])
    a.advertising("q")
    b.advertising("q")
    pid = a.listener.backend_pid
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", [pid])
        wait_for(
            lambda: not conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]).fetchall(),
            "the session to end",
        )
    # Its adverts went with it: while the listener reconnects (>= 0.5 s), every run goes to b.
    for _ in range(3):
        trigger(engine, t)
        assert b.next() == TARGETED
        b.listener.resolve(time.monotonic(), served=True)
    assert a.next() is None  # reconnected: "some may have been missed"
    a.advertising("q")  # and advertising again, from its new session
    assert a.listener.backend_pid != pid


def test_a_worker_that_does_not_serve_every_task_of_a_queue_does_not_advertise(engine, workers):
    t1 = task(engine, "t1", "q")
    task(engine, "t2", "q")
    partial, whole = workers("partial"), workers("whole")
    partial.serve(["q"], ["t1"])
    whole.serve(["q"], ["t1", "t2"])
    whole.advertising("q")
    wait_for(lambda: partial.listener.listened == ("q",), "the queue channels")
    time.sleep(0.2)
    assert partial.listener.advertised == frozenset()
    partial.drain()
    trigger(engine, t1)
    assert whole.next() == TARGETED
    whole.listener.resolve(time.monotonic(), served=True)
    assert partial.quiet()


def test_versions_decide_who_is_picked(engine, workers):
    t = task(engine, "t", "q")
    v1, v2, anyv = workers("v1"), workers("v2"), workers("any")
    v1.serve(["q"], ["t"], version="1")
    v2.serve(["q"], ["t"], version="2")
    v1.advertising("q")
    v2.advertising("q")
    for _ in range(4):
        trigger(engine, t, version="2")
        assert v2.next() == TARGETED
        v2.listener.resolve(time.monotonic(), served=True)
        assert v1.quiet()
    anyv.serve(["q"], ["t"])
    anyv.advertising("q")
    v2.serve(["q"], ["t"], available=False, version="2")
    wait_for(lambda: not v2.listener.advertised, "v2 to withdraw")
    trigger(engine, t, version="2")
    assert anyv.next() == TARGETED  # a worker without a version takes any


def test_a_listener_that_was_never_told_its_queues_hears_every_queue(engine, pg_store):
    t = task(engine, "t", "q")
    got: queue.Queue[bytes | None] = queue.Queue()
    listener = pg_store.listen("dev", "legacy", got.put)
    try:
        trigger(engine, t)
        assert got.get(timeout=10) == WORK
    finally:
        listener.close()


def test_notifier_reports_a_wake_up_served_only_after_a_claim_that_took_runs_and_left_room():
    reports: list[tuple[float, bool]] = []

    class Fake:
        def serve(self, *args: Any) -> None:
            pass

        def resolve(self, before: float, served: bool) -> None:
            reports.append((before, served))

        def lend(self, loan: Any) -> None:
            pass

    notifier = Notifier(None, "dev")  # type: ignore[arg-type]
    fake = Fake()
    notifier.attach("w", fake)
    idle = dict(queues=["q"], task_ids=["t"], machine=DEFAULT_MACHINE, version=None)
    notifier.idle("w", **idle, able=True, claim_wanted=False, claimed=0)
    assert reports == []  # nothing was targeted
    notifier.targeted("w", 1.0, claimed=5)
    notifier.idle("w", **idle, able=True, claim_wanted=False, claimed=6)
    assert reports.pop() == (1.0, True)
    notifier.targeted("w", 2.0, claimed=6)
    notifier.idle("w", **idle, able=True, claim_wanted=False, claimed=6)  # claimed nothing
    assert reports.pop() == (2.0, False)
    notifier.targeted("w", 3.0, claimed=6)
    notifier.idle("w", **idle, able=False, claim_wanted=True, claimed=7)  # filled up
    assert reports.pop() == (3.0, False)
    notifier.targeted("w", 4.0, claimed=7)
    notifier.targeted("w", 5.0, claimed=7)
    notifier.idle("w", **idle, able=True, claim_wanted=False, claimed=8)
    assert reports == [(5.0, True)]


class FakeLoan:
    """What a wholly idle worker lends its listener (engine.notify.ClaimLoan), scripted."""

    def __init__(self, served: bool) -> None:
        self.served = served
        self.taken = threading.Event()

    def take(self) -> bool:
        if self.taken.is_set():
            return False
        self.taken.set()
        return True

    def run(self) -> bool:
        return self.served


def test_an_idle_worker_s_listener_claims_itself_with_the_loan_and_passes_on_what_it_could_not(engine, workers):
    t = task(engine, "t", "q")
    a, b = idle_and_busy(workers)
    loan = FakeLoan(served=True)
    a.listener.lend(loan)
    trigger(engine, t)
    assert loan.taken.wait(10)
    assert a.quiet()  # claimed on the LISTEN thread: no datagram, nothing pending
    assert b.quiet()  # nor forwarded (not even by the watchdog)
    loan = FakeLoan(served=False)  # claimed nothing, or the worker filled up
    a.listener.lend(loan)
    trigger(engine, t)
    assert loan.taken.wait(10)
    assert b.next() == WORK
    assert a.quiet()
    trigger(engine, t)  # the loan is used up: the worker's loop is woken as usual
    assert a.next() == TARGETED


def test_a_claim_loan_is_made_once_and_never_after_the_worker_took_it_back():
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        woken: list[bool] = []
        claims: list[int] = []

        def claim() -> list[str]:
            claims.append(1)
            return ["run-1"]

        loan = Notifier.loan(claim, 2, loop, lambda: woken.append(True))
        assert loan.take() and not loan.take()
        assert await asyncio.to_thread(loan.run)  # one run of two slots: served
        await asyncio.wait_for(loan.done, 5)
        assert loan.claimed == ["run-1"] and woken == [True] and claims == [1]
        assert not loan.revoke()  # taken: the worker waits for `done` and starts its runs
        other = Notifier.loan(claim, 1, loop, lambda: None)
        assert other.revoke()
        assert not other.take()  # taken back first: the listener wakes the worker instead
        full = Notifier.loan(claim, 1, loop, lambda: None)
        assert full.take() and not await asyncio.to_thread(full.run)  # it filled the worker

    asyncio.run(scenario())


def idle_and_busy(workers):
    """Two workers of queue "q": `a` idle and advertising, `b` listening but without a free slot."""
    a, b = workers("a"), workers("b")
    a.serve(["q"], ["t"])
    a.advertising("q")
    b.serve(["q"], ["t"], available=False)
    wait_for(lambda: b.listener.listened == ("q",), "the queue channels")
    b.drain()
    return a, b


def pick(producer: psycopg.Connection, store: PostgresStore, queue_name: str) -> None:
    """What PostgresStore._commit sends for one new run in `queue_name`, inside the producer's
    open transaction."""
    channel = pg_listen.queue_channel(store.schema, "dev", queue_name)
    locks = pg_listen.run_locks(producer.info.dbname, store.schema, "dev", queue_name, DEFAULT_MACHINE, None)
    statement, params = pg_listen.pick_notify(locks, channel)
    producer.execute(statement, params)
