"""`conveyor.wait` and children waited on: durable waits that hold no worker (SPEC §2-3).

Every call here is journaled like a step (DECISIONS.md, "Durable execution"): on a retry or a
resume the run replays from the top and the call returns what the journal says instead of
waiting or triggering again.

A wait that suspends writes nothing itself. It raises `Suspend`, which unwinds the run's code
(a BaseException, so `except Exception` does not catch it; `finally` blocks run), and the
worker reports the suspension with the wait's request. The store applies both in one
transaction fenced by the lease: journal row, children, waitpoints, status WAITING, and no
slot held. When every waitpoint the run waits for has completed, the run is queued again,
continues the same attempt on any worker, and the call returns its result.

One name works from both kinds of task: in an `async def` task the call returns an awaitable;
in a plain `def` task (`Execution.sync`) it blocks and returns the value.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from conveyor.core.errors import (
    ConveyorError,
    InvalidOptions,
    InvalidPayload,
    RunFailed,
    TokenNotFound,
    WaitTimeout,
)
from conveyor.core.ids import new_id
from conveyor.core.records import NewRun, NewWaitpoint, StepRecord, WaitRequest, WaitState
from conveyor.sdk import context
from conveyor.sdk.context import Execution
from conveyor.sdk.serde import to_json
from conveyor.sdk.steps import _next_call, load_journal, load_journal_blocking

T = TypeVar("T")

# Time waits shorter than this stay in process (DECISIONS.md); longer ones suspend the run.
SUSPEND_THRESHOLD = 1.0
MAX_CHILDREN = 1_000


class Suspend(BaseException):  # noqa: N818 - not an error: the run's code unwinds to suspend
    """Raised by a wait that suspends the run. Let it propagate: code that catches it (an
    `except BaseException`) still suspends, but whatever it does next is lost."""


@dataclass(frozen=True)
class Result:
    """The outcome of a child run or a token wait. `.unwrap()` returns the output or raises."""

    ok: bool
    output: Any = None
    error: dict[str, Any] | None = None
    run_id: str | None = None

    def unwrap(self) -> Any:
        if self.ok:
            return self.output
        error = self.error or {}
        message = error.get("message") or "failed"
        if error.get("code") == "TIMEOUT":
            raise WaitTimeout(message)
        raise RunFailed(f"run {self.run_id} did not complete: {message}", self.run_id, self.error)

    @classmethod
    def from_state(cls, state: WaitState) -> Result:
        data = state.output if isinstance(state.output, dict) else {"ok": True, "output": state.output}
        return cls(bool(data.get("ok")), data.get("output"), data.get("error"), data.get("run_id"))


@dataclass(frozen=True)
class Token:
    """A wait token: complete it with `conveyor.wait.complete_token(token.id, data)` or by
    POSTing to `token.url` (the HTTP API)."""

    id: str
    url: str
    timeout_at: float | None = None
    tags: list[str] = field(default_factory=list)


def _dual(execution: Execution | None, run_async: Callable[[], Awaitable[T]], run_sync: Callable[[], T]) -> Any:
    """The awaitable in async code, the value in a sync task (or outside a run, off any loop)."""
    if execution is not None:
        return run_sync() if execution.sync else run_async()
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run_sync()
    return run_async()


def _client() -> Any:
    from conveyor.sdk.client import get_client

    return get_client()


def _suspend(execution: Execution, request: WaitRequest | None) -> Any:
    if request is not None:
        execution.suspend_requests.append(request)
    execution.suspending = True
    raise Suspend()


def _journal_row(execution: Execution, position: int, key: str, name: str, output: dict[str, Any]) -> StepRecord:
    now = time.time()
    run = execution.ctx.run
    return StepRecord(run.id, position, key, name, json.dumps(output), execution.ctx.attempt.number, now, now)


def _replayed(execution: Execution, stored: StepRecord) -> list[WaitState]:
    """The states of a journaled wait's waitpoints once all have completed; otherwise the run
    suspends again (it was retried after the wait began, before the wait ended)."""
    ids = json.loads(stored.output).get("waitpoints", [])
    states = [execution.waits.get(i) for i in ids]
    if all(s is not None and s.completed for s in states):
        return [s for s in states if s is not None]
    missing = [i for i, s in zip(ids, states, strict=True) if s is None]
    if missing:
        raise TokenNotFound(f"the run waits for {', '.join(missing)}, which do not exist")
    return _suspend(execution, None)  # type: ignore[no-any-return]


def _lease_lost() -> BaseException:
    from conveyor.worker.attempt import LEASE_LOST, StopExecution

    return StopExecution(LEASE_LOST)


class Wait:
    """`conveyor.wait`."""

    # --- time ---------------------------------------------------------------------------------
    def for_(self, *, seconds: float = 0, minutes: float = 0, hours: float = 0, days: float = 0) -> Any:
        """Wait this long (the amounts add up). Suspends the run when at least SUSPEND_THRESHOLD."""
        total = 0.0
        for amount, unit in ((seconds, 1), (minutes, 60), (hours, 3600), (days, 86400)):
            if isinstance(amount, bool) or not isinstance(amount, int | float) or amount < 0:
                raise InvalidOptions(f"wait.for_ takes amounts >= 0, got {amount!r}")
            total += amount * unit
        return self._time("wait.for", delay=total)

    def until(self, when: datetime) -> Any:
        """Wait until a timezone-aware datetime (at once if it has passed)."""
        if not isinstance(when, datetime) or when.tzinfo is None:
            raise InvalidOptions("wait.until needs a timezone-aware datetime")
        return self._time("wait.until", until=when.timestamp())

    def _time(self, name: str, delay: float | None = None, until: float | None = None) -> Any:
        """A wait `delay` seconds long, or until the epoch time `until`. A delay is handed to the
        store as such, which adds it to the clock it compares against (DECISIONS.md: the
        database's, in production)."""
        execution = context.require(f"conveyor.{name}")

        def plan() -> tuple[float, StepRecord] | None:
            """None: the wait is over (replayed); else a short wait to sleep here, and its row."""
            position, key, stored = _next_call(execution, name)
            if stored is not None:
                _replayed(execution, stored)
                return None
            seconds = delay if until is None else until - _client().engine.now
            assert seconds is not None
            if seconds < SUSPEND_THRESHOLD:
                return max(0.0, seconds), _journal_row(execution, position, key, name, {"waitpoints": []})
            waitpoint = NewWaitpoint(new_id("wait"), "time", complete_at=until, delay=delay if until is None else None)
            row = _journal_row(execution, position, key, name, {"waitpoints": [waitpoint.id]})
            return _suspend(execution, WaitRequest(row, create=[waitpoint], wait_on=[waitpoint.id]))  # type: ignore[no-any-return]

        async def run_async() -> None:
            await load_journal(execution)
            short = plan()
            if short is not None:
                await asyncio.sleep(short[0])
                await execution.channel.save_step(short[1])

        def run_sync() -> None:
            load_journal_blocking(execution)
            short = plan()
            if short is not None:
                time.sleep(short[0])
                execution.channel.save_step_sync(short[1])

        return _dual(execution, run_async, run_sync)

    # --- tokens -------------------------------------------------------------------------------
    def create_token(self, timeout: float | None = None, tags: Sequence[str] | None = None) -> Any:
        """A token to wait for (`for_token`), completed from anywhere with `complete_token`.
        `timeout` in seconds: after it the wait's Result has error code TIMEOUT."""
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0):
            raise InvalidOptions(f"create_token: timeout must be seconds > 0, got {timeout!r}")
        tag_list = [str(t) for t in tags or []]
        execution = context.current()

        def make() -> tuple[Token, NewWaitpoint]:
            engine = _client().engine
            token_id = new_id("token")
            timeout_at = None if timeout is None else engine.now + float(timeout)
            base = os.environ.get("CONVEYOR_API_URL", "http://127.0.0.1:8030").rstrip("/")
            token = Token(token_id, f"{base}/api/v1/tokens/{token_id}/complete", timeout_at, tag_list)
            return token, NewWaitpoint(
                token_id, "token", delay=None if timeout is None else float(timeout), tags=tag_list
            )

        if execution is None:

            def outside() -> Token:
                token, waitpoint = make()
                _client().engine.create_waitpoints([waitpoint])
                return token

            async def outside_async() -> Token:
                return await asyncio.to_thread(outside)

            return _dual(None, outside_async, outside)

        def plan() -> tuple[Token, WaitRequest | None]:
            position, key, stored = _next_call(execution, "wait.create_token")
            if stored is not None:
                return Token(**json.loads(stored.output)["token"]), None
            token, waitpoint = make()
            row = _journal_row(execution, position, key, "wait.create_token", {"token": asdict(token)})
            return token, WaitRequest(row, create=[waitpoint])

        def apply(request: WaitRequest) -> None:
            if _client().engine.apply_wait(request, execution.lease_token) is None:
                raise _lease_lost()

        async def run_async() -> Token:
            await load_journal(execution)
            token, request = plan()
            if request is not None:
                await asyncio.to_thread(apply, request)
            return token

        def run_sync() -> Token:
            load_journal_blocking(execution)
            token, request = plan()
            if request is not None:
                apply(request)
            return token

        return _dual(execution, run_async, run_sync)

    def for_token(self, token: Token | str) -> Any:
        """Suspend until the token is completed or times out. -> Result (`.ok`, `.output`,
        `.error["code"] == "TIMEOUT"`)."""
        token_id = token.id if isinstance(token, Token) else token
        if not isinstance(token_id, str) or not token_id:
            raise InvalidOptions(f"for_token needs a Token or a token id, got {token!r}")
        execution = context.require("conveyor.wait.for_token")

        def check() -> None:
            """Fail at the call, not after a suspension, when there is no such token."""
            if _client().engine.waitpoint(token_id).kind != "token":
                raise TokenNotFound(f"{token_id!r} is not a token")

        def suspend(position: int, key: str) -> Result:
            row = _journal_row(execution, position, key, "wait.for_token", {"waitpoints": [token_id]})
            return _suspend(execution, WaitRequest(row, wait_on=[token_id]))  # type: ignore[no-any-return]

        async def run_async() -> Result:
            await load_journal(execution)
            position, key, stored = _next_call(execution, "wait.for_token")
            if stored is not None:
                return Result.from_state(_replayed(execution, stored)[0])
            await asyncio.to_thread(check)
            return suspend(position, key)

        def run_sync() -> Result:
            load_journal_blocking(execution)
            position, key, stored = _next_call(execution, "wait.for_token")
            if stored is not None:
                return Result.from_state(_replayed(execution, stored)[0])
            check()
            return suspend(position, key)

        return _dual(execution, run_async, run_sync)

    def complete_token(self, token_id: Token | str, data: Any = None) -> bool:
        """Complete a token from anywhere (an app, another run, the CLI); the runs waiting for
        it resume with `Result(ok=True, output=data)`. -> True; False if it was already
        completed or timed out (nothing changes). Unknown id: TokenNotFound."""
        token_id = token_id.id if isinstance(token_id, Token) else token_id
        output = to_json({"ok": True, "output": data}, "the data of complete_token")
        return bool(_client().engine.complete_token(token_id, output))

    def retrieve_token(self, token_id: str) -> WaitState:
        """The token's state: `.status` (PENDING | COMPLETED) and `.output` (the Result data)."""
        return _client().engine.waitpoint(token_id)  # type: ignore[no-any-return]


