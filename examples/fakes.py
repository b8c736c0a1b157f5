"""Offline stand-ins for the external services the examples call (an AI API, Telegram, a vector store).

They sleep a little and sometimes fail, so retries, backoff and `handle_error` have something to
do. Failures are controllable from the payload (`FakeControls`) and otherwise drawn from a random
stream seeded by the run's identity and attempt number, so the same run fails the same way every
time. `FAKE_FAILURE_RATE` (default 0.1) sets the random failure rate; set it to 0 to turn random
failures off.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

from pydantic import BaseModel, Field


class FakeControls(BaseModel):
    """Demo and test knobs carried in a payload. Not part of any real API."""

    think: float = Field(default=0.05, ge=0, le=30, description="seconds the fake call takes")
    rate_limit: float | None = Field(default=None, ge=0, description="first attempt gets a 429 with this Retry-After")
    fail_attempts: int = Field(default=0, ge=0, description="the first N attempts fail with a transient error")
    failure_rate: float | None = Field(default=None, ge=0, le=1, description="overrides FAKE_FAILURE_RATE")


class TransientError(Exception):
    """A 5xx or a dropped connection: worth retrying with backoff."""


class RateLimited(Exception):
    """A 429. `retry_after` is the server's Retry-After, in seconds."""

    def __init__(self, service: str, retry_after: float) -> None:
        super().__init__(f"{service}: 429 Too Many Requests (retry after {retry_after:g} s)")
        self.retry_after = retry_after


def _failure(service: str, controls: FakeControls | None, seed: str, attempt: int) -> Exception | None:
    controls = controls or FakeControls()
    if controls.rate_limit is not None and attempt == 1:
        return RateLimited(service, controls.rate_limit)
    if attempt <= controls.fail_attempts:
        return TransientError(f"{service}: 503 Service Unavailable (attempt {attempt})")
    rate = controls.failure_rate
    if rate is None:
        rate = float(os.environ.get("FAKE_FAILURE_RATE", "0.1"))
    if random.Random(f"{service}:{seed}:{attempt}").random() < rate:
        return TransientError(f"{service}: connection reset (attempt {attempt})")
    return None


async def call(service: str, controls: FakeControls | None, seed: str, attempt: int) -> None:
    """An async call to `service` that takes `controls.think` seconds and may fail."""
    await asyncio.sleep((controls or FakeControls()).think)
    error = _failure(service, controls, seed, attempt)
    if error is not None:
        raise error


def call_sync(service: str, controls: FakeControls | None, seed: str, attempt: int) -> None:
    """The same, blocking (for sync tasks)."""
    time.sleep((controls or FakeControls()).think)
    error = _failure(service, controls, seed, attempt)
    if error is not None:
        raise error


async def ai_reply(text: str, controls: FakeControls | None, seed: str, attempt: int) -> str:
    """A flaky AI completion."""
    await call("ai", controls, seed, attempt)
    return f"You said {text!r}. Here is a thoughtful answer."


async def telegram_send(chat_id: int, text: str) -> dict[str, int]:
    """Telegram's sendMessage, minus the network."""
    await asyncio.sleep(0.01)
    return {"chat_id": chat_id, "message_id": random.randint(1, 1_000_000)}


def fake_documents(owner: str, count_max: int = 4) -> list[str]:
    """The document ids a namespace 'holds' in the fake database: stable for a given owner."""
    rng = random.Random(owner)
    return [f"doc_{owner}_{i}" for i in range(rng.randint(1, count_max))]
