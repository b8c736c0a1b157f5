"""Run-lifecycle logic both drivers share: no SQL here, only what to do with the rows.

Each driver decodes its own column types (SQLite keeps JSON as text, PostgreSQL returns
jsonb as Python values) and passes `decode` for JSON columns.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from conveyor.core.backoff import RetryPolicy
from conveyor.core.errors import ConfigError
from conveyor.core.records import ClaimedRun, Outcome, OutcomeKind, Run
from conveyor.core.status import RunStatus

Decode = Callable[[Any], Any]

WORKER_LOST = {"code": "WORKER_LOST", "message": "the worker running this attempt stopped renewing its lease"}
CANCELED_ERROR = {"code": "CANCELED", "type": "Canceled", "message": "the run was canceled"}
EXPIRED_ERROR = {"code": "EXPIRED", "message": "not started within its ttl"}
# The Result of a token wait that timed out (a waitpoint's output).
TOKEN_TIMEOUT = json.dumps(
    {"ok": False, "error": {"code": "TIMEOUT", "type": "WaitTimeout", "message": "the token was not completed in time"}}
)

# The columns of a Run, in the order `run_from_row` reads them.
RUN_COLUMNS = (
    "id, environment, task_id, queue, status, payload, output, error, attempt_count, max_attempts, "
    "tags, metadata, idempotency_key, concurrency_key, priority, machine, version, parent_id, root_id, "
    "batch_id, created_at, available_at, started_at, finished_at, updated_at, ttl, max_duration, "
    "executed_seconds, cancel_requested, worker_id, retry, key_limit, queue_slot, idempotency_key_ttl"
)


def run_from_row(r: Sequence[Any], decode: Decode) -> Run:
    return Run(
        id=r[0], environment=r[1], task_id=r[2], queue=r[3], status=RunStatus(r[4]), payload=decode(r[5]),
        output=decode(r[6]), error=decode(r[7]), attempts=r[8], max_attempts=r[9], tags=decode(r[10]) or [],
        metadata=decode(r[11]) or {}, idempotency_key=r[12], concurrency_key=r[13], priority=r[14],
        machine=r[15], version=r[16], parent_id=r[17], root_id=r[18], batch_id=r[19], created_at=r[20],
        available_at=r[21], started_at=r[22], finished_at=r[23], updated_at=r[24], ttl=r[25],
        max_duration=r[26], executed_seconds=r[27], cancel_requested=bool(r[28]), worker_id=r[29],
        retry=decode(r[30]), key_limit=r[31], queue_slot=bool(r[32]), idempotency_key_ttl=r[33],
    )  # fmt: skip


def claimed_from_row(r: Sequence[Any], token: str, decode: Decode) -> ClaimedRun:
    """A row of the claim's RETURNING list (the same order in both drivers)."""
    return ClaimedRun(
        id=r[0], task_id=r[1], queue=r[2], payload=r[3], attempt=r[4], lease_token=token, max_attempts=r[5],
        retry=decode(r[6]), max_duration=r[7], executed_seconds=r[8], tags=decode(r[9]) or [],
        metadata=decode(r[10]) or {}, concurrency_key=r[11], idempotency_key=r[12], machine=r[13],
        version=r[14], parent_id=r[15], root_id=r[16], batch_id=r[17], created_at=r[18], started_at=r[19],
        claimed_at=r[22], segment=r[23],
    )  # fmt: skip


def claim_in_passes(queues: Sequence[str], limit: int, take: Callable[[str, int], list[Any]]) -> list[Any]:
    """Round-robin over the queues with free capacity: each pass offers every queue an equal
    share of what is left; a queue that could not fill its share drops out. `take(queue, want)`
    admits and starts up to `want` runs at once (so the next pass counts them against the
    limits) and returns their rows. -> the rows, in claim order (sort_key, id)."""
    rows: list[Any] = []
    remaining = limit
    candidates = list(queues)
    while remaining > 0 and candidates:
        share = -(-remaining // len(candidates))
        still_full = []
        for queue in candidates:
            want = min(share, remaining)
            if want <= 0:
                break
            taken = take(queue, want)
            rows += taken
            remaining -= len(taken)
            if len(taken) == want:
                still_full.append(queue)
        candidates = still_full
    rows.sort(key=lambda r: (r[21], r[0]))
    return rows


def lost_lease_outcome(
    run_id: str, token: str, attempt: int, max_attempts: int, retry: dict[str, Any] | None, canceled: bool, now: float
) -> Outcome:
    """An expired lease is a failed attempt (WORKER_LOST): retried with backoff while attempts
    remain, else CRASHED; CANCELED when a cancel was already asked for."""
    if canceled:
        return Outcome(run_id, token, OutcomeKind.FAILED, error=WORKER_LOST, status=RunStatus.CANCELED)
    if attempt < max_attempts:
        delay = RetryPolicy.from_dict(retry).delay_after(attempt)
        return Outcome(run_id, token, OutcomeKind.RETRY, error=WORKER_LOST, retry_at=now + delay)
    return Outcome(run_id, token, OutcomeKind.FAILED, error=WORKER_LOST, status=RunStatus.CRASHED)


def dbapi_connection(obj: Any) -> tuple[object, str]:
    """What `connection=` (transactional enqueue) was given, unwrapped to the DBAPI connection
    underneath: a SQLAlchemy 2 `Connection` or `Session` (sync), or a raw pooled connection,
    recognised by the module of its classes (SQLAlchemy is never imported); anything else is
    returned as it is. A SQLAlchemy transaction that has not begun yet is begun here, as
    SQLAlchemy's autobegin would; the caller commits it. -> (the connection, what was passed,
    for errors)."""
    kinds = {c.__name__ for c in type(obj).__mro__ if c.__module__.split(".")[0] == "sqlalchemy"}
    if not kinds:
        package = type(obj).__module__.split(".")[0]
        return obj, type(obj).__qualname__ if package == "builtins" else f"{package}.{type(obj).__qualname__}"
    if "PoolProxiedConnection" in kinds:  # engine.raw_connection(): a DBAPI connection
        return obj.driver_connection, "a SQLAlchemy raw connection"
    if kinds & {"Session", "scoped_session"}:
        what = "a SQLAlchemy Session"
    elif "Connection" in kinds:
        what = "a SQLAlchemy Connection"
    else:
        raise ConfigError(
            f"connection= takes a SQLAlchemy Connection or Session (sync, inside its transaction), "
            f"got SQLAlchemy {type(obj).__name__}"
        )
    try:
        if what.endswith("Session"):
            obj = obj.connection()  # the session's connection, its transaction begun
        elif not obj.in_transaction():
            obj.begin()
        what += f" ({obj.dialect.name}+{obj.dialect.driver})"
        return obj.connection.driver_connection, what
    except ConfigError:
        raise
    except Exception as exc:  # closed, invalidated, needs a rollback, unbound, ...
        raise ConfigError(f"connection= got {what} that cannot be used: {exc}") from exc
