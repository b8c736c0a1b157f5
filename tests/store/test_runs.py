"""The rest of the Tx vocabulary, on every driver: inserts and idempotency keys, cancel,
reschedule, maintenance, reads, metadata operations, logs, workers and the task registry."""

import pytest

from conveyor.core.errors import InvalidOptions, InvalidTransition, RunNotFound
from conveyor.core.records import (
    ClaimRequest,
    LogLine,
    MetadataOp,
    Outcome,
    OutcomeKind,
    RunFilter,
    TaskRecord,
    WorkerInfo,
)
from conveyor.core.status import RunStatus
from conveyor.engine import TriggerOptions


def test_insert_records_every_option_and_reads_it_back(h, clock):
    t = h.task("t", retry={"max_attempts": 4})
    run_id = h.trigger(
        t,
        '{"x": 1, "nested": {"b": [1, 2.5, null, "s"]}}',
        tags=["a", "user:42"],
        metadata={"chat": 7},
        priority=10,
        ttl=600,
        concurrency_key="user:42",
        machine="large-1x",
        version="v1",
        max_attempts=5,
        idempotency_key="k1",
        max_duration=30,
    )
    run = h.engine.retrieve(run_id)
    assert run.status is RunStatus.QUEUED and run.environment == "dev"
    assert run.payload == {"x": 1, "nested": {"b": [1, 2.5, None, "s"]}}
    assert run.tags == ["a", "user:42"] and run.metadata == {"chat": 7}
    assert (run.priority, run.ttl, run.concurrency_key, run.machine) == (10, 600, "user:42", "large-1x")
    assert (run.version, run.max_attempts, run.idempotency_key, run.max_duration) == ("v1", 5, "k1", 30)
    assert run.created_at == clock.now() and run.available_at == clock.now()
    assert run.started_at is None and run.finished_at is None and run.attempts == 0
    assert run.retry["max_attempts"] == 4 and run.idempotency_key_ttl is not None
    assert [e.data for e in h.engine.events(run_id)] == [{"status": "QUEUED"}]


def test_a_batch_records_each_items_options(h, clock):
    """A batch is one statement on PostgreSQL (an array per column): every item keeps its own
    options, unset ones too, whole and fractional numbers side by side in one column."""
    t = h.task("t")
    items = [
        TriggerOptions(tags=["a", "b"], ttl=600, max_duration=30, priority=5, concurrency_key="u1"),
        TriggerOptions(),
        TriggerOptions(ttl=1.5, max_duration=2.25, delay=60, metadata={"m": 1}, machine="large-1x", version="v2"),
        TriggerOptions(tags=["c"], idempotency_key="k", idempotency_key_ttl=90, max_attempts=7),
    ]
    runs = [h.engine.prepare(t, f'{{"i": {i}}}', o) for i, o in enumerate(items)]
    ids = [run_id for run_id, _ in h.engine.insert(runs)]
    got = [h.engine.retrieve(i) for i in ids]
    assert [r.payload for r in got] == [{"i": 0}, {"i": 1}, {"i": 2}, {"i": 3}]
    assert [r.tags for r in got] == [["a", "b"], [], [], ["c"]]
    assert [r.ttl for r in got] == [600, None, 1.5, None]
    assert [r.max_duration for r in got] == [30, None, 2.25, None]
    assert [r.priority for r in got] == [5, 0, 0, 0]
    assert [r.concurrency_key for r in got] == ["u1", None, None, None]
    assert [r.status for r in got] == [RunStatus.QUEUED, RunStatus.QUEUED, RunStatus.DELAYED, RunStatus.QUEUED]
    assert got[2].available_at == clock.now() + 60 and got[2].metadata == {"m": 1}
    assert (got[2].machine, got[2].version, got[0].machine) == ("large-1x", "v2", "small-1x")
    assert (got[3].idempotency_key, got[3].idempotency_key_ttl, got[3].max_attempts) == ("k", 90, 7)
    assert len({r.batch_id for r in got}) == 1 and got[0].batch_id
    assert [r.id for r in h.engine.list_runs(RunFilter(tags=["c"]))] == [ids[3]]


