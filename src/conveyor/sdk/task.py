"""`@task`: a function plus the options of SPEC §1, and the ways to trigger it."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, ParamSpec, TypeVar

from conveyor.core.backoff import RetryPolicy
from conveyor.core.errors import ConveyorError, InvalidOptions, InvalidPayload
from conveyor.core.records import DEFAULT_MACHINE, NewRun, QueueSpec, TaskRecord
from conveyor.engine.options import TriggerOptions, prepare_run
from conveyor.sdk.serde import PayloadType

Retry = RetryPolicy
P = ParamSpec("P")
R = TypeVar("R")

_TASK_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Queue:
    name: str
    concurrency_limit: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidOptions("a queue needs a non-empty name")
        if self.concurrency_limit is not None and (
            isinstance(self.concurrency_limit, bool)
            or not isinstance(self.concurrency_limit, int)
            or self.concurrency_limit < 1
        ):
            raise InvalidOptions(f"queue {self.name!r}: concurrency_limit must be >= 1, got {self.concurrency_limit!r}")


@dataclass(frozen=True)
class Concurrency:
    """At most `limit` runs at once per key; `key(payload)` picks the key (SPEC §1)."""

    limit: int
    key: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise InvalidOptions(f"Concurrency limit must be an integer >= 1, got {self.limit!r}")


@dataclass(frozen=True)
class RetryDecision:
    """What `handle_error` may return: retry at a given time (within max_attempts) or fail now."""

    retry_at: float | None = None
    abort: bool = False

    @classmethod
    def retry_in(cls, seconds: float) -> RetryDecision:
        import time

        return cls(retry_at=time.time() + max(0.0, float(seconds)))

    @classmethod
    def retry_at_time(cls, when: datetime) -> RetryDecision:
        return cls(retry_at=when.timestamp())

    @classmethod
    def fail(cls) -> RetryDecision:
        return cls(abort=True)


@dataclass(frozen=True)
class BatchItem:
    payload: Any
    options: dict[str, Any] = field(default_factory=dict)


HOOKS = ("on_start", "on_success", "on_failure", "on_cancel", "cleanup", "handle_error")


class Task(Generic[P, R]):
    """A registered task. Call `.trigger(payload)` to run it on a worker; calling the task object
    directly runs the plain function in-process (handy in unit tests)."""

    def __init__(
        self,
        fn: Callable[..., Any],
        id: str,
        *,
        queue: Queue | str | None = None,
        retry: RetryPolicy | None = None,
        max_duration: float | None = None,
        machine: str | None = None,
        concurrency: Concurrency | None = None,
        priority: int | Callable[[Any], int] | None = None,
        idempotency_key: Callable[[Any], Any] | None = None,
        idempotency_key_ttl: float | None = None,
        version: str | None = None,
        **hooks: Callable[..., Any] | None,
    ) -> None:
        unknown = set(hooks) - set(HOOKS)
        if unknown:
            raise InvalidOptions(f"task {id!r}: unknown option(s) {', '.join(sorted(unknown))}")
        if not isinstance(id, str) or not _TASK_ID.match(id):
            raise InvalidOptions(
                f"task id {id!r} must be 1-128 characters of lowercase letters, digits, '-', '_' or '.'"
            )
        if max_duration is not None and (not isinstance(max_duration, int | float) or max_duration <= 0):
            raise InvalidOptions(f"task {id!r}: max_duration must be > 0 seconds, got {max_duration!r}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise InvalidOptions(f"task {id!r}: retry must be a conveyor.Retry(...)")
        self.id = id
        self.fn = fn
        self.queue = queue if isinstance(queue, Queue) else Queue(queue or id)
        self.retry = retry
        self.max_duration = max_duration
        self.machine = machine or DEFAULT_MACHINE
        self.concurrency = concurrency
        self.priority = priority
        self.idempotency_key = idempotency_key
        self.idempotency_key_ttl = idempotency_key_ttl
        self.version = version
        self.hooks = {name: hook for name, hook in hooks.items() if hook is not None}
        self.is_async = inspect.iscoroutinefunction(fn)
        self._derives_from_payload = bool(
            (concurrency is not None and concurrency.key is not None) or idempotency_key or callable(priority)
        )
        params = list(inspect.signature(fn).parameters.values())
        if len(params) > 2:
            raise InvalidOptions(
                f"task {id!r}: the function takes (payload) or (payload, ctx), not {len(params)} arguments"
            )
        self.takes_payload = len(params) >= 1
        self.takes_ctx = len(params) == 2
        hints = _hints(fn)
        annotation = hints.get(params[0].name, inspect.Parameter.empty) if params else inspect.Parameter.empty
        self.payload_type = PayloadType(annotation, id)
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", id)
        self.__wrapped__ = fn

    # --- what the registry stores --------------------------------------------------------------
    def record(self, defaults: RetryPolicy | None = None, max_duration: float | None = None) -> TaskRecord:
        retry = self.retry or defaults or RetryPolicy()
        options: dict[str, Any] = {
            "retry": retry.to_dict(),
            "max_duration": self.max_duration or max_duration,
            "queue_limit": self.queue.concurrency_limit,
            "key_limit": self.concurrency.limit if self.concurrency else None,
            "idempotency_key_ttl": self.idempotency_key_ttl,
            "is_async": self.is_async,
        }
        return TaskRecord(
            task_id=self.id,
            queue=self.queue.name,
            machine=self.machine,
            options=options,
            payload_schema=self.payload_type.schema(),
            code_hash=_code_hash(self.fn),
            version=self.version or "",
        )

    def queue_spec(self) -> QueueSpec:
        return QueueSpec(self.queue.name, self.queue.concurrency_limit)

    # --- triggering ----------------------------------------------------------------------------
    def _trigger_context(self) -> tuple[Any, TaskRecord, float, dict[str, Any]]:
        """What every run of one trigger call shares: client, registered record, time, lineage."""
        from conveyor.sdk import client as client_module

        client = client_module.get_client()
        return client, client.task_record(self), client.engine.now, client.lineage()

    def _prepare(
        self,
        client: Any,
        record: TaskRecord,
        now: float,
        lineage: dict[str, Any],
        payload: Any,
        options: dict[str, Any],
    ) -> NewRun:
        opts = TriggerOptions.from_kwargs(**options)
        if opts.queue is not None and opts.queue != self.queue.name:
            client.engine.check_queue(opts.queue)  # no worker would ever claim it otherwise
        payload_json = self.payload_type.dump(payload)
        derived = dict(lineage)
        if self._derives_from_payload:
            data = json.loads(payload_json)
            if self.concurrency is not None and self.concurrency.key is not None and opts.concurrency_key is None:
                derived["concurrency_key"] = _derive(self.concurrency.key, data, self.id, "concurrency key")
            if self.idempotency_key is not None and opts.idempotency_key is None:
                derived["idempotency_key"] = _derive(self.idempotency_key, data, self.id, "idempotency key")
            if callable(self.priority):
                derived["priority"] = _derive(self.priority, data, self.id, "priority", str_=False)
        if self.priority is not None and not callable(self.priority):
            derived["priority"] = self.priority
        return prepare_run(record, payload_json, opts, now, client.engine.limits, **derived)

    def prepare(self, payload: Any, options: dict[str, Any]) -> NewRun:
        """Validate a payload and options into the run a trigger would insert."""
        return self._prepare(*self._trigger_context(), payload, options)

    def trigger(self, payload: Any = None, *, connection: Any = None, **options: Any) -> RunHandle:
        """`connection`: the caller's open psycopg (or sqlite3) connection to the same database;
        the run is written in its transaction and exists iff the caller commits."""
        if connection is None and _in_run():
            from conveyor.sdk import waits

            client = self._trigger_context()[0]
            return RunHandle(waits.trigger_in_run(self, [(payload, options)], "trigger")[0], client)
        client, record, now, lineage = self._trigger_context()
        run = self._prepare(client, record, now, lineage, payload, options)
        run_id, _ = client.engine.insert([run], connection)[0]
        return RunHandle(run_id, client)

    async def trigger_async(self, payload: Any = None, **options: Any) -> RunHandle:
        return await asyncio.to_thread(self.trigger, payload, **options)

    def batch_trigger(self, items: list[Any], *, connection: Any = None) -> list[RunHandle]:
        """Up to 1,000 items, atomically: all valid or nothing created (the error names the items)."""
        if connection is None and _in_run():
            from conveyor.sdk import waits

            client = self._trigger_context()[0]
            pairs = [_item(i) for i in items]
            return [RunHandle(run_id, client) for run_id in waits.trigger_in_run(self, pairs, "batch_trigger")]
        client, record, now, lineage = self._trigger_context()
        runs: list[NewRun] = []
        errors: list[str] = []
        for index, item in enumerate(items):
            payload, options = _item(item)
            try:
                runs.append(self._prepare(client, record, now, lineage, payload, options))
            except ConveyorError as exc:
                errors.append(f"item {index}: {exc}")
        if errors:
            raise InvalidPayload(
                f"batch_trigger of {self.id} created nothing; invalid {'; '.join(errors[:20])}"
                + (f" (+{len(errors) - 20} more)" if len(errors) > 20 else "")
            )
        return [RunHandle(run_id, client) for run_id, _ in client.engine.insert(runs, connection)]

    async def batch_trigger_async(self, items: list[Any]) -> list[RunHandle]:
        return await asyncio.to_thread(self.batch_trigger, items)

    def trigger_and_wait(self, payload: Any = None, **options: Any) -> Any:
        """Inside a task: trigger a child and suspend until it finishes, holding no worker or
        concurrency slot. -> Result (`.ok`, `.output`, `.error`, `.unwrap()`); awaitable in an
        async task, the value in a sync one. The child runs the parent's version."""
        from conveyor.sdk import waits

        return waits.trigger_and_wait(self, [(payload, options)], batch=False)

    def batch_trigger_and_wait(self, items: list[Any]) -> Any:
        """Inside a task: up to 1,000 children (payloads or BatchItems), one suspension until all
        have finished. -> a list of Results in input order."""
        from conveyor.sdk import waits

        return waits.trigger_and_wait(self, [_item(i) for i in items], batch=True)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return typing.cast(R, self.fn(*args, **kwargs))

    def __repr__(self) -> str:
        return f"<Task {self.id} queue={self.queue.name}>"


