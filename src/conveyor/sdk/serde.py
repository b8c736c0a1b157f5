"""Payloads, outputs and errors as JSON text. Nothing is ever pickled."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import traceback
import typing
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from conveyor.core.errors import InvalidPayload, SerializationError

_UNTYPED = (inspect.Parameter.empty, Any, object, dict, typing.Dict)  # noqa: UP006


class PayloadType:
    """Validates a task's payload when triggered and rebuilds the typed value when run."""

    def __init__(self, annotation: Any, task_id: str) -> None:
        self.task_id = task_id
        self.annotation = annotation
        self.adapter: TypeAdapter[Any] | None = None
        if annotation not in _UNTYPED and typing.get_origin(annotation) is not dict:
            self.adapter = TypeAdapter(annotation)

    def dump(self, payload: Any) -> str:
        """Validate and serialise; the error names the task and the fields."""
        if self.adapter is None:
            return to_json(payload, f"payload of {self.task_id}", InvalidPayload)
        try:
            value = self.adapter.validate_python(payload)
            return self.adapter.dump_json(value, by_alias=True).decode()
        except ValidationError as exc:
            raise InvalidPayload(f"payload of {self.task_id} is invalid: {_describe(exc)}") from None
        except Exception as exc:  # e.g. values pydantic cannot serialise
            raise InvalidPayload(f"payload of {self.task_id} cannot be serialised: {exc}") from None

    def load(self, payload_json: str) -> Any:
        if self.adapter is None:
            return json.loads(payload_json)
        try:
            return self.adapter.validate_json(payload_json)
        except ValidationError as exc:
            raise InvalidPayload(f"payload of {self.task_id} is invalid: {_describe(exc)}") from None

    def schema(self) -> dict[str, Any] | None:
        if self.adapter is None:
            return None
        try:
            return self.adapter.json_schema()
        except Exception:
            return None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "(root)"
        parts.append(f"{where}: {err.get('msg')}")
    more = "" if exc.error_count() <= 5 else f" (+{exc.error_count() - 5} more)"
    return "; ".join(parts) + more


def plain(value: Any) -> Any:
    """Pydantic models and dataclasses become JSON data; other values pass through."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def to_json(value: Any, what: str, error: type[Exception] = SerializationError) -> str:
    try:
        # Plain JSON types skip the model/dataclass checks (the trigger hot path).
        text = _ENCODER.encode(value if type(value) in _NATIVE else plain(value))
    except (TypeError, ValueError, RecursionError) as exc:
        raise error(f"{what} is not JSON-serialisable: {exc}") from None
    if "\\u0000" in text and _NUL.search(text):
        # PostgreSQL's jsonb cannot hold it: refuse it on every store, here, not at the commit.
        raise error(f"{what} contains a NUL character (\\u0000), which the store cannot hold")
    return text


# An escaped NUL in JSON text (not the literal text "\\u0000", whose backslash is escaped too).
_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _default(value: Any) -> Any:
    if isinstance(value, BaseModel) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
        return plain(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_NATIVE = {dict, list, str, int, float, bool, type(None)}
# One encoder for every call: json.dumps builds a new one whenever options are passed.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=_default)


def safe_str(value: Any) -> str:
    """str() that never raises: an exception whose __str__ fails must still be reported."""
    try:
        return str(value)
    except Exception:
        try:
            return repr(value)
        except Exception:
            return f"<unprintable {type(value).__name__}>"


def error_dict(exc: BaseException, code: str | None = None) -> dict[str, Any]:
    """{type, message, stack, code}: plain text that always crosses process boundaries."""
    try:
        stack = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception:
        stack = f"<traceback unavailable for {type(exc).__name__}>"
    return {
        "type": type(exc).__name__,
        "message": safe_str(exc),
        "stack": stack[-20_000:],
        "code": code or getattr(exc, "code", None) or "TASK_ERROR",
    }