wait = Wait()


# --- children -------------------------------------------------------------------------------------
def trigger_and_wait(task: Any, items: list[tuple[Any, dict[str, Any]]], batch: bool) -> Any:
    """The parent suspends until every child has finished; -> Result (or a list in input order)."""
    verb = "batch_trigger_and_wait" if batch else "trigger_and_wait"
    execution = context.current()
    if execution is None:
        raise ConveyorError(f"{task.id}.{verb}() only works inside a running task; outside use trigger() and wait()")
    if len(items) > MAX_CHILDREN:
        raise InvalidOptions(f"{verb} takes at most {MAX_CHILDREN:,} items, got {len(items):,}")
    name = f"{verb}:{task.id}"

    def plan() -> Any:
        position, key, stored = _next_call(execution, name)
        if stored is not None:
            results = [Result.from_state(s) for s in _replayed(execution, stored)]
            return results if batch else results[0]
        runs = _prepare_children(task, items, execution)
        waitpoints = [NewWaitpoint(new_id("wait"), "run") for _ in runs]
        ids = [w.id for w in waitpoints]
        row = _journal_row(execution, position, key, name, {"waitpoints": ids})
        return _suspend(execution, WaitRequest(row, create=waitpoints, runs=runs, wait_on=ids))

    async def run_async() -> Any:
        await load_journal(execution)
        return plan()

    def run_sync() -> Any:
        load_journal_blocking(execution)
        return plan()

    return _dual(execution, run_async, run_sync)


