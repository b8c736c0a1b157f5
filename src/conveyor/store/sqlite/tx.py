"""The SQLite transaction: every run-lifecycle statement Conveyor issues on SQLite.

Lists of ids travel as one JSON array parameter (`json_each(?)`), so each statement's text is
fixed. Status guards live in the WHERE clauses: a statement that finds the run in another
status (or held under another lease) changes nothing and the caller is told.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Sequence
from typing import Any

from conveyor.core.errors import InvalidOptions, InvalidTransition, RunNotFound
from conveyor.core.records import (
    Attempt,
    CancelResult,
    ClaimedRun,
    ClaimRequest,
    HeartbeatResult,
    Journal,
    LogLine,
    MaintenanceResult,
    MetadataOp,
    NewRun,
    NewWaitpoint,
    Outcome,
    OutcomeKind,
    QueueInfo,
    QueueSpec,
    Run,
    RunEvent,
    RunFilter,
    StepRecord,
    StreamChunk,
    TaskRecord,
    WaitRequest,
    WaitState,
    WorkerInfo,
)
from conveyor.core.status import FREES_IDEMPOTENCY_KEY, RunStatus
from conveyor.store import common
from conveyor.store.base import Tx

_STATUS_EVENT = {s: json.dumps({"status": s.value}) for s in RunStatus}

RUN_COLUMNS = common.RUN_COLUMNS

_RUN_INSERT_COLUMNS = """id, task_id, queue, status, payload, available_at, priority, sort_key,
    ttl, expires_at, max_attempts, retry, max_duration, concurrency_key, key_limit, queue_slot,
    idempotency_key, idempotency_key_ttl, tags, metadata, machine, version, parent_id, root_id,
    batch_id, trace_context, queued_at"""

INSERT_RUN = f"""
INSERT INTO runs ({_RUN_INSERT_COLUMNS}, environment, created_at, updated_at, event_seq)
VALUES ({", ".join("?" * 27)}, ?, ?, ?, 1)
"""

INSERT_RUN_HEAD = f"INSERT INTO runs ({_RUN_INSERT_COLUMNS}, environment, created_at, updated_at, event_seq) VALUES "
_ROW_PLACEHOLDERS = "(" + ", ".join("?" * 30) + ", 1)"
_ROWS_PER_INSERT = 500  # 30 parameters a row: well under SQLite's 32,766
_MULTI_INSERT: dict[int, str] = {}

INSERT_EVENT = "INSERT INTO run_events (run_id, seq, attempt, kind, data, created_at) VALUES (?, ?, ?, ?, ?, ?)"

CLAIM_CANDIDATES = """
SELECT id, concurrency_key, key_limit, queue_slot FROM runs
WHERE environment = ?1 AND queue = ?2 AND status = 'QUEUED' AND available_at <= ?3
  AND machine = ?4 AND (?5 IS NULL OR version IS NULL OR version = ?5)
  AND task_id IN (SELECT value FROM json_each(?6))
  AND (concurrency_key IS NULL OR concurrency_key NOT IN (SELECT value FROM json_each(?7)))
  AND (queue_slot = 0 OR ?8 > 0)
  AND id NOT IN (SELECT value FROM json_each(?9))
ORDER BY sort_key, id
LIMIT ?10
"""

CLAIM_UPDATE = """
UPDATE runs SET status = 'EXECUTING', worker_id = ?1, lease_token = ?2, lease_expires_at = ?3,
    attempt_count = attempt_count + 1 - resume, started_at = coalesce(started_at, ?4), expires_at = NULL,
    segment_started_at = ?4, executed_seconds = executed_seconds * resume, version = coalesce(version, ?5),
    segment = CASE WHEN resume = 1 THEN segment + 1 ELSE 1 END, resume = 0,
    event_seq = event_seq + 1, updated_at = ?4
WHERE id IN (SELECT value FROM json_each(?6)) AND status = 'QUEUED'
RETURNING id, task_id, queue, payload, attempt_count, max_attempts, retry, max_duration,
    executed_seconds, tags, metadata, concurrency_key, idempotency_key, machine, version,
    parent_id, root_id, batch_id, created_at, started_at, event_seq, sort_key, segment_started_at, segment
"""

# Finishing an execution segment: the lease must still match. ?1 now.
SETTLE_FINAL = """
UPDATE runs SET status = ?2, output = ?3, error = ?4, finished_at = ?1,
    executed_seconds = executed_seconds + max(0, ?1 - coalesce(segment_started_at, ?1)),
    worker_id = NULL, lease_token = NULL, lease_expires_at = NULL, segment_started_at = NULL,
    event_seq = event_seq + 1, updated_at = ?1
WHERE id = ?5 AND lease_token = ?6 AND status = 'EXECUTING'
RETURNING event_seq, attempt_count, environment, task_id, idempotency_key, parent_id, segment
"""

SETTLE_RETRY = """
UPDATE runs SET status = 'QUEUED', error = ?2, available_at = ?3, sort_key = ?3 - priority,
    executed_seconds = executed_seconds + max(0, ?1 - coalesce(segment_started_at, ?1)),
    worker_id = NULL, lease_token = NULL, lease_expires_at = NULL, segment_started_at = NULL,
    event_seq = event_seq + 1, updated_at = ?1
WHERE id = ?4 AND lease_token = ?5 AND status = 'EXECUTING'
RETURNING event_seq, attempt_count, environment, task_id, idempotency_key, parent_id, segment
"""

# A released first segment gives its attempt back; a released resumed segment (segment > 1)
# stays a resume: its attempt continues on the next claim.
SETTLE_RELEASE = """
UPDATE runs SET status = 'QUEUED', attempt_count = attempt_count - (segment <= 1), resume = (segment > 1),
    executed_seconds = executed_seconds
        + CASE WHEN segment > 1 THEN max(0, ?1 - coalesce(segment_started_at, ?1)) ELSE 0 END,
    segment = CASE WHEN segment > 1 THEN segment - 1 ELSE 0 END,
    worker_id = NULL, lease_token = NULL, lease_expires_at = NULL, segment_started_at = NULL,
    event_seq = event_seq + 1, updated_at = ?1
WHERE id = ?2 AND lease_token = ?3 AND status = 'EXECUTING'
RETURNING event_seq, attempt_count + (segment = 0), environment, task_id, idempotency_key, parent_id, segment
"""

SETTLE_SUSPEND = """
UPDATE runs SET status = 'WAITING',
    executed_seconds = executed_seconds + max(0, ?1 - coalesce(segment_started_at, ?1)),
    worker_id = NULL, lease_token = NULL, lease_expires_at = NULL, segment_started_at = NULL,
    event_seq = event_seq + 1, updated_at = ?1
