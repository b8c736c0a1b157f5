"""The worker loop.

One asyncio loop claims runs and executes them; one store thread does every transaction of
the hot path (settle finished runs + claim new ones, in one commit when both are pending);
one heartbeat thread renews leases, never behind the loop or user code (DECISIONS.md).
Async tasks run on the loop; sync tasks run in a pool of child processes that can be stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from conveyor.core.backoff import RetryPolicy
from conveyor.core.errors import ConveyorError, StoreError
from conveyor.core.ids import new_id
from conveyor.core.records import (
    DEFAULT_MACHINE,
    ClaimedRun,
    ClaimRequest,
    HeartbeatResult,
    Journal,
    LogLine,
    MetadataOp,
    Outcome,
    OutcomeKind,
    StepRecord,
    StreamChunk,
    TaskRecord,
    WorkerInfo,
)
from conveyor.core.status import RunStatus
from conveyor.engine import Engine
from conveyor.engine.notify import CANCEL, DELAYED, WakeSocket
from conveyor.sdk import context, logs
from conveyor.sdk.context import Execution
from conveyor.sdk.serde import error_dict
from conveyor.sdk.steps import load_journal
from conveyor.sdk.task import Task
from conveyor.worker.attempt import (
    CANCELED,
    LEASE_LOST,
    RELEASED,
    TIMED_OUT,
    StopExecution,
    build_context,
    run_attempt,
)
from conveyor.worker.pool import SyncPool, synthesized

log = logging.getLogger("conveyor.worker")
T = TypeVar("T")
MAINTAIN_GAP = 0.005  # seconds between two timer-driven maintenance passes, at least


@dataclass
class WorkerOptions:
    concurrency: int = 10
    queues: list[str] | None = None  # None: the queues of the worker's tasks
    machine: str = DEFAULT_MACHINE
    version: str | None = None
    lease: float = 30.0
    renew: float = 10.0
    poll: float = 1.0  # fallback check for missed wake-ups (PRAGMA data_version)
    shutdown_grace: float = 30.0
    sync_mode: str = "process"  # "process": stoppable pool children; "thread": cannot be stopped
    modules: list[str] = field(default_factory=list)
    log_level: int = logging.INFO
    database_url: str | None = None
    max_step_bytes: int = 1024 * 1024

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConveyorError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.sync_mode not in ("process", "thread"):
            raise ConveyorError("sync_mode must be 'process' or 'thread'")
        if not 0 < self.renew < self.lease:
            raise ConveyorError("renew must be positive and shorter than the lease")


@dataclass
class _Running:
    run: ClaimedRun
    task: Task[Any, Any]
    claimed_at: float
    future: asyncio.Future[Any] | None = None
    stopper: asyncio.Future[str] | None = None
    reason: str | None = None
    timer: asyncio.TimerHandle | None = None


class _LocalChannel:
    """A run's channel on the worker's own loop: writes join the next store transaction."""

    def __init__(self, worker: Worker, run: ClaimedRun) -> None:
        self.worker = worker
        self.run = run

    def log(self, level: str, message: str, attributes: dict[str, Any] | None, ts: float) -> None:
        self.worker._add_log(self.run, level, message, attributes, ts)

    def metadata(self, ops: list[MetadataOp], run_id: str | None = None) -> None:
        self.worker._add_metadata(self.run, ops, run_id)

    def stream(self, key: str, chunk: str, ts: float) -> None:
        self.worker._add_chunk(StreamChunk(self.run.id, self.run.lease_token, self.run.attempt, key, chunk, ts))

    async def load_journal(self) -> Journal:
        """The run's journal. A store that does not answer (a database restart) is asked again,
        for as long as the run is ours: once it is stopped (its lease renewals stalled too, a
        cancel) this raises StopExecution with the reason, and the run is settled as stopped."""
        pause = 0.1
        while True:
            try:
                return await self.worker._store(self.worker.engine.journal, self.run.id)
            except StoreError as exc:
                log.error("store error, retrying: the journal of run %s: %s", self.run.id, exc)
            entry = self.worker.running.get(self.run.id)
            reason = RELEASED if entry is None else entry.reason
            if reason is not None:
                raise StopExecution(reason)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    async def save_step(self, step: StepRecord) -> None:
        step.lease_token = self.run.lease_token
        if not await self.worker._add_step(step):
            raise StopExecution(LEASE_LOST)  # the run is someone else's now: stop its code

    # Sync tasks in thread mode call these from their thread; the work happens on the loop.
    def load_journal_sync(self) -> Journal:
        return self._on_loop(self.load_journal())

    def save_step_sync(self, step: StepRecord) -> None:
        self._on_loop(self.save_step(step))

    def _on_loop(self, coro: Any) -> Any:
        loop = self.worker._loop
        assert loop is not None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coro.close()
            raise ConveyorError("step_sync would block the worker's event loop: use `await conveyor.step(...)`")
        return asyncio.run_coroutine_threadsafe(coro, loop).result()


class Worker:
    def __init__(self, engine: Engine, tasks: list[Task[Any, Any]], options: WorkerOptions | None = None) -> None:
        if not tasks:
            raise ConveyorError("a worker needs at least one task (check --modules)")
        self.engine = engine
        self.options = options or WorkerOptions()
        self.tasks = {t.id: t for t in tasks}
        self.id = new_id("worker")
        served = list(dict.fromkeys(t.queue.name for t in tasks))
        if self.options.queues:
            unknown = [q for q in self.options.queues if q not in served]
            if unknown:
                log.warning("no task of this worker uses queue(s) %s", ", ".join(unknown))
            served = [q for q in self.options.queues if q in served]
        self.queues = served
        self.task_ids = [t.id for t in tasks if t.queue.name in served]
        self.running: dict[str, _Running] = {}
        self._outcomes: list[Outcome] = []
        self._logs: list[LogLine] = []
        self._metadata: list[tuple[str, str | None, list[MetadataOp]]] = []
        self._chunks: list[StreamChunk] = []
        self._steps: list[tuple[StepRecord, asyncio.Future[bool]]] = []  # resolved when committed
        self._settling: set[str] = set()  # finished here, outcome not committed yet
        self._claim_wanted = True
        self._check_cancels = False
        self._maintain_at = 0.0
        self._maintained_at = float("-inf")  # loop time of the last maintenance pass
        self._last_maintain: float | None = None
        self._stopping = False
        self._release_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._store_thread = ThreadPoolExecutor(1, thread_name_prefix="conveyor-store")
        self._heartbeat_stop = threading.Event()
        self._last_renewal = time.monotonic()
        self._rotation = 0
        self._change_token: int | None = None
        self._pool: SyncPool | None = None
        self.started = threading.Event()
        self.stats = {"claimed": 0, "settled": 0}

    # --- public ---------------------------------------------------------------------------------
    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        logs.install_capture()
        wake_socket = WakeSocket()
        self._loop.add_reader(wake_socket.fileno(), self._on_datagram, wake_socket)
        # PostgreSQL: LISTEN/NOTIFY wake-ups, forwarded to the socket (None on SQLite).
        listener = await self._store(self.engine.listen, self.id, wake_socket.address)
        prewarm: asyncio.Future[None] | None = None
        records = [self.engine_task_record(t) for t in self.tasks.values()]
        await self._store(self.engine.register, records, [t.queue_spec() for t in self.tasks.values()])
        await self._store(
            self.engine.register_worker,
            WorkerInfo(
                id=self.id,
                environment=self.engine.environment,
                host=socket.gethostname(),
                pid=os.getpid(),
                address=wake_socket.address,
                queues=self.queues,
                machine=self.options.machine,
                version=self.options.version,
                started_at=0.0,
                last_seen_at=0.0,
            ),
        )
        self.engine.notifier.forget()
        if any(not t.is_async for t in self.tasks.values()) and self.options.sync_mode == "process":
            self._pool = SyncPool(self._child_settings(), self.options.modules)
            # Start the first child in the background: async runs need not wait for it.
            prewarm = self._loop.run_in_executor(None, self._pool.prewarm)
        self._last_renewal = time.monotonic()
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="conveyor-heartbeat", daemon=True)
        heartbeat.start()
        self.started.set()
        try:
            await self._main_loop()
        finally:
            self._heartbeat_stop.set()
            if listener is not None:
                listener.close()
            self._loop.remove_reader(wake_socket.fileno())
            wake_socket.close()
            with contextlib.suppress(Exception):
                await self._store(self.engine.deregister_worker, self.id)
            if self._pool is not None:
                if prewarm is not None:
                    with contextlib.suppress(Exception):
                        await prewarm
                await asyncio.to_thread(self._pool.close)
            self._store_thread.shutdown(wait=True)
            heartbeat.join(timeout=5)

    def request_stop(self, grace: float | None = None) -> None:
        """Graceful: stop claiming, let running code finish within the grace period, then hand
        the rest back (QUEUED, no attempt spent) so other workers take them at once."""
        if self._loop is None:
            return
        grace = self.options.shutdown_grace if grace is None else grace

        def stop() -> None:
            deadline = time.monotonic() + grace
            self._stopping = True
            self._release_at = deadline if self._release_at is None else min(self._release_at, deadline)
            self._poke()

        self._call_soon(stop)

    def engine_task_record(self, task: Task[Any, Any]) -> TaskRecord:
        """The registry row this worker writes: the client's record (project defaults applied),
        under the version it serves. A copy: the client's cached record is shared with triggers."""
        from conveyor.sdk.client import get_client

        record = get_client().task_record(task)
        return replace(record, version=self.options.version) if self.options.version else record

    # --- the loop -------------------------------------------------------------------------------
    async def _main_loop(self) -> None:
        assert self._wake is not None and self._loop is not None
        while True:
            self._wake.clear()
            if self._stopping:
                if self._release_at is not None and time.monotonic() >= self._release_at:
                    for run_id in list(self.running):
                        self._stop(run_id, RELEASED)
                    self._release_at = float("inf")
                if not self.running and not self._has_writes():
                    return
            if self.running and self._renewals_stale():
                # Renewals have failed (or hang) for 2/3 of the lease: stop the code ourselves
                # before the lease expires and another worker may claim these runs.
                # Hand them back (fenced: refused if the lease is really gone).
                log.error("leases not renewed for %.1f s; stopping running code", self.options.lease * 2 / 3)
                self._stop_all(RELEASED)
            if self._check_cancels:
                self._check_cancels = False
                for run_id in await self._store(self.engine.cancel_requested, self.id):
                    self._stop(run_id, CANCELED)
            if self._loop.time() >= self._maintain_at:
                await self._maintain()
            claim = self._claim_request()
            if claim is not None or self._has_writes():
                await self._exchange(claim)
                continue
            await self._idle()

    def _claim_request(self) -> ClaimRequest | None:
        free = self.options.concurrency - len(self.running)
        if self._stopping or free <= 0 or not self._claim_wanted or self._renewals_stale():
            return None
        self._rotation = (self._rotation + 1) % len(self.queues)
        queues = self.queues[self._rotation :] + self.queues[: self._rotation]
        return ClaimRequest(
            environment=self.engine.environment,
            worker_id=self.id,
            queues=queues,
            task_ids=self.task_ids,
            limit=free,
            lease_seconds=self.options.lease,
            machine=self.options.machine,
            version=self.options.version,
        )

    def _has_writes(self) -> bool:
        return bool(self._outcomes or self._logs or self._metadata or self._steps or self._chunks)

    async def _exchange(self, claim: ClaimRequest | None) -> None:
        outcomes, self._outcomes = self._outcomes, []
        lines, self._logs = self._logs, []
        metadata, self._metadata = self._metadata, []
        chunks, self._chunks = self._chunks, []
        steps, self._steps = self._steps, []
        self._claim_wanted = False
        try:
            result = await self._store(
                self.engine.exchange, outcomes, lines, claim, metadata, [record for record, _ in steps], chunks
            )
        except Exception as exc:
            # Keep every write: nothing reported may be lost. Try again shortly.
            log.error("store error, retrying: %s", exc)
            self._outcomes[:0], self._logs[:0], self._metadata[:0] = outcomes, lines, metadata
            self._chunks[:0] = chunks
            self._steps[:0] = steps
            self._claim_wanted = claim is not None
            await asyncio.sleep(0.2)
            return
        accepted, claimed = result.accepted, result.claimed
        for (_, done), ok in zip(steps, result.steps_accepted, strict=True):
            if not done.done():
                done.set_result(ok)
        self._settling.difference_update(o.run_id for o in outcomes)
        for outcome, ok in zip(outcomes, accepted, strict=True):
            if ok and outcome.kind == OutcomeKind.RETRY and outcome.retry_at is not None:
                # Wake when the retry is due (maintenance notices it and claims it).
                self._maintain_by(outcome.retry_at)
            if ok and outcome.kind == OutcomeKind.SUSPENDED:
                for request in outcome.waits:  # timers: wake when due, to resume the run at once
                    for waitpoint in request.create:
                        due = waitpoint.due(self.engine.now)
                        if due is not None:
                            self._maintain_by(due)
            if not ok:
                log.warning("run %s: outcome refused, the lease was lost (another worker may own it)", outcome.run_id)
        self.stats["settled"] += len(outcomes)
        self.stats["claimed"] += len(claimed)
        for run in claimed:
            self._start(run)
        if claim is not None and len(claimed) >= claim.limit:
            self._claim_wanted = True  # there may be more
        if outcomes:
            self._claim_wanted = True  # freed slots may admit runs a limit held back

    async def _idle(self) -> None:
        assert self._wake is not None and self._loop is not None
        # Tell the LISTEN session (PostgreSQL) whether this worker can take a run now, and how
        # the targeted wake-ups it read went: one it could not serve goes to the other workers.
        # Wholly idle (no code of ours running that could hold up this loop), lend it a claim
        # to make itself on the next wake-up for work (engine.notify.ClaimLoan).
        free = self.options.concurrency - len(self.running)
        able = free > 0 and not self._stopping and not self._renewals_stale()
        loan = None
        if able and not self.running and self.engine.notifier.lends(self.id):
            self._rotation = (self._rotation + 1) % len(self.queues)
            request = ClaimRequest(
                environment=self.engine.environment,
                worker_id=self.id,
                queues=self.queues[self._rotation :] + self.queues[: self._rotation],
                task_ids=self.task_ids,
                limit=free,
                lease_seconds=self.options.lease,
                machine=self.options.machine,
                version=self.options.version,
            )
            loan = self.engine.notifier.loan(lambda: self.engine.claim(request), free, self._loop, self._poke)
        self.engine.notifier.idle(
            self.id,
            self.queues,
            self.task_ids,
            self.options.machine,
            self.options.version,
            able,
            self._claim_wanted,
            self.stats["claimed"],
            loan,
        )
        timeout = min(self.options.poll, max(0.0, self._maintain_at - self._loop.time()))
        if self._stopping and self._release_at is not None and self._release_at != float("inf"):
            timeout = min(timeout, max(0.0, self._release_at - time.monotonic()))
        timed_out = False
        try:
            async with asyncio.timeout(timeout):  # no task of its own, unlike wait_for
                await self._wake.wait()
        except TimeoutError:
            timed_out = True
        if loan is not None and not loan.revoke():  # the LISTEN thread claimed: wait, then start
            await loan.done
            if loan.error is not None:
                log.error("store error, retrying: %s", loan.error)
            self.stats["claimed"] += len(loan.claimed)
            for run in loan.claimed:
                self._start(run)
            if loan.error is not None or len(loan.claimed) >= loan.limit:
                self._claim_wanted = True  # there may be more
        if timed_out:
            try:
                token = await self._store(self.engine.store.change_token)
            except Exception as exc:  # the store is unreachable (a database restart): not fatal
                log.error("store error, retrying: %s", exc)
                self._claim_wanted = True  # look for work once it answers again
                return
            if token != self._change_token:
                self._change_token = token
                self._claim_wanted = True

    async def _maintain(self) -> None:
        assert self._loop is not None
        now = self.engine.now
        try:
            result = await self._store(self.engine.maintain, self._last_maintain)
        except Exception as exc:
            log.error("maintenance failed: %s", exc)
            self._maintain_at = self._loop.time() + 1.0
            return
        self._last_maintain = now
        self._maintained_at = self._loop.time()
        self._maintain_at = self._maintained_at + 5.0
        if result.next_due is not None:
            self._maintain_by(result.next_due)
        if result.promoted or result.recovered or result.became_due or result.resumed:
            self._claim_wanted = True

    # --- executing ------------------------------------------------------------------------------
    def _start(self, run: ClaimedRun) -> None:
        assert self._loop is not None
        task = self.tasks[run.task_id]
        entry = _Running(run=run, task=task, claimed_at=time.monotonic())
        self.running[run.id] = entry
        if task.is_async or self.options.sync_mode == "thread":
            self._start_timer(entry)
        entry.future = asyncio.ensure_future(self._execute(entry))

    def _start_timer(self, entry: _Running) -> None:
        """max_duration counts from when the code starts."""
        assert self._loop is not None
        if entry.run.max_duration and entry.run.id in self.running:
            remaining = max(0.0, entry.run.max_duration - entry.run.executed_seconds)
            entry.timer = self._loop.call_later(remaining, self._stop, entry.run.id, TIMED_OUT)

    async def _execute(self, entry: _Running) -> None:
        run, task = entry.run, entry.task
        outcome: Outcome | None
        try:
            if task.is_async or self.options.sync_mode == "thread":
                outcome = await self._execute_here(entry)
            else:
                assert self._pool is not None and self._loop is not None
                entry.stopper = self._loop.create_future()
                if entry.reason is not None:
                    entry.stopper.set_result(entry.reason)
                outcome = await self._pool.run(
                    run, _LocalChannel(self, run), entry.stopper, lambda: self._start_timer(entry)
                )
        except asyncio.CancelledError:
            if entry.reason is None:
                raise  # the worker itself is being torn down
            # `_stop` cancelled it before run_attempt took over (a replay's journal was loading):
            # settle it as stopped, or it would stay held, its lease renewed, and never run.
            outcome = synthesized(run, entry.reason)
        except Exception as exc:  # a Conveyor fault, never user code: report it, keep going
            log.exception("run %s: executing failed inside the worker", run.id)
            outcome = Outcome(
                run.id,
                run.lease_token,
                OutcomeKind.FAILED,
                error=error_dict(exc, "SYSTEM_FAILURE"),
                status=RunStatus.SYSTEM_FAILURE,
            )
        self._finish(entry, outcome)

    async def _execute_here(self, entry: _Running) -> Outcome | None:
        run, task = entry.run, entry.task
        ctx = build_context(task, run, self.engine.environment)
        execution = Execution(
            ctx=ctx,
            channel=_LocalChannel(self, run),
            metadata=dict(run.metadata),
            log_level=self.options.log_level,
            max_step_bytes=self.options.max_step_bytes,
            lease_token=run.lease_token,
            sync=not task.is_async,
        )
        token = context.enter(execution)
        try:
            if run.attempt > 1 or run.segment > 1:  # a replay: know it from the first line of code
                try:
                    await load_journal(execution)
                except StopExecution as stop:  # stopped before its code began
                    return synthesized(run, stop.reason)
            if task.is_async:
                call = _caller(task, ctx)
            else:

                def call(payload: Any) -> Any:
                    return asyncio.to_thread(_caller(task, ctx), payload)

            return await run_attempt(task, run, ctx, self.engine.store.clock, call, lambda: entry.reason)
        finally:
            context.leave(token)

    def _finish(self, entry: _Running, outcome: Outcome | None) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
        self.running.pop(entry.run.id, None)
        if outcome is not None and entry.reason == LEASE_LOST:
            outcome = None  # another worker may own the run now; writing would be refused anyway
        if outcome is not None:
            self._settling.add(outcome.run_id)
            if outcome.kind == OutcomeKind.RETRY and outcome.retry_at is None:
                delay = RetryPolicy.from_dict(entry.run.retry).delay_after(entry.run.attempt)
                outcome.retry_at = self.engine.now + delay
            self._outcomes.append(outcome)
        self._poke()

    def _stop(self, run_id: str, reason: str) -> None:
        entry = self.running.get(run_id)
        if entry is None or entry.reason is not None:
            return
        entry.reason = reason
        if entry.stopper is not None:
            if not entry.stopper.done():
                entry.stopper.set_result(reason)
        elif entry.future is not None and (entry.task.is_async or self.options.sync_mode == "thread"):
            # Not at once: a task cancelled before its first step never runs `_execute` at all,
            # so the run would stay in `running` (its lease renewed) and never settle. Queued
            # after that first step, the cancellation lands inside run_attempt, which settles it.
            assert self._loop is not None
            self._loop.call_soon(entry.future.cancel)

    # --- buffers --------------------------------------------------------------------------------
    def _add_log(self, run: ClaimedRun, level: str, message: str, attributes: dict[str, Any] | None, ts: float) -> None:
        self._logs.append(LogLine(run.id, run.lease_token, run.attempt, ts, level, message, attributes))
        if len(self._logs) >= 500:
            self._poke()
        elif len(self._logs) == 1 and self._loop is not None:
            self._loop.call_later(0.2, self._poke)

    def _add_chunk(self, chunk: StreamChunk) -> None:
        """Stream chunks go out at once (a live stream), grouped with whatever else is pending."""
        self._chunks.append(chunk)
        self._poke()

    def _add_step(self, step: StepRecord) -> asyncio.Future[bool]:
        """Queue a completed step for the next commit; the future says whether it was stored."""
        assert self._loop is not None
        done: asyncio.Future[bool] = self._loop.create_future()
        self._steps.append((step, done))
        self._poke()
        return done

    def _add_metadata(self, run: ClaimedRun, ops: list[MetadataOp], target: str | None = None) -> None:
        """`target`: another run of the tree (metadata.parent / .root); it is not this run's
        to fence, so those operations are applied whatever that run's state."""
        self._metadata.append((target, None, ops) if target else (run.id, run.lease_token, ops))
        self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _on_datagram(self, wake_socket: WakeSocket) -> None:
        for message in wake_socket.drain():
            if message == CANCEL:
                self._check_cancels = True
            elif message == DELAYED:
                self._maintain_at = 0.0
            else:  # WORK, or TARGETED: work for this worker alone, reported back in _idle
                self._claim_wanted = True
        if wake_socket.targeted:
            self.engine.notifier.targeted(self.id, wake_socket.drained_at, self.stats["claimed"])
        self._poke()

    # --- leases ---------------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        while not self._heartbeat_stop.wait(self.options.renew):
            started = time.monotonic()
            try:
                # Runs still executing here, and finished ones whose outcome is not committed yet.
                held = [*self.running, *self._settling]
                result = self.engine.heartbeat(self.id, self.options.lease, held)
            except Exception as exc:
                log.error("lease renewal failed: %s", exc)
                if self._renewals_stale():
                    # Stop the code before anyone else can claim these runs.
                    self._call_soon(self._stop_all, RELEASED)
                continue
            self._last_renewal = started
            self._call_soon(self._on_heartbeat, result, started)

    def _renewals_stale(self) -> bool:
        return time.monotonic() - self._last_renewal > self.options.lease * 2 / 3

    def _on_heartbeat(self, result: HeartbeatResult, started: float) -> None:
        for run_id, entry in list(self.running.items()):
            if entry.claimed_at < started and result.renewed.get(run_id) != entry.run.lease_token:
                log.warning("run %s: lease lost, stopping its code", run_id)
                self._stop(run_id, LEASE_LOST)
        for run_id in result.cancel_requested:
            self._stop(run_id, CANCELED)

    def _stop_all(self, reason: str) -> None:
        for run_id in list(self.running):
            self._stop(run_id, reason)

    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(fn, *args)

    # --- helpers --------------------------------------------------------------------------------
    def _maintain_by(self, when: float) -> None:
        """Run maintenance at store-clock time `when` (a timer or a retry falls due), but at most
        one pass per MAINTAIN_GAP: timers that fall due close together (a burst of runs that
        all waited 2 s) share a pass, and a lone timer is served on time."""
        at = self._loop_time() + max(0.001, when - self.engine.now + 0.001)
        self._maintain_at = min(self._maintain_at, max(at, self._maintained_at + MAINTAIN_GAP))

    def _loop_time(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    async def _store(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._store_thread, fn, *args)

    def _child_settings(self) -> dict[str, Any]:
        return {
            "modules": self.options.modules,
            "environment": self.engine.environment,
            "log_level": self.options.log_level,
            "database_url": self.options.database_url or f"sqlite:///{self.engine.store.location}",
            "max_step_bytes": self.options.max_step_bytes,
        }


def _caller(task: Task[Any, Any], ctx: Any) -> Callable[[Any], Any]:
    fn = task.fn
    if task.takes_ctx:
        return lambda payload: fn(payload, ctx)
    if task.takes_payload:
        return fn
    return lambda payload: fn()
