"""Helpers shared by test directories (imported as `helpers`; conftest modules are not)."""

from __future__ import annotations

import time

from conveyor.core.records import QueueSpec, TaskRecord
from conveyor.engine import Engine


def register(engine: Engine, task_id: str, queue: str | None = None, **options) -> TaskRecord:
    """Register a task definition as a worker would, and return it."""
    record = TaskRecord(task_id=task_id, queue=queue or task_id, options=options)
    engine.register([record], [QueueSpec(record.queue, options.get("queue_limit"))])
    return record


def wait_until(condition, timeout: float = 10.0, interval: float = 0.005):
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
