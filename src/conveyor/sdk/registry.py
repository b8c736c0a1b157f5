"""The tasks this process knows, by id (what a worker can run)."""

from __future__ import annotations

from typing import Any

from conveyor.core.errors import InvalidOptions, UnknownTask


class Registry:
    def __init__(self) -> None:
        self._tasks: dict[str, Any] = {}

    def add(self, task: Any) -> None:
        existing = self._tasks.get(task.id)
        if existing is not None and _origin(existing.fn) != _origin(task.fn):
            raise InvalidOptions(f"two tasks share the id {task.id!r}: {_origin(existing.fn)} and {_origin(task.fn)}")
        self._tasks[task.id] = task

    def get(self, task_id: str) -> Any:
        try:
            return self._tasks[task_id]
        except KeyError:
            raise UnknownTask(f"no task {task_id!r} is defined in this process") from None

    def find(self, task_id: str) -> Any | None:
        return self._tasks.get(task_id)

    def all(self) -> list[Any]:
        return list(self._tasks.values())

    def clear(self) -> None:
        self._tasks.clear()


def _origin(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"


REGISTRY = Registry()
