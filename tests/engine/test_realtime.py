"""Realtime subscriptions and streams without a worker: runs are claimed and written through
the store, subscribers follow their event logs; `streams.pipe` runs against fake channels.

Subscriptions here use a short poll and a fallback of 30 s, so a test only passes if the
change-token wake-up works (the fallback would be far too late)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

import conveyor
from conveyor.core.errors import ConveyorError, InvalidOptions, NonDeterministic, RunNotFound, SerializationError
from conveyor.core.records import ClaimRequest, Journal, MetadataOp, Outcome, OutcomeKind, StepRecord, StreamChunk
from conveyor.engine import TriggerOptions
from conveyor.sdk import context, realtime
from conveyor.sdk.context import AttemptInfo, Context, Execution, RunInfo, TaskInfo
from helpers import register

FAST = {"poll": 0.005, "fallback": 30.0}
TIMEOUT = 5.0


def trigger(engine, task, **options):
    return engine.insert([engine.prepare(task, "{}", TriggerOptions.from_kwargs(**options))])[0][0]


def claim(engine, task):
    return engine.claim(ClaimRequest("dev", "w1", [task.queue], [task.task_id], 10, 30.0))


def started(engine, **options):
    """A run of task "t", claimed: (run id, its ClaimedRun)."""
    t = register(engine, "t")
    run = trigger(engine, t, **options)
    (c,) = claim(engine, t)
    return run, c


def stream(engine, c, *chunks, key="tokens"):
    with engine.store.transaction() as tx:
        assert tx.stream_append_many([StreamChunk(c.id, c.lease_token, c.attempt, key, d, time.time()) for d in chunks])


def set_metadata(engine, c, key, value):
    with engine.store.transaction() as tx:
        assert tx.metadata_apply(c.id, [MetadataOp("set", key, value)], c.lease_token) is not None


def settle(engine, c, kind=OutcomeKind.COMPLETED, **fields):
    with engine.store.transaction() as tx:
        assert tx.run_settle_many("dev", [Outcome(c.id, c.lease_token, kind, **fields)]) == [True]


def brief(updates):
    return [(u.seq, u.type, u.data.get("status") or u.data.get("chunk") or u.data.get("key")) for u in updates]


async def until(condition, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.002)


class Collector:
    """Consumes a subscription in a task, keeping what it yields."""

    def __init__(self, subscription):
        self.updates: list[realtime.RunUpdate] = []
        self.received: list[float] = []
        self._subscription = subscription
        self.task = asyncio.create_task(self._consume())

    async def _consume(self):
        async with contextlib.aclosing(self._subscription) as updates:
            async for update in updates:
                self.updates.append(update)
                self.received.append(time.monotonic())

    async def count(self, n):
        await until(lambda: len(self.updates) >= n or self.task.done())
        if self.task.done():
            self.task.result()  # raise what ended it
        return self.updates

    async def finish(self):
        await asyncio.wait_for(self.task, TIMEOUT)
        return self.updates

    async def stop(self):
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        return self.updates


# --- subscribe(run_id) ---------------------------------------------------------------------------


def test_subscribe_gives_the_stored_log_then_live_updates_and_ends_at_the_final_status(engine):
    run, c = started(engine)
    stream(engine, c, '"a"', '"b"')

    async def main():
        sub = Collector(realtime.subscribe(engine, run, **FAST))
        assert brief(await sub.count(4)) == [(1, "status", "QUEUED"), (2, "status", "EXECUTING"),
                                             (3, "stream", "a"), (4, "stream", "b")]  # fmt: skip
        set_metadata(engine, c, "stage", "x")
        await sub.count(5)
        stream(engine, c, '"c"')
        await sub.count(6)
        settle(engine, c, output='"done"')
        return await sub.finish()

    updates = asyncio.run(main())
    assert brief(updates[4:]) == [(5, "metadata", "stage"), (6, "stream", "c"), (7, "status", "COMPLETED")]
    assert updates[4].data == {"op": "set", "key": "stage", "value": "x"}
    assert updates[5].data == {"key": "tokens", "chunk": "c"} and updates[5].attempt == 1
    assert updates[-1].finished and not any(u.finished for u in updates[:-1])
    assert all(u.run_id == run for u in updates)


def test_a_chunk_reaches_a_subscriber_within_milliseconds(engine):
    run, c = started(engine)

    async def main():
        sub = Collector(realtime.subscribe(engine, run, after=2, **FAST))
        await asyncio.sleep(0.05)  # the subscriber is asleep: nothing new
        latencies = []
        for i in range(5):
            sent = time.monotonic()
            stream(engine, c, str(i))
            await sub.count(i + 1)
            latencies.append(sub.received[i] - sent)
        await sub.stop()
        return latencies

    latencies = asyncio.run(main())
    assert sorted(latencies)[2] < 0.1, latencies  # the median; the fallback read is 30 s away


def test_a_late_subscriber_gets_the_whole_log_of_a_finished_run_and_ends(engine):
    run, c = started(engine)
    stream(engine, c, "1", "2")
    settle(engine, c, OutcomeKind.FAILED, error={"message": "x"})

    async def main():
        return await Collector(realtime.subscribe(engine, run, **FAST)).finish()

    assert brief(asyncio.run(main())) == [
        (1, "status", "QUEUED"),
        (2, "status", "EXECUTING"),
        (3, "stream", 1),
        (4, "stream", 2),
        (5, "status", "FAILED"),
    ]


def test_subscribe_resumes_after_a_seq(engine):
    run, c = started(engine)
    stream(engine, c, "1", "2", "3")
    settle(engine, c)

    async def main(after):
        return await Collector(realtime.subscribe(engine, run, after=after, **FAST)).finish()

    assert [u.seq for u in asyncio.run(main(3))] == [4, 5, 6]
    assert asyncio.run(main(6)) == []  # after the final status: ends at once


def test_a_retry_goes_on_and_only_a_final_status_ends_the_subscription(engine):
    t = register(engine, "t", retry={"max_attempts": 2, "min_delay": 0, "max_delay": 0, "randomize": False})
    run = trigger(engine, t)
    (first,) = claim(engine, t)

    async def main():
        sub = Collector(realtime.subscribe(engine, run, **FAST))
        stream(engine, first, '"one"')
        settle(engine, first, OutcomeKind.RETRY, error={"message": "boom"}, retry_at=engine.now)
        await sub.count(4)
        (second,) = claim(engine, t)
        stream(engine, second, '"two"')
        settle(engine, second)
        return await sub.finish()

    updates = asyncio.run(main())
    assert brief(updates) == [(1, "status", "QUEUED"), (2, "status", "EXECUTING"), (3, "stream", "one"),
                              (4, "status", "QUEUED"), (5, "status", "EXECUTING"), (6, "stream", "two"),
                              (7, "status", "COMPLETED")]  # fmt: skip
    assert (updates[2].attempt, updates[5].attempt) == (1, 2)


def test_subscribe_to_an_unknown_run_raises(engine):
    async def main():
        async for _ in realtime.subscribe(engine, "run_nope", **FAST):
            pass

    with pytest.raises(RunNotFound):
        asyncio.run(main())


def test_conveyor_runs_subscribe_through_the_client(client, engine):
    run, c = started(engine)
    stream(engine, c, '"hi"')
    settle(engine, c)

    async def main():
        return [u async for u in conveyor.runs.subscribe(run, poll=0.005)]

    updates = asyncio.run(main())
    assert isinstance(updates[0], conveyor.RunUpdate)
    assert [u.type for u in updates] == ["status", "status", "stream", "status"]

    async def by_tag():
        sub = Collector(conveyor.runs.subscribe_tag("team:a", poll=0.005))
        await asyncio.sleep(0.02)
        tagged = trigger(engine, engine.task("t"), tags=["team:a"])
        first = (await sub.count(1))[0]
        await sub.stop()
        return tagged, first

    tagged, first = asyncio.run(by_tag())
    assert (first.run_id, first.seq, first.data) == (tagged, 1, {"status": "QUEUED"})


# --- subscribe_tag ---------------------------------------------------------------------------------


def test_subscribe_tag_follows_existing_runs_and_runs_created_later(engine):
    t = register(engine, "t")
    before = trigger(engine, t, tags=["user:42"])
    (c_before,) = claim(engine, t)
    stream(engine, c_before, '"old"')  # before the subscription: not delivered

    async def main():
        sub = Collector(realtime.subscribe_tag(engine, "user:42", **FAST))
        await asyncio.sleep(0.02)
        later = trigger(engine, t, tags=["vip", "user:42"])
        trigger(engine, t, tags=["user:7"])  # another tag
        await sub.count(1)  # the later run's first status: the subscription has started
        stream(engine, c_before, '"new"')
        await sub.count(2)
        claimed = {c.id: c for c in claim(engine, t)}
        stream(engine, claimed[later], '"x"')
        settle(engine, claimed[later])
        settle(engine, c_before)
        await sub.count(6)
        await asyncio.sleep(0.05)  # nothing else arrives
        return later, await sub.stop()

    later, updates = asyncio.run(main())
    assert len(updates) == 6
    assert brief([u for u in updates if u.run_id == before]) == [(4, "stream", "new"), (5, "status", "COMPLETED")]
    assert brief([u for u in updates if u.run_id == later]) == [
        (1, "status", "QUEUED"),
        (2, "status", "EXECUTING"),
        (3, "stream", "x"),
        (4, "status", "COMPLETED"),
    ]


def test_subscribe_tag_after_a_time_delivers_the_runs_created_since_then_whole(engine):
    t = register(engine, "t")
    old = trigger(engine, t, tags=["batch"])
    time.sleep(0.005)
    since = time.time()
    time.sleep(0.005)
    recent = trigger(engine, t, tags=["batch"])
    claimed = {c.id: c for c in claim(engine, t)}
    stream(engine, claimed[recent], '"r"')
    settle(engine, claimed[recent])  # finished before the subscription: still delivered whole

    async def main():
        sub = Collector(realtime.subscribe_tag(engine, "batch", after=since, **FAST))
        await sub.count(4)
        stream(engine, claimed[old], '"o"')
        await sub.count(5)
        return await sub.stop()

    updates = asyncio.run(main())
    assert brief([u for u in updates if u.run_id == recent]) == [
        (1, "status", "QUEUED"),
        (2, "status", "EXECUTING"),
        (3, "stream", "r"),
        (4, "status", "COMPLETED"),
    ]
    assert brief([u for u in updates if u.run_id == old]) == [(3, "stream", "o")]


# --- streams.pipe ------------------------------------------------------------------------------------


@dataclass
class FakeChannel:
    """The Channel protocol, recording what a run's code hands to its worker."""

    journal: list[StepRecord] = field(default_factory=list)
    streamed: list[tuple[str, str]] = field(default_factory=list)
    saved: list[StepRecord] = field(default_factory=list)

    def log(self, level: str, message: str, attributes: dict[str, Any] | None, ts: float) -> None:
        pass

    def metadata(self, ops: list[MetadataOp]) -> None:
        pass

    def stream(self, key: str, chunk: str, ts: float) -> None:
        self.streamed.append((key, chunk))

    async def load_journal(self) -> Journal:
        return Journal(steps=list(self.journal))

    async def save_step(self, step: StepRecord) -> None:
        self.saved.append(step)

    def load_journal_sync(self) -> Journal:
        return Journal(steps=list(self.journal))

    def save_step_sync(self, step: StepRecord) -> None:
        self.saved.append(step)


