"""The store interface every driver implements.

Work happens inside a transaction: `with store.transaction() as tx:` gives a `Tx` whose
methods are the whole vocabulary of the run lifecycle. One transaction may combine several
(a worker settles finished runs and claims new ones in one commit). Methods are noun-first,
take plain records from `conveyor.core.records`, and check in SQL the status a run comes from,
so two processes can never both finish, claim or resume one run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

from conveyor.core.clock import Clock
from conveyor.core.errors import ConfigError
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


class Listener(Protocol):
    """Wake-ups pushed by the database to one worker (see `Store.listen`)."""

    def close(self) -> None: ...


class Tx(ABC):
    """One open transaction. Reads see its own writes."""

    # Queues of the WAITING runs this transaction queued again (their waits ended): the engine
    # wakes workers for them after the commit.
    resumed_queues: set[str]
    # Runs that suspended although a cancel was asked for (it raced the suspension): the engine
    # cancels them, and what they wait for, in the same transaction.
    cancel_pending: list[str]

    # --- wake-ups ---------------------------------------------------------------------------------
    def wake(self, environment: str, message: bytes, worker_id: str | None = None) -> bool:
        """Ask the database to wake the environment's workers (or one worker) when this
        transaction commits, with a one-byte message (engine.notify). False when the driver
        cannot (SQLite): the engine then sends its datagrams after the commit."""
        return False

    # --- registry -------------------------------------------------------------------------
    @abstractmethod
    def task_upsert_many(self, environment: str, tasks: Sequence[TaskRecord]) -> None: ...

    @abstractmethod
    def task_get(self, environment: str, task_id: str) -> TaskRecord | None:
        """The most recently registered definition of the task in the environment."""

    @abstractmethod
    def task_list(self, environment: str) -> list[TaskRecord]: ...

    @abstractmethod
    def queue_upsert_many(self, environment: str, queues: Sequence[QueueSpec]) -> None:
        """Limits come from code; pause state is left as it is."""

    @abstractmethod
    def queue_get(self, environment: str, name: str) -> QueueInfo | None: ...

    @abstractmethod
    def queue_list(self, environment: str) -> list[QueueInfo]: ...

    @abstractmethod
    def queue_set_paused(self, environment: str, name: str, paused: bool) -> QueueInfo | None: ...

    # --- runs: the lifecycle --------------------------------------------------------------
    @abstractmethod
    def run_insert_many(self, environment: str, runs: Sequence[NewRun]) -> list[tuple[str, bool]]:
        """Insert runs; a live idempotency key returns the existing run. -> [(run id, created)]."""

    @abstractmethod
    def run_claim(self, request: ClaimRequest) -> list[ClaimedRun]:
        """Start up to `request.limit` runs: candidates in sort order, then admission checks
        (pause, queue limit, per-key limit) that take slots in this transaction."""

    @abstractmethod
    def run_settle_many(self, environment: str, outcomes: Sequence[Outcome]) -> list[bool]:
        """Apply what workers report. An outcome whose lease no longer matches is refused (False)."""

    @abstractmethod
    def run_heartbeat(self, worker_id: str, lease_seconds: float, run_ids: Sequence[str]) -> HeartbeatResult:
        """Renew, in one statement, the leases of the runs the worker still holds (`run_ids`):
        a run it gave up keeps its old lease, expires, and is recovered by maintenance."""

    @abstractmethod
    def run_cancel(self, environment: str, run_id: str) -> CancelResult: ...

    @abstractmethod
    def run_reschedule(self, environment: str, run_id: str, available_at: float) -> Run: ...

    @abstractmethod
    def run_maintain(self, limit: int = 500, since: float | None = None) -> MaintenanceResult:
        """Time-driven transitions, all environments: DELAYED -> QUEUED when due, QUEUED past
        ttl -> EXPIRED, expired leases -> retry or CRASHED. Idempotent; any number may run."""

    @abstractmethod
    def run_purge(self, before: float, limit: int = 500) -> int:
        """Retention: delete up to `limit` finished runs with `finished_at < before`, oldest
        first, with their attempts, events, logs, tags, steps and expired idempotency-key rows.
        Never a run whose idempotency key is still live (DECISIONS.md, "Idempotency"); rows
        another transaction holds are skipped. One small batch per call keeps locks short.
        -> runs deleted."""

    # --- durable waits ---------------------------------------------------------------------------
    # A run in `run_settle_many` with an outcome of kind SUSPENDED applies its wait requests, then
    # goes WAITING, and is queued again at once if nothing it waits for is pending. A finished
    # child completes the waitpoints that target it; the maintenance pass completes due times and
    # token timeouts; each completion queues the runs that wait for nothing else (`resumed_queues`).
    @abstractmethod
    def wait_apply(self, request: WaitRequest, lease_token: str) -> list[str] | None:
        """Apply one wait request without suspending (create_token, a trigger inside a run).
        The journal row of a request that starts runs records their ids (an idempotency key
        may return an existing run). -> those ids; None (nothing written) unless the run's
        lease matches."""

    @abstractmethod
    def waitpoint_create(self, environment: str, waitpoints: Sequence[NewWaitpoint]) -> None:
        """Waitpoints made outside any run (a token created by an app)."""

    @abstractmethod
    def waitpoint_get(self, environment: str, waitpoint_id: str) -> WaitState | None: ...

    @abstractmethod
    def token_complete(self, environment: str, token_id: str, output: str) -> bool | None:
        """Complete a pending token with `output` (JSON text of the Result) and resume its
        waiters. -> True; False if it was completed (or timed out) before; None if unknown."""

    @abstractmethod
    def journal(self, run_id: str) -> Journal:
        """The run's steps and the state of every waitpoint it waits or waited for."""

    @abstractmethod
    def run_children_waited(self, run_id: str) -> list[str]:
        """Children the run waits for (trigger_and_wait) that have not finished: cancel cascades to them."""

    # --- runs: reads -------------------------------------------------------------------------
    @abstractmethod
    def run_get(self, environment: str, run_id: str) -> Run | None: ...

    @abstractmethod
    def run_status_many(self, environment: str, run_ids: Sequence[str]) -> dict[str, str]: ...

    @abstractmethod
    def run_list(self, environment: str, flt: RunFilter) -> list[Run]: ...

    @abstractmethod
    def attempt_list(self, run_id: str) -> list[Attempt]: ...

    @abstractmethod
    def event_list(self, run_id: str, after_seq: int = 0, limit: int = 1000) -> list[RunEvent]: ...

    @abstractmethod
    def log_list(self, run_id: str, limit: int = 10_000) -> list[LogLine]: ...

    @abstractmethod
    def run_cancel_requested(self, worker_id: str) -> list[str]:
        """Runs this worker holds whose cancellation was asked for."""

    # --- writes a worker makes while a run executes (fenced by lease) -------------------------
    @abstractmethod
    def log_append_many(self, lines: Sequence[LogLine]) -> int:
        """Append log lines whose run's lease still matches. -> lines written."""

    @abstractmethod
    def step_append_many(self, steps: Sequence[StepRecord]) -> list[bool]:
        """Store completed steps whose run's lease still matches (False: refused)."""

    @abstractmethod
    def step_list(self, run_id: str) -> list[StepRecord]:
        """The run's journal in call order."""

    @abstractmethod
    def metadata_apply(
        self, run_id: str, ops: Sequence[MetadataOp], lease_token: str | None = None
    ) -> dict[str, object] | None:
        """Apply operations in SQL (no lost updates). With a lease token, refused (None) unless
        it still matches. Returns the new metadata."""

    @abstractmethod
    def stream_append_many(self, chunks: Sequence[StreamChunk]) -> list[bool]:
        """Append stream chunks to their runs' event logs: each an event of kind "stream" with
        data {"key", "chunk"}, taking its run's next seq (bumping `event_seq` and `updated_at`),
        chunks of one run in input order. A chunk whose run no longer matches (id, lease
        token, EXECUTING) is refused (False) and nothing of it is written."""

    @abstractmethod
    def run_tag_seqs(
        self,
        environment: str,
        tag: str,
        min_id: str = "",
        run_ids: Sequence[str] = (),
        unfinished: bool = False,
    ) -> list[tuple[str, int, str]]:
        """What `subscribe_tag` polls: (run id, event_seq, status) of the runs with the tag
        whose id is >= `min_id` (ids sort by creation time: a recent window), of the tag's
        unfinished runs when `unfinished` (once, when a subscription starts), and of
        `run_ids` (runs the subscriber already follows, read by primary key). Reads the
        tag's index range, never all runs."""

    # --- workers -------------------------------------------------------------------------------
    @abstractmethod
    def worker_register(self, worker: WorkerInfo) -> None: ...

    @abstractmethod
    def worker_deregister(self, worker_id: str) -> None: ...

    @abstractmethod
    def worker_list(self, environment: str | None = None, live_within: float = 30.0) -> list[WorkerInfo]: ...


