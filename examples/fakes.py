"""Offline stand-ins for the external services the examples call (an AI API, Telegram, a vector
store, an LLM that streams, image and speech generation, transcription).

They sleep a little and sometimes fail, so retries, backoff and `handle_error` have something to
do. Failures are controllable from the payload (`FakeControls`) and otherwise drawn from a random
stream seeded by the run's identity and attempt number, so the same run fails the same way every
time. `FAKE_FAILURE_RATE` (default 0.1) sets the random failure rate; set it to 0 to turn random
failures off. Generated content (LLM text, transcripts, tags, images) is deterministic: the
same input gives the same output, so a replayed or retried run can be checked against it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, Field


class FakeControls(BaseModel):
    """Demo and test knobs carried in a payload. Not part of any real API."""

    think: float = Field(default=0.05, ge=0, le=30, description="seconds the fake call takes")
    rate_limit: float | None = Field(default=None, ge=0, description="first attempt gets a 429 with this Retry-After")
    fail_attempts: int = Field(default=0, ge=0, description="the first N attempts fail with a transient error")
    failure_rate: float | None = Field(default=None, ge=0, le=1, description="overrides FAKE_FAILURE_RATE")
    token_delay: float | None = Field(default=None, ge=0, le=5, description="seconds between streamed LLM tokens")
    tokens: int | None = Field(default=None, ge=1, le=10_000, description="length of a fake LLM reply, in tokens")


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


# --- a streaming LLM (seed 001) -------------------------------------------------------------------

_VOCABULARY = (
    "the plan is simple first we read the request then we sketch a layout write each file check it "
    "and ship a preview every step is stored once so a retry picks up where it stopped while the "
    "reply streams token by token to the browser and a cancel stops it at once"
)
_WORDS = _VOCABULARY.split()


def llm_tokens(prompt: str, tokens: int | None = None) -> list[str]:
    """The reply the fake LLM gives to `prompt`, as tokens (words with their leading space).
    Deterministic: the same prompt always gets the same reply. `tokens` sets its length."""
    rng = random.Random(f"llm:{prompt}")
    count = tokens or rng.randint(12, 40)
    words = [rng.choice(_WORDS) for _ in range(count)]
    words[0] = words[0].capitalize()
    return [word if i == 0 else f" {word}" for i, word in enumerate(words)]


def llm_text(prompt: str, tokens: int | None = None) -> str:
    """The whole reply at once (what `llm_stream` yields, joined)."""
    return "".join(llm_tokens(prompt, tokens))


def token_delay(controls: FakeControls | None = None) -> float:
    """Seconds between tokens: the payload's knob, else FAKE_TOKEN_DELAY, else 20 ms."""
    if controls is not None and controls.token_delay is not None:
        return controls.token_delay
    return float(os.environ.get("FAKE_TOKEN_DELAY", "0.02"))


async def llm_stream(prompt: str, controls: FakeControls | None = None) -> AsyncIterator[str]:
    """A streaming completion: yields the reply's tokens one by one, `token_delay` apart."""
    delay = token_delay(controls)
    for token in llm_tokens(prompt, controls.tokens if controls is not None else None):
        await asyncio.sleep(delay)
        yield token


async def llm_complete(prompt: str, controls: FakeControls | None, seed: str, attempt: int) -> str:
    """A non-streaming completion that takes `controls.think` seconds and may fail."""
    await call("llm", controls, seed, attempt)
    return llm_text(prompt, controls.tokens if controls is not None else None)


# --- images, speech, transcription, embeddings (seeds 001 and 004) --------------------------------


def _digest(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:16]


async def generate_image(
    prompt: str, size: str, controls: FakeControls | None, seed: str, attempt: int
) -> dict[str, Any]:
    """An image generation API: the URL of the 'rendered' image (stable for prompt and size)."""
    await call("images", controls, seed, attempt)
    return {"url": f"https://images.example/{_digest(prompt, size)}.png", "size": size, "prompt": prompt}


async def transcribe(audio_url: str, controls: FakeControls | None, seed: str, attempt: int) -> str:
    """A speech-to-text API (Cartesia in the seed): a transcript that depends only on the audio."""
    await call("transcription", controls, seed, attempt)
    rng = random.Random(f"audio:{audio_url}")
    sentences = [llm_text(f"{audio_url}:{n}", tokens=rng.randint(8, 16)) + "." for n in range(rng.randint(3, 6))]
    return " ".join(sentences)


def embed(text: str, dims: int = 8) -> list[float]:
    """An embedding vector for `text` (OpenAI in the seed), unit-ish and stable."""
    rng = random.Random(f"embed:{text}")
    return [round(rng.uniform(-1, 1), 4) for _ in range(dims)]


_VALUES = ["family", "courage", "kindness", "work", "faith", "humour", "patience", "home", "travel", "loss"]


def tag_values(text: str, count: int = 3) -> list[str]:
    """The value tags an LLM would pick for `text` (stable)."""
    return sorted(random.Random(f"tags:{text}").sample(_VALUES, count))


def extract_quotes(text: str, count: int = 2) -> list[str]:
    """The most 'memorable' sentences of `text`: the longest ones, in order of appearance."""
    sentences = [s.strip() + "." for s in text.split(".") if s.strip()]
    longest = sorted(sentences, key=len, reverse=True)[:count]
    return [s for s in sentences if s in longest]


def synthesize_speech_sync(text: str, controls: FakeControls | None, seed: str, attempt: int) -> dict[str, Any]:
    """A text-to-speech call plus ffmpeg, blocking (for a sync task): the podcast file."""
    call_sync("speech", controls, seed, attempt)
    return {"url": f"https://audio.example/{_digest(text)}.mp3", "seconds": round(len(text.split()) / 2.5, 1)}


# --- the app's own database (Convex in seed 001), in memory -----------------------------------------

APP_DB: dict[str, dict[str, Any]] = {"messages": {}, "projects": {}}
"""What the app would keep in its own database, per process (the examples only print it)."""