@dataclass
class StoreChannel(FakeChannel):
    """Writes through the store at once, fenced like the worker's commits."""

    engine: Any = None
    claimed: Any = None

    def stream(self, key: str, chunk: str, ts: float) -> None:
        c = self.claimed
        with self.engine.store.transaction() as tx:
            assert tx.stream_append_many([StreamChunk(c.id, c.lease_token, c.attempt, key, chunk, ts)]) == [True]

    async def save_step(self, step: StepRecord) -> None:
        with self.engine.store.transaction() as tx:
            assert tx.step_append_many([replace(step, lease_token=self.claimed.lease_token)]) == [True]


def execution(channel, sync=False, run_id="run_test", attempt=1):
    ctx = Context(RunInfo(run_id, [], 0.0, 0.0), AttemptInfo(attempt, 0.0), TaskInfo("t", "t"), "dev", None, "x")
    return Execution(ctx=ctx, channel=channel, sync=sync)


def in_run(execution, fn):
    token = context.enter(execution)
    try:
        return fn()
    finally:
        context.leave(token)


@dataclass
class Point:
    x: int
    y: int


class Source:
    """An async generator's stand-in that records how it was used."""

    def __init__(self, items):
        self.items = items
        self.pulled = 0
        self.closed = False

    async def gen(self):
        try:
            for item in self.items:
                self.pulled += 1
                yield item
        finally:
            self.closed = True


