"""The run context (`ctx`), and the per-run channel that metadata and log lines go through.

While a run's code executes, a context variable holds its `Execution`: the `Context` the task
sees and the channel to the worker that owns the run. The channel buffers writes; the worker
commits them fenced by the run's lease, in order, before the run's outcome.
"""

from __future__ import annotations

import contextvars
import copy
from dataclasses import dataclass, field
from typing import Any, Protocol

from conveyor.core.errors import ConveyorError, InvalidOptions
from conveyor.core.records import MetadataOp, StepRecord


@dataclass(frozen=True)
class RunInfo:
    id: str
    tags: list[str]
    created_at: float
    started_at: float
    idempotency_key: str | None = None
    concurrency_key: str | None = None
    parent_id: str | None = None
    root_id: str | None = None
    batch_id: str | None = None
    max_attempts: int = 1
    max_duration: float | None = None


@dataclass(frozen=True)
class AttemptInfo:
    number: int
    started_at: float


@dataclass(frozen=True)
class TaskInfo:
    id: str
    queue: str


@dataclass(frozen=True)
class Context:
    """What a task may know about the run it executes (`ctx`)."""

    run: RunInfo
    attempt: AttemptInfo
    task: TaskInfo
    environment: str
    version: str | None
    machine: str


class Channel(Protocol):
    """How a run's code reaches the worker that owns it. Writes are fenced by the run's lease."""

    def log(self, level: str, message: str, attributes: dict[str, Any] | None, ts: float) -> None: ...

    def metadata(self, ops: list[MetadataOp]) -> None: ...

    async def load_journal(self) -> list[StepRecord]: ...

    async def save_step(self, step: StepRecord) -> None:
        """Returns once the step is committed; raises StopExecution if the lease is gone."""

    def load_journal_sync(self) -> list[StepRecord]: ...

    def save_step_sync(self, step: StepRecord) -> None: ...


@dataclass
class Execution:
    ctx: Context
    channel: Channel
    metadata: dict[str, Any] = field(default_factory=dict)
    log_level: int = 20
    max_step_bytes: int = 1024 * 1024
    # The step journal: loaded at the first step() call, by position.
    journal: dict[int, StepRecord] | None = None
    step_counts: dict[str, int] = field(default_factory=dict)
    next_position: int = 0
    nondeterministic: Exception | None = None  # set when a replay diverged (the run fails)


_current: contextvars.ContextVar[Execution | None] = contextvars.ContextVar("conveyor_execution", default=None)


def current() -> Execution | None:
    return _current.get()


def require(what: str) -> Execution:
    execution = _current.get()
    if execution is None:
        raise ConveyorError(f"{what} is only available inside a running task")
    return execution


def enter(execution: Execution) -> contextvars.Token[Execution | None]:
    return _current.set(execution)


def leave(token: contextvars.Token[Execution | None]) -> None:
    _current.reset(token)


class Metadata:
    """`conveyor.metadata`: the current run's metadata, changed with operations applied in SQL
    so concurrent writers never lose updates."""

    def _apply(self, op: MetadataOp) -> None:
        execution = require(f"metadata.{op.op}")
        _apply_local(execution.metadata, op)
        execution.channel.metadata([op])

    def set(self, key: str, value: Any) -> None:
        self._apply(MetadataOp("set", _key(key), _jsonable(value)))

    def delete(self, key: str) -> None:
        self._apply(MetadataOp("delete", _key(key)))

    def increment(self, key: str, amount: int | float = 1) -> None:
        if isinstance(amount, bool) or not isinstance(amount, int | float):
            raise InvalidOptions(f"metadata.increment needs a number, got {amount!r}")
        self._apply(MetadataOp("increment", _key(key), amount))

    def decrement(self, key: str, amount: int | float = 1) -> None:
        self.increment(key, -amount)

    def append(self, key: str, value: Any) -> None:
        self._apply(MetadataOp("append", _key(key), _jsonable(value)))

    def get(self, key: str, default: Any = None) -> Any:
        return copy.deepcopy(require("metadata.get").metadata.get(key, default))

    def current(self) -> dict[str, Any]:
        return copy.deepcopy(require("metadata.current").metadata)


def _key(key: str) -> str:
    if not isinstance(key, str) or not key or '"' in key or "\\" in key:
        raise InvalidOptions(f"metadata key must be a non-empty string without quotes, got {key!r}")
    return key


def _jsonable(value: Any) -> Any:
    import json

    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidOptions(f"metadata value is not JSON-serialisable: {exc}") from None


def _apply_local(data: dict[str, Any], op: MetadataOp) -> None:
    if op.op == "set":
        data[op.key] = op.value
    elif op.op == "delete":
        data.pop(op.key, None)
    elif op.op == "increment":
        current = data.get(op.key, 0)
        data[op.key] = (current if isinstance(current, int | float) else 0) + op.value
    elif op.op == "append":
        current = data.get(op.key)
        data[op.key] = [*current, op.value] if isinstance(current, list) else [op.value]


metadata = Metadata()
