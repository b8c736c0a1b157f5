"""Run statuses (SPEC §5) and the table of legal transitions between them."""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    DELAYED = "DELAYED"
    QUEUED = "QUEUED"
    EXECUTING = "EXECUTING"
    WAITING = "WAITING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    CRASHED = "CRASHED"
    TIMED_OUT = "TIMED_OUT"
    EXPIRED = "EXPIRED"
    SYSTEM_FAILURE = "SYSTEM_FAILURE"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED: frozenset[RunStatus] = frozenset(
    {
        RunStatus.COMPLETED,
        RunStatus.FAILED,
        RunStatus.CANCELED,
        RunStatus.CRASHED,
        RunStatus.TIMED_OUT,
        RunStatus.EXPIRED,
        RunStatus.SYSTEM_FAILURE,
    }
)
UNFINISHED: frozenset[RunStatus] = frozenset(RunStatus) - FINISHED

# Finished statuses that free an idempotency key at once (DECISIONS.md, "Idempotency");
# COMPLETED and CANCELED keep it until its TTL.
FREES_IDEMPOTENCY_KEY: frozenset[RunStatus] = frozenset(
    {
        RunStatus.FAILED,
        RunStatus.CRASHED,
        RunStatus.TIMED_OUT,
        RunStatus.EXPIRED,
        RunStatus.SYSTEM_FAILURE,
    }
)

S = RunStatus
TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    S.DELAYED: frozenset({S.QUEUED, S.CANCELED, S.EXPIRED, S.SYSTEM_FAILURE}),
    # QUEUED -> QUEUED is not a transition: a retry re-queues from EXECUTING.
    S.QUEUED: frozenset({S.EXECUTING, S.CANCELED, S.EXPIRED, S.SYSTEM_FAILURE}),
    S.EXECUTING: frozenset(
        {
            S.QUEUED,  # retry with backoff, graceful release, lease lost with attempts left
            S.WAITING,
            S.COMPLETED,
            S.FAILED,
            S.CANCELED,
            S.CRASHED,
            S.TIMED_OUT,
            S.SYSTEM_FAILURE,
        }
    ),
    S.WAITING: frozenset({S.QUEUED, S.CANCELED, S.TIMED_OUT, S.SYSTEM_FAILURE}),
}
for _done in FINISHED:
    TRANSITIONS[_done] = frozenset()
del _done, S


def can_transition(source: RunStatus | str, target: RunStatus | str) -> bool:
    return RunStatus(target) in TRANSITIONS[RunStatus(source)]


def sources_of(target: RunStatus) -> frozenset[RunStatus]:
    """Every status a run may be in just before it moves to `target` (used in SQL guards)."""
    return frozenset(s for s, targets in TRANSITIONS.items() if target in targets)