def trigger_in_run(task: Any, items: list[tuple[Any, dict[str, Any]]], verb: str) -> list[str]:
    """A plain trigger from inside a run, journaled: a replay returns the same run ids instead
    of triggering again. Written in one transaction with its journal row, fenced by the lease."""
    execution = context.current()
    assert execution is not None
    load_journal_blocking(execution)
    position, key, stored = _next_call(execution, f"{verb}:{task.id}")
    if stored is not None:
        return list(json.loads(stored.output)["runs"])
    runs = _prepare_children(task, items, execution, inherit_version=False)
    row = _journal_row(execution, position, key, f"{verb}:{task.id}", {})
    ids = _client().engine.apply_wait(WaitRequest(row, runs=runs), execution.lease_token)
    if ids is None:
        raise _lease_lost()
    return list(ids)


def _prepare_children(
    task: Any, items: list[tuple[Any, dict[str, Any]]], execution: Execution, inherit_version: bool = True
) -> list[NewRun]:
    """Validate every child first: any invalid -> nothing is triggered (the error names the items)."""
    client, record, now, lineage = task._trigger_context()
    runs: list[NewRun] = []
    errors: list[str] = []
    for index, (payload, options) in enumerate(items):
        if inherit_version and execution.ctx.version and "version" not in options:
            options = {**options, "version": execution.ctx.version}  # a child runs its parent's code
        try:
            runs.append(task._prepare(client, record, now, lineage, payload, options))
        except ConveyorError as exc:
            errors.append(f"item {index}: {exc}" if len(items) > 1 else str(exc))
    if errors:
        raise InvalidPayload(f"{task.id}: nothing was triggered; invalid {'; '.join(errors[:20])}")
    return runs
