"""A pool of reused child processes for sync tasks, one run per child at a time.

Why processes and not threads: a thread stuck in `time.sleep` or a C call cannot be stopped,
and DECISIONS.md requires that cancel and max_duration stop sync code within 2 s and free its
slot only once the code has really stopped. A child is stopped with a signal that raises into
the code; if it has not reported within the grace period it is SIGKILLed and replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

from conveyor.core.backoff import RetryPolicy
from conveyor.core.records import ClaimedRun, MetadataOp, Outcome, StepRecord
from conveyor.core.status import RunStatus
from conveyor.sdk.context import Channel
from conveyor.worker import child
from conveyor.worker.attempt import CANCELED, LEASE_LOST, RELEASED, TIMED_OUT, StopExecution

log = logging.getLogger("conveyor.worker")

KILL_AFTER = 2.0


class ChildGone(Exception):
    pass


class _Child:
    def __init__(self, process: Any, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.busy = False

    @property
    def pid(self) -> int:
        return int(self.process.pid)


class SyncPool:
    def __init__(self, settings: dict[str, Any], preload: list[str]) -> None:
        self.settings = {**settings, "path": list(sys.path)}
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(["conveyor.worker.child", *preload])
        self._idle: list[_Child] = []
        self._all: set[_Child] = set()
        # The worker holds the only write end and never writes: when it dies (even by kill -9),
        # every child sees EOF and ends itself, so no run's code outlives its worker's lease.
        self._alive_r, self._alive_w = self._ctx.Pipe(duplex=False)

    def prewarm(self) -> None:
        """Start one child ahead of the first sync run (a fresh child imports the task modules)."""
        if not self._all:
            self._idle.append(self._spawn())

    def _spawn(self) -> _Child:
        parent_conn, child_conn = self._ctx.Pipe()
        process = self._ctx.Process(target=child.entry, args=(child_conn, self.settings, self._alive_r), daemon=True)
        process.start()
        child_conn.close()
        made = _Child(process, parent_conn)
        self._all.add(made)
        return made

    async def run(
        self,
        run: ClaimedRun,
        channel: Channel,
        stopper: asyncio.Future[str],
        on_started: Callable[[], None] = lambda: None,
    ) -> Outcome | None:
        """Run `run` in a child; what its code writes goes through `channel` (the run's channel
        in the worker). Resolving `stopper` with a reason stops the code; `on_started` is called
        when the code starts (a fresh child first imports the task modules)."""
        worker = self._idle.pop() if self._idle else await asyncio.to_thread(self._spawn)
        worker.busy = True
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Any] = asyncio.Queue()

        def readable() -> None:
            try:
                while worker.conn.poll():
                    inbox.put_nowait(worker.conn.recv())
            except (EOFError, OSError):
                inbox.put_nowait(("gone",))
                loop.remove_reader(worker.conn.fileno())

        loop.add_reader(worker.conn.fileno(), readable)
        healthy = True
        try:
            worker.conn.send(("run", asdict(run)))
            kill_at: float | None = None
            reason: str | None = None
            started = False
            while True:
                timeout = None if kill_at is None else max(0.0, kill_at - loop.time())
                get = asyncio.ensure_future(inbox.get())
                waiting: set[asyncio.Future[Any]] = {get}
                if reason is None:
                    waiting.add(stopper)
                done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if stopper in done and reason is None:
                    reason = stopper.result()
                    if started:  # before that, the child has no handler yet: signal on "started"
                        self._signal(worker, reason)
                    kill_at = loop.time() + KILL_AFTER
                if get not in done:
                    get.cancel()
                    if kill_at is not None and loop.time() >= kill_at:
                        healthy = False
                        await self._kill(worker)
                        return synthesized(run, reason or CANCELED, killed=True)
                    continue
                message = get.result()
                kind = message[0]
                if kind == "started":
                    started = True
                    if reason is not None:
                        self._signal(worker, reason)
                    else:
                        on_started()
                elif kind == "log":
                    channel.log(*message[1:])
                elif kind == "meta":
                    channel.metadata([MetadataOp(op, key, value) for op, key, value in message[1]], message[2])
                elif kind == "chunk":
                    channel.stream(*message[1:])
                elif kind == "journal":  # the child waits for the answer: it always gets one
                    try:
                        journal = await channel.load_journal()
                    except StopExecution as stop:  # stopped while the store did not answer
                        worker.conn.send(("journal", None, stop.reason))
                    except BaseException:
                        healthy = False  # it would wait for an answer forever: not reused
                        await self._kill(worker)
                        raise
                    else:
                        worker.conn.send(("journal", asdict(journal), None))
                elif kind == "step":
                    try:
                        await channel.save_step(StepRecord(**message[1]))
                        stored = True
                    except StopExecution:
                        stored = False
                    worker.conn.send(("step_ok", stored))
                elif kind == "done":
                    data = message[1]
                    return None if data is None else Outcome.from_dict(data)
                elif kind == "stopped":
                    return synthesized(run, message[1])
                elif kind == "gone":
                    healthy = False
                    code = await asyncio.to_thread(self._reap, worker)
                    if reason is not None:
                        return synthesized(run, reason, killed=True)
                    error = {
                        "code": "CHILD_EXITED",
                        "type": "ChildExited",
                        "message": f"the process running the task exited with code {code}",
                    }
                    if run.attempt < run.max_attempts:
                        delay = RetryPolicy.from_dict(run.retry).delay_after(run.attempt)
                        return Outcome(run.id, run.lease_token, "retry", error=error, retry_at=time.time() + delay)
                    return Outcome(run.id, run.lease_token, "failed", error=error)
        finally:
            with contextlib.suppress(Exception):
                loop.remove_reader(worker.conn.fileno())
            worker.busy = False
            if healthy and worker.process.is_alive():
                self._idle.append(worker)
            else:
                self._all.discard(worker)

    def _signal(self, worker: _Child, reason: str) -> None:
        sig = child.SIGNAL_FOR.get(reason if reason != LEASE_LOST else RELEASED, signal.SIGUSR1)
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, sig)

    async def _kill(self, worker: _Child) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)
        await asyncio.to_thread(self._reap, worker)

    def _reap(self, worker: _Child) -> int | None:
        worker.process.join(5)
        with contextlib.suppress(Exception):
            worker.conn.close()
        self._all.discard(worker)
        return worker.process.exitcode  # type: ignore[no-any-return]

    def close(self) -> None:
        for worker in list(self._all):
            with contextlib.suppress(Exception):
                worker.conn.send(("exit",))
        for worker in list(self._all):
            worker.process.join(1)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(1)
        self._all.clear()
        self._idle.clear()


def synthesized(run: ClaimedRun, reason: str, killed: bool = False) -> Outcome | None:
    """The outcome of a run whose child was stopped without reporting one itself."""
    how = " (the process was killed after not stopping within 2 s)" if killed else ""
    if reason == CANCELED:
        return Outcome(
            run.id,
            run.lease_token,
            "failed",
            status=RunStatus.CANCELED,
            error={"code": "CANCELED", "type": "Canceled", "message": "the run was canceled" + how},
        )
    if reason == TIMED_OUT:
        return Outcome(
            run.id,
            run.lease_token,
            "failed",
            status=RunStatus.TIMED_OUT,
            error={
                "code": "MAX_DURATION_EXCEEDED",
                "type": "TimedOut",
                "message": f"the run exceeded its max_duration of {run.max_duration:g} s" + how,
            },
        )
    if reason == RELEASED:
        return Outcome(run.id, run.lease_token, "released")
    return None
