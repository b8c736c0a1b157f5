"""Engine: the single source of truth for a run's life, used in-process by workers, the CLI and apps.

Each public method is one store transaction (so one transition checks the status it comes
from), followed by the wake-ups the change calls for.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import NamedTuple, TypeVar

from conveyor.core.errors import (
    ConveyorError,
    InvalidOptions,
    InvalidTransition,
    RunNotFound,
    StoreConflict,
    TokenNotFound,
    UnknownQueue,
    UnknownTask,
)
from conveyor.core.ids import new_id
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
from conveyor.core.status import RunStatus
from conveyor.engine.notify import CANCEL, DELAYED, WORK, Notifier, QueueWake, parse_address
from conveyor.engine.options import Limits, TriggerOptions, prepare_run
from conveyor.engine.payload_schema import check_payload
from conveyor.store.base import Listener, Store, Tx


class Exchanged(NamedTuple):
    accepted: list[bool]  # per outcome: False when the lease no longer matched
    claimed: list[ClaimedRun]
    steps_accepted: list[bool]  # per step written


MAX_BATCH = 1_000
MAX_BATCH_BYTES = 10 * 1024 * 1024
# Retention from the maintenance loop: one small batch at a time, so no lock is held for long and
# the claim path never waits behind a purge. A full batch means a backlog: the next one follows
# after PURGE_BACKLOG_PAUSE (at most ~PURGE_BATCH runs/s per process); otherwise after
# PURGE_INTERVAL (finished runs age by days, so checking every 5 minutes loses nothing).
PURGE_BATCH = 500
PURGE_INTERVAL = 300.0
PURGE_BACKLOG_PAUSE = 1.0

log = logging.getLogger("conveyor.engine")
T = TypeVar("T")


class Engine:
    def __init__(
        self,
        store: Store,
        environment: str = "dev",
        limits: Limits = Limits(),
        retention_days: float | None = 30.0,
    ) -> None:
        self.store = store
        self.environment = environment
        self.limits = limits
        self.notifier = Notifier(store, environment)
        self.retention_days = retention_days  # None: keep finished runs forever
        self._purge_at = 0.0  # store-clock time of the next retention batch
        self._known_queues: set[str] = set()

    @property
    def now(self) -> float:
        return self.store.clock.now()

    # --- registry -----------------------------------------------------------------------------
    def register(self, tasks: Sequence[TaskRecord], queues: Sequence[QueueSpec]) -> None:
        with self.store.transaction() as tx:
            tx.task_upsert_many(self.environment, tasks)
            tx.queue_upsert_many(self.environment, queues)

    def task(self, task_id: str) -> TaskRecord:
        with self.store.read() as tx:
            record = tx.task_get(self.environment, task_id)
        if record is None:
            raise UnknownTask(
                f"no task {task_id!r} is registered in environment {self.environment!r} "
                "(start a worker that imports it, or check the id)"
            )
        return record

    def tasks(self) -> list[TaskRecord]:
        with self.store.read() as tx:
            return tx.task_list(self.environment)

    # --- trigger --------------------------------------------------------------------------------
    def prepare(self, task: TaskRecord, payload_json: str, options: TriggerOptions, **derived: object) -> NewRun:
        return prepare_run(task, payload_json, options, self.now, self.limits, **derived)  # type: ignore[arg-type]

    def trigger_by_id(
        self, task_id: str, payload_json: str, options: TriggerOptions, connection: object = None, **derived: object
    ) -> tuple[str, bool]:
        """Trigger a task known only from the registry (no code imported)."""
        task = self.task(task_id)
        check_payload(task_id, task.payload_schema, payload_json)
        if options.queue and options.queue != task.queue:
            self.check_queue(options.queue)
        return self.insert([self.prepare(task, payload_json, options, **derived)], connection)[0]

    def check_queue(self, name: str) -> None:
        """Raise UnknownQueue unless a queue of that name exists. Queues are not deleted, so a
        name found once is remembered (a batch with a queue override reads the store once)."""
        if name in self._known_queues:
            return
        with self.store.read() as tx:
            known = tx.queue_get(self.environment, name) is not None or any(
                t.queue == name for t in tx.task_list(self.environment)
            )
        if not known:
            raise UnknownQueue(f"no queue {name!r} in environment {self.environment!r}")
        self._known_queues.add(name)

    def insert(self, runs: Sequence[NewRun], connection: object = None) -> list[tuple[str, bool]]:
        """Insert prepared runs atomically; -> (run id, created) in input order. With a
        `connection` (the caller's, to the same database, inside its open transaction) the runs
        exist iff the caller commits (SPEC §2, transactional enqueue)."""
        if len(runs) > MAX_BATCH:
            raise InvalidOptions(f"a batch takes at most {MAX_BATCH:,} items, got {len(runs):,}")
        if len(runs) > 1:
            size = sum(len(r.payload) for r in runs)
            if size > MAX_BATCH_BYTES:
                raise InvalidOptions(f"a batch takes at most {MAX_BATCH_BYTES:,} bytes of payload, got {size:,}")
            batch_id = new_id("batch")
            for r in runs:
                r.batch_id = r.batch_id or batch_id
        if connection is not None:
            with self.store.transaction_on(connection) as tx:
                results = tx.run_insert_many(self.environment, runs)
                # PostgreSQL: NOTIFY at the caller's commit. SQLite: no datagram can wait for
                # a commit made by someone else; workers notice it by their fallback check.
                self._wake(tx, _insert_wakes(runs, results))
            return results
        with self.store.transaction() as tx:
            results = tx.run_insert_many(self.environment, runs)
            unsent = self._wake(tx, _insert_wakes(runs, results))
        self._send(unsent)
        return results

    # --- worker side ------------------------------------------------------------------------------
    def claim(self, request: ClaimRequest) -> list[ClaimedRun]:
        with self.store.transaction() as tx:
            return tx.run_claim(request)

    def exchange(
        self,
        outcomes: Sequence[Outcome],
        logs: Sequence[LogLine],
        claim: ClaimRequest | None,
        metadata: Sequence[tuple[str, str | None, list[MetadataOp]]] = (),
        steps: Sequence[StepRecord] = (),
        chunks: Sequence[StreamChunk] = (),
    ) -> Exchanged:
        """A worker's hot path in one transaction: log lines, metadata, stream chunks and completed
        steps, then outcomes (so a run's last writes land before it finishes), then new claims.
        Metadata without a lease token is another run's (metadata.parent / .root): unfenced."""
        return _rerun_on_conflict(lambda: self._exchange(outcomes, logs, claim, metadata, steps, chunks))

    def _exchange(
        self,
        outcomes: Sequence[Outcome],
        logs: Sequence[LogLine],
        claim: ClaimRequest | None,
        metadata: Sequence[tuple[str, str | None, list[MetadataOp]]],
        steps: Sequence[StepRecord],
        chunks: Sequence[StreamChunk],
    ) -> Exchanged:
        with self.store.transaction() as tx:
            if logs:
                tx.log_append_many(logs)
            # By run id (stable: one run's operations keep their order), so two workers updating
            # the same parents lock them in the same order.
            for run_id, lease_token, ops in sorted(metadata, key=lambda m: m[0]):
                tx.metadata_apply(run_id, ops, lease_token)
            if chunks:
                tx.stream_append_many(chunks)
            steps_accepted = tx.step_append_many(steps) if steps else []
            accepted = tx.run_settle_many(self.environment, outcomes) if outcomes else []
            stops = []
            for run_id in tx.cancel_pending:  # canceled while suspending: what it waits for too
                stops += self._stop_wakes(tx, self._cancel_tree(tx, run_id)[1])
            claimed = tx.run_claim(claim) if claim is not None and claim.limit > 0 else []
            unsent = self._wake(tx, _settle_wakes([o for o, ok in zip(outcomes, accepted, strict=True) if ok], tx))
        self._send_stops(stops)
        self._send(unsent)
        return Exchanged(accepted, claimed, steps_accepted)

    def steps(self, run_id: str) -> list[StepRecord]:
        """A run's step journal, in call order."""
        with self.store.read() as tx:
            return tx.step_list(run_id)

    def journal(self, run_id: str) -> Journal:
        """What a replay of the run needs: its steps and the state of its waits."""
        with self.store.read() as tx:
            return tx.journal(run_id)

    # --- durable waits ----------------------------------------------------------------------------
    def apply_wait(self, request: WaitRequest, lease_token: str) -> list[str] | None:
        """A wait request that does not suspend the run (create_token, a trigger inside a run),
        in a transaction of its own, fenced by the run's lease. -> the ids of the runs it
        started (an idempotency key may give an existing one); None if the lease is gone."""
        with self.store.transaction() as tx:
            started = tx.wait_apply(request, lease_token)
            unsent = self._wake(tx, [WORK] if started else [])
        self._send(unsent)
        return started

    def create_waitpoints(self, waitpoints: Sequence[NewWaitpoint]) -> None:
        """Waitpoints made outside any run (a token an app creates)."""
        with self.store.transaction() as tx:
            tx.waitpoint_create(self.environment, waitpoints)
            unsent = self._wake(tx, [DELAYED] if any(w.due(0.0) is not None for w in waitpoints) else [])
        self._send(unsent)

    def waitpoint(self, waitpoint_id: str) -> WaitState:
        with self.store.read() as tx:
            state = tx.waitpoint_get(self.environment, waitpoint_id)
        if state is None:
            raise TokenNotFound(f"no waitpoint {waitpoint_id!r} in environment {self.environment!r}")
        return state

    def complete_token(self, token_id: str, output_json: str) -> bool:
        """Complete a token: the runs waiting for it resume. False if it was already completed
        or timed out (nothing changes); TokenNotFound if there is no such token."""
        return _rerun_on_conflict(lambda: self._complete_token(token_id, output_json))

    def _complete_token(self, token_id: str, output_json: str) -> bool:
        with self.store.transaction() as tx:
            done = tx.token_complete(self.environment, token_id, output_json)
            unsent = self._wake(tx, [WORK] if tx.resumed_queues else [])
        if done is None:
            raise TokenNotFound(f"no token {token_id!r} in environment {self.environment!r}")
        self._send(unsent)
        return done

    def heartbeat(self, worker_id: str, lease_seconds: float, run_ids: Sequence[str]) -> HeartbeatResult:
        with self.store.transaction() as tx:
            return tx.run_heartbeat(worker_id, lease_seconds, run_ids)

    def cancel_requested(self, worker_id: str) -> list[str]:
        with self.store.read() as tx:
            return tx.run_cancel_requested(worker_id)

    def register_worker(self, worker: WorkerInfo) -> None:
        with self.store.transaction() as tx:
            tx.worker_register(worker)

    def deregister_worker(self, worker_id: str) -> None:
        with self.store.transaction() as tx:
            tx.worker_deregister(worker_id)

    def workers(self) -> list[WorkerInfo]:
        with self.store.read() as tx:
            return tx.worker_list(self.environment)

    def maintain(self, since: float | None = None) -> MaintenanceResult:
        """Time-driven transitions. `since`: when the caller last ran it, to notice retries
        that became due in between (they need a wake-up, not a transition)."""
        with self.store.transaction() as tx:
            result = tx.run_maintain(since=since)
            due = result.promoted or result.recovered or result.became_due or tx.resumed_queues
            unsent = self._wake(tx, [WORK] if due else [])
        self._send(unsent)
        self._retain()
        return result

    # --- retention ------------------------------------------------------------------------------
    def purge(self, older_than_days: float, limit: int | None = None) -> int:
        """Delete one batch (default PURGE_BATCH) of runs finished more than `older_than_days` ago,
        in a transaction of its own. -> runs deleted."""
        with self.store.transaction() as tx:
            return tx.run_purge(self.now - older_than_days * 86400.0, limit or PURGE_BATCH)

    def _retain(self) -> None:
        """At most one retention batch per maintenance pass, and only when due (see PURGE_INTERVAL).
        A failure is logged and tried again later: it must never hold up maintenance."""
        if self.retention_days is None or self.now < self._purge_at:
            return
        try:
            purged = self.purge(self.retention_days)
        except ConveyorError as exc:
            log.warning("retention: purge failed, trying again later: %s", exc)
            purged = 0
        self._purge_at = self.now + (PURGE_BACKLOG_PAUSE if purged >= PURGE_BATCH else PURGE_INTERVAL)

    # --- wake-ups -------------------------------------------------------------------------------
    def _wake(self, tx: Tx, messages: Sequence[object], worker_id: str | None = None) -> list[bytes]:
        """Wake-ups the database delivers when `tx` commits (PostgreSQL NOTIFY); -> the ones
        left for datagrams after the commit (SQLite). `messages`: bytes (engine.notify), or a
        `QueueWake`, which goes to its queue's workers where the Tx can address them
        (PostgreSQL's `wake_queue`) and is a plain WORK elsewhere."""
        wake_queue = getattr(tx, "wake_queue", None)
        unsent: list[bytes] = []
        for m in messages:
            if isinstance(m, QueueWake):
                if (
                    wake_queue is not None
                    and worker_id is None
                    and wake_queue(self.environment, m.queue, m.runs, m.machine, m.version)
                ):
                    continue
                message = m.message
            elif isinstance(m, bytes):
                message = m
            else:
                raise TypeError(f"not a wake-up: {m!r}")
            if message not in unsent and not tx.wake(self.environment, message, worker_id):
                unsent.append(message)
        return unsent

    def _send(self, messages: Sequence[bytes]) -> None:
        for message in messages:
            self.notifier.wake_workers(message)

    def listen(self, worker_id: str, address: str) -> Listener | None:
        """Forward the wake-ups the database pushes to this worker (PostgreSQL LISTEN) to its
        wake socket at `address`. None where producers send the datagrams themselves (SQLite).
        The worker tells the listener what it serves, and how its targeted wake-ups went,
        through `self.notifier.idle` (engine.notify)."""
        target = parse_address(address)
        if target is None:
            return None
        every = [target]

        def deliver(message: bytes | None) -> None:
            # None: some may have been missed (the connection was lost): check everything.
            if message is None:
                for m in (WORK, DELAYED, CANCEL):
                    self.notifier.send(every, m)
            else:
                self.notifier.send(every, message)

        listener = self.store.listen(self.environment, worker_id, deliver)
        if listener is not None:
            self.notifier.attach(worker_id, listener)
        return listener

    # --- runs API -------------------------------------------------------------------------------
    def retrieve(self, run_id: str) -> Run:
        with self.store.read() as tx:
            run = tx.run_get(self.environment, run_id)
        if run is None:
            raise RunNotFound(f"no run {run_id!r} in environment {self.environment!r}")
        return run

    def list_runs(self, flt: RunFilter) -> list[Run]:
        with self.store.read() as tx:
            return tx.run_list(self.environment, flt)

    def attempts(self, run_id: str) -> list[Attempt]:
        with self.store.read() as tx:
            return tx.attempt_list(run_id)

    def events(self, run_id: str, after_seq: int = 0) -> list[RunEvent]:
        with self.store.read() as tx:
            return tx.event_list(run_id, after_seq)

    def logs(self, run_id: str) -> list[LogLine]:
        with self.store.read() as tx:
            return tx.log_list(run_id)

    def cancel(self, run_id: str) -> Run:
        """QUEUED, DELAYED, WAITING: CANCELED at once. EXECUTING: its worker is told to stop the
        code and confirms; the run keeps its slots until then. Finished: unchanged. The cancel
        cascades to the unfinished children the run waits for (trigger_and_wait), and theirs."""
        return _rerun_on_conflict(lambda: self._cancel(run_id))

    def _cancel(self, run_id: str) -> Run:
        with self.store.transaction() as tx:
            result, stopping = self._cancel_tree(tx, run_id)
            stops = self._stop_wakes(tx, stopping)
            resumed = self._wake(tx, [WORK] if tx.resumed_queues else [])
        self._send_stops(stops)
        self._send(resumed)
        return result.run

    def _cancel_tree(self, tx: Tx, run_id: str) -> tuple[CancelResult, list[CancelResult]]:
        """Cancel a run and the unfinished children it waits for, and theirs. -> the run's
        result, and the results of the executing runs whose workers must stop their code."""
        result = tx.run_cancel(self.environment, run_id)
        stopping = [result] if result.stopping else []
        pending = tx.run_children_waited(run_id)
        while pending:
            child = tx.run_cancel(self.environment, pending.pop())
            if child.stopping:
                stopping.append(child)
            pending += tx.run_children_waited(child.run.id)
        return result, stopping

    def _stop_wakes(self, tx: Tx, stopping: Sequence[CancelResult]) -> list[tuple[str | None, bytes]]:
        """Cancel wake-ups for the workers holding `stopping`: by the database at commit
        (PostgreSQL), else (address, message) datagrams to send after it."""
        return [(r.worker_address, m) for r in stopping for m in self._wake(tx, [CANCEL], r.run.worker_id)]

    def _send_stops(self, stops: Sequence[tuple[str | None, bytes]]) -> None:
        for address, message in stops:
            target = parse_address(address)
            if target:
                self.notifier.send([target], message)

    def replay(self, run_id: str) -> str:
        """A new run of the same task with the same payload and options (no idempotency key)."""
        old = self.retrieve(run_id)
        new = NewRun(
            id=new_id("run"),
            task_id=old.task_id,
            queue=old.queue,
            payload=json.dumps(old.payload, separators=(",", ":")),
            status=RunStatus.QUEUED,
            available_at=self.now,
            max_attempts=old.max_attempts,
            retry=None if old.retry is None else json.dumps(old.retry),
            priority=old.priority,
            ttl=old.ttl,
            max_duration=old.max_duration,
            concurrency_key=old.concurrency_key,
            key_limit=old.key_limit,
            queue_slot=old.queue_slot,
            tags=old.tags,
            metadata=json.dumps(old.metadata) if old.metadata else None,
            machine=old.machine,
            version=old.version,
        )
        return self.insert([new])[0][0]

    def reschedule(self, run_id: str, delay: float | datetime) -> Run:
        if isinstance(delay, datetime):
            if delay.tzinfo is None:
                raise InvalidOptions("reschedule to a datetime needs a timezone-aware datetime")
            when = delay.timestamp()
        elif isinstance(delay, int | float) and not isinstance(delay, bool) and delay >= 0:
            when = self.now + float(delay)
        else:
            raise InvalidOptions(f"delay must be seconds >= 0 or a datetime, got {delay!r}")
        with self.store.transaction() as tx:
            run = tx.run_reschedule(self.environment, run_id, when)
        return run

    def wait(self, run_id: str, timeout: float | None = None, poll: float = 0.002) -> Run:
        """Block until the run is finished. Polls with growing intervals (2 ms .. 100 ms)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            run = self.retrieve(run_id)
            if run.status.finished:
                return run
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {run_id} is still {run.status.value} after {timeout} s")
            time.sleep(poll)
            poll = min(poll * 1.5, 0.1)

    # --- queues ---------------------------------------------------------------------------------
    def queues(self) -> list[QueueInfo]:
        with self.store.read() as tx:
            return tx.queue_list(self.environment)

    def queue(self, name: str) -> QueueInfo:
        with self.store.read() as tx:
            info = tx.queue_get(self.environment, name)
        if info is None:
            raise UnknownQueue(f"no queue {name!r} in environment {self.environment!r}")
        return info

    def set_paused(self, name: str, paused: bool) -> QueueInfo:
        self.queue(name)  # raises UnknownQueue
        with self.store.transaction() as tx:
            info = tx.queue_set_paused(self.environment, name, paused)
            unsent = self._wake(tx, [] if paused else [WORK])
        if info is None:  # pragma: no cover - the row was just written
            raise InvalidTransition(f"queue {name!r} vanished")
        self._send(unsent)
        return info


def _rerun_on_conflict(body: Callable[[], T], attempts: int = 3) -> T:
    """Run a transaction again when the database aborted it to break a deadlock (PostgreSQL,
    between transactions that lock several runs and waitpoints at once): nothing of it was
    written, and the body is a function of its arguments and the store."""
    for _ in range(attempts - 1):
        try:
            return body()
        except StoreConflict as exc:
            log.info("transaction aborted by a conflict, running it again: %s", exc)
    return body()


def _settle_wakes(settled: Sequence[Outcome], tx: Tx) -> list[bytes]:
    """What accepted outcomes wake workers for."""
    wakes = []
    kinds = {o.kind for o in settled}
    children = any(r for o in settled for w in o.waits for r in w.runs)
    if OutcomeKind.RELEASED in kinds or tx.resumed_queues or children:  # work for someone, now
        wakes.append(WORK)
    timers = any(p.due(0.0) is not None for o in settled for w in o.waits for p in w.create)
    if OutcomeKind.RETRY in kinds or timers:  # work later: workers re-plan their maintenance timers
        wakes.append(DELAYED)
    return wakes


def _insert_wakes(runs: Sequence[NewRun], results: Sequence[tuple[str, bool]]) -> list[object]:
    """What an insert wakes workers for: the queues of the runs made QUEUED (a QueueWake per
    queue, saying how many runs), and timers to re-plan (runs made DELAYED)."""
    queued: dict[str, list[NewRun]] = {}
    delayed = False
    for run, (_, created) in zip(runs, results, strict=True):
        if not created:
            continue
        if run.status is RunStatus.QUEUED:
            queued.setdefault(run.queue, []).append(run)
        elif run.status is RunStatus.DELAYED:
            delayed = True
    wakes: list[object] = [QueueWake(q, len(rs), rs[0].machine, rs[0].version) for q, rs in queued.items()]
    if delayed:
        wakes.append(DELAYED)
    return wakes
