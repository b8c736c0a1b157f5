"""Plain records that cross the store boundary. Pure data, no behaviour beyond conversion."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from conveyor.core.status import RunStatus

DEFAULT_MACHINE = "small-1x"


@dataclass(slots=True)
class NewRun:
    """A run about to be inserted. Payload and metadata are already JSON text."""

    id: str
    task_id: str
    queue: str
    payload: str
    status: RunStatus  # QUEUED or DELAYED
    available_at: float
    max_attempts: int
    retry: str | None = None  # JSON text of the RetryPolicy
    priority: int = 0
    ttl: float | None = None
    max_duration: float | None = None
    concurrency_key: str | None = None
    key_limit: int | None = None
    queue_slot: bool = True
    idempotency_key: str | None = None
    idempotency_key_ttl: float | None = None
    tags: list[str] = field(default_factory=list)
    metadata: str | None = None
    machine: str = DEFAULT_MACHINE
    version: str | None = None
    parent_id: str | None = None
    root_id: str | None = None
    batch_id: str | None = None
    trace_context: str | None = None


@dataclass(slots=True)
class Run:
    """A run as `runs.retrieve` shows it. JSON fields are decoded."""

    id: str
    environment: str
    task_id: str
    queue: str
    status: RunStatus
    payload: Any
    output: Any
    error: dict[str, Any] | None
    attempts: int
    max_attempts: int
    tags: list[str]
    metadata: dict[str, Any]
    idempotency_key: str | None
    concurrency_key: str | None
    priority: int
    machine: str
    version: str | None
    parent_id: str | None
    root_id: str | None
    batch_id: str | None
    created_at: float
    available_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    ttl: float | None = None
    max_duration: float | None = None
    executed_seconds: float = 0.0
    cancel_requested: bool = False
    worker_id: str | None = None
    # How the run was triggered, kept so a replay can copy it exactly.
    retry: dict[str, Any] | None = None
    key_limit: int | None = None
    queue_slot: bool = True
    idempotency_key_ttl: float | None = None

    @property
    def duration(self) -> float | None:
        """Seconds spent executing (waits excluded)."""
        return self.executed_seconds if self.started_at is not None else None

    @property
    def finished(self) -> bool:
        return self.status.finished

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _INTERNAL_RUN_FIELDS}
        out["status"] = self.status.value
        out["duration"] = self.duration
        return out


_INTERNAL_RUN_FIELDS = {"retry", "key_limit", "queue_slot", "idempotency_key_ttl", "worker_id"}


@dataclass(slots=True)
class Attempt:
    run_id: str
    number: int
    status: str
    worker_id: str | None
    started_at: float
    finished_at: float | None
    error: dict[str, Any] | None


@dataclass(slots=True)
class ClaimRequest:
    environment: str
    worker_id: str
    queues: list[str]  # in the order to try them (the caller rotates it for round-robin)
    task_ids: list[str]  # only runs of tasks this worker has code for
    limit: int
    lease_seconds: float
    machine: str = DEFAULT_MACHINE
    version: str | None = None  # None: serves any version


@dataclass(slots=True)
class ClaimedRun:
    id: str
    task_id: str
    queue: str
    payload: str
    attempt: int
    lease_token: str
    max_attempts: int
    retry: dict[str, Any] | None
    max_duration: float | None
    executed_seconds: float
    tags: list[str]
    metadata: dict[str, Any]
    concurrency_key: str | None
    idempotency_key: str | None
    machine: str
    version: str | None
    parent_id: str | None
    root_id: str | None
    batch_id: str | None
    created_at: float
    started_at: float  # the run's first start
    claimed_at: float = 0.0  # when this claim started the code (this attempt, or its resume)
    segment: int = 1  # execution segments of this attempt so far: > 1 after a resume from WAITING


class OutcomeKind:
    COMPLETED = "completed"
    RETRY = "retry"  # failed, attempts left: back to QUEUED at retry_at
    FAILED = "failed"  # final failure with `status` (FAILED, TIMED_OUT, CANCELED, CRASHED, ...)
    RELEASED = "released"  # graceful hand-back: QUEUED, costs no attempt
    SUSPENDED = "suspended"  # waiting without a worker: WAITING until its waitpoints complete


@dataclass(slots=True)
class Outcome:
    """What a worker reports for one run it holds. Applied only if its lease still matches."""

    run_id: str
    lease_token: str
    kind: str
    output: str | None = None  # JSON text
    error: dict[str, Any] | None = None
    retry_at: float | None = None
    status: RunStatus = RunStatus.FAILED  # final status for kind FAILED
    waits: list[WaitRequest] = field(default_factory=list)  # kind SUSPENDED: what to create first

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Outcome:
        """The inverse of `dataclasses.asdict` (an outcome crossing a pipe as plain data)."""
        fields_ = dict(data)
        fields_["status"] = RunStatus(fields_["status"])
        fields_["waits"] = [WaitRequest.from_dict(w) for w in fields_.get("waits") or []]
        return cls(**fields_)


@dataclass(slots=True)
class LogLine:
    run_id: str
    lease_token: str
    attempt: int
    ts: float
    level: str
    message: str
    attributes: dict[str, Any] | None = None


@dataclass(slots=True)
class StepRecord:
    """One completed step in a run's journal. `output` is JSON text."""

    run_id: str
    position: int  # the n-th step() call of the run (0-based), across names
    key: str  # "name#n": the n-th call of that name
    name: str
    output: str
    attempt: int
    started_at: float
    finished_at: float
    lease_token: str = ""  # set on writes: refused unless the run's lease still matches


