"""`conveyor.idempotency_key(...)`: keys scoped to the current run, attempt, or global."""

from __future__ import annotations

import hashlib
from typing import Any

from conveyor.core.errors import InvalidOptions
from conveyor.sdk import context

SCOPES = ("run", "attempt", "global")


def idempotency_key(*parts: Any, scope: str = "run") -> str:
    """A key from `parts` (strings, numbers, or lists of them). Inside a run, scope "run" (the
    default) makes it unique to this run, so a retry of the run reuses the key (and so finds
    the child it already triggered), while another run of the same task gets a new key;
    "attempt" adds the attempt number; "global" is the same everywhere. Outside a run every
    scope is global."""
    if scope not in SCOPES:
        raise InvalidOptions(f"idempotency key scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    flat: list[str] = []
    for part in parts:
        if isinstance(part, list | tuple):
            flat.extend(str(p) for p in part)
        else:
            flat.append(str(part))
    if not flat:
        raise InvalidOptions("idempotency_key() needs at least one part")
    execution = context.current()
    if execution is not None and scope != "global":
        flat.insert(0, execution.ctx.run.id)
        if scope == "attempt":
            flat.insert(1, f"attempt-{execution.ctx.attempt.number}")
    return hashlib.sha256("\x1f".join(flat).encode()).hexdigest()
