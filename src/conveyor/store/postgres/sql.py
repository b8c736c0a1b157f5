"""Every statement the PostgreSQL driver issues, as named constants (no ORM).

Two conventions make one text serve every deployment:

- Tables are written `conveyor.name`; `render` swaps in the configured schema.
- The current time is the parameter `%(now)s`. With an injected (fake) clock it is passed as a
  parameter; in production `render` replaces it with the database's clock (`now()`, the start
  of the transaction), so host clock skew never expires a live lease (DECISIONS.md).

Status guards are in the outer WHERE of every UPDATE: under READ COMMITTED an UPDATE that
waited for a row lock re-checks only its own WHERE clause against the new row version.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

DEFAULT_SCHEMA = "conveyor"
DB_NOW = "(extract(epoch from now())::float8)"
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def valid_schema(name: str) -> bool:
    return bool(_SCHEMA_NAME.match(name))


@lru_cache(maxsize=4096)
def render(text: str, schema: str, db_clock: bool) -> str:
    """The statement for one schema and clock mode (cached; statement texts are constants)."""
    if schema != DEFAULT_SCHEMA:
        text = text.replace("conveyor.", f'"{schema}".')
    if db_clock:
        text = text.replace("%(now)s", DB_NOW)
    return text


def channel(schema: str, name: str) -> str:
    """A NOTIFY channel name (an identifier: at most 63 bytes)."""
    full = f"conveyor.{schema}.{name}"
    if len(full.encode()) <= 63:
        return full
    return "conveyor." + hashlib.sha1(full.encode()).hexdigest()[:40]


def environment_channel(schema: str, environment: str) -> str:
    return channel(schema, f"env.{environment}")


def worker_channel(schema: str, worker_id: str) -> str:
    return channel(schema, f"worker.{worker_id}")


# --- registry -----------------------------------------------------------------------------------

ENSURE_ENVIRONMENT = """
INSERT INTO conveyor.environments (name, created_at) VALUES (%(env)s, %(now)s) ON CONFLICT DO NOTHING
"""

TASK_UPSERT = """
INSERT INTO conveyor.tasks (environment, task_id, version, queue, machine, options, payload_schema,
    code_hash, updated_at)
VALUES (%(env)s, %(task_id)s, %(version)s, %(queue)s, %(machine)s, %(options)s::jsonb, %(schema)s::jsonb,
    %(code_hash)s, %(now)s)
ON CONFLICT (environment, task_id, version) DO UPDATE SET queue = excluded.queue,
    machine = excluded.machine, options = excluded.options, payload_schema = excluded.payload_schema,
    code_hash = excluded.code_hash, updated_at = excluded.updated_at
"""

TASK_GET = """
SELECT task_id, queue, machine, options, payload_schema, code_hash, version, updated_at
FROM conveyor.tasks WHERE environment = %(env)s AND task_id = %(task_id)s
ORDER BY updated_at DESC LIMIT 1
"""

TASK_LIST = """
SELECT DISTINCT ON (task_id) task_id, queue, machine, options, payload_schema, code_hash, version, updated_at
FROM conveyor.tasks WHERE environment = %(env)s ORDER BY task_id, updated_at DESC
"""

QUEUE_UPSERT = """
INSERT INTO conveyor.queues (environment, name, concurrency_limit, paused, updated_at)
VALUES (%(env)s, %(name)s, %(limit)s, false, %(now)s)
ON CONFLICT (environment, name) DO UPDATE SET
    concurrency_limit = excluded.concurrency_limit, updated_at = excluded.updated_at
"""

QUEUE_SET_PAUSED = """
INSERT INTO conveyor.queues (environment, name, concurrency_limit, paused, updated_at)
VALUES (%(env)s, %(name)s, NULL, %(paused)s, %(now)s)
ON CONFLICT (environment, name) DO UPDATE SET paused = excluded.paused, updated_at = excluded.updated_at
"""

QUEUE_STATS = """
SELECT q.name, q.concurrency_limit, q.paused,
    (SELECT count(*) FROM conveyor.runs r WHERE r.environment = q.environment AND r.queue = q.name
        AND r.status = 'QUEUED'),
    (SELECT count(*) FROM conveyor.runs r WHERE r.environment = q.environment AND r.queue = q.name
        AND r.status = 'EXECUTING'),
    (SELECT count(*) FROM conveyor.runs r WHERE r.environment = q.environment AND r.queue = q.name
        AND r.status = 'DELAYED')
FROM conveyor.queues q WHERE q.environment = %(env)s AND (%(name)s::text IS NULL OR q.name = %(name)s)
ORDER BY q.name
"""

# Queues named only by runs. One branch per status, each matching a partial index's predicate
# (runs_claim, runs_running, runs_delayed), so only unfinished runs are read: `status IN (...)`
# matched none of them and read the whole table (a parallel seq scan of 11M rows, 2 s, with 10M
# finished runs: bench/pg_scale.py, docs/performance.md).
QUEUES_FROM_RUNS = """
SELECT queue, NULL::integer, false, sum(queued)::bigint, sum(running)::bigint, sum(delayed)::bigint
FROM (
    SELECT queue, 1 AS queued, 0 AS running, 0 AS delayed FROM conveyor.runs
        WHERE environment = %(env)s AND status = 'QUEUED'
    UNION ALL SELECT queue, 0, 1, 0 FROM conveyor.runs WHERE environment = %(env)s AND status = 'EXECUTING'
    UNION ALL SELECT queue, 0, 0, 1 FROM conveyor.runs WHERE environment = %(env)s AND status = 'DELAYED'
) AS live
GROUP BY queue
"""

QUEUED_COUNT = """
SELECT count(*) FROM conveyor.runs WHERE environment = %(env)s AND queue = %(queue)s AND status = 'QUEUED'
"""

QUEUED_BY_MACHINE = """
SELECT machine, version, count(*) FROM conveyor.runs
WHERE environment = %(env)s AND queue = %(queue)s AND status = 'QUEUED' GROUP BY machine, version
"""

# --- insert -------------------------------------------------------------------------------------

# Keys in key order (ORDER BY), so two batches that share keys lock them in the same order.
KEY_INSERT_MANY = """
INSERT INTO conveyor.idempotency_keys (environment, task_id, key, run_id, expires_at)
SELECT %(env)s, k.task_id, k.key, k.run_id, %(now)s + k.ttl
FROM unnest(%(task_ids)s::text[], %(keys)s::text[], %(run_ids)s::text[], %(ttls)s::float8[])
    AS k(task_id, key, run_id, ttl)