def test_pipe_publishes_each_chunk_and_journals_the_list_like_a_step():
    channel = FakeChannel()
    source = Source(["a", (1, 2), Point(1, 2), None])
    result = in_run(execution(channel), lambda: asyncio.run(conveyor.streams.pipe("tokens", source.gen())))
    assert result == ["a", [1, 2], {"x": 1, "y": 2}, None]  # the JSON form, as a replay returns it
    assert channel.streamed == [("tokens", '"a"'), ("tokens", "[1,2]"), ("tokens", '{"x":1,"y":2}'), ("tokens", "null")]
    (step,) = channel.saved
    assert (step.position, step.key, step.name, step.attempt) == (0, "stream:tokens#0", "stream:tokens", 1)
    assert step.output == '["a",[1,2],{"x":1,"y":2},null]'


def test_a_replayed_pipe_returns_the_stored_list_without_iterating_or_publishing():
    stored = StepRecord("run_test", 0, "stream:tokens#0", "stream:tokens", '["a","b"]', 1, 1.0, 2.0)
    channel = FakeChannel(journal=[stored])
    source = Source(["should", "not", "run"])

    async def main():
        gen = source.gen()
        await gen.asend(None)  # started (a replayed iterable may be mid-way): close must finish it
        return await conveyor.streams.pipe("tokens", gen)

    assert in_run(execution(channel, attempt=2), lambda: asyncio.run(main())) == ["a", "b"]
    assert channel.streamed == [] and channel.saved == []
    assert source.pulled == 1 and source.closed  # aclose() ran its finally


