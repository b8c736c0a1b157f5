"""Validating a payload against a task's registered JSON Schema, for triggers by id.

A process that triggers `conveyor.trigger("id", payload)` without the task's code still
refuses a bad payload at the call (SPEC §1): workers register each typed task's schema (made
by pydantic), and it is checked here with `jsonschema`. JSON Schema is strict where pydantic's
lax mode would coerce (the string "42" for an integer field is refused here).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from conveyor.core.errors import InvalidPayload


@lru_cache(maxsize=256)
def _validator(schema_json: str) -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(json.loads(schema_json))


def check_payload(task_id: str, schema: dict[str, Any] | None, payload_json: str) -> None:
    if not schema:
        return
    validator = _validator(json.dumps(schema, sort_keys=True))
    errors = sorted(validator.iter_errors(json.loads(payload_json)), key=lambda e: list(e.absolute_path))
    if errors:
        parts = [f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}" for e in errors[:5]]
        more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
        raise InvalidPayload(f"payload of {task_id} is invalid: {'; '.join(parts)}{more}")