class Store(ABC):
    """A database holding runs. Safe to share between threads; each thread gets its own
    connection. Processes share state only through the database."""

    clock: Clock
    location: str  # a printable name of the database (file path or URL without password)
    dialect: str

    @contextmanager
    @abstractmethod
    def transaction(self) -> Iterator[Tx]:
        """A write transaction (SQLite: BEGIN IMMEDIATE). Commits on success."""
        yield  # type: ignore[misc]

    @contextmanager
    @abstractmethod
    def read(self) -> Iterator[Tx]:
        """A read-only snapshot. Write methods must not be called on it."""
        yield  # type: ignore[misc]

    @contextmanager
    def transaction_on(self, connection: object) -> Iterator[Tx]:
        """A Tx inside the caller's own open transaction on `connection`, a connection of the
        driver's library to the same database (psycopg for PostgreSQL, sqlite3 for SQLite).
        Nothing is committed or rolled back here: what is written exists iff the caller commits."""
        raise ConfigError(f"the {self.dialect} store cannot write inside a caller's connection")
        yield  # pragma: no cover

    @abstractmethod
    def schema_version(self) -> int: ...

    @abstractmethod
    def migrate(self) -> list[int]:
        """Apply pending migrations; returns the versions applied."""

    @abstractmethod
    def change_token(self) -> int:
        """A number that changes when another connection commits (cheap; for polling)."""

    def listen(self, environment: str, worker_id: str, deliver: Callable[[bytes | None], None]) -> Listener | None:
        """Deliver the wake-ups `Tx.wake` sends to this worker (and to its environment) until
        closed; `deliver(None)` means some may have been missed. None when the driver has no
        such channel (SQLite: workers get datagrams instead)."""
        return None

    @abstractmethod
    def close(self) -> None: ...
