"""Waking workers without polling.

SQLite has no LISTEN/NOTIFY, so every worker binds a UDP socket on the loopback and records
its address in the workers table; after a commit that makes work, the producer sends each live
worker of the environment one payload-free datagram. Losing one costs latency only: workers
also watch `PRAGMA data_version` as a slow fallback.
"""

from __future__ import annotations

import socket
import threading
import time

from conveyor.store.base import Store

WORK = b"w"  # new or due runs
CANCEL = b"c"  # a run this worker holds was asked to stop
DELAYED = b"d"  # a delayed run was made: re-plan the maintenance timer

_ADDRESS_TTL = 1.0
# No worker known: look again soon, so a worker that just started is woken for the next run
# instead of finding it by its fallback poll.
_EMPTY_TTL = 0.1


class Notifier:
    def __init__(self, store: Store, environment: str) -> None:
        self.store = store
        self.environment = environment
        self._sock: socket.socket | None = None
        self._addresses: list[tuple[str, int]] = []
        self._fetched_at = 0.0
        self._lock = threading.Lock()

    def _targets(self) -> list[tuple[str, int]]:
        now = time.monotonic()
        if now - self._fetched_at > (_ADDRESS_TTL if self._addresses else _EMPTY_TTL):
            with self.store.read() as tx:
                workers = tx.worker_list(self.environment)
            self._addresses = [a for a in (parse_address(w.address) for w in workers) if a]
            self._fetched_at = now
        return self._addresses

    def wake_workers(self, message: bytes = WORK) -> None:
        targets = self._targets()
        if targets:
            self.send(targets, message)

    def send(self, targets: list[tuple[str, int]], message: bytes) -> None:
        with self._lock:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            for target in targets:
                try:
                    self._sock.sendto(message, target)
                except OSError:
                    pass  # a gone worker; the fallback poll covers anything missed

    def forget(self) -> None:
        """Re-read the worker list on the next wake (a worker came or went)."""
        self._fetched_at = 0.0

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def parse_address(address: str | None) -> tuple[str, int] | None:
    if not address or not address.startswith("udp://"):
        return None
    host, _, port = address[len("udp://") :].rpartition(":")
    try:
        return host, int(port)
    except ValueError:
        return None


class WakeSocket:
    """The worker's end: a UDP socket on the loopback."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        bound_host, port = self.sock.getsockname()
        self.address = f"udp://{bound_host}:{port}"

    def drain(self) -> set[bytes]:
        """Read every pending datagram; return the distinct messages."""
        seen: set[bytes] = set()
        while True:
            try:
                data = self.sock.recv(64)
            except (BlockingIOError, InterruptedError):
                return seen
            except OSError:
                return seen
            seen.add(data[:1])

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()