def test_batch_dedupes_keys_and_keeps_input_order(h):
    t = h.task("t")
    existing = h.trigger(t, idempotency_key="old")
    runs = [
        h.engine.prepare(t, f'{{"i": {i}}}', TriggerOptions(idempotency_key=k))
        for i, k in enumerate(["a", None, "a", "old", None])
    ]
    results = h.engine.insert(runs)
    ids = [r for r, _ in results]
    assert ids[0] == ids[2] and ids[3] == existing
    assert [c for _, c in results] == [True, True, False, False, True]
    assert h.engine.retrieve(ids[2]).payload == {"i": 0}  # the first item with the key wins
    batch = h.engine.retrieve(ids[1]).batch_id
    assert batch and all(h.engine.retrieve(i).batch_id == batch for i in (ids[0], ids[1], ids[4]))


def test_key_lifetime(h, clock):
    t = h.task("t")
    first = h.trigger(t, idempotency_key="k", idempotency_key_ttl=60)
    assert h.trigger(t, idempotency_key="k") == first
    clock.advance(3600)
    assert h.trigger(t, idempotency_key="k") == first  # never expires while unfinished
    h.complete(h.claim(t))
    second = h.trigger(t, idempotency_key="k", idempotency_key_ttl=60)
    assert second != first  # finished, and its ttl ended long ago
    h.complete(h.claim(t))
    clock.advance(59)
    assert h.trigger(t, idempotency_key="k") == second  # COMPLETED keeps it until the ttl
    clock.advance(2)
    assert h.trigger(t, idempotency_key="k") not in (first, second)
    other = h.task("other")
    assert h.trigger(other, idempotency_key="k") != second  # keys are per task


@pytest.mark.parametrize("final", [RunStatus.FAILED, RunStatus.TIMED_OUT, RunStatus.CRASHED, RunStatus.CANCELED])
def test_final_statuses_free_or_keep_the_key(h, final):
    t = h.task("t")
    first = h.trigger(t, idempotency_key="k")
    c = h.claim(t)[0]
    h.engine.exchange([Outcome(c.id, c.lease_token, OutcomeKind.FAILED, status=final, error={"m": 1})], [], None)
    again = h.trigger(t, idempotency_key="k")
    assert (again == first) is (final is RunStatus.CANCELED)


def test_expired_run_frees_its_key(h, clock):
    t = h.task("t")
    first = h.trigger(t, idempotency_key="k", ttl=10)
    clock.advance(11)
    assert h.engine.maintain().expired == 1
    assert h.status(first) == "EXPIRED"
    assert h.engine.retrieve(first).error["code"] == "EXPIRED"
    assert h.trigger(t, idempotency_key="k") != first


def test_cancel_queued_delayed_executing_and_finished(h):
    t = h.task("t")
    queued, delayed = h.trigger(t), h.trigger(t, delay=60)
    assert h.engine.cancel(queued).status is RunStatus.CANCELED
    assert h.engine.cancel(delayed).status is RunStatus.CANCELED
    assert h.engine.cancel(queued).status is RunStatus.CANCELED  # finished: unchanged
    assert [e.data["status"] for e in h.engine.events(delayed)] == ["DELAYED", "CANCELED"]
    running = h.trigger(t)
    c = h.claim(t)[0]
    run = h.engine.cancel(running)
    assert run.status is RunStatus.EXECUTING and run.cancel_requested
    assert h.engine.cancel_requested("w1") == [running]
    with pytest.raises(RunNotFound):
        h.engine.cancel("run_nope")
    assert c.id == running


def test_reschedule_moves_a_delayed_run_only(h, clock):
    t = h.task("t")
    delayed = h.trigger(t, delay=60)
    assert h.engine.reschedule(delayed, 600).available_at == clock.now() + 600
    queued = h.trigger(t)
    with pytest.raises(InvalidTransition, match="only a DELAYED run"):
        h.engine.reschedule(queued, 10)
    with pytest.raises(RunNotFound):
        h.engine.reschedule("run_nope", 10)


def test_ttl_counts_from_when_a_delayed_run_is_queued(h, clock):
    t = h.task("t")
    run = h.trigger(t, delay=100, ttl=10)
    clock.advance(101)
    assert h.engine.maintain().promoted == 1
    clock.advance(9)
    h.engine.maintain()
    assert h.status(run) == "QUEUED"
    clock.advance(2)
    assert h.engine.maintain().expired == 1
    assert [e.data["status"] for e in h.engine.events(run)] == ["DELAYED", "QUEUED", "EXPIRED"]


