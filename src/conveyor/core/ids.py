"""Time-sortable ids: a prefix, 12 hex digits of millisecond time, 16 of randomness.

Ids sort by creation time as strings. Ids made in the same millisecond by one process
increase monotonically, so a batch keeps its input order.
"""

from __future__ import annotations

import os
import threading
import time

_lock = threading.Lock()
_last_ms = -1
_last_rand = 0
_RAND_MAX = (1 << 64) - 1


def new_id(prefix: str, now_ms: int | None = None) -> str:
    """`now_ms`: an id for that time, outside the monotonic sequence (which it must not move)."""
    global _last_ms, _last_rand
    if now_ms is not None:
        return f"{prefix}_{now_ms:012x}{int.from_bytes(os.urandom(8), 'big') >> 1:016x}"
    ms = int(time.time() * 1000)
    with _lock:
        if ms <= _last_ms and _last_rand < _RAND_MAX:
            ms = _last_ms
            rand = _last_rand + 1
        else:
            rand = int.from_bytes(os.urandom(8), "big") >> 1  # leave headroom to increment
        _last_ms, _last_rand = ms, rand
    return f"{prefix}_{ms:012x}{rand:016x}"


def id_time(identifier: str) -> float:
    """The creation time (epoch seconds) encoded in an id."""
    return int(identifier.split("_", 1)[1][:12], 16) / 1000.0
