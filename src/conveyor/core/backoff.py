"""Retry backoff with Trigger.dev semantics (DECISIONS.md, "Statuses and time")."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from conveyor.core.errors import InvalidOptions


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """`max_attempts` counts the first attempt; delays are in seconds."""

    max_attempts: int = 3
    factor: float = 2.0
    min_delay: float = 1.0
    max_delay: float = 60.0
    randomize: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise InvalidOptions(f"retry max_attempts must be >= 1, got {self.max_attempts}")
        if self.factor < 1:
            raise InvalidOptions(f"retry factor must be >= 1, got {self.factor}")
        if self.min_delay < 0 or self.max_delay < 0:
            raise InvalidOptions("retry delays must be >= 0")
        if self.max_delay < self.min_delay:
            raise InvalidOptions(f"retry max_delay ({self.max_delay}) is below min_delay ({self.min_delay})")

    def delay_after(self, attempt: int, rand: float | None = None) -> float:
        """Seconds to wait before attempt `attempt + 1`, after attempt `attempt` failed.

        `rand` in [0, 1) replaces the random draw (tests pass it to get exact values).
        """
        if attempt < 1:
            raise ValueError("attempt numbers start at 1")
        if self.min_delay == 0:
            base = 0.0
        else:
            try:
                base = min(self.max_delay, self.min_delay * self.factor ** (attempt - 1))
            except OverflowError:  # a huge attempt number: the cap applies
                base = self.max_delay
        if not self.randomize:
            return base
        u = random.random() if rand is None else rand
        return base * (1.0 + u)

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_attempts": self.max_attempts,
            "factor": self.factor,
            "min_delay": self.min_delay,
            "max_delay": self.max_delay,
            "randomize": self.randomize,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RetryPolicy:
        return cls(**data) if data else cls()


DEFAULT_RETRY = RetryPolicy()
