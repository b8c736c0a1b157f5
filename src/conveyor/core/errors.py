"""One error hierarchy. Every error Conveyor raises on purpose is a ConveyorError with a code."""

from __future__ import annotations


class ConveyorError(Exception):
    code = "CONVEYOR_ERROR"


class InvalidOptions(ConveyorError, ValueError):
    code = "INVALID_OPTIONS"


class InvalidPayload(ConveyorError, ValueError):
    code = "INVALID_PAYLOAD"


class PayloadTooLarge(InvalidPayload):
    code = "PAYLOAD_TOO_LARGE"


class UnknownTask(ConveyorError, LookupError):
    code = "UNKNOWN_TASK"


class UnknownQueue(ConveyorError, LookupError):
    code = "UNKNOWN_QUEUE"


class RunNotFound(ConveyorError, LookupError):
    code = "RUN_NOT_FOUND"


class TokenNotFound(ConveyorError, LookupError):
    code = "TOKEN_NOT_FOUND"


class RunFailed(ConveyorError):
    """`Result.unwrap()` of a child run that did not complete."""

    code = "RUN_FAILED"

    def __init__(self, message: str, run_id: str | None = None, error: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.error = error


class InvalidTransition(ConveyorError):
    """The run is not in a status the requested change can start from."""

    code = "INVALID_TRANSITION"


class LeaseLost(ConveyorError):
    """A worker wrote for a run it no longer owns (stale lease token or run not EXECUTING)."""

    code = "LEASE_LOST"


class SerializationError(ConveyorError, TypeError):
    code = "NOT_SERIALIZABLE"


class WaitTimeout(ConveyorError, TimeoutError):
    code = "TIMEOUT"


class StoreError(ConveyorError):
    code = "STORE_ERROR"


class StoreBusy(StoreError):
    code = "STORE_BUSY"


class StoreConflict(StoreBusy):
    """The database aborted the transaction to break a deadlock or a serialization conflict:
    nothing of it was written, so running it again is safe."""

    code = "STORE_CONFLICT"


class StoreReadOnly(StoreError):
    code = "STORE_READ_ONLY"


class SchemaMismatch(StoreError):
    code = "SCHEMA_MISMATCH"


class ConfigError(ConveyorError):
    code = "CONFIG_ERROR"


class AbortRun(Exception):  # noqa: N818 - the public name from SPEC §1
    """Raise inside a task to fail the run at once, with no retry."""

    code = "ABORTED"


class NonDeterministic(ConveyorError):
    code = "NON_DETERMINISTIC"