@dataclass(slots=True)
class NewWaitpoint:
    """Something a run can wait for without holding a worker (see WaitRequest)."""

    id: str
    kind: str  # time | token | run
    complete_at: float | None = None  # time: when due; token: its timeout (epoch seconds)
    tags: list[str] = field(default_factory=list)
    # Or due this many seconds from the store's now (wait.for_, a token's timeout): the store
    # derives complete_at with the clock it compares against (the database's, in production),
    # so a host whose clock is off does not shorten or stretch the wait.
    delay: float | None = None

    def due(self, now: float) -> float | None:
        """When it falls due by itself, as seen from `now` (None: only when completed)."""
        return self.complete_at if self.complete_at is not None or self.delay is None else now + self.delay


@dataclass(slots=True)
class WaitRequest:
    """One durable wait call, applied in one transaction fenced by the run's lease: the journal
    row `step` (what a replay reads), the waitpoints to create, the child runs to insert (the
    waitpoint of kind "run" at the same index targets `runs[i]`), and the waitpoints the run
    now waits for (`wait_on`, linked to the run; empty for `create_token`)."""

    step: StepRecord
    create: list[NewWaitpoint] = field(default_factory=list)
    runs: list[NewRun] = field(default_factory=list)
    wait_on: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WaitRequest:
        runs = []
        for r in data.get("runs") or []:
            run = dict(r)
            run["status"] = RunStatus(run["status"])
            runs.append(NewRun(**run))
        return cls(
            step=StepRecord(**data["step"]),
            create=[NewWaitpoint(**w) for w in data.get("create") or []],
            runs=runs,
            wait_on=list(data.get("wait_on") or []),
        )


@dataclass(slots=True)
class WaitState:
    """A waitpoint as a replaying run sees it. `output` is the decoded result when completed."""

    id: str
    kind: str
    status: str  # PENDING | COMPLETED
    output: Any = None
    target_run_id: str | None = None

    @property
    def completed(self) -> bool:
        return self.status == "COMPLETED"


@dataclass(slots=True)
class Journal:
    """What a replay needs: the completed steps by call order and the state of the waits."""

    steps: list[StepRecord] = field(default_factory=list)
    waits: dict[str, WaitState] = field(default_factory=dict)


@dataclass(slots=True)
class MetadataOp:
    op: str  # set | delete | increment | append
    key: str
    value: Any = None


@dataclass(slots=True)
class RunEvent:
    run_id: str
    seq: int
    attempt: int | None
    kind: str  # status | metadata | stream
    data: Any
    created_at: float


@dataclass(slots=True)
class TaskRecord:
    task_id: str
    queue: str
    machine: str = DEFAULT_MACHINE
    options: dict[str, Any] = field(default_factory=dict)
    payload_schema: dict[str, Any] | None = None
    code_hash: str | None = None
    version: str = ""
    updated_at: float = 0.0
    # Values derived from `options` once, for the trigger hot path (see engine.options).
    derived: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(slots=True)
class QueueSpec:
    name: str
    concurrency_limit: int | None


@dataclass(slots=True)
class QueueInfo:
    name: str
    concurrency_limit: int | None
    paused: bool
    queued: int
    running: int
    delayed: int
    unservable: int = 0  # queued runs no live worker can serve (machine or version)


@dataclass(slots=True)
class HeartbeatResult:
    renewed: dict[str, str]  # run id -> lease token still held
    cancel_requested: list[str]


@dataclass(slots=True)
class MaintenanceResult:
    promoted: int = 0
    resumed: int = 0  # WAITING runs whose waits ended (time due, token timed out)
    expired: int = 0
    recovered: int = 0
    became_due: int = 0  # QUEUED runs whose retry time passed since the last call
    changed_queues: set[str] = field(default_factory=set)
    next_due: float | None = None


@dataclass(slots=True)
class CancelResult:
    run: Run
    stopping: bool  # EXECUTING: the worker was asked to stop the code
    worker_address: str | None = None


@dataclass(slots=True)
class WorkerInfo:
    id: str
    environment: str
    host: str
    pid: int
    address: str | None
    queues: list[str]
    machine: str
    version: str | None
    started_at: float
    last_seen_at: float


@dataclass(slots=True)
class RunFilter:
    task: str | None = None
    status: list[str] | None = None
    tags: list[str] | None = None
    created_after: float | None = None
    created_before: float | None = None
    batch_id: str | None = None
    parent_id: str | None = None
    limit: int = 50
    cursor: str | None = None  # the last id of the previous page (lists run newest first)


@dataclass(slots=True)
class StreamChunk:
    """One chunk of a run's stream (`conveyor.streams.pipe`), appended to the run's event log
    as an event of kind "stream" with data {"key": key, "chunk": <data>}; refused unless the
    run's lease still matches. `data` is JSON text; `ts` is when the code produced it."""

    run_id: str
    lease_token: str
    attempt: int
    key: str
    data: str
    ts: float