ORDER BY k.task_id, k.key
ON CONFLICT (environment, task_id, key) DO NOTHING
RETURNING task_id, key
"""

KEY_INSERT = """
INSERT INTO conveyor.idempotency_keys (environment, task_id, key, run_id, expires_at)
VALUES (%(env)s, %(task_id)s, %(key)s, %(run_id)s, %(now)s + %(ttl)s)
ON CONFLICT (environment, task_id, key) DO NOTHING
RETURNING run_id
"""

KEY_LOCK = """
SELECT run_id, expires_at > %(now)s FROM conveyor.idempotency_keys
WHERE environment = %(env)s AND task_id = %(task_id)s AND key = %(key)s
FOR UPDATE
"""

KEY_TAKE = """
UPDATE conveyor.idempotency_keys SET run_id = %(run_id)s, expires_at = %(now)s + %(ttl)s
WHERE environment = %(env)s AND task_id = %(task_id)s AND key = %(key)s
"""

KEY_FREE = """
DELETE FROM conveyor.idempotency_keys
WHERE environment = %(env)s AND task_id = %(task_id)s AND key = %(key)s AND run_id = %(run_id)s
"""

RUN_STATUS = "SELECT status FROM conveyor.runs WHERE id = %(id)s"

INSERT_RUN = """
INSERT INTO conveyor.runs (id, environment, task_id, queue, status, payload, available_at, priority, sort_key,
    ttl, expires_at, max_attempts, retry, max_duration, concurrency_key, key_limit, queue_slot,
    idempotency_key, idempotency_key_ttl, tags, metadata, machine, version, parent_id, root_id,
    batch_id, trace_context, event_seq, created_at, queued_at, updated_at)
VALUES (%(id)s, %(env)s, %(task_id)s, %(queue)s, %(status)s, %(payload)s::jsonb, %(available_at)s,
    %(priority)s, %(available_at)s - %(priority)s, %(ttl)s,
    CASE WHEN %(queued)s THEN %(now)s + %(ttl)s END,
    %(max_attempts)s, %(retry)s::jsonb, %(max_duration)s, %(concurrency_key)s, %(key_limit)s, %(queue_slot)s,
    %(idempotency_key)s, %(idempotency_key_ttl)s, %(tags)s::jsonb, %(metadata)s::jsonb, %(machine)s,
    %(version)s, %(parent_id)s, %(root_id)s, %(batch_id)s, %(trace_context)s, 1, %(now)s,
    CASE WHEN %(queued)s THEN %(now)s END, %(now)s)
"""


# INSERT_RUN for many runs in one statement: one array per column (tx._RUN_COLUMNS), so a batch is
# one statement, not one execution per row. The arrays go in binary (`%()b`): psycopg's text
# format escapes every element with a regex, which cost more than the insert itself.
INSERT_RUNS = """
INSERT INTO conveyor.runs (id, environment, task_id, queue, status, payload, available_at, priority, sort_key,
    ttl, expires_at, max_attempts, retry, max_duration, concurrency_key, key_limit, queue_slot,
    idempotency_key, idempotency_key_ttl, tags, metadata, machine, version, parent_id, root_id,
    batch_id, trace_context, event_seq, created_at, queued_at, updated_at)
SELECT r.id, %(env)s, r.task_id, r.queue, r.status, r.payload::jsonb, r.available_at, r.priority,
    r.available_at - r.priority, r.ttl, CASE WHEN r.status = 'QUEUED' THEN %(now)s + r.ttl END,
    r.max_attempts, r.retry::jsonb, r.max_duration, r.concurrency_key, r.key_limit, r.queue_slot,
    r.idempotency_key, r.idempotency_key_ttl, r.tags::jsonb, r.metadata::jsonb, r.machine, r.version,
    r.parent_id, r.root_id, r.batch_id, r.trace_context, 1, %(now)s,
    CASE WHEN r.status = 'QUEUED' THEN %(now)s END, %(now)s
FROM unnest(%(id)b::text[], %(task_id)b::text[], %(queue)b::text[], %(status)b::text[], %(payload)b::text[],
    %(available_at)b::float8[], %(priority)b::int4[], %(ttl)b::float8[], %(max_attempts)b::int4[],
    %(retry)b::text[], %(max_duration)b::float8[], %(concurrency_key)b::text[], %(key_limit)b::int4[],
    %(queue_slot)b::bool[], %(idempotency_key)b::text[], %(idempotency_key_ttl)b::float8[], %(tags)b::text[],
    %(metadata)b::text[], %(machine)b::text[], %(version)b::text[], %(parent_id)b::text[], %(root_id)b::text[],
    %(batch_id)b::text[], %(trace_context)b::text[])
    AS r(id, task_id, queue, status, payload, available_at, priority, ttl, max_attempts, retry, max_duration,
    concurrency_key, key_limit, queue_slot, idempotency_key, idempotency_key_ttl, tags, metadata, machine,
    version, parent_id, root_id, batch_id, trace_context)
"""

INSERT_TAGS = """
INSERT INTO conveyor.run_tags (environment, tag, run_id)
SELECT %(env)s, t, r FROM unnest(%(tags)b::text[], %(run_ids)b::text[]) AS x(t, r)
ON CONFLICT DO NOTHING
"""


@lru_cache(maxsize=16)
def insert_run_alone(notify: str) -> str:
    """One run's INSERT_RUN, its tags and `notify` (an SQL expression sending the transaction's
    NOTIFYs) in one statement, sent in autocommit: a trigger of one run is one round trip
    (driver._Tx). The run's id is made by the client, so the statement may be sent again after a
    lost connection whatever became of the first: ON CONFLICT (id) DO NOTHING."""
    return f"""WITH run AS ({INSERT_RUN.strip()}
ON CONFLICT (id) DO NOTHING RETURNING id
), tagged AS (
INSERT INTO conveyor.run_tags (environment, tag, run_id)
SELECT %(env)s, t, run.id FROM run, unnest(%(tag_list)s::text[]) AS t ON CONFLICT DO NOTHING
)
SELECT {notify}"""


# NOTIFYs as an expression (insert_run_alone): one per (channel, payload) pair.
NOTIFY_EACH = "(SELECT count(pg_notify(c, p)) FROM unnest(%(channels)s::text[], %(payloads)s::text[]) AS n(c, p))"

INSERT_EVENT = """
INSERT INTO conveyor.run_events (run_id, seq, attempt, kind, data, created_at)
VALUES (%(run_id)s, %(seq)s, %(attempt)s, %(kind)s, %(data)s::jsonb, %(now)s)
"""

# --- claim --------------------------------------------------------------------------------------

QUEUE_READ = """
SELECT concurrency_limit, paused FROM conveyor.queues WHERE environment = %(env)s AND name = %(queue)s
"""

# The queue's slot lock. Blocking for the first queue a transaction locks; SKIP LOCKED for any
# further one (QUEUE_TRY_LOCK), so two claimers that rotate their queues never deadlock.
QUEUE_LOCK = QUEUE_READ.rstrip() + " FOR UPDATE\n"
QUEUE_TRY_LOCK = QUEUE_READ.rstrip() + " FOR UPDATE SKIP LOCKED\n"

QUEUE_RUNNING = """
SELECT count(*) FROM conveyor.runs
WHERE environment = %(env)s AND queue = %(queue)s AND status = 'EXECUTING' AND queue_slot
"""

# Per-key locks where no queue lock serialises the claimers (queues without a limit):
# transaction-level advisory locks, tried without waiting (a key held by another claimer is
# left to it). 64-bit keys from the schema, environment, queue and key.
KEY_TRY_LOCKS = """
SELECT k, pg_try_advisory_xact_lock(hashtextextended(%(scope)s || k, 0))
FROM unnest(%(keys)s::text[]) AS k
"""

KEY_RUNNING = """
SELECT concurrency_key, count(*) FROM conveyor.runs
WHERE environment = %(env)s AND queue = %(queue)s AND status = 'EXECUTING'
  AND concurrency_key = ANY(%(keys)s::text[])
