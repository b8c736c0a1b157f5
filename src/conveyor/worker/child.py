"""A pool child: runs sync tasks one at a time, for a parent worker that can stop it.

Created by the multiprocessing forkserver, so it starts from a clean single-threaded process
that has already imported the task modules. Everything crosses the pipe as plain data:
payloads and outputs as JSON text, errors as {type, message, stack} — never pickled objects
of user types.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
import threading
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

from conveyor.core.clock import SYSTEM_CLOCK
from conveyor.core.records import ClaimedRun, Journal, MetadataOp, StepRecord, WaitState
from conveyor.sdk import client as client_module
from conveyor.sdk import context, logs
from conveyor.sdk.context import Execution
from conveyor.sdk.registry import REGISTRY
from conveyor.sdk.steps import install_journal
from conveyor.worker.attempt import (
    CANCELED,
    LEASE_LOST,
    RELEASED,
    TIMED_OUT,
    StopExecution,
    build_context,
    run_attempt,
)

# Signals the parent sends to stop the current run, and what each means.
STOP_SIGNALS = {signal.SIGUSR1: CANCELED, signal.SIGUSR2: TIMED_OUT, signal.SIGHUP: RELEASED}
SIGNAL_FOR = {reason: sig for sig, reason in STOP_SIGNALS.items()}

_running = False
_stop_reason: str | None = None  # why the current run was stopped (the code may swallow the raise)
_in_pipe = False  # a message to or from the worker is under way
_pending_stop: str | None = None  # a stop that arrived meanwhile


def _why_stopped() -> str | None:
    return _stop_reason


def _on_stop(signum: int, _frame: Any) -> None:
    # Once per run: a signal that lands while the run is already stopping (the parent signals a
    # run it saw stopped, while the child is reporting that stop) must not raise a second time,
    # out of the handler of the first, which would end this process. And never in the middle of
    # a message to or from the worker (`_send`, `_receive`): it is raised once that is whole.
    global _pending_stop
    if not _running or _stop_reason is not None:
        return
    reason = STOP_SIGNALS[signal.Signals(signum)]
    if _in_pipe:
        _pending_stop = reason
        return
    raise _stopping(reason)


def _send(conn: Connection, message: tuple[Any, ...]) -> None:
    """A message to the worker that a stop cannot cut in two: a raise between the writes of a
    large message, or in the middle of reading an answer (`_receive`), would leave half a
    message in the pipe, which the next read takes for another, and this process ends."""
    global _in_pipe
    _in_pipe = True
    try:
        conn.send(message)
    finally:
        _in_pipe = False
    _raise_pending()


def _receive(conn: Connection) -> Any:
    """The next message from the worker, whole (see `_send`)."""
    global _in_pipe
    _in_pipe = True
    try:
        message = conn.recv()
    finally:
        _in_pipe = False
    _raise_pending()
    return message


def _raise_pending() -> None:
    global _pending_stop
    if _pending_stop is not None:
        reason, _pending_stop = _pending_stop, None
        if _running and _stop_reason is None:
            raise _stopping(reason)


def _stopping(reason: str) -> StopExecution:
    """The stop of the current run, remembered (the code may swallow the raise)."""
    global _stop_reason
    _stop_reason = reason
    return StopExecution(reason)


class PipeChannel:
    """The run's channel inside a child: every write goes to the parent, which commits it."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def log(self, level: str, message: str, attributes: dict[str, Any] | None, ts: float) -> None:
        _send(self.conn, ("log", level, message, attributes, ts))

    def metadata(self, ops: list[MetadataOp], run_id: str | None = None) -> None:
        _send(self.conn, ("meta", [(op.op, op.key, op.value) for op in ops], run_id))

    def stream(self, key: str, chunk: str, ts: float) -> None:
        _send(self.conn, ("chunk", key, chunk, ts))

    def load_journal_sync(self) -> Journal:
        _send(self.conn, ("journal",))
        data, stopped = self._reply("journal")
        if data is None:  # the run was stopped while the worker could not read the journal
            raise _stopping(stopped)
        return Journal([StepRecord(**s) for s in data["steps"]], {k: WaitState(**w) for k, w in data["waits"].items()})

    def save_step_sync(self, step: StepRecord) -> None:
        _send(self.conn, ("step", asdict(step)))
        (stored,) = self._reply("step_ok")
        if not stored:
            raise _stopping(LEASE_LOST)  # the run is someone else's now: stop its code

    async def load_journal(self) -> Journal:  # async hooks of sync tasks run here too
        return self.load_journal_sync()

    async def save_step(self, step: StepRecord) -> None:
        self.save_step_sync(step)

    def _reply(self, kind: str) -> tuple[Any, ...]:
        while True:
            message = _receive(self.conn)
            if message[0] == kind:
                return tuple(message[1:])


