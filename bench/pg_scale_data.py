"""Realistic finished runs (and their child rows) made fast in a Conveyor PostgreSQL schema, for
bench/pg_scale.py's 10M mode.

Every row is cloned with INSERT ... SELECT generate_series from one run triggered through the SDK
(so every column is one Conveyor writes; the columns this file does not name keep the template's
value, including columns added by later migrations), with what differs per run computed from g:

  runs            finished_at spread evenly over the last `days` (60) days, created a few seconds
                  before; ids in Conveyor's format (`run_` + 12 hex digits of the creation ms + 16 hex)
                  so they sort by time as real ones do. 20 tasks on 10 queues. Statuses: COMPLETED
                  90 %, FAILED 5 % (3 attempts), CANCELED 2 %, CRASHED 1 % (3 attempts), TIMED_OUT 1 %,
                  EXPIRED 0.5 % (never started), SYSTEM_FAILURE 0.5 %; 2 % of the COMPLETED ones took 2
                  attempts. Output on COMPLETED, an error object on the others. Tags on 20 %
                  (`tenant:N`, 100 tenants; 4 % also `priority`), an idempotency key on 10 % (TTL 30
                  days, 1 in 100 of them 90 days), a batch id on 30 %, metadata on 5 %.
  attempts        one row per attempt (attempt_count of them).
  run_events      what Conveyor appends: per attempt EXECUTING then QUEUED (a retry) or the final
                  status; EXPIRED runs one event (event 1, the creation, is never stored).
  run_tags        one row per tag.
  idempotency_keys  the key rows that outlive a finished run: COMPLETED and CANCELED keep theirs until
                  the TTL (live or expired, as time has it); the other statuses freed theirs.
  run_logs        two lines for 10 % of the runs.
  run_steps       three journal entries for 2 % of the runs (when migration 0002 is there).

Made in chunks of `chunk` runs, each chunk's child rows selected from its runs by primary-key range.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

DAY = 86400.0

# Status by g % 200 (COMPLETED for the rest), with the attempts it took.
_STATUS = (
    "CASE WHEN g % 200 < 10 THEN 'FAILED' WHEN g % 200 < 14 THEN 'CANCELED' WHEN g % 200 < 16 THEN 'CRASHED' "
    "WHEN g % 200 < 18 THEN 'TIMED_OUT' WHEN g % 200 = 18 THEN 'EXPIRED' WHEN g % 200 = 19 THEN 'SYSTEM_FAILURE' "
    "ELSE 'COMPLETED' END"
)
_ATTEMPTS = (
    "CASE WHEN g % 200 < 10 OR g % 200 IN (14, 15) THEN 3 WHEN g % 200 = 18 THEN 0 "
    "WHEN g % 200 >= 20 AND g % 50 = 21 THEN 2 ELSE 1 END"
)


def run_overrides(n: int, now: float, days: float) -> dict[str, str]:
    """Column -> SQL expression of g (1..n) and the template's columns, for a finished run."""
    fin = f"({now - days * DAY!r}::float8 + (g - 0.5) * {days * DAY / n!r}::float8)"
    # A few seconds before, jittered by less than half the spacing of finished_at: ids (made from
    # created_at) then grow with g, which fill_finished's chunks rely on.
    created = f"({fin} - 2 - (g % 7) * {days * DAY / n / 14!r}::float8)"
    ms = f"({created} * 1000)::bigint"
    status = _STATUS
    attempts = _ATTEMPTS
    keyed = "g % 10 = 3"
    return {
        "id": f"'run_' || lpad(to_hex({ms}), 12, '0') || lpad(to_hex(g), 16, '0')",
        "environment": "'dev'",
        "task_id": "'task-' || lpad((g % 20)::text, 2, '0')",
        "queue": "'queue-' || (g % 10)",
        "status": status,
        "payload": "jsonb_build_object('order_id', g, 'customer', 'c' || (g % 9973), 'amount', (g % 1000) / 10.0)",
        "output": f"CASE WHEN {status} = 'COMPLETED' THEN jsonb_build_object('ok', true, 'order_id', g) END",
        "error": (
            f"CASE WHEN {status} NOT IN ('COMPLETED', 'CANCELED') THEN jsonb_build_object('type', 'ValueError', "
            "'message', 'payment provider said no for order ' || g, "
            "'stack', repeat('  File \"app.py\", line 1\\n', 4)) END"
        ),
        "available_at": created,
        "sort_key": created,
        "expires_at": "NULL",
        "attempt_count": attempts,
        "max_attempts": "3",
        "executed_seconds": f"CASE WHEN {attempts} = 0 THEN 0 ELSE 0.05 + (g % 13) / 10.0 END",
        "concurrency_key": "NULL",
        "key_limit": "NULL",
        "idempotency_key": f"CASE WHEN {keyed} THEN 'order-' || g END",
        "idempotency_key_ttl": (
            f"CASE WHEN {keyed} THEN CASE WHEN g % 1000 = 3 THEN 90 * 86400.0 ELSE 30 * 86400.0 END END"
        ),
        "tags": (
            "CASE WHEN g % 25 = 0 THEN jsonb_build_array('tenant:' || (g / 5 % 100), 'priority') "
            "WHEN g % 5 = 0 THEN jsonb_build_array('tenant:' || (g / 5 % 100)) END"
        ),
        "metadata": "CASE WHEN g % 20 = 1 THEN '{\"progress\": 100}'::jsonb END",
        "batch_id": "CASE WHEN g % 10 IN (5, 6, 7) THEN 'batch_' || lpad(to_hex(g / 1000), 12, '0') END",
        "parent_id": "NULL",
        "root_id": "NULL",
        "version": "NULL",
        "worker_id": "NULL",
        "lease_token": "NULL",
        "lease_expires_at": "NULL",
        "segment_started_at": "NULL",
        "cancel_requested": f"{status} = 'CANCELED'",
        "event_seq": f"CASE WHEN {attempts} = 0 THEN 2 ELSE 1 + 2 * {attempts} END",
        "created_at": created,
        "queued_at": created,
        "started_at": f"CASE WHEN {attempts} = 0 THEN NULL ELSE {created} + 0.01 END",
        "finished_at": fin,
        "updated_at": fin,
    }