def test_pipe_in_a_sync_task_blocks_and_returns_the_list():
    channel = FakeChannel()
    result = in_run(execution(channel, sync=True), lambda: conveyor.streams.pipe("lines", iter(["x", "y"])))
    assert result == ["x", "y"] and [c for _, c in channel.streamed] == ['"x"', '"y"']
    assert channel.saved[0].key == "stream:lines#0"

    closed = []

    def gen():
        try:
            yield "never"
        finally:
            closed.append(True)

    replay = FakeChannel(journal=channel.saved)
    g = gen()
    next(g)
    assert in_run(execution(replay, sync=True), lambda: conveyor.streams.pipe("lines", g)) == ["x", "y"]
    assert replay.streamed == [] and closed == [True]

    async def agen():
        yield 1

    with pytest.raises(ConveyorError, match="async iterable needs an `async def` task"):
        in_run(execution(FakeChannel(), sync=True), lambda: conveyor.streams.pipe("k", agen()))


def test_pipe_calls_are_numbered_per_key_after_the_other_steps():
    channel = FakeChannel()

    async def main():
        await conveyor.step("load", lambda: 1)
        await conveyor.streams.pipe("a", ["1"])
        await conveyor.streams.pipe("a", ["2"])
        await conveyor.streams.pipe("b", ["3"])

    in_run(execution(channel), lambda: asyncio.run(main()))
    assert [(s.position, s.key) for s in channel.saved] == [
        (0, "load#0"),
        (1, "stream:a#0"),
        (2, "stream:a#1"),
        (3, "stream:b#0"),
    ]


def test_a_pipe_where_the_journal_has_another_call_is_non_deterministic():
    other = StepRecord("run_test", 0, "load#0", "load", "1", 1, 1.0, 2.0)
    with pytest.raises(NonDeterministic, match="stream:tokens#0"):
        in_run(execution(FakeChannel(journal=[other])), lambda: asyncio.run(conveyor.streams.pipe("tokens", [1])))


def test_pipe_refuses_chunks_that_are_not_json_and_journals_nothing():
    channel = FakeChannel()

    with pytest.raises(SerializationError, match="chunk 1 of stream 'tokens' is not JSON-serialisable"):
        in_run(execution(channel), lambda: asyncio.run(conveyor.streams.pipe("tokens", ["ok", object()])))
    assert channel.streamed == [("tokens", '"ok"')] and channel.saved == []
    with pytest.raises(SerializationError, match="NUL"):
        in_run(execution(FakeChannel()), lambda: asyncio.run(conveyor.streams.pipe("t", [{"a": "x\x00"}])))
    with pytest.raises(SerializationError, match="passed 100 bytes"):
        small = execution(FakeChannel())
        small.max_step_bytes = 100
        in_run(small, lambda: asyncio.run(conveyor.streams.pipe("t", ["x" * 40, "y" * 40, "z" * 40])))
    with pytest.raises(InvalidOptions, match="not a single string"):
        in_run(execution(FakeChannel()), lambda: conveyor.streams.pipe("t", "tokens"))
    with pytest.raises(ConveyorError, match="only available inside a running task"):
        conveyor.streams.pipe("t", [1])


def test_piped_chunks_reach_a_subscriber_while_the_pipe_runs(engine):
    run, c = started(engine)
    channel = StoreChannel(engine=engine, claimed=c)
    exe = execution(channel, run_id=run)

    async def main():
        sub = Collector(realtime.subscribe(engine, run, **FAST))

        async def tokens():
            for i in range(3):
                yield f"t{i}"
                # the next token only once the subscriber has this one: delivery is live
                await until(lambda i=i: len(sub.updates) >= 3 + i)

        token = context.enter(exe)
        try:
            result = await conveyor.streams.pipe("tokens", tokens())
        finally:
            context.leave(token)
        settle(engine, c, output="null")
        return result, await sub.finish()

    result, updates = asyncio.run(main())
    assert result == ["t0", "t1", "t2"]
    assert brief(updates) == [(1, "status", "QUEUED"), (2, "status", "EXECUTING"), (3, "stream", "t0"),
                              (4, "stream", "t1"), (5, "stream", "t2"), (6, "status", "COMPLETED")]  # fmt: skip
    assert [s.key for s in engine.steps(run)] == ["stream:tokens#0"]
