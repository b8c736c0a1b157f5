"""The client: the Python API of SPEC §2 and §5 over the engine (direct database transport).

`get_client()` is built lazily from the project configuration; `conveyor.configure(...)`
replaces it; a worker installs its own so that tasks triggering tasks share its store.
"""

from __future__ import annotations

import asyncio
import builtins
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from conveyor.core.backoff import RetryPolicy
from conveyor.core.clock import SYSTEM_CLOCK, Clock
from conveyor.core.errors import ConfigError
from conveyor.core.records import Attempt, LogLine, QueueInfo, Run, RunEvent, RunFilter, StepRecord, TaskRecord
from conveyor.engine import Engine, Limits, TriggerOptions
from conveyor.sdk import config as config_module
from conveyor.sdk import context, realtime
from conveyor.sdk.realtime import RunUpdate
from conveyor.sdk.registry import REGISTRY
from conveyor.sdk.serde import to_json
from conveyor.sdk.task import RunHandle, Task
from conveyor.store import open_store
from conveyor.store.base import Store


@dataclass
class RunPage:
    data: list[Run]
    next_cursor: str | None

    def __iter__(self) -> Any:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


class Client:
    def __init__(self, config: config_module.Config, store: Store | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        self._store = store
        self._clock = clock
        self._engine: Engine | None = None
        self._records: dict[str, TaskRecord] = {}
        self._lock = threading.Lock()
        self.runs = Runs(self)
        self.queues = Queues(self)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    store = self._store or open_store(
                        self.config.resolved_database_url, self._clock, synchronous=self.config.synchronous
                    )
                    self._store = store
                    self._engine = Engine(
                        store,
                        self.config.environment,
                        Limits(max_payload_bytes=self.config.max_payload_bytes),
                        retention_days=self.config.retention_days,
                    )
        return self._engine

    @property
    def store(self) -> Store:
        return self.engine.store

    def task_record(self, task: Task[Any, Any]) -> TaskRecord:
        record = self._records.get(task.id)
        if record is None:
            retry = self.config.retry
            if self.config.environment == "dev" and not self.config.retry_enabled_in_dev:
                retry = replace(retry, max_attempts=1)
            record = task.record(retry if task.retry is None else None, self.config.max_duration)
            if task.retry is None and retry != RetryPolicy():
                record.options["retry"] = retry.to_dict()
            self._records[task.id] = record
        return record

    def lineage(self) -> dict[str, Any]:
        """Parent and root of a run triggered from inside another run."""
        execution = context.current()
        if execution is None:
            return {}
        run = execution.ctx.run
        return {"parent_id": run.id, "root_id": run.root_id or run.id}

    def trigger(self, task_id: str, payload: Any = None, *, connection: Any = None, **options: Any) -> RunHandle:
        """Trigger by id. A task defined in this process validates its typed payload; otherwise
        the store's task registry (written by workers) must know the id."""
        local = REGISTRY.find(task_id)
        if local is not None:
            return local.trigger(payload, connection=connection, **options)  # type: ignore[no-any-return]
        opts = TriggerOptions.from_kwargs(**options)
        payload_json = to_json(payload, f"payload of {task_id}")
        run_id, _ = self.engine.trigger_by_id(task_id, payload_json, opts, connection, **self.lineage())
        return RunHandle(run_id, self)

    async def trigger_async(self, task_id: str, payload: Any = None, **options: Any) -> RunHandle:
        return await asyncio.to_thread(self.trigger, task_id, payload, **options)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.notifier.close()
            self._engine.store.close()
            self._engine = None


class Runs:
    """`conveyor.runs`."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def retrieve(self, run_id: str) -> Run:
        return self._client.engine.retrieve(run_id)

    def list(
        self,
        task: str | None = None,
        status: list[str] | str | None = None,
        tags: list[str] | str | None = None,
        created_after: float | datetime | None = None,
        created_before: float | datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
        batch_id: str | None = None,
        parent_id: str | None = None,
    ) -> RunPage:
        flt = RunFilter(
            task=task,
            status=[status] if isinstance(status, str) else status,
            tags=[tags] if isinstance(tags, str) else tags,
            created_after=_ts(created_after),
            created_before=_ts(created_before),
            limit=limit,
            cursor=cursor,
            batch_id=batch_id,
            parent_id=parent_id,
        )
        runs = self._client.engine.list_runs(flt)
        return RunPage(runs, runs[-1].id if len(runs) == flt.limit and runs else None)

    def cancel(self, run_id: str) -> Run:
        return self._client.engine.cancel(run_id)

    def replay(self, run_id: str) -> RunHandle:
        return RunHandle(self._client.engine.replay(run_id), self._client)

    def reschedule(self, run_id: str, delay: float | datetime) -> Run:
        return self._client.engine.reschedule(run_id, delay)

    def logs(self, run_id: str) -> builtins.list[LogLine]:
        self._client.engine.retrieve(run_id)
        return self._client.engine.logs(run_id)

    def attempts(self, run_id: str) -> builtins.list[Attempt]:
        self._client.engine.retrieve(run_id)
        return self._client.engine.attempts(run_id)

    def steps(self, run_id: str) -> builtins.list[StepRecord]:
        """The run's step journal: each completed step with its output and timings."""
        self._client.engine.retrieve(run_id)
        return self._client.engine.steps(run_id)

    def events(self, run_id: str, after: int = 0) -> builtins.list[RunEvent]:
        self._client.engine.retrieve(run_id)
        return self._client.engine.events(run_id, after)

    def wait(self, run_id: str, timeout: float | None = None) -> Run:
        return self._client.engine.wait(run_id, timeout)

    def subscribe(self, run_id: str, after: int = 0, *, poll: float = realtime.POLL) -> AsyncIterator[RunUpdate]:
        """`async for update in conveyor.runs.subscribe(run_id)`: the run's status changes,
        metadata operations and stream chunks after seq `after`, stored ones first, then live;
        ends after the update that finishes the run. `poll`: seconds between change checks."""
        return realtime.subscribe(self._client.engine, run_id, after, poll=poll)

    def subscribe_tag(
        self, tag: str, after: float | datetime | None = None, *, poll: float = realtime.POLL
    ) -> AsyncIterator[RunUpdate]:
        """`async for update in conveyor.runs.subscribe_tag("user:42")`: the updates of every
        run with the tag, runs created later included; never ends. `after` (a time): runs
        created since then are delivered from their first update (None: from now on)."""
        return realtime.subscribe_tag(self._client.engine, tag, after, poll=poll)


class Queues:
    """`conveyor.queues`."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self) -> list[QueueInfo]:
        return self._client.engine.queues()

    def retrieve(self, name: str) -> QueueInfo:
        return self._client.engine.queue(name)

    def pause(self, name: str) -> QueueInfo:
        return self._client.engine.set_paused(name, True)

    def resume(self, name: str) -> QueueInfo:
        return self._client.engine.set_paused(name, False)


def _ts(value: float | datetime | None) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    return value


_default: Client | None = None
_default_lock = threading.Lock()


def get_client() -> Client:
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Client(config_module.load())
    return _default


def set_client(client: Client | None) -> Client | None:
    """Install `client` as the default (None: rebuild from config next time). Returns the old one."""
    global _default
    with _default_lock:
        old, _default = _default, client
    return old


def configure(
    *,
    database_url: str | None = None,
    environment: str | None = None,
    store: Store | None = None,
    clock: Clock | None = None,
    **settings: Any,
) -> Client:
    """Set the connection and project settings in code (SPEC §6)."""
    base = config_module.load()
    changes: dict[str, Any] = dict(settings)
    if database_url is not None:
        changes["database_url"] = database_url
    if environment is not None:
        changes["environment"] = environment
    try:
        cfg = replace(base, **changes)
    except TypeError as exc:
        raise ConfigError(f"conveyor.configure: {exc}") from None
    client = Client(cfg, store=store, clock=clock or SYSTEM_CLOCK)
    old = set_client(client)
    if old is not None and old is not client and old._store is not store:
        old.close()
    return client
