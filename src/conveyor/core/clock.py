"""The injectable clock. Everything time-dependent asks a Clock, so tests move time instead of sleeping."""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock time, epoch seconds."""
        ...

    def is_real(self) -> bool: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def is_real(self) -> bool:
        return True


class FakeClock:
    """A clock that only moves when told to. Thread-safe."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def is_real(self) -> bool:
        return False

    def advance(self, seconds: float) -> float:
        with self._lock:
            self._now += seconds
            return self._now

    def set(self, when: float) -> None:
        with self._lock:
            self._now = when


SYSTEM_CLOCK = SystemClock()
