"""Time-sortable ids: a prefix, 10 characters of millisecond time, 16 of randomness.

Crockford base32 like ULID, so ids sort by creation time as strings. Ids made in the same
millisecond by one process increase monotonically, so a batch keeps its input order.
"""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_lock = threading.Lock()
_last_ms = -1
_last_rand = 0
_RAND_BITS = 80
_RAND_MAX = (1 << _RAND_BITS) - 1


def _encode(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_id(prefix: str, now_ms: int | None = None) -> str:
    global _last_ms, _last_rand
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    with _lock:
        if ms <= _last_ms and _last_rand < _RAND_MAX:
            ms = _last_ms
            rand = _last_rand + 1
        else:
            rand = int.from_bytes(os.urandom(10), "big") >> 1  # leave headroom to increment
        _last_ms, _last_rand = ms, rand
    return f"{prefix}_{_encode(ms, 10)}{_encode(rand, 16)}"


def id_time(identifier: str) -> float:
    """The creation time (epoch seconds) encoded in an id."""
    body = identifier.split("_", 1)[1][:10]
    value = 0
    for ch in body:
        value = value * 32 + _ALPHABET.index(ch)
    return value / 1000.0