GROUP BY concurrency_key
"""

CLAIM_CANDIDATES = """
SELECT id, concurrency_key, key_limit, queue_slot FROM conveyor.runs
WHERE environment = %(env)s AND queue = %(queue)s AND status = 'QUEUED' AND available_at <= %(now)s
  AND machine = %(machine)s AND (%(version)s::text IS NULL OR version IS NULL OR version = %(version)s)
  AND task_id = ANY(%(task_ids)s::text[])
  AND (concurrency_key IS NULL OR concurrency_key <> ALL(%(full_keys)s::text[]))
  AND (NOT queue_slot OR %(queue_free)s > 0)
  AND id <> ALL(%(picked)s::text[])
ORDER BY sort_key, id
LIMIT %(window)s
FOR UPDATE SKIP LOCKED
"""

# The queue's settings (QUEUE_READ) and, for a queue without a limit and not paused, the first
# CLAIM_CANDIDATES, in one round trip: an idle worker's claim is one statement shorter (W3 latency).
# Always one row at least: (NULL candidate, limit, paused) when there is no candidate. For a queue
# with a limit or paused the gate (an InitPlan, evaluated before the scan) locks no run: the caller
# then takes the queue's lock and asks CLAIM_CANDIDATES, as before.
_UNGATED = "\n  AND NOT EXISTS (SELECT 1 FROM q WHERE paused OR concurrency_limit IS NOT NULL)\nORDER BY"
CLAIM_FIRST_CANDIDATES = (
    """WITH q AS (
    SELECT concurrency_limit, paused FROM conveyor.queues WHERE environment = %(env)s AND name = %(queue)s
)
SELECT c.id, c.concurrency_key, c.key_limit, c.queue_slot, s.concurrency_limit, s.paused
FROM (SELECT (SELECT concurrency_limit FROM q) AS concurrency_limit,
             coalesce((SELECT paused FROM q), false) AS paused) AS s
LEFT JOIN LATERAL (
"""
    + CLAIM_CANDIDATES.strip().replace("\nORDER BY", _UNGATED)
    + """
) AS c ON true
"""
)

# `status || '' = ...` in the guards of the set-based updates is `status = ...` that the planner
# cannot match to a partial index's predicate: it must find the rows by primary key, not scan
# every QUEUED (runs_claim) or EXECUTING (runs_running) row to filter by id. With stale statistics
# (a bulk insert not yet analyzed) it chose the scan, and each claim read the whole queue.
# A run resumed from WAITING (`resume`) continues its attempt: same number, executed time kept,
# one more segment; any other claim starts attempt n + 1 at segment 1.
CLAIM_UPDATE = """
UPDATE conveyor.runs SET status = 'EXECUTING', worker_id = %(worker_id)s, lease_token = %(token)s,
    lease_expires_at = %(now)s + %(lease)s, attempt_count = attempt_count + CASE WHEN resume THEN 0 ELSE 1 END,
    started_at = coalesce(started_at, %(now)s), expires_at = NULL, segment_started_at = %(now)s,
    executed_seconds = CASE WHEN resume THEN executed_seconds ELSE 0 END,
    segment = CASE WHEN resume THEN segment + 1 ELSE 1 END, resume = false,
    version = coalesce(version, %(version)s::text), event_seq = event_seq + 1, updated_at = %(now)s
WHERE id = ANY(%(ids)s::text[]) AND status || '' = 'QUEUED'
RETURNING id, task_id, queue, payload::text, attempt_count, max_attempts, retry, max_duration,
    executed_seconds, tags, metadata, concurrency_key, idempotency_key, machine, version,
    parent_id, root_id, batch_id, created_at, started_at, event_seq, sort_key, segment_started_at, segment
