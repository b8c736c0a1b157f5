"""`conveyor.step(...)`: memoised steps, the heart of durable execution by replay.

A run's function runs from the top on every attempt. Each `step(name, fn, ...)` call gets a
key `name#n` (the n-th call of that name) and a position (the n-th step call of the run).
The first time a step completes its result is stored in the run's journal before the code
goes on; on a later attempt the call at that position returns the stored result without
running `fn`. If the call at a recorded position has another key, the code no longer
replays the way it ran: the run fails with NON_DETERMINISTIC (DECISIONS.md, "Durable
execution"). A step that raises is not stored; the attempt fails as usual.

Results cross the journal as JSON, so a step returns the same value on its first run and
on every replay: the JSON form of what `fn` returned (a pydantic model or dataclass becomes
a dict).
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable
from typing import Any

from conveyor.core.errors import ConveyorError, InvalidOptions, NonDeterministic, SerializationError
from conveyor.core.records import Journal, StepRecord
from conveyor.sdk import context
from conveyor.sdk.context import Execution
from conveyor.sdk.serde import to_json


async def step(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run `fn(*args, **kwargs)` once per run (awaited if it returns an awaitable)."""
    execution = context.require("conveyor.step")
    await load_journal(execution)
    position, key, stored = _next_call(execution, name)
    if stored is not None:
        return json.loads(stored.output)
    started = time.time()
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    record = _record(execution, position, key, name, result, started)
    await execution.channel.save_step(record)
    execution.journal[position] = record
    return json.loads(record.output)


def step_sync(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The same for sync tasks: `conveyor.step_sync("load", load_user, user_id)`."""
    execution = context.require("conveyor.step_sync")
    if execution.journal is None:
        install_journal(execution, execution.channel.load_journal_sync())
    position, key, stored = _next_call(execution, name)
    if stored is not None:
        return json.loads(stored.output)
    started = time.time()
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        raise ConveyorError(f"step {name!r}: step_sync got an awaitable; in async tasks use `await conveyor.step(...)`")
    record = _record(execution, position, key, name, result, started)
    execution.channel.save_step_sync(record)
    execution.journal[position] = record
    return json.loads(record.output)


async def load_journal(execution: Execution) -> None:
    """Load the run's journal once per execution segment, at its first durable call."""
    if execution.journal is None:
        install_journal(execution, await execution.channel.load_journal())


def load_journal_blocking(execution: Execution) -> None:
    """The same from code that may not await (a sync task, or a trigger from async code): it
    reads the store on the calling thread."""
    if execution.journal is None:
        from conveyor.sdk.client import get_client

        install_journal(execution, get_client().engine.journal(execution.ctx.run.id))


def install_journal(execution: Execution, journal: Journal) -> None:
    execution.journal = {s.position: s for s in journal.steps}
    execution.waits = journal.waits


def _next_call(execution: Execution, name: str) -> tuple[int, str, StepRecord | None]:
    if not isinstance(name, str) or not name:
        raise InvalidOptions(f"a step needs a non-empty name, got {name!r}")
    count = execution.step_counts.get(name, 0)
    execution.step_counts[name] = count + 1
    key = f"{name}#{count}"
    position = execution.next_position
    execution.next_position += 1
    assert execution.journal is not None
    stored = execution.journal.get(position)
    if stored is not None and stored.key != key:
        error = NonDeterministic(
            f"replay reached step {key!r} at position {position}, but the journal recorded {stored.key!r} "
            "there: the task's code changed or depends on something that is not replayed "
            "(wrap it in a step, or deploy the change as a new version)"
        )
        execution.nondeterministic = error
        raise error
    return position, key, stored


def _record(execution: Execution, position: int, key: str, name: str, result: Any, started: float) -> StepRecord:
    output = to_json(result, f"the result of step {name!r}", SerializationError)
    size = len(output.encode())
    if size > execution.max_step_bytes:
        raise SerializationError(
            f"the result of step {name!r} is {size:,} bytes; the limit is {execution.max_step_bytes:,} bytes "
            "(store large data elsewhere and return a reference)"
        )
    run = execution.ctx.run
    return StepRecord(run.id, position, key, name, output, execution.ctx.attempt.number, started, time.time())