def main(conn: Connection, settings: dict[str, Any]) -> None:
    global _running, _stop_reason, _pending_stop
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent; it decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for name in settings["modules"]:
        importlib.import_module(name)
    environment, log_level = settings["environment"], settings["log_level"]
    # Never share the parent's client (and its SQLite connections) across processes: tasks
    # that trigger tasks get a client of their own on the same database.
    client_module.set_client(None)
    client_module.configure(database_url=settings["database_url"], environment=environment)
    logs.install_capture()
    channel = PipeChannel(conn)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "exit":
            return
        if message[0] != "run":
            continue  # a late answer to a request of a run that was stopped meanwhile
        _, run_fields = message
        run = ClaimedRun(**run_fields)
        task = REGISTRY.get(run.task_id)
        ctx = build_context(task, run, environment)
        execution = Execution(
            ctx=ctx,
            channel=channel,
            metadata=dict(run.metadata),
            log_level=log_level,
            max_step_bytes=settings["max_step_bytes"],
            lease_token=run.lease_token,
            sync=True,
        )
        token = context.enter(execution)
        _stop_reason = _pending_stop = None
        if run.attempt > 1 or run.segment > 1:  # a replay: know it from the first line of code
            try:
                install_journal(execution, channel.load_journal_sync())
            except StopExecution as stop:  # stopped before its code began
                context.leave(token)
                _send(conn, ("stopped", stop.reason))
                continue
        _running = True
        try:
            _send(conn, ("started",))  # a stop from here on is the run's: caught below
            outcome = asyncio.run(run_attempt(task, run, ctx, SYSTEM_CLOCK, _caller(task, ctx), _why_stopped))
        except StopExecution as stop:  # arrived outside the attempt's own handlers
            outcome = None
            _send(conn, ("stopped", stop.reason))
            continue
        finally:
            _running = False
            context.leave(token)
        _send(conn, ("done", None if outcome is None else asdict(outcome)))


def _caller(task: Any, ctx: Any) -> Any:
    fn = task.fn

    def call(payload: Any) -> Any:
        if task.takes_ctx:
            return fn(payload, ctx)
        return fn(payload) if task.takes_payload else fn()

    return call


def _exit_with_worker(alive: Connection) -> None:
    """`alive` is the read end of a pipe only the worker can write to, and never does: EOF
    means the worker is gone. Its leases will expire and other workers run its runs again, so
    the code running here must stop now (DECISIONS.md: no run's code outlives its lease)."""
    try:
        while True:
            alive.recv_bytes()
    except (EOFError, OSError):
        pass
    os._exit(1)


def entry(conn: Connection, settings: dict[str, Any], alive: Connection | None = None) -> None:
    if alive is not None:
        threading.Thread(target=_exit_with_worker, args=(alive,), name="conveyor-worker-watch", daemon=True).start()
    sys.path[:0] = [p for p in settings["path"] if p not in sys.path]
    try:
        main(conn, settings)
    except KeyboardInterrupt:
        pass
    finally:
        logging.shutdown()
        os._exit(0)