WHERE id = ?2 AND lease_token = ?3 AND status = 'EXECUTING'
RETURNING event_seq, attempt_count, environment, task_id, idempotency_key, parent_id, segment, cancel_requested
"""

# Runs among ?2 (a JSON array of run ids) that wait for nothing pending any more: queued again,
# flagged so that the claim continues their attempt. Their sort key is kept (DECISIONS.md).
RESUME_READY = """
UPDATE runs SET status = 'QUEUED', resume = 1, event_seq = event_seq + 1, updated_at = ?1
WHERE id IN (SELECT value FROM json_each(?2)) AND status = 'WAITING'
  AND NOT EXISTS (SELECT 1 FROM run_waits w JOIN waitpoints p ON p.id = w.waitpoint_id
                  WHERE w.run_id = runs.id AND p.status = 'PENDING')
RETURNING id, event_seq, attempt_count, queue
"""

WAITPOINT_INSERT = """
INSERT INTO waitpoints (id, environment, kind, status, complete_at, target_run_id, tags, created_by, created_at)
VALUES (?, ?, ?, 'PENDING', ?, ?, ?, ?, ?)
"""


FINISH_ATTEMPT = "UPDATE attempts SET status = ?, error = ?, finished_at = ? WHERE run_id = ? AND number = ?"

STEP_INSERT = """
INSERT OR IGNORE INTO run_steps (run_id, position, key, name, output, attempt, started_at, finished_at)
SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8
WHERE EXISTS (SELECT 1 FROM runs WHERE id = ?1 AND lease_token = ?9 AND status = 'EXECUTING')
"""

LOG_INSERT = """
INSERT INTO run_logs (run_id, attempt, ts, level, message, attributes)
SELECT ?1, ?2, ?3, ?4, ?5, ?6
WHERE EXISTS (SELECT 1 FROM runs WHERE id = ?1 AND lease_token = ?7 AND status = 'EXECUTING')
"""


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _json_path(key: str) -> str:
    if not key or '"' in key or "\\" in key:
        raise InvalidOptions(f"metadata key {key!r} must be non-empty and contain no quotes or backslashes")
    return f'$."{key}"'


def _run_result(run_id: str, status: RunStatus, output: str | None, error: Any) -> str:
    """A finished child as its parent's Result sees it (the waitpoint's output, JSON text)."""
    if status is RunStatus.COMPLETED:
        head = json.dumps({"ok": True, "run_id": run_id, "status": status.value})
        return f'{head[:-1]},"output":{output or "null"}}}'
    return json.dumps({"ok": False, "run_id": run_id, "status": status.value, "error": error})


def _row_to_run(row: sqlite3.Row | tuple[Any, ...]) -> Run:
    return common.run_from_row(row, _loads)


class SQLiteTx(Tx):
    def __init__(self, conn: sqlite3.Connection, now: float) -> None:
        self.conn = conn
        self.now = now
        self.resumed_queues: set[str] = set()
        self.cancel_pending: list[str] = []

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(sql, params).fetchone()

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self.conn.execute(sql, params).fetchall()

    # --- registry -------------------------------------------------------------------------
    def _ensure_environment(self, environment: str) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO environments (name, created_at) VALUES (?, ?)", (environment, self.now)
        )

    def task_upsert_many(self, environment: str, tasks: Sequence[TaskRecord]) -> None:
        self._ensure_environment(environment)
        self.conn.executemany(
            """INSERT INTO tasks (environment, task_id, version, queue, machine, options, payload_schema,
                   code_hash, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (environment, task_id, version) DO UPDATE SET queue = excluded.queue,
                   machine = excluded.machine, options = excluded.options,
                   payload_schema = excluded.payload_schema, code_hash = excluded.code_hash,
                   updated_at = excluded.updated_at""",
            [
                (
                    environment,
                    t.task_id,
                    t.version,
                    t.queue,
                    t.machine,
                    json.dumps(t.options),
                    _dumps(t.payload_schema),
                    t.code_hash,
                    self.now,
                )
                for t in tasks
            ],
        )

    def task_get(self, environment: str, task_id: str) -> TaskRecord | None:
        row = self._one(
            """SELECT task_id, queue, machine, options, payload_schema, code_hash, version, updated_at
               FROM tasks WHERE environment = ? AND task_id = ? ORDER BY updated_at DESC LIMIT 1""",
            (environment, task_id),
        )
        return None if row is None else self._task(row)

    def task_list(self, environment: str) -> list[TaskRecord]:
        rows = self._all(
            """SELECT task_id, queue, machine, options, payload_schema, code_hash, version, max(updated_at)
               FROM tasks WHERE environment = ? GROUP BY task_id ORDER BY task_id""",
            (environment,),
        )
        return [self._task(r) for r in rows]

    @staticmethod
    def _task(row: tuple[Any, ...]) -> TaskRecord:
        task_id, queue, machine, options, schema, code_hash, version, updated_at = row
        return TaskRecord(
            task_id=task_id,
            queue=queue,
            machine=machine,
            options=json.loads(options),
            payload_schema=_loads(schema),
            code_hash=code_hash,
            version=version,
            updated_at=updated_at,
        )

    def queue_upsert_many(self, environment: str, queues: Sequence[QueueSpec]) -> None:
        self._ensure_environment(environment)
        self.conn.executemany(
            """INSERT INTO queues (environment, name, concurrency_limit, paused, updated_at)
               VALUES (?, ?, ?, 0, ?)
               ON CONFLICT (environment, name) DO UPDATE SET
                   concurrency_limit = excluded.concurrency_limit, updated_at = excluded.updated_at""",
            [(environment, q.name, q.concurrency_limit, self.now) for q in queues],
        )

    _QUEUE_STATS = """
        SELECT q.name, q.concurrency_limit, q.paused,
            (SELECT count(*) FROM runs r WHERE r.environment = q.environment AND r.queue = q.name
                AND r.status = 'QUEUED'),
            (SELECT count(*) FROM runs r WHERE r.environment = q.environment AND r.queue = q.name
                AND r.status = 'EXECUTING'),
            (SELECT count(*) FROM runs r WHERE r.environment = q.environment AND r.queue = q.name
                AND r.status = 'DELAYED')
        FROM queues q WHERE q.environment = ?1"""

    def queue_get(self, environment: str, name: str) -> QueueInfo | None:
        row = self._one(self._QUEUE_STATS + " AND q.name = ?2", (environment, name))
        return None if row is None else self._queue_info(environment, row)

    def queue_list(self, environment: str) -> list[QueueInfo]:
        # Queues that only exist because runs name them are listed too.
        rows = self._all(self._QUEUE_STATS + " ORDER BY q.name", (environment,))
        known = {r[0] for r in rows}
        extra = self._all(
            """SELECT queue, NULL, 0,
                   sum(status = 'QUEUED'), sum(status = 'EXECUTING'), sum(status = 'DELAYED')
               FROM runs WHERE environment = ? AND status IN ('QUEUED', 'EXECUTING', 'DELAYED')
               GROUP BY queue""",
            (environment,),
        )
        rows += [r for r in extra if r[0] not in known]
        return sorted((self._queue_info(environment, r) for r in rows), key=lambda q: q.name)

    def _queue_info(self, environment: str, row: tuple[Any, ...]) -> QueueInfo:
        name, limit, paused, queued, running, delayed = row
        info = QueueInfo(
            name=name,
            concurrency_limit=limit,
            paused=bool(paused),
            queued=queued or 0,
            running=running or 0,
            delayed=delayed or 0,
        )
        if info.queued:
            info.unservable = self._unservable(environment, name)
        return info

    def _unservable(self, environment: str, queue: str) -> int:
        """Queued runs that no live worker can serve (its machine or version is missing)."""
        workers = self.worker_list(environment)
        servers = [(w.machine, w.version) for w in workers if not w.queues or queue in w.queues]
        if not servers:
            return int(
                self._one(
                    "SELECT count(*) FROM runs WHERE environment = ? AND queue = ? AND status = 'QUEUED'",
                    (environment, queue),
                )[0]
            )
        rows = self._all(
            """SELECT machine, version, count(*) FROM runs WHERE environment = ? AND queue = ?
               AND status = 'QUEUED' GROUP BY machine, version""",
            (environment, queue),
        )
        return sum(
            n
            for machine, version, n in rows
            if not any(m == machine and (v is None or version is None or v == version) for m, v in servers)
        )

    def queue_set_paused(self, environment: str, name: str, paused: bool) -> QueueInfo | None:
        self._ensure_environment(environment)
        self.conn.execute(
            """INSERT INTO queues (environment, name, concurrency_limit, paused, updated_at)
               VALUES (?, ?, NULL, ?, ?)
               ON CONFLICT (environment, name) DO UPDATE SET paused = excluded.paused,
                   updated_at = excluded.updated_at""",
            (environment, name, int(paused), self.now),
        )
        return self.queue_get(environment, name)

    # --- runs: insert ------------------------------------------------------------------------
    def run_insert_many(self, environment: str, runs: Sequence[NewRun]) -> list[tuple[str, bool]]:
        now = self.now
        results: list[tuple[str, bool]] = []
        fresh: list[NewRun] = []
        seen_keys: dict[tuple[str, str], str] = {}
        for run in runs:
            if run.idempotency_key is not None:
                key = (run.task_id, run.idempotency_key)
                existing = seen_keys.get(key) or self._live_key_owner(environment, *key)
                if existing is not None:
                    seen_keys[key] = existing
                    results.append((existing, False))
                    continue
                seen_keys[key] = run.id
                ttl = run.idempotency_key_ttl if run.idempotency_key_ttl is not None else 30 * 86400
                self.conn.execute(
                    """INSERT INTO idempotency_keys (environment, task_id, key, run_id, expires_at)
                       VALUES (?, ?, ?, ?, ?)
                       ON CONFLICT (environment, task_id, key) DO UPDATE SET run_id = excluded.run_id,
                           expires_at = excluded.expires_at""",
                    (environment, run.task_id, run.idempotency_key, run.id, now + ttl),
                )
            fresh.append(run)
            results.append((run.id, True))
        if not fresh:
            return results
        rows = [
            (
                r.id,
                r.task_id,
                r.queue,
                r.status.value,
                r.payload,
                r.available_at,
                r.priority,
                r.available_at - r.priority,
                r.ttl,
                now + r.ttl if r.ttl is not None and r.status is RunStatus.QUEUED else None,
                r.max_attempts,
                r.retry,
                r.max_duration,
                r.concurrency_key,
                r.key_limit,
                int(r.queue_slot),
                r.idempotency_key,
                r.idempotency_key_ttl,
                _dumps(r.tags) if r.tags else None,
                r.metadata,
                r.machine,
                r.version,
                r.parent_id,
                r.root_id,
                r.batch_id,
                r.trace_context,
                now if r.status is RunStatus.QUEUED else None,
            )
            for r in fresh
        ]
        values = [(*row, environment, now, now) for row in rows]
        if len(values) == 1:
            self.conn.execute(INSERT_RUN, values[0])
        else:
            self._insert_rows(values)
        # Event 1 (the run's first status) is not written: event_list derives it from the row.
        tagged = [(environment, tag, r.id) for r in fresh for tag in r.tags]
        if tagged:
            self.conn.executemany("INSERT OR IGNORE INTO run_tags (environment, tag, run_id) VALUES (?, ?, ?)", tagged)
        return results

    def _insert_rows(self, rows: list[tuple[Any, ...]]) -> None:
        """Many runs in few statements: a multi-row INSERT per 500 rows costs less than a
        statement step per row (executemany): +12 % on a 1,000-run batch_trigger."""
        for start in range(0, len(rows), _ROWS_PER_INSERT):
            chunk = rows[start : start + _ROWS_PER_INSERT]
            sql = _MULTI_INSERT.get(len(chunk))
            if sql is None:
                sql = _MULTI_INSERT[len(chunk)] = INSERT_RUN_HEAD + ", ".join([_ROW_PLACEHOLDERS] * len(chunk))
            self.conn.execute(sql, [v for row in chunk for v in row])

    def _live_key_owner(self, environment: str, task_id: str, key: str) -> str | None:
        row = self._one(
            """SELECT k.run_id, k.expires_at, r.status FROM idempotency_keys k
               LEFT JOIN runs r ON r.id = k.run_id
               WHERE k.environment = ? AND k.task_id = ? AND k.key = ?""",
            (environment, task_id, key),
        )
        if row is None or row[2] is None:
            return None
        run_id, expires_at, status = row
        status = RunStatus(status)
        if not status.finished or expires_at > self.now:
            return str(run_id)
        return None

    # --- runs: claim -------------------------------------------------------------------------
    def run_claim(self, request: ClaimRequest) -> list[ClaimedRun]:
        now = self.now
        token = os.urandom(8).hex()
        tasks_json = json.dumps(request.task_ids)
        start_params = (request.worker_id, token, now + request.lease_seconds, now, request.version)

        def take(queue: str, want: int) -> list[Any]:
            picked = self._pick(request, queue, want, tasks_json)
            return self._all(CLAIM_UPDATE, (*start_params, json.dumps(picked))) if picked else []

        rows = common.claim_in_passes(request.queues, request.limit, take)
        if not rows:
            return []
        # A resumed segment continues its attempt row (same number, first start kept).
        self.conn.executemany(
            """INSERT INTO attempts (run_id, number, worker_id, lease_token, status, started_at)
               VALUES (?, ?, ?, ?, 'EXECUTING', ?)
               ON CONFLICT (run_id, number) DO UPDATE SET worker_id = excluded.worker_id,
                   lease_token = excluded.lease_token, status = 'EXECUTING', error = NULL, finished_at = NULL""",
            [(r[0], r[4], request.worker_id, token, now) for r in rows],
        )
        executing = _STATUS_EVENT[RunStatus.EXECUTING]
        self.conn.executemany(INSERT_EVENT, [(r[0], r[20], r[4], "status", executing, now) for r in rows])
        return [common.claimed_from_row(r, token, _loads) for r in rows]

    def _pick(self, request: ClaimRequest, queue: str, want: int, tasks_json: str) -> list[str]:
        """Admission checks for one queue: paused, the queue's slots, each key's slots."""
        env = request.environment
        row = self._one("SELECT concurrency_limit, paused FROM queues WHERE environment = ? AND name = ?", (env, queue))
        limit, paused = (row[0], row[1]) if row else (None, 0)
        if paused:
            return []
        if limit is None:
            queue_free = want
        else:
            running = self._one(
                """SELECT count(*) FROM runs WHERE environment = ? AND queue = ? AND status = 'EXECUTING'
                   AND queue_slot = 1""",
                (env, queue),
            )[0]
            queue_free = limit - running
        picked: list[str] = []
        full_keys: list[str] = []
        key_running: dict[str, int] = {}
        while len(picked) < want:
            window = want - len(picked)
            candidates = self._all(
                CLAIM_CANDIDATES,
                (
                    env,
                    queue,
                    self.now,
                    request.machine,
                    request.version,
                    tasks_json,
                    json.dumps(full_keys),
                    queue_free,
                    json.dumps(picked),
                    window,
                ),
            )
            progress = False
            for run_id, key, key_limit, queue_slot in candidates:
                if queue_slot and queue_free <= 0:
                    continue
                if key is not None:
                    if key in full_keys:
                        continue
                    if key not in key_running:
                        key_running[key] = self._one(
                            """SELECT count(*) FROM runs WHERE environment = ? AND queue = ?
                               AND concurrency_key = ? AND status = 'EXECUTING'""",
                            (env, queue, key),
                        )[0]
                    # No limit of its own: a key given at trigger time gets the queue's limit.
                    effective = key_limit if key_limit is not None else limit
                    if effective is not None and key_running[key] >= effective:
                        full_keys.append(key)
                        progress = True
                        continue
                    key_running[key] += 1
                picked.append(run_id)
                progress = True
                if queue_slot:
                    queue_free -= 1
                if len(picked) >= want:
                    break
            if len(candidates) < window or not progress:
                break
        return picked

    # --- runs: settle ------------------------------------------------------------------------
    def run_settle_many(self, environment: str, outcomes: Sequence[Outcome]) -> list[bool]:
        return [self._settle(o, attempt_status=None) for o in outcomes]

    def _settle(self, o: Outcome, attempt_status: str | None) -> bool:
        now = self.now
        error = _dumps(o.error)
        if o.kind == OutcomeKind.COMPLETED:
            status = RunStatus.COMPLETED
            row = self._one(SETTLE_FINAL, (now, status.value, o.output, None, o.run_id, o.lease_token))
        elif o.kind == OutcomeKind.RETRY:
            status = RunStatus.QUEUED
            row = self._one(SETTLE_RETRY, (now, error, o.retry_at, o.run_id, o.lease_token))
        elif o.kind == OutcomeKind.FAILED:
            status = o.status
            row = self._one(SETTLE_FINAL, (now, status.value, None, error, o.run_id, o.lease_token))
        elif o.kind == OutcomeKind.RELEASED:
            status = RunStatus.QUEUED
            row = self._one(SETTLE_RELEASE, (now, o.run_id, o.lease_token))
        elif o.kind == OutcomeKind.SUSPENDED:
            status = RunStatus.WAITING
            # The waits first: their journal rows are fenced by the lease, like the suspension.
            for request in o.waits:
                self.wait_apply(request, o.lease_token)
            row = self._one(SETTLE_SUSPEND, (now, o.run_id, o.lease_token))
        else:
            raise ValueError(f"unknown outcome kind {o.kind!r}")
        if row is None:
            return False
        seq, attempt, environment, task_id, idem, _, segment = row[:7]
        if o.kind == OutcomeKind.SUSPENDED and row[7]:
            self.cancel_pending.append(o.run_id)  # canceled while suspending: the engine cancels it
        if o.kind == OutcomeKind.RELEASED and segment == 0:
            self.conn.execute("DELETE FROM attempts WHERE run_id = ? AND number = ?", (o.run_id, attempt))
        elif o.kind in (OutcomeKind.RELEASED, OutcomeKind.SUSPENDED):
            self.conn.execute(
                "UPDATE attempts SET status = 'WAITING' WHERE run_id = ? AND number = ?", (o.run_id, attempt)
            )
        else:
            if attempt_status is None:
                attempt_status = (
                    "COMPLETED"
                    if status is RunStatus.COMPLETED
                    else ("FAILED" if status is RunStatus.QUEUED else status.value)
                )
            self.conn.execute(FINISH_ATTEMPT, (attempt_status, error, now, o.run_id, attempt))
        data = (
            _STATUS_EVENT[status]
            if o.kind != OutcomeKind.RETRY
            else json.dumps({"status": "QUEUED", "retry_at": o.retry_at})
        )
        self.conn.execute(INSERT_EVENT, (o.run_id, seq, attempt, "status", data, now))
        if idem is not None and status in FREES_IDEMPOTENCY_KEY:
            self._free_key(environment, task_id, idem, o.run_id)
        if status.finished:  # any run may be waited for (a trigger_and_wait that reused it by key)
            self._complete_child_waits(o.run_id, status, o.output, o.error)
        if o.kind == OutcomeKind.SUSPENDED:
            # Everything it waits for may have ended already (a fast child, an early token).
            self._resume_ready([o.run_id])
        return True

    # --- durable waits ---------------------------------------------------------------------------
    def wait_apply(self, req: WaitRequest, lease_token: str) -> list[str] | None:
        """The journal row, the children, the waitpoints and the links of one wait call, only
        while the run's lease matches."""
        st = req.step
        row = self._one(
            "SELECT environment FROM runs WHERE id = ? AND lease_token = ? AND status = 'EXECUTING'",
            (st.run_id, lease_token),
        )
        if row is None:
            return None
        environment = row[0]
        children = self.run_insert_many(environment, req.runs) if req.runs else []
        output = st.output
        if children:
            output = json.dumps({**json.loads(output), "runs": [run_id for run_id, _ in children]})
        self.conn.execute(
            """INSERT INTO run_steps (run_id, position, key, name, output, attempt, started_at, finished_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
            (st.run_id, st.position, st.key, st.name, output, st.attempt, st.started_at, st.finished_at),
        )
        targets = iter(children)
        existing: list[tuple[str, str]] = []
        rows = []
        for wp in req.create:
            target = None
            if wp.kind == "run":
                target, created = next(targets)
                if not created:  # an idempotency key returned an existing run: it may be done
                    existing.append((wp.id, target))
            tags = _dumps(wp.tags) if wp.tags else None
            rows.append((wp.id, environment, wp.kind, wp.due(self.now), target, tags, st.run_id, self.now))
        self.conn.executemany(WAITPOINT_INSERT, rows)
        for waitpoint_id, target in existing:
            run = self.run_get(environment, target)
            if run is not None and run.status.finished:
                result = _run_result(run.id, run.status, json.dumps(run.output), run.error)
                self._complete_waitpoints([waitpoint_id], result)
        if req.wait_on:
            self.conn.executemany(
                """INSERT OR IGNORE INTO run_waits (run_id, waitpoint_id)
                   SELECT ?1, id FROM waitpoints WHERE id = ?2 AND environment = ?3""",
                [(st.run_id, w, environment) for w in req.wait_on],
            )
        return [run_id for run_id, _ in children]

    def _complete_waitpoints(self, ids: Sequence[str], output: str) -> None:
        done = self._all(
            """UPDATE waitpoints SET status = 'COMPLETED', output = ?1, completed_at = ?2
               WHERE id IN (SELECT value FROM json_each(?3)) AND status = 'PENDING' RETURNING id""",
            (output, self.now, json.dumps(list(ids))),
        )
        if done:
            self._resume_waiters([r[0] for r in done])

    def _complete_child_waits(self, run_id: str, status: RunStatus, output: str | None, error: Any) -> None:
        """A child finished: its parents' waitpoints complete with its result."""
        rows = self._all(
            "SELECT id FROM waitpoints WHERE target_run_id = ? AND status = 'PENDING'",
            (run_id,),
        )
        if rows:
            self._complete_waitpoints([r[0] for r in rows], _run_result(run_id, status, output, error))

    def _resume_waiters(self, waitpoint_ids: Sequence[str]) -> int:
        """Resume the runs that waited for these (now completed) waitpoints and for nothing else.
        -> runs resumed."""
        waiters = self._all(
            "SELECT run_id FROM run_waits WHERE waitpoint_id IN (SELECT value FROM json_each(?))",
            (json.dumps(list(waitpoint_ids)),),
        )
        return self._resume_ready([r[0] for r in waiters]) if waiters else 0

    def _resume_ready(self, run_ids: Sequence[str]) -> int:
        rows = self._all(RESUME_READY, (self.now, json.dumps(list(run_ids))))
        queued = _STATUS_EVENT[RunStatus.QUEUED]
        self.conn.executemany(INSERT_EVENT, [(r[0], r[1], r[2], "status", queued, self.now) for r in rows])
        self.resumed_queues.update(r[3] for r in rows)
        return len(rows)

    def waitpoint_create(self, environment: str, waitpoints: Sequence[NewWaitpoint]) -> None:
        self._ensure_environment(environment)
        self.conn.executemany(
            WAITPOINT_INSERT,
            [
                (w.id, environment, w.kind, w.due(self.now), None, _dumps(w.tags) if w.tags else None, None, self.now)
                for w in waitpoints
            ],
        )

    def token_complete(self, environment: str, token_id: str, output: str) -> bool | None:
        done = self._one(
            """UPDATE waitpoints SET status = 'COMPLETED', output = ?1, completed_at = ?2
               WHERE id = ?3 AND environment = ?4 AND kind = 'token' AND status = 'PENDING' RETURNING id""",
            (output, self.now, token_id, environment),
        )
        if done is not None:
            self._resume_waiters([token_id])
            return True
        found = self._one(
            "SELECT 1 FROM waitpoints WHERE id = ? AND environment = ? AND kind = 'token'", (token_id, environment)
        )
        return None if found is None else False

    def waitpoint_get(self, environment: str, waitpoint_id: str) -> WaitState | None:
        row = self._one(
            "SELECT id, kind, status, output, target_run_id FROM waitpoints WHERE id = ? AND environment = ?",
            (waitpoint_id, environment),
        )
        return None if row is None else WaitState(row[0], row[1], row[2], _loads(row[3]), row[4])

    def journal(self, run_id: str) -> Journal:
        rows = self._all(
            """SELECT p.id, p.kind, p.status, p.output, p.target_run_id FROM run_waits w
               JOIN waitpoints p ON p.id = w.waitpoint_id WHERE w.run_id = ?""",
            (run_id,),
        )
        waits = {r[0]: WaitState(r[0], r[1], r[2], _loads(r[3]), r[4]) for r in rows}
        return Journal(self.step_list(run_id), waits)

    def run_children_waited(self, run_id: str) -> list[str]:
        rows = self._all(
            """SELECT p.target_run_id FROM run_waits w JOIN waitpoints p ON p.id = w.waitpoint_id
               WHERE w.run_id = ? AND p.kind = 'run' AND p.status = 'PENDING'""",
            (run_id,),
        )
        return [r[0] for r in rows]

    def _free_key(self, environment: str, task_id: str, key: str, run_id: str) -> None:
        self.conn.execute(
            "DELETE FROM idempotency_keys WHERE environment = ? AND task_id = ? AND key = ? AND run_id = ?",
            (environment, task_id, key, run_id),
        )

    def run_heartbeat(self, worker_id: str, lease_seconds: float, run_ids: Sequence[str]) -> HeartbeatResult:
        rows = self._all(
            """UPDATE runs SET lease_expires_at = ? WHERE worker_id = ? AND status = 'EXECUTING'
                   AND id IN (SELECT value FROM json_each(?))
               RETURNING id, lease_token, cancel_requested""",
            (self.now + lease_seconds, worker_id, json.dumps(list(run_ids))),
        )
        self.conn.execute("UPDATE workers SET last_seen_at = ? WHERE id = ?", (self.now, worker_id))
        return HeartbeatResult(renewed={r[0]: r[1] for r in rows}, cancel_requested=[r[0] for r in rows if r[2]])

    def run_cancel_requested(self, worker_id: str) -> list[str]:
        return [
            r[0]
            for r in self._all(
                "SELECT id FROM runs WHERE worker_id = ? AND status = 'EXECUTING' AND cancel_requested = 1",
                (worker_id,),
            )
        ]

    # --- runs: cancel, reschedule --------------------------------------------------------------
    def run_cancel(self, environment: str, run_id: str) -> CancelResult:
        run = self.run_get(environment, run_id)
        if run is None:
            raise RunNotFound(f"no run {run_id} in environment {environment!r}")
        if run.status.finished:
            return CancelResult(run=run, stopping=False)
        if run.status is RunStatus.EXECUTING:
            self.conn.execute(
                "UPDATE runs SET cancel_requested = 1, updated_at = ? WHERE id = ? AND status = 'EXECUTING'",
                (self.now, run_id),
            )
            row = self._one("SELECT address FROM workers WHERE id = ?", (run.worker_id,))
            run.cancel_requested = True
            return CancelResult(run=run, stopping=True, worker_address=row[0] if row else None)
        row = self._one(
            """UPDATE runs SET status = 'CANCELED', finished_at = ?1, expires_at = NULL,
                   event_seq = event_seq + 1, updated_at = ?1
               WHERE id = ?2 AND status IN ('QUEUED', 'DELAYED', 'WAITING') RETURNING event_seq""",
            (self.now, run_id),
        )
        if row is None:  # pragma: no cover - the status changed under us; impossible in one tx
            raise InvalidTransition(f"run {run_id} changed status while being canceled")
        self.conn.execute(
            INSERT_EVENT, (run_id, row[0], run.attempts or None, "status", _STATUS_EVENT[RunStatus.CANCELED], self.now)
        )
        self._complete_child_waits(run_id, RunStatus.CANCELED, None, common.CANCELED_ERROR)
        updated = self.run_get(environment, run_id)
        assert updated is not None
        return CancelResult(run=updated, stopping=False)

    def run_reschedule(self, environment: str, run_id: str, available_at: float) -> Run:
        row = self._one(
            """UPDATE runs SET available_at = ?1, sort_key = ?1 - priority, updated_at = ?2
               WHERE id = ?3 AND environment = ?4 AND status = 'DELAYED' RETURNING id""",
            (available_at, self.now, run_id, environment),
        )
        if row is None:
            run = self.run_get(environment, run_id)
            if run is None:
                raise RunNotFound(f"no run {run_id} in environment {environment!r}")
            raise InvalidTransition(f"run {run_id} is {run.status.value}; only a DELAYED run can be rescheduled")
        run = self.run_get(environment, run_id)
        assert run is not None
        return run

    # --- maintenance ---------------------------------------------------------------------------
    def run_maintain(self, limit: int = 500, since: float | None = None) -> MaintenanceResult:
        now = self.now
        result = MaintenanceResult()
        promoted = self._all(
            """UPDATE runs SET status = 'QUEUED', queued_at = ?1,
                   expires_at = CASE WHEN ttl IS NULL THEN NULL ELSE ?1 + ttl END,
                   event_seq = event_seq + 1, updated_at = ?1
               WHERE id IN (SELECT id FROM runs WHERE status = 'DELAYED' AND available_at <= ?1
                            ORDER BY available_at LIMIT ?2)
               RETURNING id, event_seq, queue""",
            (now, limit),
        )
        queued = _STATUS_EVENT[RunStatus.QUEUED]
        self.conn.executemany(INSERT_EVENT, [(r[0], r[1], None, "status", queued, now) for r in promoted])
        result.promoted = len(promoted)
        result.changed_queues.update(r[2] for r in promoted)

        expired = self._all(
            """UPDATE runs SET status = 'EXPIRED', finished_at = ?1, expires_at = NULL,
                   error = '{"code":"EXPIRED","message":"not started within its ttl"}',
                   event_seq = event_seq + 1, updated_at = ?1
               WHERE id IN (SELECT id FROM runs WHERE status = 'QUEUED' AND expires_at IS NOT NULL
                            AND expires_at <= ?1 LIMIT ?2)
               RETURNING id, event_seq, environment, task_id, idempotency_key""",
            (now, limit),
        )
        expired_event = _STATUS_EVENT[RunStatus.EXPIRED]
        for run_id, seq, env, task_id, idem in expired:
            self.conn.execute(INSERT_EVENT, (run_id, seq, None, "status", expired_event, now))
            if idem is not None:
                self._free_key(env, task_id, idem, run_id)
            self._complete_child_waits(run_id, RunStatus.EXPIRED, None, common.EXPIRED_ERROR)
        result.expired = len(expired)

        # Waits that end by time: due timers, and tokens past their timeout.
        due = self._all(
            """UPDATE waitpoints SET status = 'COMPLETED', completed_at = ?1,
                   output = CASE kind WHEN 'token' THEN ?2 ELSE '{"ok":true}' END
               WHERE id IN (SELECT id FROM waitpoints WHERE status = 'PENDING' AND complete_at IS NOT NULL
                            AND complete_at <= ?1 ORDER BY complete_at LIMIT ?3)
               RETURNING id""",
            (now, common.TOKEN_TIMEOUT, limit),
        )
        if due:
            result.resumed = self._resume_waiters([r[0] for r in due])
            result.changed_queues.update(self.resumed_queues)

        lost = self._all(
            """SELECT id, lease_token, attempt_count, max_attempts, retry, cancel_requested, queue
               FROM runs WHERE status = 'EXECUTING' AND lease_expires_at < ? LIMIT ?""",
            (now, limit),
        )
        for run_id, token, attempt, max_attempts, retry, cancel_requested, queue in lost:
            outcome = common.lost_lease_outcome(
                run_id, token, attempt, max_attempts, _loads(retry), bool(cancel_requested), now
            )
            if self._settle(outcome, attempt_status="WORKER_LOST"):
                result.recovered += 1
                result.changed_queues.add(queue)

        if since is not None:
            result.became_due = self._one(
                """SELECT count(*) FROM runs WHERE status = 'QUEUED' AND attempt_count > 0
                   AND available_at > ? AND available_at <= ?""",
                (since, now),
            )[0]
        result.next_due = self._one(
            """SELECT min(t) FROM (
                   SELECT min(available_at) AS t FROM runs WHERE status = 'DELAYED'
                   UNION ALL SELECT min(available_at) FROM runs
                       WHERE status = 'QUEUED' AND attempt_count > 0 AND available_at > ?1
                   UNION ALL SELECT min(expires_at) FROM runs WHERE status = 'QUEUED' AND expires_at IS NOT NULL
                   UNION ALL SELECT min(lease_expires_at) FROM runs WHERE status = 'EXECUTING'
                   UNION ALL SELECT min(complete_at) FROM waitpoints
                       WHERE status = 'PENDING' AND complete_at IS NOT NULL)""",
            (now,),
        )[0]
        return result

    # --- retention -----------------------------------------------------------------------------
    def run_purge(self, before: float, limit: int = 500) -> int:
        """One batch under the write lock: small, so other writers wait milliseconds."""
        doomed = self._all(
            """SELECT r.id, r.environment, r.task_id, r.idempotency_key, r.tags FROM runs r
               WHERE r.finished_at < ?1
                 AND r.status IN ('COMPLETED', 'FAILED', 'CANCELED', 'CRASHED', 'TIMED_OUT', 'EXPIRED',
                                  'SYSTEM_FAILURE')
                 AND NOT EXISTS (SELECT 1 FROM idempotency_keys k
                                 WHERE k.environment = r.environment AND k.task_id = r.task_id
                                   AND k.key = r.idempotency_key AND k.run_id = r.id AND k.expires_at > ?2)
               ORDER BY r.finished_at LIMIT ?3""",
            (before, self.now, limit),
        )
        if not doomed:
            return 0
        ids = json.dumps([r[0] for r in doomed])
        keys = [(env, task_id, key, run_id) for run_id, env, task_id, key, _ in doomed if key is not None]
        if keys:
            # Expired (checked above): nothing else refers to them.
            self.conn.executemany(
                "DELETE FROM idempotency_keys WHERE environment = ? AND task_id = ? AND key = ? AND run_id = ?", keys
            )
        tags = [(env, tag, run_id) for run_id, env, _, _, t in doomed for tag in (_loads(t) or [])]
        if tags:
            self.conn.executemany("DELETE FROM run_tags WHERE environment = ? AND tag = ? AND run_id = ?", tags)
        children = ["attempts", "run_events", "run_logs", "run_steps", "run_waits"]
        # Completed waitpoints the runs made, unless an unfinished run still waits for one (a token).
        self.conn.execute(
            """DELETE FROM waitpoints WHERE created_by IN (SELECT value FROM json_each(?)) AND status = 'COMPLETED'
               AND NOT EXISTS (SELECT 1 FROM run_waits w JOIN runs r ON r.id = w.run_id
                               WHERE w.waitpoint_id = waitpoints.id AND r.finished_at IS NULL)""",
            (ids,),
        )
        for table in children:
            self.conn.execute(f"DELETE FROM {table} WHERE run_id IN (SELECT value FROM json_each(?))", (ids,))
        self.conn.execute("DELETE FROM runs WHERE id IN (SELECT value FROM json_each(?))", (ids,))
        return len(doomed)

    # --- reads ---------------------------------------------------------------------------------
    def run_get(self, environment: str, run_id: str) -> Run | None:
        row = self._one(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ? AND environment = ?", (run_id, environment))
        return None if row is None else _row_to_run(row)

    def run_status_many(self, environment: str, run_ids: Sequence[str]) -> dict[str, str]:
        rows = self._all(
            "SELECT id, status FROM runs WHERE environment = ? AND id IN (SELECT value FROM json_each(?))",
            (environment, json.dumps(list(run_ids))),
        )
        return {r[0]: r[1] for r in rows}

    def run_list(self, environment: str, flt: RunFilter) -> list[Run]:
        where = ["environment = ?"]
        params: list[Any] = [environment]
        if flt.task:
            where.append("task_id = ?")
            params.append(flt.task)
        if flt.status:
            where.append("status IN (SELECT value FROM json_each(?))")
            params.append(json.dumps([RunStatus(s).value for s in flt.status]))
        if flt.tags:
            where.append(
                "id IN (SELECT run_id FROM run_tags WHERE environment = ? AND tag IN (SELECT value FROM json_each(?)))"
            )
            params += [environment, json.dumps(flt.tags)]
        for column, value, op in (
            ("created_at", flt.created_after, ">"),
            ("created_at", flt.created_before, "<"),
            ("batch_id", flt.batch_id, "="),
            ("parent_id", flt.parent_id, "="),
        ):
            if value is not None:
                where.append(f"{column} {op} ?")
                params.append(value)
        if flt.cursor:
            where.append("id < ?")
            params.append(flt.cursor)
        params.append(max(1, min(flt.limit, 1000)))
        rows = self._all(f"SELECT {RUN_COLUMNS} FROM runs WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?", params)
        return [_row_to_run(r) for r in rows]

    def attempt_list(self, run_id: str) -> list[Attempt]:
        rows = self._all(
            """SELECT run_id, number, status, worker_id, started_at, finished_at, error FROM attempts
               WHERE run_id = ? ORDER BY number""",
            (run_id,),
        )
        return [Attempt(r[0], r[1], r[2], r[3], r[4], r[5], _loads(r[6])) for r in rows]

    def event_list(self, run_id: str, after_seq: int = 0, limit: int = 1000) -> list[RunEvent]:
        rows = self._all(
            """SELECT run_id, seq, attempt, kind, data, created_at FROM run_events
               WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?""",
            (run_id, after_seq, limit),
        )
        events = [RunEvent(r[0], r[1], r[2], r[3], _loads(r[4]), r[5]) for r in rows]
        if after_seq < 1:
            first = self._first_event(run_id)
            if first is not None:
                events.insert(0, first)
        return events[:limit]

    def _first_event(self, run_id: str) -> RunEvent | None:
        """Event 1, the status a run was created in, derived from the row instead of stored (it
        would cost every trigger a second insert). A run created QUEUED has queued_at ==
        created_at; a run created DELAYED was queued later or never."""
        row = self._one("SELECT created_at, queued_at FROM runs WHERE id = ?", (run_id,))
        if row is None:
            return None
        created_at, queued_at = row
        status = RunStatus.QUEUED if queued_at == created_at else RunStatus.DELAYED
        return RunEvent(run_id, 1, None, "status", {"status": status.value}, created_at)

    def log_list(self, run_id: str, limit: int = 10_000) -> list[LogLine]:
        rows = self._all(
            """SELECT run_id, attempt, ts, level, message, attributes FROM run_logs WHERE run_id = ?
               ORDER BY id LIMIT ?""",
            (run_id, limit),
        )
        return [LogLine(r[0], "", r[1], r[2], r[3], r[4], _loads(r[5])) for r in rows]

    # --- fenced writes during execution ----------------------------------------------------------
    def log_append_many(self, lines: Sequence[LogLine]) -> int:
        before = self.conn.total_changes
        self.conn.executemany(
            LOG_INSERT,
            [
                (ln.run_id, ln.attempt, ln.ts, ln.level, ln.message, _dumps(ln.attributes), ln.lease_token)
                for ln in lines
            ],
        )
        return self.conn.total_changes - before

    def step_append_many(self, steps: Sequence[StepRecord]) -> list[bool]:
        accepted = []
        for st in steps:
            cur = self.conn.execute(
                STEP_INSERT,
                (
                    st.run_id,
                    st.position,
                    st.key,
                    st.name,
                    st.output,
                    st.attempt,
                    st.started_at,
                    st.finished_at,
                    st.lease_token,
                ),
            )
            accepted.append(cur.rowcount == 1)
        return accepted

    def step_list(self, run_id: str) -> list[StepRecord]:
        rows = self._all(
            """SELECT run_id, position, key, name, output, attempt, started_at, finished_at FROM run_steps
               WHERE run_id = ? ORDER BY position""",
            (run_id,),
        )
        return [StepRecord(*r) for r in rows]

    def metadata_apply(
        self, run_id: str, ops: Sequence[MetadataOp], lease_token: str | None = None
    ) -> dict[str, object] | None:
        guard = "id = ?" + (" AND lease_token = ? AND status = 'EXECUTING'" if lease_token else "")
        guard_params: tuple[Any, ...] = (run_id, lease_token) if lease_token else (run_id,)
        row = None
        params: tuple[Any, ...]
        for op in ops:
            path = _json_path(op.key)
            value = json.dumps(op.value)
            if op.op == "set":
                expr, params = "json_set(coalesce(metadata, '{}'), ?, json(?))", (path, value)
            elif op.op == "delete":
                expr, params = "json_remove(coalesce(metadata, '{}'), ?)", (path,)
            elif op.op == "increment":
                if isinstance(op.value, bool) or not isinstance(op.value, int | float):
                    raise InvalidOptions(f"metadata.increment needs a number, got {op.value!r}")
                expr = "json_set(coalesce(metadata, '{}'), ?, coalesce(json_extract(metadata, ?), 0) + ?)"
                params = (path, path, op.value)
            elif op.op == "append":
                expr = """CASE WHEN json_type(metadata, ?) = 'array'
                          THEN json_insert(metadata, ? || '[#]', json(?))
                          ELSE json_set(coalesce(metadata, '{}'), ?, json_array(json(?))) END"""
                params = (path, path, value, path, value)
            else:
                raise InvalidOptions(f"unknown metadata operation {op.op!r}")
            row = self._one(
                f"UPDATE runs SET metadata = {expr}, event_seq = event_seq + 1, updated_at = ? "
                f"WHERE {guard} RETURNING metadata, event_seq, attempt_count",
                (*params, self.now, *guard_params),
            )
            if row is None:
                return None
            self.conn.execute(
                INSERT_EVENT,
                (
                    run_id,
                    row[1],
                    row[2] or None,
                    "metadata",
                    json.dumps({"op": op.op, "key": op.key, "value": op.value}),
                    self.now,
                ),
            )
        if row is None:
            found = self._one(f"SELECT metadata FROM runs WHERE {guard}", guard_params)
            return None if found is None else (_loads(found[0]) or {})
        return _loads(row[0]) or {}

    # --- streams and realtime reads --------------------------------------------------------------
    _STREAM_BUMP = """UPDATE runs SET event_seq = event_seq + ?1, updated_at = ?2
        WHERE id = ?3 AND lease_token = ?4 AND status = 'EXECUTING' RETURNING event_seq"""
    _STREAM_EVENT = """INSERT INTO run_events (run_id, seq, attempt, kind, data, created_at)
        VALUES (?, ?, ?, 'stream', json_object('key', ?, 'chunk', json(?)), ?)"""
    # The tag's index range from a run id, plus runs by id (CROSS JOIN fixes the join order:
    # the planner must not walk runs by environment).
    _TAG_RUNS = """SELECT r.id, r.event_seq, r.status FROM run_tags t CROSS JOIN runs r ON r.id = t.run_id
        WHERE t.environment = ?1 AND t.tag = ?2 AND {window}
        UNION SELECT r.id, r.event_seq, r.status FROM json_each(?4) j CROSS JOIN runs r ON r.id = j.value
        WHERE r.environment = ?1
        ORDER BY 1"""

    def stream_append_many(self, chunks: Sequence[StreamChunk]) -> list[bool]:
        # One seq bump per run (and lease token), then its chunks' events in input order.
        groups: dict[tuple[str, str], list[int]] = {}
        for i, chunk in enumerate(chunks):
            groups.setdefault((chunk.run_id, chunk.lease_token), []).append(i)
        accepted = [False] * len(chunks)
        for (run_id, token), indexes in groups.items():
            row = self._one(self._STREAM_BUMP, (len(indexes), self.now, run_id, token))
            if row is None:
                continue
            first = row[0] - len(indexes) + 1
            self.conn.executemany(
                self._STREAM_EVENT,
                [
                    (run_id, first + n, chunks[i].attempt or None, chunks[i].key, chunks[i].data, chunks[i].ts)
                    for n, i in enumerate(indexes)
                ],
            )
            for i in indexes:
                accepted[i] = True
        return accepted

    def run_tag_seqs(
        self,
        environment: str,
        tag: str,
        min_id: str = "",
        run_ids: Sequence[str] = (),
        unfinished: bool = False,
    ) -> list[tuple[str, int, str]]:
        window = "(t.run_id >= ?3 OR r.finished_at IS NULL)" if unfinished else "t.run_id >= ?3"
        rows = self._all(self._TAG_RUNS.format(window=window), (environment, tag, min_id, json.dumps(list(run_ids))))
        return [(r[0], r[1], r[2]) for r in rows]

    # --- workers ---------------------------------------------------------------------------------
    def worker_register(self, worker: WorkerInfo) -> None:
        self._ensure_environment(worker.environment)
        self.conn.execute(
            """INSERT OR REPLACE INTO workers (id, environment, host, pid, address, queues, machine, version,
                   started_at, last_seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                worker.id,
                worker.environment,
                worker.host,
                worker.pid,
                worker.address,
                json.dumps(worker.queues),
                worker.machine,
                worker.version,
                self.now,
                self.now,
            ),
        )
        # Forget workers silent for a day: their runs were recovered long ago.
        self.conn.execute("DELETE FROM workers WHERE last_seen_at < ?", (self.now - 86400,))

    def worker_deregister(self, worker_id: str) -> None:
        self.conn.execute("DELETE FROM workers WHERE id = ?", (worker_id,))

    def worker_list(self, environment: str | None = None, live_within: float = 30.0) -> list[WorkerInfo]:
        rows = self._all(
            """SELECT id, environment, host, pid, address, queues, machine, version, started_at, last_seen_at
               FROM workers WHERE (?1 IS NULL OR environment = ?1) AND last_seen_at >= ?2 ORDER BY started_at""",
            (environment, self.now - live_within),
        )
        return [WorkerInfo(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7], r[8], r[9]) for r in rows]
