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
from conveyor.core.records import Journal, MetadataOp, StepRecord, WaitRequest, WaitState


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

    def metadata(self, ops: list[MetadataOp], run_id: str | None = None) -> None:
        """Operations on this run's metadata, or on another run of its tree (`run_id`)."""

    def stream(self, key: str, chunk: str, ts: float) -> None:
        """Buffer one stream chunk (JSON text); the worker appends it to the run's event log,
        fenced by the lease, in order with the run's other writes."""

    async def load_journal(self) -> Journal: ...

    async def save_step(self, step: StepRecord) -> None:
        """Returns once the step is committed; raises StopExecution if the lease is gone."""

    def load_journal_sync(self) -> Journal: ...

    def save_step_sync(self, step: StepRecord) -> None: ...


@dataclass
class Execution:
    ctx: Context
    channel: Channel
    metadata: dict[str, Any] = field(default_factory=dict)
    log_level: int = 20
    lease_token: str = ""  # fences what the run's code writes directly (wait requests)
    max_step_bytes: int = 1024 * 1024
    # The step journal: loaded at the first step() call, by position.
    journal: dict[int, StepRecord] | None = None
    step_counts: dict[str, int] = field(default_factory=dict)
    next_position: int = 0
    nondeterministic: Exception | None = None  # set when a replay diverged (the run fails)
    waits: dict[str, WaitState] = field(default_factory=dict)  # the waitpoints of the journal
    # Set when the code asked to suspend: the wait requests the suspension applies first.
    suspending: bool = False
    suspend_requests: list[WaitRequest] = field(default_factory=list)
    sync: bool = False  # a plain `def` task: durable calls block and return values instead of awaitables

    @property
    def replaying(self) -> bool:
        """The code has not yet reached the end of what the journal recorded: it is redoing
        what an earlier execution did, whose log lines and metadata operations are kept
        already, so they are not written again (DECISIONS.md, "Durable execution")."""
        return bool(self.journal) and self.next_position <= max(self.journal)  # type: ignore[arg-type]


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


class _Operations:
    """The write operations of `conveyor.metadata`, applied in SQL so concurrent writers (many
    children updating their parent) never lose updates."""

    def _apply(self, op: MetadataOp) -> None:
        raise NotImplementedError

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


class _TreeMetadata(_Operations):
    """`conveyor.metadata.parent` / `.root`: write-only operations on another run of the tree
    (a child reporting progress to its parent). Outside a child (no parent) they do nothing,
    like Trigger.dev's."""

    def __init__(self, which: str) -> None:
        self._which = which

    def _apply(self, op: MetadataOp) -> None:
        execution = require(f"metadata.{self._which}.{op.op}")
        if execution.replaying:
            return
        run = execution.ctx.run
        target = run.parent_id if self._which == "parent" else (run.root_id or run.parent_id)
        if target is not None:
            execution.channel.metadata([op], target)


class Metadata(_Operations):
    """`conveyor.metadata`: the current run's metadata."""

    parent = _TreeMetadata("parent")
    root = _TreeMetadata("root")

    def _apply(self, op: MetadataOp) -> None:
        execution = require(f"metadata.{op.op}")
        if execution.replaying:  # applied the first time: the run's metadata holds it already
            return
        _apply_local(execution.metadata, op)
        execution.channel.metadata([op])

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

    from conveyor.sdk.serde import to_json

    return json.loads(to_json(value, "the metadata value", InvalidOptions))


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