def test_maintenance_reports_next_due_and_retries_that_became_due(h, clock):
    t = h.task("t")
    h.trigger(t, delay=30)
    first = h.engine.maintain()
    assert first.promoted == 0 and first.next_due == clock.now() + 30
    run = h.trigger(t)
    c = h.claim(t, lease=100)[0]
    assert h.engine.maintain().next_due == clock.now() + 30  # the delayed run before the lease
    retry_at = clock.now() + 5
    h.engine.exchange([Outcome(c.id, c.lease_token, OutcomeKind.RETRY, error={"m": "x"}, retry_at=retry_at)], [], None)
    assert h.engine.maintain().next_due == retry_at
    since = clock.now()
    clock.advance(6)
    result = h.engine.maintain(since=since)
    assert result.became_due == 1 and result.promoted == 0
    assert h.engine.retrieve(run).error == {"m": "x"}
    assert h.engine.maintain().promoted == 0  # idempotent


def test_attempts_and_events_of_a_retried_run(h, clock):
    t = h.task("t")
    run = h.trigger(t)
    c = h.claim(t)[0]
    h.engine.exchange(
        [Outcome(c.id, c.lease_token, OutcomeKind.RETRY, error={"message": "boom"}, retry_at=clock.now())], [], None
    )
    c2 = h.claim(t)[0]
    assert c2.attempt == 2
    h.complete(c2, output='{"done": true}')
    attempts = h.engine.attempts(run)
    assert [(a.number, a.status) for a in attempts] == [(1, "FAILED"), (2, "COMPLETED")]
    assert attempts[0].error == {"message": "boom"} and attempts[1].error is None
    events = h.engine.events(run)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert [e.data["status"] for e in events] == ["QUEUED", "EXECUTING", "QUEUED", "EXECUTING", "COMPLETED"]
    assert events[2].data["retry_at"] == clock.now() and events[3].attempt == 2
    assert [e.seq for e in h.engine.events(run, after_seq=3)] == [4, 5]
    r = h.engine.retrieve(run)
    assert r.output == {"done": True} and r.attempts == 2 and r.status is RunStatus.COMPLETED


def test_metadata_operations_are_applied_in_the_store(h):
    t = h.task("t")
    run = h.trigger(t, metadata={"keep": 1})
    c = h.claim(t)[0]
    ops = [
        MetadataOp("set", "progress", 0.5),
        MetadataOp("increment", "count", 2),
        MetadataOp("increment", "count", 3),
        MetadataOp("append", "seen", "a"),
        MetadataOp("append", "seen", {"b": [1]}),
        MetadataOp("set", "gone", True),
        MetadataOp("delete", "gone"),
    ]
    with h.engine.store.transaction() as tx:
        result = tx.metadata_apply(run, ops, c.lease_token)
    expected = {"keep": 1, "progress": 0.5, "count": 5, "seen": ["a", {"b": [1]}]}
    assert result == expected and h.engine.retrieve(run).metadata == expected
    with h.engine.store.transaction() as tx:
        assert tx.metadata_apply(run, [], c.lease_token) == expected
        assert tx.metadata_apply(run, [MetadataOp("set", "k", 1)], "not-the-token") is None
        assert tx.metadata_apply(run, [MetadataOp("set", "free", [1, 2])]) == {**expected, "free": [1, 2]}
        with pytest.raises(InvalidOptions, match="needs a number"):
            tx.metadata_apply(run, [MetadataOp("increment", "count", "x")])
        with pytest.raises(InvalidOptions, match="must be non-empty"):
            tx.metadata_apply(run, [MetadataOp("set", 'a"b', 1)])
    kinds = [(e.kind, e.data.get("op")) for e in h.engine.events(run) if e.kind == "metadata"]
    assert kinds[:3] == [("metadata", "set"), ("metadata", "increment"), ("metadata", "increment")]


def test_log_lines_are_fenced_and_kept_in_order(h):
    t = h.task("t")
    run = h.trigger(t)
    c = h.claim(t)[0]
    lines = [
        LogLine(run, c.lease_token, 1, 100.0 + i, "INFO", f"line {i}", {"i": i} if i % 2 else None) for i in range(5)
    ]
    with h.engine.store.transaction() as tx:
        assert tx.log_append_many([*lines, LogLine(run, "stale", 1, 1.0, "INFO", "refused")]) == 5
        assert tx.log_append_many([]) == 0
    got = h.engine.logs(run)
    assert [ln.message for ln in got] == [f"line {i}" for i in range(5)]
    assert got[1].attributes == {"i": 1} and got[0].attributes is None and got[2].ts == 102.0


