"""`conveyor.streams.pipe(key, iterable)`: realtime chunks, kept with the run (SPEC §4).

    chunks = await conveyor.streams.pipe("tokens", llm_stream)     # async def task
    chunks = conveyor.streams.pipe("tokens", lines)                # plain def task: blocks

Each chunk is checked to be JSON (its JSON form is what subscribers and the return value get)
and handed to the run's channel; the worker appends it to the run's event log (an event of
kind "stream", data {"key", "chunk"}), fenced by the lease, in order, and subscribers
(`conveyor.runs.subscribe`) see it live. The call returns the list of chunks.

A pipe is journaled like a step (DECISIONS.md, "Durable execution"): its key is
`stream:<key>#n`, and once it completed, a replay (a retry, a resume) returns the stored list
without iterating (the iterable is closed) and publishes nothing. A pipe that did not complete
(the attempt failed while streaming) runs again on the retry, so its chunks are published
again, with the new attempt's number. The list is kept in the journal, so the step size limit
applies to the whole stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterable, Iterable
from typing import Any

from conveyor.core.errors import ConveyorError, InvalidOptions, SerializationError
from conveyor.core.records import StepRecord
from conveyor.sdk import context, steps
from conveyor.sdk.context import Execution
from conveyor.sdk.serde import to_json


class Streams:
    """`conveyor.streams`."""

    def pipe(self, key: str, iterable: AsyncIterable[Any] | Iterable[Any]) -> Any:
        """Publish each chunk of `iterable` to the run's stream `key` and return the list of
        chunks (their JSON form). In an `async def` task this returns an awaitable and takes an
        async or a sync iterable; in a plain `def` task it blocks and takes a sync iterable."""
        execution = context.require("conveyor.streams.pipe")
        if not isinstance(key, str) or not key:
            raise InvalidOptions(f"a stream needs a non-empty string key, got {key!r}")
        if isinstance(iterable, str | bytes | bytearray):
            raise InvalidOptions(f"streams.pipe({key!r}, ...) takes an iterable of chunks, not a single string")
        if execution.sync:
            return _pipe_sync(execution, key, iterable)
        if not isinstance(iterable, AsyncIterable | Iterable):
            raise InvalidOptions(f"streams.pipe({key!r}, ...) takes an iterable or an async iterable")
        return _pipe_async(execution, key, iterable)


async def _pipe_async(execution: Execution, key: str, source: AsyncIterable[Any] | Iterable[Any]) -> list[Any]:
    await steps.load_journal(execution)
    name = f"stream:{key}"
    position, step_key, stored = steps._next_call(execution, name)
    if stored is not None:
        await _aclose(source)
        return json.loads(stored.output)
    pipe = _Pipe(execution, key)
    if isinstance(source, AsyncIterable):
        async for item in source:
            pipe.publish(item)
    else:
        for item in source:
            pipe.publish(item)
    record = pipe.record(position, step_key, name)
    await execution.channel.save_step(record)
    assert execution.journal is not None
    execution.journal[position] = record
    return json.loads(record.output)


def _pipe_sync(execution: Execution, key: str, source: AsyncIterable[Any] | Iterable[Any]) -> list[Any]:
    if not isinstance(source, Iterable):
        raise ConveyorError(
            f"streams.pipe({key!r}, ...) in a sync task takes a (sync) iterable; an async iterable "
            "needs an `async def` task"
        )
    if execution.journal is None:
        steps.install_journal(execution, execution.channel.load_journal_sync())
    name = f"stream:{key}"
    position, step_key, stored = steps._next_call(execution, name)
    if stored is not None:
        close = getattr(source, "close", None)
        if callable(close):
            close()
        return json.loads(stored.output)
    pipe = _Pipe(execution, key)
    for item in source:
        pipe.publish(item)
    record = pipe.record(position, step_key, name)
    execution.channel.save_step_sync(record)
    assert execution.journal is not None
    execution.journal[position] = record
    return json.loads(record.output)


async def _aclose(source: object) -> None:
    """Close an iterable a replay does not iterate (an async generator's `finally` runs)."""
    aclose = getattr(source, "aclose", None)
    if callable(aclose):
        await aclose()
        return
    close = getattr(source, "close", None)
    if callable(close):
        close()


class _Pipe:
    """The chunks of one pipe call: each checked, published, and kept for the journal."""

    def __init__(self, execution: Execution, key: str) -> None:
        self.execution = execution
        self.key = key
        self.chunks: list[str] = []
        self.size = 2  # the brackets of the journal's JSON array
        self.started = time.time()

    def publish(self, item: Any) -> None:
        what = f"chunk {len(self.chunks)} of stream {self.key!r}"
        chunk = to_json(item, what, SerializationError)
        if "\\u0000" in chunk and _has_nul(json.loads(chunk)):
            # PostgreSQL's jsonb cannot hold it; refused on every driver alike.
            raise SerializationError(f"{what} contains a NUL character (\\u0000), which cannot be stored")
        self.size += len(chunk.encode()) + 1
        limit = self.execution.max_step_bytes
        if self.size > limit:
            raise SerializationError(
                f"stream {self.key!r} passed {limit:,} bytes at chunk {len(self.chunks)}: a pipe keeps its "
                "chunks in the run's journal, whose entries are limited to that size (pipe smaller streams, "
                "or store large data elsewhere and stream references)"
            )
        self.execution.channel.stream(self.key, chunk, time.time())
        self.chunks.append(chunk)

    def record(self, position: int, step_key: str, name: str) -> StepRecord:
        run = self.execution.ctx.run
        output = "[" + ",".join(self.chunks) + "]"
        attempt = self.execution.ctx.attempt.number
        return StepRecord(run.id, position, step_key, name, output, attempt, self.started, time.time())


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    return False


streams = Streams()
