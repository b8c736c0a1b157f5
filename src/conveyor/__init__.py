"""Conveyor: a durable task orchestrator for Python.

The public face (SPEC.md); everything else lives in the subpackages.
"""

from __future__ import annotations

from typing import Any

from conveyor.core.backoff import RetryPolicy as Retry
from conveyor.core.errors import (
    AbortRun,
    ConfigError,
    ConveyorError,
    InvalidOptions,
    InvalidPayload,
    InvalidTransition,
    NonDeterministic,
    PayloadTooLarge,
    RunFailed,
    RunNotFound,
    SchemaMismatch,
    StoreBusy,
    StoreError,
    StoreReadOnly,
    TokenNotFound,
    UnknownQueue,
    UnknownTask,
    WaitTimeout,
)
from conveyor.core.records import Run
from conveyor.core.status import RunStatus
from conveyor.sdk.client import configure, get_client
from conveyor.sdk.context import Context, metadata
from conveyor.sdk.keys import idempotency_key
from conveyor.sdk.logs import logger
from conveyor.sdk.realtime import RunUpdate
from conveyor.sdk.retry import retry
from conveyor.sdk.steps import step, step_sync
from conveyor.sdk.streams import streams
from conveyor.sdk.task import BatchItem, Concurrency, Queue, RetryDecision, RunHandle, Task, task
from conveyor.sdk.waits import Result, Token, wait

__version__ = "0.1.0"


class _ClientAttribute:
    """`conveyor.runs` / `conveyor.queues`: resolved on each use, so configure() takes effect."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, item: str) -> Any:
        return getattr(getattr(get_client(), self._name), item)

    def __repr__(self) -> str:
        return f"<conveyor.{self._name}>"


runs: Any = _ClientAttribute("runs")
queues: Any = _ClientAttribute("queues")


def trigger(task_id: str, payload: Any = None, **options: Any) -> RunHandle:
    """Trigger a task by id, without importing its code (SPEC §2)."""
    return get_client().trigger(task_id, payload, **options)


async def trigger_async(task_id: str, payload: Any = None, **options: Any) -> RunHandle:
    return await get_client().trigger_async(task_id, payload, **options)


__all__ = [
    "AbortRun",
    "BatchItem",
    "Concurrency",
    "ConfigError",
    "Context",
    "ConveyorError",
    "InvalidOptions",
    "InvalidPayload",
    "InvalidTransition",
    "NonDeterministic",
    "PayloadTooLarge",
    "Queue",
    "Result",
    "Retry",
    "RetryDecision",
    "Run",
    "RunFailed",
    "RunHandle",
    "RunNotFound",
    "RunStatus",
    "RunUpdate",
    "SchemaMismatch",
    "StoreBusy",
    "StoreError",
    "StoreReadOnly",
    "Task",
    "Token",
    "TokenNotFound",
    "UnknownQueue",
    "UnknownTask",
    "WaitTimeout",
    "configure",
    "idempotency_key",
    "logger",
    "metadata",
    "queues",
    "retry",
    "runs",
    "step",
    "step_sync",
    "streams",
    "task",
    "trigger",
    "trigger_async",
    "wait",
]
