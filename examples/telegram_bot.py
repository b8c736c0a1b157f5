"""Seed 000: a Telegram bot whose updates are handled by durable tasks.

Telegram -> webhook -> `receive_update(update)` -> the `handle-telegram-update` task, which asks
a (fake, flaky) AI for a reply and sends it back. What the example shows:

- its own queue (`telegram`, at most 10 updates handled at once across all users);
- per-user serialisation: one user's updates never run at the same time (`Concurrency` keyed
  by the sender's id), while other users' updates go on in parallel;
- an idempotency key from `update_id`, so a webhook redelivery never handles an update twice;
- retries with backoff for the flaky AI call, and a 429 honoured at the time the server asked
  for, through `handle_error`;
- `AbortRun` for an update the bot cannot handle (no retries, fails at once);
- tags `telegram` and `user:{id}`, metadata progress, log lines, a typed (pydantic) payload.

Run it: `make dev` in the repository root, then `python examples/demo.py --wait`, or see
examples/README.md for `conveyor trigger`.
"""

from __future__ import annotations

import time
from typing import Any

from fakes import FakeControls, RateLimited, ai_reply, telegram_send
from pydantic import BaseModel, ConfigDict, Field

import conveyor
from conveyor import AbortRun, Concurrency, Context, Queue, Retry, RetryDecision, RunHandle, task

log = conveyor.logger


# --- the payload: the parts of a Telegram Update the bot reads ---------------------------------
# `serialize_by_alias=True` keeps Telegram's own field name "from" in the stored payload (the
# Python attribute is `from_`, since `from` is a keyword).


class TgUser(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: int
    first_name: str = ""
    username: str | None = None


class TgChat(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: int
    type: str = "private"


class TgMessage(BaseModel):
    model_config = ConfigDict(extra="allow", serialize_by_alias=True)
    message_id: int
    chat: TgChat
    from_: TgUser | None = Field(default=None, alias="from")
    date: int = 0
    text: str | None = None


class TelegramUpdate(BaseModel):
    model_config = ConfigDict(extra="allow", serialize_by_alias=True)
    update_id: int
    message: TgMessage | None = None
    fake: FakeControls | None = None  # demo/test knobs for the fake AI (see fakes.py)


def user_key(update: dict[str, Any]) -> str:
    """The per-user concurrency key. Key functions see the payload as JSON data (a dict)."""
    sender = (update.get("message") or {}).get("from") or {}
    return str(sender.get("id", "unknown"))


# --- hooks ---------------------------------------------------------------------------------------


def honour_rate_limit(error: Exception, ctx: Context) -> RetryDecision | None:
    """Called when an attempt raises. A 429 is retried when the server said so, not on the
    backoff schedule; anything else keeps the task's retry policy (return None)."""
    if isinstance(error, RateLimited):
        log.warning("rate limited; retrying in %.1f s", error.retry_after, extra={"attempt": ctx.attempt.number})
        return RetryDecision.retry_in(error.retry_after)
    return None


async def apologise(update: TelegramUpdate, error: dict[str, Any], ctx: Context) -> None:
    """Runs once, when the run has finally failed (AbortRun or out of attempts)."""
    if update.message is not None and error.get("code") != "ABORTED":
        await telegram_send(update.message.chat.id, "Sorry, something went wrong. Please try again later.")


# --- the task ------------------------------------------------------------------------------------


@task(
    "handle-telegram-update",
    queue=Queue("telegram", concurrency_limit=10),
    concurrency=Concurrency(limit=1, key=user_key),
    idempotency_key=lambda update: f"tg-{update['update_id']}",
    idempotency_key_ttl=24 * 3600,  # Telegram redelivers unacknowledged updates for up to a day
    retry=Retry(max_attempts=4, factor=2.0, min_delay=1.0, max_delay=20.0),
    max_duration=120,  # an AI reply that takes longer than 2 minutes is TIMED_OUT
    machine="small-1x",  # the default preset; a heavier one needs a worker started with --machine
    handle_error=honour_rate_limit,
    on_failure=apologise,
)
async def handle_telegram_update(update: TelegramUpdate, ctx: Context) -> dict[str, Any]:
    started_at = time.time()
    message = update.message
    if message is None or message.from_ is None:
        raise AbortRun(f"update {update.update_id} carries no message from a user; nothing to answer")
    if not message.text:
        raise AbortRun(f"update {update.update_id}: message {message.message_id} has no text (only text is handled)")

    log.info("update received", extra={"update_id": update.update_id, "user": message.from_.id})
    conveyor.metadata.set("stage", "thinking")
    conveyor.metadata.set("progress", 0.2)

    reply = await ai_reply(message.text, update.fake, seed=str(update.update_id), attempt=ctx.attempt.number)

    conveyor.metadata.set("stage", "sending")
    conveyor.metadata.set("progress", 0.8)
    sent = await telegram_send(message.chat.id, reply)
    conveyor.metadata.set("progress", 1.0)
    log.info("reply sent", extra={"chat": message.chat.id, "attempt": ctx.attempt.number})
    return {
        "update_id": update.update_id,
        "user_id": message.from_.id,
        "reply": reply,
        "sent_message_id": sent["message_id"],
        "attempt": ctx.attempt.number,
        "started_at": started_at,
        "finished_at": time.time(),
    }


def receive_update(update: dict[str, Any]) -> RunHandle:
    """What the webhook endpoint does with Telegram's POST body: hand it over and answer 200.

    A redelivered update returns the handle of the run that already exists. Tags make a user's
    runs easy to find: `conveyor.runs.list(tags=["user:42"])`.
    """
    return handle_telegram_update.trigger(update, tags=["telegram", f"user:{user_key(update)}"])