def run_id_of(db: Any, n: int, now: float, days: float, g: int) -> str:
    """The id run_overrides gives run g."""
    expr = run_overrides(n, now, days)["id"]
    return str(db.execute(f"SELECT {expr.replace('%', '%%')} FROM (SELECT %s::bigint AS g) AS x", (g,)).fetchone()[0])


def columns(db: Any, schema: str, table: str) -> list[str]:
    return [
        r[0]
        for r in db.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
            "ORDER BY ordinal_position",
            (schema, table),
        )
    ]


def fill_finished(
    db: Any,
    schema: str,
    template_id: str,
    n: int,
    *,
    days: float = 60.0,
    chunk: int = 1_000_000,
    progress: Callable[[str], None] = print,
) -> dict[str, int]:
    """n finished runs and their child rows (see the module docstring). `db`: an autocommit psycopg
    connection. -> rows made per table."""
    t = f'"{schema}"'
    now = float(db.execute("SELECT extract(epoch from now())::float8").fetchone()[0])
    cols = columns(db, schema, "runs")
    over = run_overrides(n, now, days)
    select = ", ".join(over.get(c, c) for c in cols).replace("%", "%%")  # literal modulo signs
    steps = db.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{t}.run_steps",)).fetchone()[0]
    made: dict[str, int] = {}
    started = time.perf_counter()
    for lo in range(1, n + 1, chunk):
        hi = min(n, lo + chunk - 1)
        first, last = run_id_of(db, n, now, days, lo), run_id_of(db, n, now, days, hi)
        rng = {"first": first, "last": last}
        with db.transaction():
            db.execute("SET LOCAL synchronous_commit = off")
            counts = {
                "runs": db.execute(
                    f"INSERT INTO {t}.runs ({', '.join(cols)}) SELECT {select} FROM {t}.runs AS template, "
                    "generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g WHERE template.id = %(template)s",
                    {"lo": lo, "hi": hi, "template": template_id},
                ).rowcount,
                "attempts": db.execute(
                    f"INSERT INTO {t}.attempts (run_id, number, worker_id, lease_token, status, error, started_at, "
                    "finished_at) "
                    "SELECT r.id, a, 'worker_' || substr(md5(r.task_id), 1, 12), 'lease_' || substr(r.id, 5, 12), "
                    "CASE WHEN a < r.attempt_count THEN 'FAILED' WHEN r.status = 'CRASHED' THEN 'WORKER_LOST' "
                    "WHEN r.status = 'SYSTEM_FAILURE' THEN 'FAILED' ELSE r.status END, "
                    "CASE WHEN a < r.attempt_count OR r.status <> 'COMPLETED' THEN r.error END, "
                    "r.started_at + (a - 1) * 2, r.started_at + (a - 1) * 2 + 0.5 "
                    f"FROM {t}.runs r, generate_series(1, r.attempt_count) AS a "
                    "WHERE r.id BETWEEN %(first)s AND %(last)s",
                    rng,
                ).rowcount,
                "run_events": db.execute(
                    f"INSERT INTO {t}.run_events (run_id, seq, attempt, kind, data, created_at) "
                    "SELECT r.id, s, CASE WHEN r.attempt_count = 0 THEN NULL ELSE s / 2 END, 'status', "
                    "CASE WHEN s = r.event_seq THEN jsonb_build_object('status', r.status) "
                    'WHEN s %% 2 = 0 THEN \'{"status": "EXECUTING"}\'::jsonb '
                    "ELSE jsonb_build_object('status', 'QUEUED', 'retry_at', r.started_at + s) END, "
                    "least(r.finished_at, coalesce(r.started_at, r.created_at) + s * 0.1) "
                    f"FROM {t}.runs r, generate_series(2, r.event_seq) AS s "
                    "WHERE r.id BETWEEN %(first)s AND %(last)s",
                    rng,
                ).rowcount,
                "run_tags": db.execute(
                    f"INSERT INTO {t}.run_tags (environment, tag, run_id) "
                    "SELECT r.environment, tag, r.id "
                    f"FROM {t}.runs r, jsonb_array_elements_text(r.tags) AS tag "
                    "WHERE r.id BETWEEN %(first)s AND %(last)s AND r.tags IS NOT NULL",
                    rng,
                ).rowcount,
                "idempotency_keys": db.execute(
                    f"INSERT INTO {t}.idempotency_keys (environment, task_id, key, run_id, expires_at) "
                    "SELECT r.environment, r.task_id, r.idempotency_key, r.id, r.created_at + r.idempotency_key_ttl "
                    f"FROM {t}.runs r WHERE r.id BETWEEN %(first)s AND %(last)s "
                    "AND r.idempotency_key IS NOT NULL AND r.status IN ('COMPLETED', 'CANCELED')",
                    rng,
                ).rowcount,
                "run_logs": db.execute(
                    f"INSERT INTO {t}.run_logs (run_id, attempt, ts, level, message, attributes) "
                    "SELECT r.id, greatest(r.attempt_count, 1), r.started_at + i * 0.01, 'INFO', "
                    "'charging order ' || (r.payload ->> 'order_id') || ' step ' || i, "
                    "jsonb_build_object('customer', r.payload ->> 'customer') "
                    f"FROM {t}.runs r, generate_series(1, 2) AS i "
                    "WHERE r.id BETWEEN %(first)s AND %(last)s AND r.started_at IS NOT NULL "
                    "AND (r.payload ->> 'order_id')::bigint %% 10 = 1",
                    rng,
                ).rowcount,
            }
            if steps:
                counts["run_steps"] = db.execute(
                    f"INSERT INTO {t}.run_steps (run_id, position, key, name, output, attempt, started_at, "
                    "finished_at) "
                    "SELECT r.id, p, 'step-' || p || '#' || p, 'step-' || p, '{\"ok\": true}', 1, "
                    "r.started_at + p * 0.01, r.started_at + p * 0.01 + 0.005 "
                    f"FROM {t}.runs r, generate_series(1, 3) AS p "
                    "WHERE r.id BETWEEN %(first)s AND %(last)s AND r.started_at IS NOT NULL "
                    "AND (r.payload ->> 'order_id')::bigint %% 50 = 7",
                    rng,
                ).rowcount
        for k, v in counts.items():
            made[k] = made.get(k, 0) + v
        progress(f"  finished runs {hi:,}/{n:,} ({time.perf_counter() - started:.0f} s)")
    return made


def fill_queued(db: Any, schema: str, template_id: str, n: int, *, queue: str, task_id: str, offset: int = 0) -> int:
    """n QUEUED clones of the template (a just-triggered run) in `queue` as `task_id`: ids keep the
    template's creation time and take g + offset as their random part, so they sort as one batch
    triggered in the same millisecond would."""
    t = f'"{schema}"'
    cols = columns(db, schema, "runs")
    over = {
        "id": "substr(template.id, 1, 16) || lpad(to_hex(g + %(offset)s), 16, '0')",
        "queue": "%(queue)s",
        "task_id": "%(task_id)s",
        "sort_key": "template.sort_key + g * 1e-6",
        "available_at": "template.available_at + g * 1e-6",
    }
    select = ", ".join(over.get(c, f"template.{c}") for c in cols)
    with db.transaction():
        db.execute("SET LOCAL synchronous_commit = off")
        return int(
            db.execute(
                f"INSERT INTO {t}.runs ({', '.join(cols)}) SELECT {select} FROM {t}.runs AS template, "
                "generate_series(1, %(n)s) AS g WHERE template.id = %(template)s",
                {"offset": offset, "queue": queue, "task_id": task_id, "n": n, "template": template_id},
            ).rowcount
        )
