"""The PostgreSQL transaction: the run lifecycle with the SQLite driver's semantics, made safe for
any number of processes on any number of hosts.

What SQLite gets from its single writer, PostgreSQL gets from locks taken inside the
transaction (READ COMMITTED):

- Claim: candidates `FOR UPDATE SKIP LOCKED`; a queue with a limit is counted only after its
  `queues` row is locked (`FOR UPDATE`), in a statement that starts after the lock was granted,
  so it sees every claim committed before; per-key limits in a queue without a limit take a
  transaction advisory lock per key (tried, never waited for: no deadlocks).
- Idempotency keys: `INSERT ... ON CONFLICT DO NOTHING` on the keys table decides the owner;
  a conflicting key is locked (`FOR UPDATE`) and its run's status read in a later statement.
- Maintenance: candidates `FOR UPDATE SKIP LOCKED`; every UPDATE re-checks the status it
  comes from in its own WHERE clause.
- Heartbeat: its row locks all at once or none (NOWAIT under a savepoint, retried), so it
  never deadlocks with its worker's exchange, which locks the same rows in another order.

Durable waits. A run P waits for waitpoints W (run_waits); it must be queued again exactly when
it is WAITING and none of them is PENDING. SQLite checks that under its single writer; here a
suspension and the completions of P's waitpoints run in different transactions, and a check
that reads the others' rows before they commit loses the resume (P WAITING, nothing pending).
Two kinds of lock close that gap; each check runs in a statement that starts after its lock
was granted, so under READ COMMITTED it sees everything the previous holder committed:

1. A suspension against a completion, on the waitpoint row. A completion is an UPDATE of W
   (row lock until commit). A suspension locks every W it waits for FOR SHARE in the statement
   that links them (LINK_WAITS), and checks for pending ones in a later statement. If the
   completion came first, the share lock waits for it to commit, and the check sees W completed.
   If the suspension came first, the completion's UPDATE waits for the suspension to commit, and
   the completion looks for W's waiters in a later statement, which sees the link. Waitpoints
   created by the suspension itself (a child's, a timer) are invisible to others until it
   commits, so the same holds.
2. Two completions of P's waitpoints against each other (two children finishing at once on two
   workers), on the waiter's row. After completing its waitpoints, a transaction locks their
   WAITING waiters FOR UPDATE in one statement, in id order (LOCK_WAITERS), and only then, in a
   later statement, queues those that wait for nothing pending (RESUME_READY). The second to
   take P's lock sees the first one's completion: the last completion resumes P.

A child C is found done in a statement that may have waited for C's row lock, so its snapshot
may miss a waitpoint created meanwhile by the holder. Only one kind of holder creates such a
waitpoint: a wait that an idempotency key gave an existing, unfinished C. It flags C
(`awaited`, migration 0004) under C's lock; the settle reads the flag from C's newest version
and completes C's waitpoints again in a statement of its own (COMPLETE_TARGETS).

Lock order, so that these locks cannot deadlock: the runs a transaction finishes, suspends or
cancels; then waitpoints (completed, or FOR SHARE by a suspension); then the WAITING waiters, all
at once in id order, at the end (an exchange's settles, a maintenance pass: one LOCK_WAITERS for
all of them). Waiters are the parents of the finished runs, so this locks children before parents.
A cancel cascade goes the other way (the parent first, then each child), so a cancel takes every
run it may touch (the run, the unfinished runs it waits for and theirs, and everything waiting for
any of them: CANCEL_SCOPE) all at once, NOWAIT under a savepoint and retried like the heartbeat:
it never waits holding a parent for a child whose settle waits for that parent (still busy after a
second: it waits for them one by one, deepest first, the settles' order). The claim comes
last in an exchange (queue rows; candidates SKIP LOCKED), as before, and no transaction waits for
anything after taking a queue's lock. Maintenance takes its runs and due waitpoints SKIP LOCKED.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg.rows import tuple_row

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
from conveyor.store.postgres import sql as q

if TYPE_CHECKING:
    from conveyor.store.postgres.driver import PostgresStore

T = TypeVar("T")
_STATUS_EVENT = {s: json.dumps({"status": s.value}) for s in RunStatus}
_DEFAULT_KEY_TTL = 30 * 86400.0
_RENEW_PATIENCE = 2.0  # seconds the heartbeat retries its all-or-none row locks
_LOCK_PATIENCE = 2.0  # the same for a wait on an existing run
_CANCEL_PATIENCE = 1.0  # and for a cancel's runs, before it waits for them one by one


# The per-run parameters of INSERT_RUN, and the columns of INSERT_RUNS (one array each).
_RUN_COLUMNS = (
    "id", "task_id", "queue", "status", "payload", "available_at", "priority", "ttl", "max_attempts", "retry",
    "max_duration", "concurrency_key", "key_limit", "queue_slot", "idempotency_key", "idempotency_key_ttl", "tags",
    "metadata", "machine", "version", "parent_id", "root_id", "batch_id", "trace_context",
)  # fmt: skip


def _run_values(r: NewRun) -> tuple[Any, ...]:
    """A new run's values in _RUN_COLUMNS order; numbers of one column of one type (INSERT_RUNS's
    binary arrays take no mix of int and float)."""
    return (
        r.id, r.task_id, r.queue, r.status.value, r.payload, float(r.available_at), r.priority, _float(r.ttl),
        r.max_attempts, r.retry, _float(r.max_duration), r.concurrency_key, r.key_limit, bool(r.queue_slot),
        r.idempotency_key, _float(r.idempotency_key_ttl), _dumps(r.tags) if r.tags else None, r.metadata, r.machine,
        r.version, r.parent_id, r.root_id, r.batch_id, r.trace_context,
    )  # fmt: skip


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _check_key(key: str) -> None:
    if not key or '"' in key or "\\" in key:
        raise InvalidOptions(f"metadata key {key!r} must be non-empty and contain no quotes or backslashes")


def _row_to_run(row: Sequence[Any]) -> Run:
    return common.run_from_row(row, _same)


def _same(value: Any) -> Any:
    return value


def _wait_state(row: Sequence[Any]) -> WaitState:
    return WaitState(row[0], row[1], row[2], None if row[3] is None else json.loads(row[3]), row[4])


class PostgresTx(Tx):
    def __init__(
        self,
        conn: psycopg.Connection,
        store: PostgresStore,
        now: float | None,
        notifies: list[tuple[str, str]] | None = None,
    ) -> None:
        """`now` is the injected clock's time, or None to use the database's clock. `notifies`:
        where wake() leaves its NOTIFYs for the store to send with the COMMIT (one round trip);
        None (the caller's transaction, which we do not commit) sends each one at once."""
        self.conn = conn
        # Our own cursor with tuple rows: a caller's connection (transactional enqueue) may
        # have another row factory.
        self.cur = conn.cursor(row_factory=tuple_row)
        self.store = store
        self.schema = store.schema
        self._db_clock = now is None
        self._now = now
        self._notified: set[tuple[str, str]] = set()
        self._notifies = notifies
        self._holds_queue_lock = False
        # Durable waits: queues of the runs this transaction resumed (the engine wakes workers for
        # them), waitpoints it completed whose waiters are not resumed yet, and the runs a cancel
        # of this transaction locked at once.
        self.resumed_queues: set[str] = set()
        self.cancel_pending: list[str] = []
        self._completed: list[str] = []
        self._cancel_scope: set[str] = set()

    # --- plumbing -----------------------------------------------------------------------------
    @property
    def now(self) -> float:
        """The transaction's time, for the few computations made in Python (retry times)."""
        if self._now is None:
            self._now = float(self._one(q.NOW)[0])
        return self._now

    def _sql(self, text: str) -> str:
        return q.render(text, self.schema, self._db_clock)

    def _params(self, params: dict[str, Any]) -> dict[str, Any]:
        if not self._db_clock:
            params["now"] = self._now
        return params

    def _ready(self) -> None:
        """Called before every statement: the store's own transactions begin here (driver._Tx)."""

    def _raw(self, statement: str) -> None:
        """A statement without parameters or results (savepoints)."""
        self._ready()
        self.conn.execute(statement)

    def _exec(self, text: str, params: dict[str, Any] | None = None) -> psycopg.Cursor[Any]:
        self._ready()
        return self.cur.execute(self._sql(text), self._params(params or {}))

    def _one(self, text: str, params: dict[str, Any] | None = None) -> Any:
        return self._exec(text, params).fetchone()

    def _all(self, text: str, params: dict[str, Any] | None = None) -> list[Any]:
        return self._exec(text, params).fetchall()

    def _many(self, text: str, rows: list[dict[str, Any]]) -> None:
        self._ready()
        if len(rows) == 1:  # one round trip, without executemany's pipeline set-up
            self._exec(text, rows[0])
        elif rows:
            with self.conn.cursor(row_factory=tuple_row) as cur:
                cur.executemany(self._sql(text), [self._params(r) for r in rows])

    # --- wake-ups -------------------------------------------------------------------------------
    def wake(self, environment: str, message: bytes, worker_id: str | None = None) -> bool:
        """NOTIFY, delivered when (and only if) this transaction commits; PostgreSQL folds
        identical notifications of one transaction into one."""
        if worker_id is not None:
            target = q.worker_channel(self.schema, worker_id)
        else:
            target = q.environment_channel(self.schema, environment)
        key = (target, message.decode())
        if key not in self._notified:
            self._notified.add(key)
            if self._notifies is not None:
                self._notifies.append(key)  # sent in the commit's round trip (PostgresStore._commit)
            else:
                self.conn.execute(q.NOTIFY, {"channel": key[0], "payload": key[1]})
        return True

    # --- registry -------------------------------------------------------------------------------
    def _ensure_environment(self, environment: str) -> None:
        self._exec(q.ENSURE_ENVIRONMENT, {"env": environment})

    def task_upsert_many(self, environment: str, tasks: Sequence[TaskRecord]) -> None:
        self._ensure_environment(environment)
        # Sorted: two workers registering the same tasks lock their rows in the same order.
        self._many(
            q.TASK_UPSERT,
            [
                {
                    "env": environment,
                    "task_id": t.task_id,
                    "version": t.version,
                    "queue": t.queue,
                    "machine": t.machine,
                    "options": json.dumps(t.options),
                    "schema": _dumps(t.payload_schema),
                    "code_hash": t.code_hash,
                }
                for t in sorted(tasks, key=lambda t: (t.task_id, t.version))
            ],
        )

    def task_get(self, environment: str, task_id: str) -> TaskRecord | None:
        row = self._one(q.TASK_GET, {"env": environment, "task_id": task_id})
        return None if row is None else self._task(row)

    def task_list(self, environment: str) -> list[TaskRecord]:
        return [self._task(r) for r in self._all(q.TASK_LIST, {"env": environment})]

    @staticmethod
    def _task(row: Sequence[Any]) -> TaskRecord:
        task_id, queue, machine, options, schema, code_hash, version, updated_at = row
        return TaskRecord(
            task_id=task_id,
            queue=queue,
            machine=machine,
            options=options,
            payload_schema=schema,
            code_hash=code_hash,
            version=version,
            updated_at=updated_at,
        )

    def queue_upsert_many(self, environment: str, queues: Sequence[QueueSpec]) -> None:
        self._ensure_environment(environment)
        self._many(
            q.QUEUE_UPSERT,
            [
                {"env": environment, "name": spec.name, "limit": spec.concurrency_limit}
                for spec in sorted(queues, key=lambda s: s.name)
            ],
        )

    def queue_get(self, environment: str, name: str) -> QueueInfo | None:
        row = self._one(q.QUEUE_STATS, {"env": environment, "name": name})
        return None if row is None else self._queue_info(environment, row)

    def queue_list(self, environment: str) -> list[QueueInfo]:
        # Queues that only exist because runs name them are listed too.
        rows = self._all(q.QUEUE_STATS, {"env": environment, "name": None})
        known = {r[0] for r in rows}
        rows += [r for r in self._all(q.QUEUES_FROM_RUNS, {"env": environment}) if r[0] not in known]
        return sorted((self._queue_info(environment, r) for r in rows), key=lambda info: info.name)

    def _queue_info(self, environment: str, row: Sequence[Any]) -> QueueInfo:
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
        params = {"env": environment, "queue": queue}
        if not servers:
            return int(self._one(q.QUEUED_COUNT, params)[0])
        return sum(
            n
            for machine, version, n in self._all(q.QUEUED_BY_MACHINE, params)
            if not any(m == machine and (v is None or version is None or v == version) for m, v in servers)
        )

    def queue_set_paused(self, environment: str, name: str, paused: bool) -> QueueInfo | None:
        self._ensure_environment(environment)
        self._exec(q.QUEUE_SET_PAUSED, {"env": environment, "name": name, "paused": paused})
        return self.queue_get(environment, name)

    # --- runs: insert ---------------------------------------------------------------------------
    def run_insert_many(self, environment: str, runs: Sequence[NewRun]) -> list[tuple[str, bool]]:
        results: list[tuple[str, bool]] = [(r.id, True) for r in runs]
        owners = self._take_keys(environment, runs)
        fresh: list[NewRun] = []
        for i, run in enumerate(runs):
            if run.idempotency_key is not None:
                owner = owners[(run.task_id, run.idempotency_key)]
                if owner != run.id:
                    results[i] = (owner, False)
                    continue
            fresh.append(run)
        if not fresh:
            return results
        # Event 1 (the run's first status) is not written: event_list derives it from the row.
        if len(fresh) == 1:
            self._exec(q.INSERT_RUN, self.run_params(environment, fresh[0]))
        else:
            columns = zip(*(_run_values(r) for r in fresh), strict=True)
            self._exec(q.INSERT_RUNS, {"env": environment, **dict(zip(_RUN_COLUMNS, map(list, columns), strict=True))})
        tags = [(tag, r.id) for r in fresh for tag in r.tags]
        if tags:
            names, run_ids = zip(*tags, strict=True)
            self._exec(q.INSERT_TAGS, {"env": environment, "tags": list(names), "run_ids": list(run_ids)})
        return results

    @staticmethod
    def run_params(environment: str, r: NewRun) -> dict[str, Any]:
        """The parameters of INSERT_RUN for one run."""
        values = dict(zip(_RUN_COLUMNS, _run_values(r), strict=True))
        return {"env": environment, "queued": r.status is RunStatus.QUEUED, **values}

    def _take_keys(self, environment: str, runs: Sequence[NewRun]) -> dict[tuple[str, str], str]:
        """The run owning each idempotency key of the batch: a live run already holding it, or
        the first item of the batch with that key (which then holds it)."""
        wanted: dict[tuple[str, str], NewRun] = {}
        for run in runs:
            if run.idempotency_key is not None:
                wanted.setdefault((run.task_id, run.idempotency_key), run)
        if not wanted:
            return {}
        owners: dict[tuple[str, str], str] = {}
        ordered = sorted(wanted)
        ttls = [self._key_ttl(wanted[k]) for k in ordered]
        inserted = self._all(
            q.KEY_INSERT_MANY,
            {
                "env": environment,
                "task_ids": [k[0] for k in ordered],
                "keys": [k[1] for k in ordered],
                "run_ids": [wanted[k].id for k in ordered],
                "ttls": ttls,
            },
        )
        for task_id, key in inserted:
            owners[(task_id, key)] = wanted[(task_id, key)].id
        # Keys someone else holds, in key order: keep theirs if it is live, else take it over.
        for k in ordered:
            if k not in owners:
                owners[k] = self._contend_key(environment, wanted[k])
        return owners

    @staticmethod
    def _key_ttl(run: NewRun) -> float:
        return float(run.idempotency_key_ttl) if run.idempotency_key_ttl is not None else _DEFAULT_KEY_TTL

    def _contend_key(self, environment: str, run: NewRun) -> str:
        assert run.idempotency_key is not None
        params = {
            "env": environment,
            "task_id": run.task_id,
            "key": run.idempotency_key,
            "run_id": run.id,
            "ttl": self._key_ttl(run),
        }
        while True:
            row = self._one(q.KEY_LOCK, params)
            if row is None:  # freed since our insert found it: try to insert again
                if self._one(q.KEY_INSERT, params) is not None:
                    return run.id
                continue
            owner, unexpired = row
            # A separate statement, so it sees the owner's run even if it committed while we
            # waited for the key's lock.
            found = self._one(q.RUN_STATUS, {"id": owner})
            if found is not None and (not RunStatus(found[0]).finished or unexpired):
                return str(owner)
            self._exec(q.KEY_TAKE, params)
            return run.id

    # --- runs: claim ----------------------------------------------------------------------------
    def run_claim(self, request: ClaimRequest) -> list[ClaimedRun]:
        token = os.urandom(8).hex()
        start_params = {
            "worker_id": request.worker_id,
            "token": token,
            "lease": float(request.lease_seconds),
            "version": request.version,
        }

        def take(queue: str, want: int) -> list[Any]:
            taken = self._take_alone(request, queue, want, start_params)
            if taken is not None:
                return taken
            picked = self._pick(request, queue, want)
            # The runs, their attempt rows and EXECUTING events in one statement.
            return self._all(q.CLAIM_START, {**start_params, "ids": picked}) if picked else []

        rows = common.claim_in_passes(request.queues, request.limit, take)
        return [common.claimed_from_row(r, token, _same) for r in rows]

    def _take_alone(
        self, request: ClaimRequest, queue: str, want: int, start_params: dict[str, Any]
    ) -> list[Any] | None:
        """Up to `want` runs of a queue without a limit, when none of its first candidates has a
        concurrency key, picked and started in one statement (CLAIM_ALONE); None when that does
        not apply (the queue is then left to `_pick`). Queues found with a limit or keyed runs
        go to `_pick` directly until `_pick` finds them plain again (`PostgresStore.plain_queues`)."""
        plain = self.store.plain_queues
        key = (request.environment, queue)
        if key not in plain:
            return None
        rows = self._claim_alone({**self._candidates_params(request, queue, [], want, [], want), **start_params})
        limit, paused, keyed, _ = rows[0][-4:]
        if limit is not None or paused or keyed:
            plain.discard(key)
            return [] if paused else None
        return [r[:-4] for r in rows if r[0] is not None]

    def _claim_alone(self, params: dict[str, Any]) -> list[Any]:
        """CLAIM_ALONE's rows, in this transaction."""
        return self._all(q.CLAIM_ALONE, {**params, "commit": None})

    def _lock_queue(self, env: str, queue: str) -> Any:
        """Lock the queue's row (its slot lock) until commit; None if another claimer holds it
        and this transaction already holds another queue's lock (waiting then could deadlock)."""
        statement = q.QUEUE_TRY_LOCK if self._holds_queue_lock else q.QUEUE_LOCK
        row = self._one(statement, {"env": env, "queue": queue})
        if row is not None:
            self._holds_queue_lock = True
        return row

    def _pick(self, request: ClaimRequest, queue: str, want: int) -> list[str]:
        """Admission checks for one queue: paused, the queue's slots, each key's slots."""
        env = request.environment
        params = {"env": env, "queue": queue}

        def candidates_params(full_keys: list[str], queue_free: int, picked: list[str], window: int) -> dict[str, Any]:
            return self._candidates_params(request, queue, full_keys, queue_free, picked, window)

        # The queue's settings and, when it has no limit, the first candidates: one round trip.
        first = self._all(q.CLAIM_FIRST_CANDIDATES, candidates_params([], want, [], want))
        limit, paused = first[0][4], first[0][5]
        if paused:
            return []
        prefetched: list[Any] | None = None
        queue_locked = False
        if limit is None:
            prefetched = [r[:4] for r in first if r[0] is not None]
            if all(r[1] is None for r in prefetched):  # plain: the next claim may use CLAIM_ALONE
                self.store.plain_queues.add((env, queue))
        else:
            row = self._lock_queue(env, queue)
            if row is None:
                return []
            limit, paused = row
            queue_locked = True
            if paused:
                return []
        if limit is None:
            queue_free = want
        else:
            # A statement of its own, begun after the lock was granted: it sees every claim
            # committed by the previous holder.
            queue_free = limit - int(self._one(q.QUEUE_RUNNING, params)[0])
        picked: list[str] = []
        full_keys: list[str] = []
        key_running: dict[str, int] = {}
        while len(picked) < want:
            window = want - len(picked)
            if prefetched is not None:  # the first pass of a queue without a limit: already read
                candidates, prefetched = prefetched, None
            else:
                candidates = self._all(q.CLAIM_CANDIDATES, candidates_params(full_keys, queue_free, picked, window))
            new_keys = sorted({c[1] for c in candidates if c[1] is not None and c[1] not in key_running})
            if new_keys:
                self._count_keys(env, queue, new_keys, queue_locked, key_running)
            progress = False
            for run_id, key, key_limit, queue_slot in candidates:
                if queue_slot and queue_free <= 0:
                    continue
                if key is not None:
                    if key in full_keys:
                        continue
                    running = key_running[key]
                    # No limit of its own: a key given at trigger time gets the queue's limit.
                    effective = key_limit if key_limit is not None else limit
                    if running < 0 or (effective is not None and running >= effective):
                        full_keys.append(key)  # full, or being admitted by another claimer
                        progress = True
                        continue
                    key_running[key] = running + 1
                picked.append(run_id)
                progress = True
                if queue_slot:
                    queue_free -= 1
                if len(picked) >= want:
                    break
            if len(candidates) < window or not progress:
                break
        return picked

    @staticmethod
    def _candidates_params(
        request: ClaimRequest, queue: str, full_keys: list[str], queue_free: int, picked: list[str], window: int
    ) -> dict[str, Any]:
        return {
            "env": request.environment,
            "queue": queue,
            "machine": request.machine,
            "version": request.version,
            "task_ids": request.task_ids,
            "full_keys": full_keys,
            "queue_free": queue_free,
            "picked": picked,
            "window": window,
        }

    def _count_keys(self, env: str, queue: str, keys: list[str], queue_locked: bool, out: dict[str, int]) -> None:
        """Running counts of `keys` into `out` (-1: another claimer holds the key's lock)."""
        if not queue_locked:
            scope = f"{self.schema}\x1f{env}\x1f{queue}\x1f"
            locks = self._all(q.KEY_TRY_LOCKS, {"scope": scope, "keys": keys})
            for key, got in locks:
                if not got:
                    out[key] = -1
            keys = [k for k in keys if k not in out]
        if keys:
            # After the locks: a statement of its own sees every claim of the previous holder.
            counts = dict(self._all(q.KEY_RUNNING, {"env": env, "queue": queue, "keys": keys}))
            for key in keys:
                out[key] = int(counts.get(key, 0))

    # --- runs: settle ---------------------------------------------------------------------------
    def run_settle_many(self, environment: str, outcomes: Sequence[Outcome]) -> list[bool]:
        # COMPLETED outcomes (the bulk of a busy worker's exchange) in one statement; the rest,
        # and a run named twice, one by one. The waiters of the waitpoints they complete are
        # locked and resumed once, at the end ("Durable waits" above).
        done: dict[str, Outcome] = {}
        for o in outcomes:
            if o.kind == OutcomeKind.COMPLETED:
                done.setdefault(o.run_id, o)
        accepted: set[str] = set()
        if len(done) > 1:
            rows = self._all(
                q.SETTLE_COMPLETED_MANY,
                {
                    "ids": list(done),
                    "tokens": [o.lease_token for o in done.values()],
                    "outputs": [o.output for o in done.values()],
                },
            )
            awaited = []
            for run_id, late, waitpoint_id in rows:
                if run_id is None:
                    self._completed.append(waitpoint_id)
                    continue
                accepted.add(run_id)
                if late:
                    awaited.append(run_id)
            if awaited:
                self._complete_targets(awaited)
        else:
            done = {}
        results = []
        suspended = []
        for o in outcomes:
            if done.get(o.run_id) is o:
                results.append(o.run_id in accepted)
            else:
                ok = self._settle(o, attempt_status=None)
                results.append(ok)
                if ok and o.kind == OutcomeKind.SUSPENDED:
                    suspended.append(o.run_id)
        # A suspended run may wait for nothing pending (a fast child, an early token): resumed
        # here, in a statement after the one that locked its waitpoints (LINK_WAITS).
        self._resume_completed(own=suspended)
        return results

    def _settle(self, o: Outcome, attempt_status: str | None) -> bool:
        error = _dumps(o.error)
        guard = {"id": o.run_id, "token": o.lease_token}
        if o.kind == OutcomeKind.COMPLETED:
            status = RunStatus.COMPLETED
            row = self._one(q.SETTLE_FINAL, {**guard, "status": status.value, "output": o.output, "error": None})
        elif o.kind == OutcomeKind.RETRY:
            status = RunStatus.QUEUED
            retry_at = float(o.retry_at) if o.retry_at is not None else None
            row = self._one(q.SETTLE_RETRY, {**guard, "error": error, "retry_at": retry_at})
        elif o.kind == OutcomeKind.FAILED:
            status = o.status
            row = self._one(q.SETTLE_FINAL, {**guard, "status": status.value, "output": None, "error": error})
        elif o.kind == OutcomeKind.RELEASED:
            status = RunStatus.QUEUED
            row = self._one(q.SETTLE_RELEASE, guard)
        elif o.kind == OutcomeKind.SUSPENDED:
            status = RunStatus.WAITING
            # The waits first: their journal rows are fenced by the lease (locked by the first
            # one), like the suspension.
            for request in o.waits:
                self._wait_apply(request, o.lease_token)
            row = self._one(q.SETTLE_SUSPEND, guard)
        else:
            raise ValueError(f"unknown outcome kind {o.kind!r}")
        if row is None:
            return False
        seq, attempt, environment, task_id, idem, _parent_id, segment = row[:7]
        if o.kind == OutcomeKind.SUSPENDED:
            if row[7]:  # canceled while it was suspending: the engine cancels it and what it waits for
                self.cancel_pending.append(o.run_id)
            return True  # SETTLE_SUSPEND wrote the attempt and the event
        if len(row) > 7:  # SETTLE_FINAL: the waitpoints that targeted the run are completed
            awaited, completed = row[7], row[8]
            self._completed.extend(completed)
            if awaited:
                self._complete_targets([o.run_id])
        if o.kind == OutcomeKind.RELEASED and segment == 0:
            self._exec(q.ATTEMPT_DELETE, {"run_id": o.run_id, "number": attempt})
        elif o.kind == OutcomeKind.RELEASED:  # a resumed segment: its attempt goes on
            self._exec(q.ATTEMPT_WAITING, {"run_id": o.run_id, "number": attempt})
        else:
            if attempt_status is None:
                attempt_status = (
                    "COMPLETED"
                    if status is RunStatus.COMPLETED
                    else ("FAILED" if status is RunStatus.QUEUED else status.value)
                )
            self._exec(
                q.ATTEMPT_FINISH, {"status": attempt_status, "error": error, "run_id": o.run_id, "number": attempt}
            )
        data = (
            _STATUS_EVENT[status]
            if o.kind != OutcomeKind.RETRY
            else json.dumps({"status": "QUEUED", "retry_at": o.retry_at})
        )
        self._exec(q.INSERT_EVENT, {"run_id": o.run_id, "seq": seq, "attempt": attempt, "kind": "status", "data": data})
        if idem is not None and status in FREES_IDEMPOTENCY_KEY:
            self._free_key(environment, task_id, idem, o.run_id)
        return True

    def _free_key(self, environment: str, task_id: str, key: str, run_id: str) -> None:
        self._exec(q.KEY_FREE, {"env": environment, "task_id": task_id, "key": key, "run_id": run_id})

    def run_heartbeat(self, worker_id: str, lease_seconds: float, run_ids: Sequence[str]) -> HeartbeatResult:
        params = {"lease": float(lease_seconds), "worker_id": worker_id, "ids": list(run_ids)}
        rows = self._renew(params) if run_ids else []
        self._exec(q.WORKER_SEEN, {"worker_id": worker_id})
        return HeartbeatResult(renewed={r[0]: r[1] for r in rows}, cancel_requested=[r[0] for r in rows if r[2]])

    def _renew(self, params: dict[str, Any]) -> list[Any]:
        """Renew with every row lock taken at once (NOWAIT, under a savepoint); when one is busy,
        let go of all and try again shortly: the worker's own exchange, which locks the same
        rows in its own order, is never left waiting on the heartbeat."""
        rows = self._nowait("conveyor_renew", _RENEW_PATIENCE, lambda: self._all(q.HEARTBEAT_NOWAIT, params))
        # Busy for that long: wait like any statement (PostgreSQL breaks a rare deadlock).
        return rows if rows is not None else self._all(q.HEARTBEAT, params)

    def _nowait(self, savepoint: str, patience: float, attempt: Callable[[], T | None]) -> T | None:
        """`attempt` (statements that lock rows NOWAIT) under a savepoint: while a row is busy
        (LockNotAvailable), let go of everything since the savepoint and try again shortly;
        when it returns None, let go and try again at once. -> its result, or None if it did not
        go through within `patience` seconds (the caller then waits like any statement)."""
        deadline = time.monotonic() + patience
        pause = 0.002
        while time.monotonic() < deadline:
            self._raw(f"SAVEPOINT {savepoint}")
            try:
                result = attempt()
            except pgerrors.LockNotAvailable:
                self._raw(f"ROLLBACK TO SAVEPOINT {savepoint}")
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
                continue
            if result is not None:
                self._raw(f"RELEASE SAVEPOINT {savepoint}")
                return result
            self._raw(f"ROLLBACK TO SAVEPOINT {savepoint}")
        return None

    def run_cancel_requested(self, worker_id: str) -> list[str]:
        return [r[0] for r in self._all(q.CANCEL_REQUESTED, {"worker_id": worker_id})]

    # --- runs: cancel, reschedule ---------------------------------------------------------------
    def run_cancel(self, environment: str, run_id: str) -> CancelResult:
        # The runs a cancel cascade may lock, all at once ("Durable waits" above); then the run is
        # locked: no claim or settle can change its status between the read and the update.
        if run_id not in self._cancel_scope:
            self._lock_cancel_scope(run_id)
        row = self._one(q.RUN_GET_FOR_UPDATE, {"id": run_id, "env": environment})
        if row is None:
            raise RunNotFound(f"no run {run_id} in environment {environment!r}")
        run = _row_to_run(row)
        if run.status.finished:
            return CancelResult(run=run, stopping=False)
        if run.status is RunStatus.EXECUTING:
            self._exec(q.CANCEL_FLAG, {"id": run_id})
            found = self._one(q.WORKER_ADDRESS, {"worker_id": run.worker_id})
            run.cancel_requested = True
            return CancelResult(run=run, stopping=True, worker_address=found[0] if found else None)
        seq = self._one(q.CANCEL_NOW, {"id": run_id})
        if seq is None:  # pragma: no cover - the row is locked; impossible
            raise InvalidTransition(f"run {run_id} changed status while being canceled")
        self._exec(
            q.INSERT_EVENT,
            {
                "run_id": run_id,
                "seq": seq[0],
                "attempt": run.attempts or None,
                "kind": "status",
                "data": _STATUS_EVENT[RunStatus.CANCELED],
            },
        )
        # The waits for it are over (its parent's trigger_and_wait): a statement of its own.
        self._complete_targets([run_id])
        self._resume_completed()
        updated = self.run_get(environment, run_id)
        assert updated is not None
        return CancelResult(run=updated, stopping=False)

    def run_reschedule(self, environment: str, run_id: str, available_at: float) -> Run:
        row = self._one(q.RESCHEDULE, {"at": float(available_at), "id": run_id, "env": environment})
        if row is None:
            run = self.run_get(environment, run_id)
            if run is None:
                raise RunNotFound(f"no run {run_id} in environment {environment!r}")
            raise InvalidTransition(f"run {run_id} is {run.status.value}; only a DELAYED run can be rescheduled")
        run = self.run_get(environment, run_id)
        assert run is not None
        return run

    # --- maintenance ----------------------------------------------------------------------------
    def run_maintain(self, limit: int = 500, since: float | None = None) -> MaintenanceResult:
        result = MaintenanceResult()
        promoted = self._all(q.PROMOTE_DUE, {"limit": limit})
        queued = _STATUS_EVENT[RunStatus.QUEUED]
        self._many(
            q.INSERT_EVENT,
            [{"run_id": r[0], "seq": r[1], "attempt": None, "kind": "status", "data": queued} for r in promoted],
        )
        result.promoted = len(promoted)
        result.changed_queues.update(r[2] for r in promoted)

        expired = self._all(q.EXPIRE_DUE, {"limit": limit})
        expired_event = _STATUS_EVENT[RunStatus.EXPIRED]
        self._many(
            q.INSERT_EVENT,
            [{"run_id": r[0], "seq": r[1], "attempt": None, "kind": "status", "data": expired_event} for r in expired],
        )
        for run_id, _seq, env, task_id, idem in expired:
            if idem is not None:
                self._free_key(env, task_id, idem, run_id)
        result.expired = len(expired)
        if expired:  # the waits for them are over
            self._complete_targets([r[0] for r in expired])

        # Waits that end by time: due timers, and tokens past their timeout.
        self._completed.extend(
            r[0] for r in self._all(q.WAITPOINTS_DUE, {"timeout": common.TOKEN_TIMEOUT, "limit": limit})
        )

        lost = self._all(q.LEASES_LOST, {"limit": limit})
        for run_id, token, attempt, max_attempts, retry, cancel_requested, queue, _env in lost:
            outcome = common.lost_lease_outcome(
                run_id, token, attempt, max_attempts, retry, bool(cancel_requested), self.now
            )
            if self._settle(outcome, attempt_status="WORKER_LOST"):
                result.recovered += 1
                result.changed_queues.add(queue)

        # The waiters of every waitpoint completed above, locked at once (one id order).
        result.resumed = self._resume_completed()
        result.changed_queues.update(self.resumed_queues)

        if since is not None:
            result.became_due = int(self._one(q.BECAME_DUE, {"since": float(since)})[0])
        result.next_due = self._one(q.NEXT_DUE)[0]
        return result

    # --- retention ------------------------------------------------------------------------------
    def run_purge(self, before: float, limit: int = 500) -> int:
        cur = self._exec(q.PURGE, {"before": float(before), "limit": int(limit)})
        return max(cur.rowcount, 0)

    # --- durable waits --------------------------------------------------------------------------
    def wait_apply(self, request: WaitRequest, lease_token: str) -> list[str] | None:
        started = self._wait_apply(request, lease_token)
        self._resume_completed()
        return started

    def _wait_apply(self, req: WaitRequest, lease_token: str) -> list[str] | None:
        """The journal row, the children, the waitpoints and the links of one wait call, only
        while the run's lease matches (locked until commit). Waiters of what it completes are
        left to the caller (`_resume_completed`)."""
        st = req.step
        if not req.runs:  # the lease, the journal row and the waitpoints: one round trip
            row = self._one(
                q.WAIT_WRITE_LEASED,
                {
                    **self._step_params(st, st.output),
                    "token": lease_token,
                    **self._waitpoint_params(req.create, [], st.run_id),
                },
            )
            if row is None:
                return None
            self._link(req, row[0])
            return []
        row = self._one(q.WAIT_LEASE, {"run_id": st.run_id, "token": lease_token})
        if row is None:
            return None
        environment = row[0]
        if not any(run.idempotency_key is not None for run in req.runs):
            return self._apply_request(environment, req, nowait=False)
        # A key may give an existing run, which is then locked (MARK_AWAITED) while this
        # transaction holds the key: that run's final settle locks the run, then deletes the key
        # (FAILED and the like free it). So: try without waiting, and on a busy run let go of
        # everything since the savepoint (the key too), as the heartbeat does.
        started = self._nowait(
            "conveyor_wait", _LOCK_PATIENCE, lambda: self._apply_request(environment, req, nowait=True)
        )
        return started if started is not None else self._apply_request(environment, req, nowait=False)

    def _apply_request(self, environment: str, req: WaitRequest, nowait: bool) -> list[str]:
        """A wait request that starts runs, after WAIT_LEASE."""
        st = req.step
        children = self.run_insert_many(environment, req.runs)
        output = json.dumps({**json.loads(st.output), "runs": [run_id for run_id, _ in children]})
        targets = [target for target, _ in children]
        self._exec(
            q.WAIT_WRITE,
            {
                **self._step_params(st, output),
                "env": environment,
                **self._waitpoint_params(req.create, targets, st.run_id),
            },
        )
        # The kind "run" waitpoint at index i targets runs[i]; an idempotency key may have given
        # an existing run, which may be done already.
        existing = sorted({target for target, created in children if not created})
        if existing:
            marked = self._all(q.MARK_AWAITED_NOWAIT if nowait else q.MARK_AWAITED, {"ids": existing})
            finished = [run_id for run_id, done in marked if done]
            if finished:
                self._complete_targets(finished)
        self._link(req, environment)
        return [run_id for run_id, _ in children]

    def _link(self, req: WaitRequest, environment: str) -> None:
        if req.wait_on:
            self._exec(q.LINK_WAITS, {"run_id": req.step.run_id, "ids": list(req.wait_on), "env": environment})

    @staticmethod
    def _step_params(st: StepRecord, output: str) -> dict[str, Any]:
        return {
            "run_id": st.run_id,
            "position": st.position,
            "key": st.key,
            "name": st.name,
            "output": output,
            "attempt": st.attempt,
            "started_at": st.started_at,
            "finished_at": st.finished_at,
        }

    @staticmethod
    def _waitpoint_params(
        waitpoints: Sequence[NewWaitpoint], targets: Sequence[str], created_by: str | None
    ) -> dict[str, Any]:
        """WAITPOINT_INSERT's arrays; the kind "run" waitpoints take `targets` in order."""
        pending = iter(targets)
        return {
            "created_by": created_by,
            "ids": [w.id for w in waitpoints],
            "kinds": [w.kind for w in waitpoints],
            "complete_ats": [None if w.complete_at is None else float(w.complete_at) for w in waitpoints],
            "delays": [None if w.delay is None else float(w.delay) for w in waitpoints],
            "targets": [next(pending) if w.kind == "run" else None for w in waitpoints],
            "tags": [_dumps(w.tags) if w.tags else None for w in waitpoints],
        }

    def _complete_targets(self, run_ids: Sequence[str]) -> None:
        """Finished runs: the pending waitpoints that target them complete with their results
        (a statement of its own); their waiters wait for `_resume_completed`."""
        self._completed.extend(r[0] for r in self._all(q.COMPLETE_TARGETS, {"ids": list(run_ids)}))

    def _resume_completed(self, own: Sequence[str] = ()) -> int:
        """Lock the WAITING runs that wait for the waitpoints this transaction completed (one
        statement, id order), then, in a later statement, queue again those of them (and of
        `own`, runs this transaction holds already) that wait for nothing pending. -> resumed."""
        ids = list(own)
        if self._completed:
            completed, self._completed = self._completed, []
            ids += [r[0] for r in self._all(q.LOCK_WAITERS, {"ids": completed}) if r[0] not in ids]
        if not ids:
            return 0
        rows = self._all(q.RESUME_READY, {"ids": ids})
        self.resumed_queues.update(r[1] for r in rows)
        return len(rows)

    def _lock_cancel_scope(self, run_id: str) -> None:
        """Lock every run the cancel of `run_id` may lock: the run, the unfinished runs it waits
        for and theirs (the cascade), and the runs waiting for any of those (their waits end).
        All at once, NOWAIT under a savepoint, let go of and tried again while one is busy, as
        the heartbeat does: the cascade goes from parents to children, the other way round from
        a settle, so it must never wait holding a parent. Checked again once held: the scope
        cannot grow while it is locked (only an EXECUTING run of it adds children, and its
        suspension needs its row). Still busy after a while: wait for each in turn, children
        before parents (deepest first), the order of every settle."""

        def lock_all() -> list[str] | None:
            scope = self._cancel_scope_of(run_id)
            self._all(q.LOCK_RUNS_NOWAIT, {"ids": scope})
            return scope if set(self._cancel_scope_of(run_id)) <= set(scope) else None  # grew: again

        scope = self._nowait("conveyor_cancel", _CANCEL_PATIENCE, lock_all)
        if scope is None:
            scope = self._cancel_scope_of(run_id)
            self._all(q.LOCK_RUNS, {"ids": scope})
        self._cancel_scope.update(scope)

    def _cancel_scope_of(self, run_id: str) -> list[str]:
        """CANCEL_SCOPE, deepest first (then by id)."""
        rows = self._all(q.CANCEL_SCOPE, {"id": run_id})
        return [r[0] for r in sorted(rows, key=lambda r: (-r[1], r[0]))]

    def waitpoint_create(self, environment: str, waitpoints: Sequence[NewWaitpoint]) -> None:
        self._ensure_environment(environment)
        if waitpoints:
            self._exec(q.WAITPOINT_INSERT, {"env": environment, **self._waitpoint_params(waitpoints, [], None)})

    def waitpoint_get(self, environment: str, waitpoint_id: str) -> WaitState | None:
        row = self._one(q.WAITPOINT_GET, {"id": waitpoint_id, "env": environment})
        return None if row is None else _wait_state(row)

    def token_complete(self, environment: str, token_id: str, output: str) -> bool | None:
        # The UPDATE takes the token's row lock (after any suspension holding it FOR SHARE has
        # committed); the waiters are read and locked in later statements.
        if self._one(q.TOKEN_COMPLETE, {"output": output, "id": token_id, "env": environment}) is not None:
            self._completed.append(token_id)
            self._resume_completed()
            return True
        return None if self._one(q.TOKEN_EXISTS, {"id": token_id, "env": environment}) is None else False

    def journal(self, run_id: str) -> Journal:
        waits = {r[0]: _wait_state(r) for r in self._all(q.JOURNAL_WAITS, {"run_id": run_id})}
        return Journal(self.step_list(run_id), waits)

    def run_children_waited(self, run_id: str) -> list[str]:
        return [r[0] for r in self._all(q.CHILDREN_WAITED, {"run_id": run_id})]

    # --- reads ----------------------------------------------------------------------------------
    def run_get(self, environment: str, run_id: str) -> Run | None:
        row = self._one(q.RUN_GET, {"id": run_id, "env": environment})
        return None if row is None else _row_to_run(row)

    def run_status_many(self, environment: str, run_ids: Sequence[str]) -> dict[str, str]:
        rows = self._all(q.RUN_STATUS_MANY, {"env": environment, "ids": list(run_ids)})
        return {r[0]: r[1] for r in rows}

    def run_list(self, environment: str, flt: RunFilter) -> list[Run]:
        where = ["environment = %(env)s"]
        params: dict[str, Any] = {"env": environment}
        if flt.task:
            where.append("task_id = %(task)s")
            params["task"] = flt.task
        if flt.status:
            where.append("status = ANY(%(statuses)s::text[])")
            params["statuses"] = [RunStatus(s).value for s in flt.status]
        if flt.tags:
            # One tag (the common case) with `=`: the run_tags index then yields its runs in id
            # order, newest first, without reading other runs; `= ANY(array)` cannot.
            match = "tag = %(tag)s" if len(flt.tags) == 1 else "tag = ANY(%(tags)s::text[])"
            where.append(f"id IN (SELECT run_id FROM conveyor.run_tags WHERE environment = %(env)s AND {match})")
            params["tags"], params["tag"] = list(flt.tags), flt.tags[0]
        for column, value, op in (
            ("created_at", flt.created_after, ">"),
            ("created_at", flt.created_before, "<"),
            ("batch_id", flt.batch_id, "="),
            ("parent_id", flt.parent_id, "="),
        ):
            if value is not None:
                name = f"p_{column}_{len(params)}"
                where.append(f"{column} {op} %({name})s")
                params[name] = value
        if flt.cursor:
            where.append("id < %(cursor)s")
            params["cursor"] = flt.cursor
        params["limit"] = max(1, min(flt.limit, 1000))
        text = f"SELECT {q.RUN_COLUMNS} FROM conveyor.runs WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT %(limit)s"
        return [_row_to_run(r) for r in self._all(text, params)]

    def attempt_list(self, run_id: str) -> list[Attempt]:
        rows = self._all(q.ATTEMPT_LIST, {"run_id": run_id})
        return [Attempt(r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]

    def event_list(self, run_id: str, after_seq: int = 0, limit: int = 1000) -> list[RunEvent]:
        rows = self._all(q.EVENT_LIST, {"run_id": run_id, "after": after_seq, "limit": limit})
        events = [RunEvent(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]
        if after_seq < 1:
            first = self._first_event(run_id)
            if first is not None:
                events.insert(0, first)
        return events[:limit]

    def _first_event(self, run_id: str) -> RunEvent | None:
        """Event 1, the status a run was created in, derived from the row (as on SQLite)."""
        row = self._one(q.FIRST_EVENT, {"run_id": run_id})
        if row is None:
            return None
        created_at, queued_at = row
        status = RunStatus.QUEUED if queued_at == created_at else RunStatus.DELAYED
        return RunEvent(run_id, 1, None, "status", {"status": status.value}, created_at)

    def log_list(self, run_id: str, limit: int = 10_000) -> list[LogLine]:
        rows = self._all(q.LOG_LIST, {"run_id": run_id, "limit": limit})
        return [LogLine(r[0], "", r[1], r[2], r[3], r[4], r[5]) for r in rows]

    # --- fenced writes during execution ---------------------------------------------------------
    def log_append_many(self, lines: Sequence[LogLine]) -> int:
        if not lines:
            return 0
        cur = self._exec(
            q.LOG_APPEND,
            {
                "run_ids": [ln.run_id for ln in lines],
                "tokens": [ln.lease_token for ln in lines],
                "attempts": [ln.attempt for ln in lines],
                "ts": [float(ln.ts) for ln in lines],
                "levels": [ln.level for ln in lines],
                "messages": [ln.message for ln in lines],
                "attributes": [_dumps(ln.attributes) for ln in lines],
            },
        )
        return max(cur.rowcount, 0)

    def step_append_many(self, steps: Sequence[StepRecord]) -> list[bool]:
        accepted = []
        for st in steps:
            cur = self._exec(
                q.STEP_APPEND,
                {
                    "run_id": st.run_id,
                    "position": st.position,
                    "key": st.key,
                    "name": st.name,
                    "output": st.output,
                    "attempt": st.attempt,
                    "started_at": st.started_at,
                    "finished_at": st.finished_at,
                    "token": st.lease_token,
                },
            )
            accepted.append(cur.rowcount == 1)
        return accepted

    def step_list(self, run_id: str) -> list[StepRecord]:
        return [StepRecord(*r) for r in self._all(q.STEP_LIST, {"run_id": run_id})]

    def metadata_apply(
        self, run_id: str, ops: Sequence[MetadataOp], lease_token: str | None = None
    ) -> dict[str, object] | None:
        guard = q.METADATA_GUARD_LEASED if lease_token else q.METADATA_GUARD
        guard_params: dict[str, Any] = {"id": run_id, "token": lease_token} if lease_token else {"id": run_id}
        row = None
        for op in ops:
            _check_key(op.key)
            params: dict[str, Any] = {"key": op.key}
            if op.op == "set":
                expr = q.METADATA_SET
                params["value"] = json.dumps(op.value)
            elif op.op == "delete":
                expr = q.METADATA_DELETE
            elif op.op == "increment":
                if isinstance(op.value, bool) or not isinstance(op.value, int | float):
                    raise InvalidOptions(f"metadata.increment needs a number, got {op.value!r}")
                expr = q.METADATA_INCREMENT
                params["number"] = op.value
            elif op.op == "append":
                expr = q.METADATA_APPEND
                params["value"] = json.dumps(op.value)
            else:
                raise InvalidOptions(f"unknown metadata operation {op.op!r}")
            row = self._one(q.METADATA_UPDATE.format(expr=expr, guard=guard), {**params, **guard_params})
            if row is None:
                return None
            self._exec(
                q.INSERT_EVENT,
                {
                    "run_id": run_id,
                    "seq": row[1],
                    "attempt": row[2] or None,
                    "kind": "metadata",
                    "data": json.dumps({"op": op.op, "key": op.key, "value": op.value}),
                },
            )
        if row is None:
            found = self._one(q.METADATA_READ.format(guard=guard), guard_params)
            return None if found is None else (found[0] or {})
        return row[0] or {}

    # --- streams and realtime reads --------------------------------------------------------------
    def stream_append_many(self, chunks: Sequence[StreamChunk]) -> list[bool]:
        if not chunks:
            return []
        # One group per run (and lease token), in first-appearance order; chunks keep theirs.
        groups: dict[tuple[str, str], list[int]] = {}
        for i, chunk in enumerate(chunks):
            groups.setdefault((chunk.run_id, chunk.lease_token), []).append(i)
        members = list(groups.values())
        flat = [(g, k, i) for g, indexes in enumerate(members, 1) for k, i in enumerate(indexes, 1)]
        rows = self._all(
            q.STREAM_APPEND,
            {
                "run_ids": [run_id for run_id, _ in groups],
                "tokens": [token for _, token in groups],
                "counts": [len(indexes) for indexes in members],
                "c_groups": [g for g, _, _ in flat],
                "c_ks": [k for _, k, _ in flat],
                "c_run_ids": [chunks[i].run_id for _, _, i in flat],
                "c_attempts": [chunks[i].attempt or None for _, _, i in flat],
                "c_keys": [chunks[i].key for _, _, i in flat],
                "c_data": [chunks[i].data for _, _, i in flat],
                "c_ts": [float(chunks[i].ts) for _, _, i in flat],
            },
        )
        accepted = [False] * len(chunks)
        for (g,) in rows:
            for i in members[g - 1]:
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
        rows = self._all(
            q.RUN_TAG_UNFINISHED if unfinished else q.RUN_TAG_WINDOW,
            {"env": environment, "tag": tag, "min_id": min_id, "ids": list(run_ids)},
        )
        return [(r[0], r[1], r[2]) for r in rows]

    # --- workers --------------------------------------------------------------------------------
    def worker_register(self, worker: WorkerInfo) -> None:
        self._ensure_environment(worker.environment)
        self._exec(
            q.WORKER_UPSERT,
            {
                "id": worker.id,
                "env": worker.environment,
                "host": worker.host,
                "pid": worker.pid,
                "address": worker.address,
                "queues": json.dumps(worker.queues),
                "machine": worker.machine,
                "version": worker.version,
            },
        )
        # Forget workers silent for a day: their runs were recovered long ago.
        self._exec(q.WORKERS_FORGET)

    def worker_deregister(self, worker_id: str) -> None:
        self._exec(q.WORKER_DELETE, {"worker_id": worker_id})

    def worker_list(self, environment: str | None = None, live_within: float = 30.0) -> list[WorkerInfo]:
        rows = self._all(q.WORKER_LIST, {"env": environment, "live_within": float(live_within)})
        return [WorkerInfo(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9]) for r in rows]
