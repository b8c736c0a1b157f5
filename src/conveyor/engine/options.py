"""Trigger options: validated once, turned into a NewRun from a task's registered defaults."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from conveyor.core.backoff import RetryPolicy
from conveyor.core.errors import InvalidOptions, PayloadTooLarge
from conveyor.core.ids import new_id
from conveyor.core.records import DEFAULT_MACHINE, NewRun, TaskRecord
from conveyor.core.status import RunStatus

MAX_TAGS = 10
MAX_TAG_LENGTH = 128
MAX_PRIORITY = 86_400
DEFAULT_IDEMPOTENCY_TTL = 30 * 86_400.0


@dataclass(frozen=True, slots=True)
class Limits:
    max_payload_bytes: int = 512 * 1024


@dataclass(slots=True)
class TriggerOptions:
    """SPEC §2 trigger options (all optional)."""

    idempotency_key: str | None = None
    idempotency_key_ttl: float | None = None
    concurrency_key: str | None = None
    queue: str | None = None
    delay: float | datetime | None = None
    ttl: float | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] | None = None
    max_attempts: int | None = None
    priority: int | None = None
    machine: str | None = None
    version: str | None = None
    max_duration: float | None = None

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> TriggerOptions:
        if not kwargs:
            return cls()
        unknown = kwargs.keys() - _OPTION_NAMES
        if unknown:
            raise InvalidOptions(f"unknown trigger option(s): {', '.join(sorted(unknown))}")
        tags = kwargs.pop("tags", None)
        if isinstance(tags, str):
            tags = [tags]
        return cls(tags=list(tags or []), **kwargs)


_OPTION_NAMES = frozenset(TriggerOptions.__slots__)


def _seconds(value: Any, name: str, *, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidOptions(f"{name} must be a number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise InvalidOptions(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def validate_tags(tags: list[str]) -> list[str]:
    if not tags:
        return []
    if len(tags) > MAX_TAGS:
        raise InvalidOptions(f"a run takes at most {MAX_TAGS} tags, got {len(tags)}")
    for tag in tags:
        if not isinstance(tag, str) or not tag:
            raise InvalidOptions(f"tags must be non-empty strings, got {tag!r}")
        if len(tag) > MAX_TAG_LENGTH:
            raise InvalidOptions(f"tag {tag[:20]!r}... is {len(tag)} characters; the limit is {MAX_TAG_LENGTH}")
    return list(dict.fromkeys(tags))


def dump_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidOptions(f"{what} is not JSON-serialisable: {exc}") from None


def _retry_of(task: TaskRecord) -> tuple[str, int]:
    """The task's retry policy as stored JSON and its attempts, computed once per record."""
    cached = task.derived.get("retry")
    if cached is None:
        policy = RetryPolicy.from_dict(task.options.get("retry"))
        cached = task.derived["retry"] = (dump_json(policy.to_dict(), "retry"), policy.max_attempts)
    return cached


def prepare_run(
    task: TaskRecord,
    payload_json: str,
    opts: TriggerOptions,
    now: float,
    limits: Limits = Limits(),
    *,
    concurrency_key: str | None = None,
    idempotency_key: str | None = None,
    priority: int | None = None,
    parent_id: str | None = None,
    root_id: str | None = None,
    batch_id: str | None = None,
    default_version: str | None = None,
) -> NewRun:
    """Validate options against the task's defaults and build the row to insert.

    Keyword arguments carry values the SDK derived from the payload (key functions); explicit
    trigger options win over them.
    """
    # A character is at most 4 bytes in UTF-8: short payloads need no encoding to be measured.
    if len(payload_json) * 4 > limits.max_payload_bytes:
        size = len(payload_json.encode())
        if size > limits.max_payload_bytes:
            raise PayloadTooLarge(
                f"payload of {task.task_id} is {size:,} bytes; the limit is {limits.max_payload_bytes:,} bytes"
            )
    o = task.options
    available_at = now
    status = RunStatus.QUEUED
    if opts.delay is not None:
        if isinstance(opts.delay, datetime):
            if opts.delay.tzinfo is None:
                raise InvalidOptions("delay as a datetime must be timezone-aware")
            available_at = opts.delay.timestamp()
        else:
            available_at = now + _seconds(opts.delay, "delay")
        if available_at > now:
            status = RunStatus.DELAYED
    retry_json, max_attempts = _retry_of(task)
    if opts.max_attempts is not None:
        if isinstance(opts.max_attempts, bool) or not isinstance(opts.max_attempts, int) or opts.max_attempts < 1:
            raise InvalidOptions(f"max_attempts must be an integer >= 1, got {opts.max_attempts!r}")
        max_attempts = opts.max_attempts
    prio = opts.priority if opts.priority is not None else (priority or 0)
    if isinstance(prio, bool) or not isinstance(prio, int) or not 0 <= prio <= MAX_PRIORITY:
        raise InvalidOptions(f"priority must be an integer of seconds in 0..{MAX_PRIORITY}, got {prio!r}")
    ttl = None if opts.ttl is None else _seconds(opts.ttl, "ttl", allow_zero=False)
    key_ttl = o.get("idempotency_key_ttl")
    if opts.idempotency_key_ttl is not None:
        key_ttl = _seconds(opts.idempotency_key_ttl, "idempotency_key_ttl", allow_zero=False)
    max_duration = o.get("max_duration")
    if opts.max_duration is not None:
        max_duration = _seconds(opts.max_duration, "max_duration", allow_zero=False)
    key = opts.concurrency_key if opts.concurrency_key is not None else concurrency_key
    idem = opts.idempotency_key if opts.idempotency_key is not None else idempotency_key
    for name, value in (("concurrency_key", key), ("idempotency_key", idem)):
        if value is not None and (not isinstance(value, str) or not value or len(value) > 512):
            raise InvalidOptions(f"{name} must be a non-empty string of at most 512 characters, got {value!r}")
    queue = opts.queue or task.queue
    # DECISIONS.md, "Concurrency": a key with a Concurrency(limit) takes both slots; a key
    # given only at trigger gets its queue's limit per key (read by the claim, so it follows
    # the queue the run is in) and no queue-wide cap.
    key_limit: int | None = None
    queue_slot = True
    if key is not None:
        if o.get("key_limit") is not None:
            key_limit = int(o["key_limit"])
        else:
            queue_slot = False
    metadata = None if opts.metadata is None else dump_json(opts.metadata, "metadata")
    machine = opts.machine or task.machine or DEFAULT_MACHINE
    return NewRun(
        id=new_id("run"),
        task_id=task.task_id,
        queue=queue,
        payload=payload_json,
        status=status,
        available_at=available_at,
        max_attempts=max_attempts,
        retry=retry_json,
        priority=prio,
        ttl=ttl,
        max_duration=max_duration,
        concurrency_key=key,
        key_limit=key_limit,
        queue_slot=queue_slot,
        idempotency_key=idem,
        idempotency_key_ttl=key_ttl if key_ttl is not None else DEFAULT_IDEMPOTENCY_TTL,
        tags=validate_tags(opts.tags),
        metadata=metadata,
        machine=machine,
        version=opts.version or default_version,
        parent_id=parent_id,
        root_id=root_id,
        batch_id=batch_id,
    )