"""

# CLAIM_UPDATE with the claimed runs' attempt rows and EXECUTING events in the same round trip. A
# resumed segment continues its attempt row (same number, first start kept).
CLAIM_START = (
    "WITH claimed AS ("
    + CLAIM_UPDATE.strip()
    + """
), started AS (
    INSERT INTO conveyor.attempts (run_id, number, worker_id, lease_token, status, started_at)
    SELECT id, attempt_count, %(worker_id)s, %(token)s, 'EXECUTING', %(now)s FROM claimed
    ON CONFLICT (run_id, number) DO UPDATE SET worker_id = excluded.worker_id,
        lease_token = excluded.lease_token, status = 'EXECUTING', error = NULL, finished_at = NULL
), events AS (
    INSERT INTO conveyor.run_events (run_id, seq, attempt, kind, data, created_at)
    SELECT id, event_seq, attempt_count, 'status', '{"status":"EXECUTING"}'::jsonb, %(now)s FROM claimed
)
SELECT * FROM claimed
"""
)

# A claim of one queue in one statement (PostgresTx._take_alone): the queue's settings, the first
# candidates and, when the queue has no limit, is not paused and none of those candidates has a
# concurrency key, their start (CLAIM_START). Always one row at least, each ending with the gate:
# (limit, paused, keyed, the commit mode); when the gate is closed nothing is started and the caller
# claims the usual way (CLAIM_FIRST_CANDIDATES and on). `commit`: NULL keeps the transaction's
# synchronous_commit; 'off' when the claim is the whole transaction (driver._Tx, docs/architecture.md).
CLAIM_ALONE = (
    """WITH q AS (
    SELECT concurrency_limit, paused FROM conveyor.queues WHERE environment = %(env)s AND name = %(queue)s
), c AS (
"""
    + CLAIM_CANDIDATES.strip()
    .replace("SELECT id, concurrency_key, key_limit, queue_slot FROM", "SELECT id, concurrency_key FROM")
    .replace("\nORDER BY", _UNGATED)
    + """
), gate AS (
    SELECT (SELECT concurrency_limit FROM q) AS concurrency_limit, coalesce((SELECT paused FROM q), false) AS paused,
        EXISTS (SELECT 1 FROM c WHERE concurrency_key IS NOT NULL) AS keyed,
        set_config('synchronous_commit', coalesce(%(commit)s::text, current_setting('synchronous_commit')), true)
), """
    + CLAIM_START.replace(
        "WHERE id = ANY(%(ids)s::text[]) AND", "WHERE id IN (SELECT id FROM c) AND NOT (SELECT keyed FROM gate) AND"
    )
    .removeprefix("WITH ")
    .replace("SELECT * FROM claimed", "SELECT claimed.*, gate.* FROM gate LEFT JOIN claimed ON true")
)

# --- settle -------------------------------------------------------------------------------------

_SEGMENT = "executed_seconds = executed_seconds + greatest(0, %(now)s - coalesce(segment_started_at, %(now)s))"
_UNLEASE = "worker_id = NULL, lease_token = NULL, lease_expires_at = NULL, segment_started_at = NULL"
_SETTLE_GUARD = "WHERE id = %(id)s AND lease_token = %(token)s AND status = 'EXECUTING'"
_SETTLE_RETURNING = "RETURNING event_seq, attempt_count, environment, task_id, idempotency_key, parent_id, segment"


def _wait_result(run: str, output: str) -> str:
    """A finished run as the Result of the waits that target it (a waitpoint's output, JSON text):
    {"ok": true, "run_id", "status", "output"} or {"ok": false, "run_id", "status", "error"}.
    `run` names a row with id, status and error; `output` is its output as JSON text."""
    ok = (
        f"""'{{"ok":true,"run_id":' || to_json({run}.id)::text || ',"status":"COMPLETED","output":' """
        f"|| coalesce({output}, 'null') || '}}'"
    )
    failed = f"json_build_object('ok', false, 'run_id', {run}.id, 'status', {run}.status, 'error', {run}.error)::text"
    return f"CASE WHEN {run}.status = 'COMPLETED' THEN {ok} ELSE {failed} END"


# A final status, and (same statement) the pending waitpoints that target the run complete with
# its result. Their waiters are resumed later, in statements of their own (tx.py, "Durable waits").
# `awaited`: a waitpoint may target the run that this statement's snapshot does not show (see
# migration 0004); the caller then completes them again in a statement of its own.
SETTLE_FINAL = f"""
WITH settled AS (
    UPDATE conveyor.runs SET status = %(status)s, output = %(output)s::jsonb, error = %(error)s::jsonb,
        finished_at = %(now)s, {_SEGMENT}, {_UNLEASE}, event_seq = event_seq + 1, updated_at = %(now)s
    {_SETTLE_GUARD}
    RETURNING event_seq, attempt_count, environment, task_id, idempotency_key, parent_id, segment,
        awaited, id, status, output, error
), done AS (
    UPDATE conveyor.waitpoints p SET status = 'COMPLETED', completed_at = %(now)s,
        output = {_wait_result("s", "s.output::text")}
    FROM settled s WHERE p.target_run_id = s.id AND p.status = 'PENDING'
    RETURNING p.id
)
SELECT event_seq, attempt_count, environment, task_id, idempotency_key, parent_id, segment, awaited,
    ARRAY(SELECT id FROM done)
FROM settled
"""

SETTLE_RETRY = f"""
UPDATE conveyor.runs SET status = 'QUEUED', error = %(error)s::jsonb, available_at = %(retry_at)s,
    sort_key = %(retry_at)s - priority, {_SEGMENT}, {_UNLEASE}, event_seq = event_seq + 1, updated_at = %(now)s
{_SETTLE_GUARD}
{_SETTLE_RETURNING}
"""

# A released first segment gives its attempt back; a released resumed segment (segment > 1)
# stays a resume: its attempt continues on the next claim (its executed time kept).
SETTLE_RELEASE = f"""
UPDATE conveyor.runs SET status = 'QUEUED',
    attempt_count = attempt_count - CASE WHEN segment <= 1 THEN 1 ELSE 0 END, resume = segment > 1,
    executed_seconds = executed_seconds
        + CASE WHEN segment > 1 THEN greatest(0, %(now)s - coalesce(segment_started_at, %(now)s)) ELSE 0 END,
    segment = CASE WHEN segment > 1 THEN segment - 1 ELSE 0 END,
    {_UNLEASE}, event_seq = event_seq + 1, updated_at = %(now)s
{_SETTLE_GUARD}
RETURNING event_seq, attempt_count + CASE WHEN segment = 0 THEN 1 ELSE 0 END, environment, task_id,
    idempotency_key, parent_id, segment
"""

# The common case of a worker's exchange, all its COMPLETED outcomes in one round trip: the runs,
# their attempts and their status events (a per-outcome loop cost three round trips per run and
# bounded the drain), and the waitpoints that target them (as SETTLE_FINAL). The data-modifying
# CTEs see `settled`, the rows this statement changed. -> (run id, awaited, NULL) per settled
# run, then (NULL, NULL, waitpoint id) per completed waitpoint.
SETTLE_COMPLETED_MANY = f"""
WITH settled AS (
    UPDATE conveyor.runs r SET status = 'COMPLETED', output = o.output::jsonb, error = NULL,
        finished_at = %(now)s, {_SEGMENT}, {_UNLEASE}, event_seq = r.event_seq + 1, updated_at = %(now)s
    FROM unnest(%(ids)s::text[], %(tokens)s::text[], %(outputs)s::text[]) AS o(id, token, output)
    WHERE r.id = o.id AND r.lease_token = o.token AND r.status || '' = 'EXECUTING'
    RETURNING r.id, r.event_seq, r.attempt_count, r.awaited, r.status, r.error, o.output AS text_output
), finished AS (
    UPDATE conveyor.attempts a SET status = 'COMPLETED', error = NULL, finished_at = %(now)s
    FROM settled s WHERE a.run_id = s.id AND a.number = s.attempt_count
), events AS (
    INSERT INTO conveyor.run_events (run_id, seq, attempt, kind, data, created_at)
    SELECT id, event_seq, attempt_count, 'status', '{{"status":"COMPLETED"}}'::jsonb, %(now)s FROM settled
), done AS (
    UPDATE conveyor.waitpoints p SET status = 'COMPLETED', completed_at = %(now)s,
        output = {_wait_result("s", "s.text_output")}
    FROM settled s WHERE p.target_run_id = s.id AND p.status = 'PENDING'
    RETURNING p.id
)
SELECT id, awaited, NULL FROM settled
UNION ALL SELECT NULL, NULL, id FROM done
"""

ATTEMPT_FINISH = """
UPDATE conveyor.attempts SET status = %(status)s, error = %(error)s::jsonb, finished_at = %(now)s
WHERE run_id = %(run_id)s AND number = %(number)s
"""

ATTEMPT_DELETE = "DELETE FROM conveyor.attempts WHERE run_id = %(run_id)s AND number = %(number)s"

HEARTBEAT = """
UPDATE conveyor.runs SET lease_expires_at = %(now)s + %(lease)s
WHERE worker_id = %(worker_id)s AND status = 'EXECUTING' AND id = ANY(%(ids)s::text[])
RETURNING id, lease_token, cancel_requested
"""

# The heartbeat's row locks, all or none: it runs beside its worker's own transactions, which
# lock the same rows in their own order; never holding one lock while waiting for another
# keeps the two from deadlocking.
HEARTBEAT_NOWAIT = """
UPDATE conveyor.runs SET lease_expires_at = %(now)s + %(lease)s
WHERE id IN (SELECT id FROM conveyor.runs
             WHERE worker_id = %(worker_id)s AND status = 'EXECUTING' AND id = ANY(%(ids)s::text[])
             FOR UPDATE NOWAIT)
  AND worker_id = %(worker_id)s AND status = 'EXECUTING'
RETURNING id, lease_token, cancel_requested
"""

WORKER_SEEN = "UPDATE conveyor.workers SET last_seen_at = %(now)s WHERE id = %(worker_id)s"

CANCEL_REQUESTED = """
SELECT id FROM conveyor.runs WHERE worker_id = %(worker_id)s AND status = 'EXECUTING' AND cancel_requested
"""

# --- cancel, reschedule -------------------------------------------------------------------------

CANCEL_FLAG = """
UPDATE conveyor.runs SET cancel_requested = true, updated_at = %(now)s WHERE id = %(id)s AND status = 'EXECUTING'
"""

WORKER_ADDRESS = "SELECT address FROM conveyor.workers WHERE id = %(worker_id)s"

CANCEL_NOW = """
UPDATE conveyor.runs SET status = 'CANCELED', finished_at = %(now)s, expires_at = NULL,
    event_seq = event_seq + 1, updated_at = %(now)s
WHERE id = %(id)s AND status IN ('QUEUED', 'DELAYED', 'WAITING')
RETURNING event_seq
"""

RESCHEDULE = """
UPDATE conveyor.runs SET available_at = %(at)s, sort_key = %(at)s - priority, updated_at = %(now)s
WHERE id = %(id)s AND environment = %(env)s AND status = 'DELAYED'
RETURNING id
"""

# --- maintenance (any number of processes may run it: SKIP LOCKED, guarded updates) ----------------

PROMOTE_DUE = """
UPDATE conveyor.runs SET status = 'QUEUED', queued_at = %(now)s,
    expires_at = CASE WHEN ttl IS NULL THEN NULL ELSE %(now)s + ttl END,
    event_seq = event_seq + 1, updated_at = %(now)s
WHERE id IN (SELECT id FROM conveyor.runs WHERE status = 'DELAYED' AND available_at <= %(now)s
             ORDER BY available_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
  AND status = 'DELAYED'
RETURNING id, event_seq, queue, environment
"""

EXPIRE_DUE = """
UPDATE conveyor.runs SET status = 'EXPIRED', finished_at = %(now)s, expires_at = NULL,
    error = '{"code":"EXPIRED","message":"not started within its ttl"}'::jsonb,
    event_seq = event_seq + 1, updated_at = %(now)s
WHERE id IN (SELECT id FROM conveyor.runs WHERE status = 'QUEUED' AND expires_at IS NOT NULL
             AND expires_at <= %(now)s LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
  AND status = 'QUEUED' AND expires_at <= %(now)s
RETURNING id, event_seq, environment, task_id, idempotency_key
"""

LEASES_LOST = """
SELECT id, lease_token, attempt_count, max_attempts, retry, cancel_requested, queue, environment
FROM conveyor.runs WHERE status = 'EXECUTING' AND lease_expires_at < %(now)s
LIMIT %(limit)s FOR UPDATE SKIP LOCKED
"""

BECAME_DUE = """
SELECT count(*) FROM conveyor.runs WHERE status = 'QUEUED' AND attempt_count > 0
  AND available_at > %(since)s AND available_at <= %(now)s
"""

NEXT_DUE = """
SELECT min(t) FROM (
    SELECT min(available_at) AS t FROM conveyor.runs WHERE status = 'DELAYED'
    UNION ALL SELECT min(available_at) FROM conveyor.runs
        WHERE status = 'QUEUED' AND attempt_count > 0 AND available_at > %(now)s
    UNION ALL SELECT min(expires_at) FROM conveyor.runs WHERE status = 'QUEUED' AND expires_at IS NOT NULL
    UNION ALL SELECT min(lease_expires_at) FROM conveyor.runs WHERE status = 'EXECUTING'
    UNION ALL SELECT min(complete_at) FROM conveyor.waitpoints
        WHERE status = 'PENDING' AND complete_at IS NOT NULL) AS due
"""

# --- retention ----------------------------------------------------------------------------------

# One batch in one statement: the oldest finished runs (runs_finished index), skipping rows
# another transaction holds and runs whose idempotency key is still live, then their child rows.
# Data-modifying CTEs share one snapshot, so every DELETE sees exactly the runs `doomed` chose.
# Child rows go by `run_id = ANY(array)`: index probes whatever the planner guesses of `doomed`.
# Key rows still pointing at a purged run have expired (NOT EXISTS above): they go too, unless a
# trigger took the key over meanwhile (the DELETE re-checks run_id after waiting for its lock).
# Their links to waitpoints go too, and the completed waitpoints they created (a pending one may
# still be waited for: a token another run waits on).
PURGE = """
WITH doomed AS (
    SELECT r.id, r.environment, r.task_id, r.idempotency_key, r.tags FROM conveyor.runs r
    WHERE r.finished_at < %(before)s
      AND r.status IN ('COMPLETED', 'FAILED', 'CANCELED', 'CRASHED', 'TIMED_OUT', 'EXPIRED', 'SYSTEM_FAILURE')
      AND NOT EXISTS (SELECT 1 FROM conveyor.idempotency_keys k
                      WHERE k.environment = r.environment AND k.task_id = r.task_id
                        AND k.key = r.idempotency_key AND k.run_id = r.id AND k.expires_at > %(now)s)
    ORDER BY r.finished_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), gone_keys AS (
    DELETE FROM conveyor.idempotency_keys k USING doomed d
    WHERE k.environment = d.environment AND k.task_id = d.task_id AND k.key = d.idempotency_key
      AND k.run_id = d.id
), gone_tags AS (
    DELETE FROM conveyor.run_tags t
    USING (SELECT environment, jsonb_array_elements_text(tags) AS tag, id FROM doomed
           WHERE jsonb_typeof(tags) = 'array') d
    WHERE t.environment = d.environment AND t.tag = d.tag AND t.run_id = d.id
), doomed_ids AS (
    SELECT array_agg(id) AS ids FROM doomed
), gone_attempts AS (
    DELETE FROM conveyor.attempts WHERE run_id = ANY((SELECT ids FROM doomed_ids)::text[])
), gone_events AS (
    DELETE FROM conveyor.run_events WHERE run_id = ANY((SELECT ids FROM doomed_ids)::text[])
), gone_logs AS (
    DELETE FROM conveyor.run_logs WHERE run_id = ANY((SELECT ids FROM doomed_ids)::text[])
), gone_steps AS (
    DELETE FROM conveyor.run_steps WHERE run_id = ANY((SELECT ids FROM doomed_ids)::text[])
), gone_waits AS (
    DELETE FROM conveyor.run_waits WHERE run_id = ANY((SELECT ids FROM doomed_ids)::text[])
), gone_waitpoints AS (
    DELETE FROM conveyor.waitpoints p
    WHERE p.created_by = ANY((SELECT ids FROM doomed_ids)::text[]) AND p.status = 'COMPLETED'
      AND NOT EXISTS (SELECT 1 FROM conveyor.run_waits w JOIN conveyor.runs r ON r.id = w.run_id
                      WHERE w.waitpoint_id = p.id AND r.finished_at IS NULL)
)
DELETE FROM conveyor.runs WHERE id IN (SELECT id FROM doomed)
"""

TABLE_EXISTS = "SELECT to_regclass(%(name)s) IS NOT NULL"

# --- reads --------------------------------------------------------------------------------------

RUN_COLUMNS = (
    "id, environment, task_id, queue, status, payload, output, error, attempt_count, max_attempts, "
    "tags, metadata, idempotency_key, concurrency_key, priority, machine, version, parent_id, root_id, "
    "batch_id, created_at, available_at, started_at, finished_at, updated_at, ttl, max_duration, "
    "executed_seconds, cancel_requested, worker_id, retry, key_limit, queue_slot, idempotency_key_ttl"
)

RUN_GET = f"SELECT {RUN_COLUMNS} FROM conveyor.runs WHERE id = %(id)s AND environment = %(env)s"
RUN_GET_FOR_UPDATE = RUN_GET + " FOR UPDATE"

RUN_STATUS_MANY = """
SELECT id, status FROM conveyor.runs WHERE environment = %(env)s AND id = ANY(%(ids)s::text[])
"""

ATTEMPT_LIST = """
SELECT run_id, number, status, worker_id, started_at, finished_at, error FROM conveyor.attempts
WHERE run_id = %(run_id)s ORDER BY number
"""

EVENT_LIST = """
SELECT run_id, seq, attempt, kind, data, created_at FROM conveyor.run_events
WHERE run_id = %(run_id)s AND seq > %(after)s ORDER BY seq LIMIT %(limit)s
"""

FIRST_EVENT = "SELECT created_at, queued_at FROM conveyor.runs WHERE id = %(run_id)s"

LOG_LIST = """
SELECT run_id, attempt, ts, level, message, attributes FROM conveyor.run_logs WHERE run_id = %(run_id)s
ORDER BY id LIMIT %(limit)s
"""

# --- fenced writes during execution -------------------------------------------------------------

# One statement for a batch of lines; only lines whose run still holds the lease are written,
# in input order.
# A completed step, stored only while the run's lease still matches.
STEP_APPEND = """
INSERT INTO conveyor.run_steps (run_id, position, key, name, output, attempt, started_at, finished_at)
SELECT %(run_id)s, %(position)s, %(key)s, %(name)s, %(output)s, %(attempt)s, %(started_at)s, %(finished_at)s
WHERE EXISTS (SELECT 1 FROM conveyor.runs WHERE id = %(run_id)s AND lease_token = %(token)s
              AND status = 'EXECUTING')
ON CONFLICT (run_id, position) DO NOTHING
"""

STEP_LIST = """
SELECT run_id, position, key, name, output, attempt, started_at, finished_at FROM conveyor.run_steps
WHERE run_id = %(run_id)s ORDER BY position
"""

LOG_APPEND = """
INSERT INTO conveyor.run_logs (run_id, attempt, ts, level, message, attributes)
SELECT l.run_id, l.attempt, l.ts, l.level, l.message, l.attributes::jsonb
FROM unnest(%(run_ids)s::text[], %(tokens)s::text[], %(attempts)s::integer[], %(ts)s::float8[],
            %(levels)s::text[], %(messages)s::text[], %(attributes)s::text[])
     WITH ORDINALITY AS l(run_id, token, attempt, ts, level, message, attributes, n)
JOIN conveyor.runs r ON r.id = l.run_id AND r.lease_token = l.token AND r.status = 'EXECUTING'
ORDER BY l.n
"""

# Metadata operations, applied in SQL so concurrent writers never lose updates.
METADATA_SET = "jsonb_set(coalesce(metadata, '{}'::jsonb), ARRAY[%(key)s::text], %(value)s::jsonb, true)"
METADATA_DELETE = "coalesce(metadata, '{}'::jsonb) - %(key)s::text"
METADATA_INCREMENT = (
    "jsonb_set(coalesce(metadata, '{}'::jsonb), ARRAY[%(key)s::text], "
    "to_jsonb(coalesce((metadata ->> %(key)s::text)::numeric, 0) + %(number)s::numeric), true)"
)
METADATA_APPEND = """CASE WHEN jsonb_typeof(metadata -> %(key)s::text) = 'array'
    THEN jsonb_set(metadata, ARRAY[%(key)s::text], (metadata -> %(key)s::text) || jsonb_build_array(%(value)s::jsonb))
    ELSE jsonb_set(coalesce(metadata, '{}'::jsonb), ARRAY[%(key)s::text], jsonb_build_array(%(value)s::jsonb), true)
    END"""

METADATA_UPDATE = """
UPDATE conveyor.runs SET metadata = {expr}, event_seq = event_seq + 1, updated_at = %(now)s
WHERE {guard} RETURNING metadata, event_seq, attempt_count
"""
METADATA_GUARD = "id = %(id)s"
METADATA_GUARD_LEASED = "id = %(id)s AND lease_token = %(token)s AND status = 'EXECUTING'"
METADATA_READ = "SELECT metadata FROM conveyor.runs WHERE {guard}"

# --- workers ------------------------------------------------------------------------------------

WORKER_UPSERT = """
INSERT INTO conveyor.workers (id, environment, host, pid, address, queues, machine, version, started_at,
    last_seen_at)
VALUES (%(id)s, %(env)s, %(host)s, %(pid)s, %(address)s, %(queues)s::jsonb, %(machine)s, %(version)s,
    %(now)s, %(now)s)
ON CONFLICT (id) DO UPDATE SET environment = excluded.environment, host = excluded.host, pid = excluded.pid,
    address = excluded.address, queues = excluded.queues, machine = excluded.machine,
    version = excluded.version, started_at = excluded.started_at, last_seen_at = excluded.last_seen_at
"""

WORKERS_FORGET = "DELETE FROM conveyor.workers WHERE last_seen_at < %(now)s - 86400"

WORKER_DELETE = "DELETE FROM conveyor.workers WHERE id = %(worker_id)s"

WORKER_LIST = """
SELECT id, environment, host, pid, address, queues, machine, version, started_at, last_seen_at
FROM conveyor.workers WHERE (%(env)s::text IS NULL OR environment = %(env)s)
  AND last_seen_at >= %(now)s - %(live_within)s
ORDER BY started_at
"""

NOTIFY = "SELECT pg_notify(%(channel)s, %(payload)s)"

NOW = "SELECT extract(epoch from now())::float8"

# Changes whenever any transaction in the cluster takes an id (cheap; the slow safety poll).
CHANGE_TOKEN = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"

# --- durable waits (how these statements meet under concurrency: tx.py, "Durable waits") ---------

# A suspending run: WAITING (its executed time added up), its attempt and its event, in one round
# trip. The caller resumes it in a later statement if nothing it waits for is pending.
SETTLE_SUSPEND = f"""
WITH settled AS (
    UPDATE conveyor.runs SET status = 'WAITING', {_SEGMENT}, {_UNLEASE}, event_seq = event_seq + 1,
        updated_at = %(now)s
    {_SETTLE_GUARD}
    {_SETTLE_RETURNING}, id, cancel_requested
), waiting AS (
    UPDATE conveyor.attempts a SET status = 'WAITING'
    FROM settled s WHERE a.run_id = s.id AND a.number = s.attempt_count
), events AS (
    INSERT INTO conveyor.run_events (run_id, seq, attempt, kind, data, created_at)
    SELECT id, event_seq, attempt_count, 'status', '{{"status":"WAITING"}}'::jsonb, %(now)s FROM settled
)
SELECT event_seq, attempt_count, environment, task_id, idempotency_key, parent_id, segment, cancel_requested
FROM settled
"""

ATTEMPT_WAITING = "UPDATE conveyor.attempts SET status = 'WAITING' WHERE run_id = %(run_id)s AND number = %(number)s"

# A wait request's fence: the run's lease, locked until commit, so the lease cannot be lost (or
# the run canceled) between the check and the writes it guards.
WAIT_LEASE = """
SELECT environment FROM conveyor.runs WHERE id = %(run_id)s AND lease_token = %(token)s AND status = 'EXECUTING'
    FOR NO KEY UPDATE
"""

_STEP_VALUES = "%(run_id)s, %(position)s, %(key)s, %(name)s, %(output)s, %(attempt)s, %(started_at)s, %(finished_at)s"
_STEP_INSERT = "INSERT INTO conveyor.run_steps (run_id, position, key, name, output, attempt, started_at, finished_at)"
_WAITPOINT_INSERT = """INSERT INTO conveyor.waitpoints (id, environment, kind, status, complete_at, target_run_id, tags,
        created_by, created_at)
    SELECT w.id, {env}, w.kind, 'PENDING', coalesce(w.complete_at, %(now)s + w.delay), w.target, w.tags::jsonb,
        %(created_by)s, %(now)s
    FROM unnest(%(ids)s::text[], %(kinds)s::text[], %(complete_ats)s::float8[], %(delays)s::float8[],
                %(targets)s::text[], %(tags)s::text[]) AS w(id, kind, complete_at, delay, target, tags)"""

# Waitpoints made outside any run.
WAITPOINT_INSERT = _WAITPOINT_INSERT.format(env="%(env)s")

# A wait request that starts no run, in one round trip: the lease (WAIT_LEASE), and only under it
# the journal row and the waitpoints. -> the run's environment; no row: the lease is gone.
WAIT_WRITE_LEASED = f"""
WITH lease AS (
    {WAIT_LEASE.strip()}
), step AS (
    {_STEP_INSERT}
    SELECT {_STEP_VALUES} FROM lease
), created AS (
    {_WAITPOINT_INSERT.format(env="(SELECT environment FROM lease)")}
    WHERE EXISTS (SELECT 1 FROM lease)
)
SELECT environment FROM lease
"""

# The same after WAIT_LEASE (a request that starts runs: their ids are in the journal row).
WAIT_WRITE = f"""
WITH step AS (
    {_STEP_INSERT}
    VALUES ({_STEP_VALUES})
)
{_WAITPOINT_INSERT.format(env="%(env)s")}
"""

# An existing run that a new waitpoint targets (an idempotency key returned it): flagged under its
# row lock (see migration 0004), and read in its newest version: finished or not. The NOWAIT form
# is tried first: the caller may hold that run's idempotency key, which the run's own final
# settle deletes after locking the run (tx.py, `_wait_apply`).
_MARK_AWAITED = """
UPDATE conveyor.runs SET awaited = true
WHERE id IN (SELECT id FROM conveyor.runs WHERE id = ANY(%(ids)s::text[]) ORDER BY id FOR NO KEY UPDATE{nowait})
RETURNING id, finished_at IS NOT NULL
"""
MARK_AWAITED = _MARK_AWAITED.format(nowait="")
MARK_AWAITED_NOWAIT = _MARK_AWAITED.format(nowait=" NOWAIT")

# The run waits for these waitpoints. They are locked FOR SHARE first (in id order): a completion
# (an UPDATE) that came before waits to commit first, so a later statement of this transaction
# sees it; one that comes after waits for this transaction, and then sees this link.
LINK_WAITS = """
WITH w AS (
    SELECT id FROM conveyor.waitpoints WHERE id = ANY(%(ids)s::text[]) AND environment = %(env)s
    ORDER BY id FOR SHARE
)
INSERT INTO conveyor.run_waits (run_id, waitpoint_id) SELECT %(run_id)s, id FROM w ON CONFLICT DO NOTHING
"""

# The pending waitpoints that target finished runs complete with each run's result (a statement of
# its own: its snapshot sees waitpoints created by transactions that committed meanwhile).
COMPLETE_TARGETS = f"""
UPDATE conveyor.waitpoints p SET status = 'COMPLETED', completed_at = %(now)s,
    output = {_wait_result("r", "r.output::text")}
FROM conveyor.runs r
WHERE r.id = ANY(%(ids)s::text[]) AND r.finished_at IS NOT NULL AND p.target_run_id = r.id
  AND p.status = 'PENDING'
RETURNING p.id
"""

TOKEN_COMPLETE = """
UPDATE conveyor.waitpoints SET status = 'COMPLETED', output = %(output)s, completed_at = %(now)s
WHERE id = %(id)s AND environment = %(env)s AND kind = 'token' AND status = 'PENDING'
RETURNING id
"""

TOKEN_EXISTS = "SELECT 1 FROM conveyor.waitpoints WHERE id = %(id)s AND environment = %(env)s AND kind = 'token'"

# Maintenance: due times and tokens past their timeout; rows another transaction holds are left
# to it (or to the next pass).
WAITPOINTS_DUE = """
UPDATE conveyor.waitpoints SET status = 'COMPLETED', completed_at = %(now)s,
    output = CASE kind WHEN 'token' THEN %(timeout)s ELSE '{"ok":true}' END
WHERE id IN (SELECT id FROM conveyor.waitpoints WHERE status = 'PENDING' AND complete_at IS NOT NULL
             AND complete_at <= %(now)s ORDER BY complete_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
  AND status = 'PENDING'
RETURNING id
"""

# The WAITING runs that wait for these (completed) waitpoints, locked in id order. The resume
# check runs in a later statement: it sees every completion committed by an earlier holder.
LOCK_WAITERS = """
SELECT r.id FROM conveyor.runs r
WHERE r.id IN (SELECT run_id FROM conveyor.run_waits WHERE waitpoint_id = ANY(%(ids)s::text[]))
  AND r.status = 'WAITING'
ORDER BY r.id
FOR UPDATE OF r
"""

# Runs among `ids` (locked by the caller) that wait for nothing pending any more: queued again,
# flagged so that the claim continues their attempt; their sort key is kept (DECISIONS.md).
RESUME_READY = """
WITH resumed AS (
    UPDATE conveyor.runs r SET status = 'QUEUED', resume = true, event_seq = r.event_seq + 1, updated_at = %(now)s
    WHERE r.id = ANY(%(ids)s::text[]) AND r.status = 'WAITING'
      AND NOT EXISTS (SELECT 1 FROM conveyor.run_waits w JOIN conveyor.waitpoints p ON p.id = w.waitpoint_id
                      WHERE w.run_id = r.id AND p.status = 'PENDING')
    RETURNING r.id, r.event_seq, r.attempt_count, r.queue
), events AS (
    INSERT INTO conveyor.run_events (run_id, seq, attempt, kind, data, created_at)
    SELECT id, event_seq, attempt_count, 'status', '{"status":"QUEUED"}'::jsonb, %(now)s FROM resumed
)
SELECT id, queue FROM resumed
"""

# Cancel: the run, the unfinished runs it waits for (trigger_and_wait children) and theirs, and
# every run waiting for one of those: all that a cancel cascade may lock. -> (id, depth): 0 for
# the run, n for its waited descendants n levels down (the longest way), -1 for the other waiters.
CANCEL_SCOPE = """
WITH RECURSIVE tree(id, depth) AS (
    SELECT %(id)s::text, 0
  UNION
    SELECT p.target_run_id, t.depth + 1 FROM tree t
    JOIN conveyor.run_waits w ON w.run_id = t.id
    JOIN conveyor.waitpoints p ON p.id = w.waitpoint_id
    WHERE p.kind = 'run' AND p.status = 'PENDING' AND t.depth < 64
)
SELECT id, max(depth) FROM (
    SELECT id, depth FROM tree
    UNION ALL
    SELECT w.run_id, -1 FROM conveyor.waitpoints p JOIN conveyor.run_waits w ON w.waitpoint_id = p.id
    WHERE p.target_run_id IN (SELECT id FROM tree) AND p.status = 'PENDING'
) scope
GROUP BY id
"""

# Runs locked in the order given.
LOCK_RUNS = """
SELECT r.id FROM unnest(%(ids)s::text[]) WITH ORDINALITY AS o(id, n) JOIN conveyor.runs r ON r.id = o.id
ORDER BY o.n
FOR UPDATE OF r
"""
LOCK_RUNS_NOWAIT = LOCK_RUNS.rstrip() + " NOWAIT\n"

CHILDREN_WAITED = """
SELECT p.target_run_id FROM conveyor.run_waits w JOIN conveyor.waitpoints p ON p.id = w.waitpoint_id
WHERE w.run_id = %(run_id)s AND p.kind = 'run' AND p.status = 'PENDING'
ORDER BY p.target_run_id
"""

WAITPOINT_GET = """
SELECT id, kind, status, output, target_run_id FROM conveyor.waitpoints WHERE id = %(id)s AND environment = %(env)s
"""

JOURNAL_WAITS = """
SELECT p.id, p.kind, p.status, p.output, p.target_run_id FROM conveyor.run_waits w
JOIN conveyor.waitpoints p ON p.id = w.waitpoint_id WHERE w.run_id = %(run_id)s
"""

# --- streams and realtime reads -----------------------------------------------------------------

# Stream chunks: each group (a run and its lease token) bumps its run's event_seq once by its
# chunk count, under the lease; its chunks become events numbered in input order. -> the
# accepted groups (their ordinality, 1-based).
STREAM_APPEND = """
WITH bumped AS (
    UPDATE conveyor.runs r SET event_seq = r.event_seq + i.n, updated_at = %(now)s
    FROM unnest(%(run_ids)s::text[], %(tokens)s::text[], %(counts)s::integer[])
         WITH ORDINALITY AS i(run_id, token, n, g)
    WHERE r.id = i.run_id AND r.lease_token = i.token AND r.status || '' = 'EXECUTING'
    RETURNING i.g, r.event_seq - i.n AS base
), events AS (
    INSERT INTO conveyor.run_events (run_id, seq, attempt, kind, data, created_at)
    SELECT c.run_id, b.base + c.k, c.attempt, 'stream',
           jsonb_build_object('key', c.key, 'chunk', c.data::jsonb), c.ts
    FROM unnest(%(c_groups)s::bigint[], %(c_ks)s::integer[], %(c_run_ids)s::text[], %(c_attempts)s::integer[],
                %(c_keys)s::text[], %(c_data)s::text[], %(c_ts)s::float8[])
         AS c(g, k, run_id, attempt, key, data, ts)
    JOIN bumped b ON b.g = c.g
)
SELECT g FROM bumped
"""

# subscribe_tag: the tag's runs from a run id on (ids sort by creation time; the primary key
# of run_tags is the range), plus the runs a subscriber follows, by id.
_TAG_RUNS = """
SELECT r.id, r.event_seq, r.status FROM conveyor.run_tags t JOIN conveyor.runs r ON r.id = t.run_id
WHERE t.environment = %(env)s AND t.tag = %(tag)s AND {window}
UNION
SELECT id, event_seq, status FROM conveyor.runs WHERE environment = %(env)s AND id = ANY(%(ids)s::text[])
ORDER BY 1
"""
RUN_TAG_WINDOW = _TAG_RUNS.format(window="t.run_id >= %(min_id)s")
# Once per subscription: also every unfinished run of the tag (the whole tag's range).
RUN_TAG_UNFINISHED = _TAG_RUNS.format(window="(t.run_id >= %(min_id)s OR r.finished_at IS NULL)")