def test_run_list_filters_and_pages(h, clock):
    a, b = h.task("a"), h.task("b")
    ids = []
    for i in range(5):
        ids.append(h.trigger(a if i % 2 == 0 else b, tags=["even"] if i % 2 == 0 else ["odd"]))
        clock.advance(1)
    newest_first = list(reversed(ids))
    assert [r.id for r in h.engine.list_runs(RunFilter())] == newest_first
    assert [r.id for r in h.engine.list_runs(RunFilter(task="b"))] == [ids[3], ids[1]]
    assert [r.id for r in h.engine.list_runs(RunFilter(tags=["even"]))] == [ids[4], ids[2], ids[0]]
    page = h.engine.list_runs(RunFilter(limit=2))
    assert [r.id for r in page] == newest_first[:2]
    assert [r.id for r in h.engine.list_runs(RunFilter(limit=2, cursor=page[-1].id))] == newest_first[2:4]
    h.claim(a, limit=1)
    assert [r.id for r in h.engine.list_runs(RunFilter(status=["EXECUTING"]))] == [ids[0]]
    created = h.engine.retrieve(ids[2]).created_at
    assert [r.id for r in h.engine.list_runs(RunFilter(created_after=created))] == newest_first[:2]
    assert [r.id for r in h.engine.list_runs(RunFilter(created_before=created))] == [ids[1], ids[0]]
    with h.engine.store.read() as tx:
        assert tx.run_status_many("dev", [ids[0], ids[1], "run_nope"]) == {ids[0]: "EXECUTING", ids[1]: "QUEUED"}
        assert tx.run_get("other-env", ids[0]) is None


def test_queues_list_pause_and_unservable(h):
    t = h.task("t", queue="ai", queue_limit=3)
    h.trigger(t)
    h.trigger(t, delay=10)
    h.trigger(t, machine="large-1x")
    info = h.engine.queue("ai")
    assert (info.concurrency_limit, info.queued, info.delayed, info.running, info.paused) == (3, 2, 1, 0, False)
    assert info.unservable == 2  # no live worker at all
    h.engine.register_worker(WorkerInfo("w", "dev", "host", 1, None, ["ai"], "small-1x", None, 0, 0))
    assert h.engine.queue("ai").unservable == 1  # no worker for large-1x
    assert h.engine.set_paused("ai", True).paused
    assert [q.name for q in h.engine.queues()] == ["ai"]
    assert h.engine.set_paused("ai", False).paused is False
    with h.engine.store.transaction() as tx:
        tx.run_insert_many("dev", [h.engine.prepare(t, "{}", TriggerOptions(queue="adhoc"))])
    names = [(q.name, q.queued, q.concurrency_limit) for q in h.engine.queues()]
    assert names == [("adhoc", 1, None), ("ai", 2, 3)]


def test_workers_register_list_and_deregister(h, clock):
    w = WorkerInfo("w1", "dev", "host", 42, "udp://127.0.0.1:9", ["a", "b"], "small-1x", "v1", 0, 0)
    h.engine.register_worker(w)
    h.engine.register_worker(WorkerInfo("w2", "prod", "host", 43, None, [], "small-1x", None, 0, 0))
    listed = h.engine.workers()
    assert [(x.id, x.pid, x.queues, x.version, x.started_at) for x in listed] == [
        ("w1", 42, ["a", "b"], "v1", clock.now())
    ]
    with h.engine.store.read() as tx:
        assert {x.id for x in tx.worker_list(None)} == {"w1", "w2"}
    clock.advance(31)
    assert h.engine.workers() == []  # silent for longer than live_within
    h.engine.heartbeat("w1", 30, [])
    assert [x.id for x in h.engine.workers()] == ["w1"]
    h.engine.deregister_worker("w1")
    assert h.engine.workers() == []


def test_task_registry_keeps_the_latest_definition(h, clock):
    h.engine.register([TaskRecord("t", "q1", options={"a": 1}, payload_schema={"type": "object"})], [])
    clock.advance(1)
    h.engine.register([TaskRecord("t", "q2", options={"a": 2}, version="v2", code_hash="h")], [])
    h.engine.register([TaskRecord("u", "q1")], [])
    record = h.engine.task("t")
    assert (record.queue, record.options, record.version, record.code_hash) == ("q2", {"a": 2}, "v2", "h")
    assert [(r.task_id, r.queue) for r in h.engine.tasks()] == [("t", "q2"), ("u", "q1")]
    with h.engine.store.read() as tx:
        assert tx.task_get("dev", "nope") is None and tx.task_get("prod", "t") is None


def test_claim_request_for_another_environment_sees_nothing(h):
    t = h.task("t")
    h.trigger(t)
    assert h.engine.claim(ClaimRequest("prod", "w", ["t"], ["t"], 5, 30)) == []
    assert len(h.claim(t)) == 1