def _item(item: Any) -> tuple[Any, dict[str, Any]]:
    return (item.payload, item.options) if isinstance(item, BatchItem) else (item, {})


def _in_run() -> bool:
    from conveyor.sdk import context

    return context.current() is not None


def _derive(fn: Callable[[Any], Any], data: Any, task_id: str, what: str, str_: bool = True) -> Any:
    try:
        value = fn(data)
    except Exception as exc:
        raise InvalidPayload(f"task {task_id}: computing the {what} from the payload failed: {exc!r}") from None
    return str(value) if str_ else value


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:
        return {}


def _code_hash(fn: Callable[..., Any]) -> str | None:
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return None
    return hashlib.sha256(source.encode()).hexdigest()[:16]


class RunHandle:
    """`.id` and `.wait()`; returned by every trigger."""

    __slots__ = ("id", "_client")

    def __init__(self, run_id: str, client: Any) -> None:
        self.id = run_id
        self._client = client

    def wait(self, timeout: float | None = None) -> Any:
        from conveyor.sdk import context

        if context.current() is not None:
            raise ConveyorError("handle.wait() blocks a worker slot inside a task; use task.trigger_and_wait() instead")
        return self._client.engine.wait(self.id, timeout)

    async def wait_async(self, timeout: float | None = None) -> Any:
        return await asyncio.to_thread(self.wait, timeout)

    def retrieve(self) -> Any:
        return self._client.engine.retrieve(self.id)

    def __repr__(self) -> str:
        return f"RunHandle({self.id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunHandle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)


def task(
    id: str | Callable[..., Any] | None = None,
    **options: Any,
) -> Any:
    """`@task("id", ...)`, `@task(id="id", ...)` or bare `@task` (the id is the function name)."""
    from conveyor.sdk.registry import REGISTRY

    def decorate(fn: Callable[..., Any]) -> Task[Any, Any]:
        task_id = id if isinstance(id, str) else options.pop("id", None) or fn.__name__.replace("_", "-")
        made: Task[Any, Any] = Task(fn, task_id, **options)
        REGISTRY.add(made)
        return made

    if callable(id):
        fn, id = id, None
        return decorate(fn)
    return decorate
