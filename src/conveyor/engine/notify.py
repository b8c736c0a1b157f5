"""Waking workers without polling.

Every worker binds a UDP socket on the loopback and records its address in the workers table.
SQLite has no LISTEN/NOTIFY, so after a commit that makes work the producer sends each live
worker of the environment one payload-free datagram. Losing one costs latency only: workers
also watch `PRAGMA data_version` as a slow fallback.

PostgreSQL delivers NOTIFYs to a LISTEN thread in each worker (store/postgres/listen.py), which
forwards them to the same socket. A new run in a queue wakes one idle worker of that queue
(`TARGETED`): the worker reports back whether it took work (`Notifier.idle`), and a wake-up it
could not serve is passed on to every worker of the queue.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import weakref
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple

from conveyor.core.records import DEFAULT_MACHINE
from conveyor.store.base import Store

WORK = b"w"  # new or due runs
CANCEL = b"c"  # a run this worker holds was asked to stop
DELAYED = b"d"  # a delayed run was made: re-plan the maintenance timer
TARGETED = b"t"  # WORK for this worker alone (PostgreSQL): report back with Notifier.idle


class ClaimLoan:
    """A wholly idle worker lends its LISTEN thread (PostgreSQL) one claim: on the next wake-up
    for work, that thread claims at once (`run`) instead of waking the worker's loop, which
    would hand the claim to its store thread — two thread hand-offs fewer between the NOTIFY
    and the claim. The loop gets the runs when `done` resolves. The worker takes the loan back
    (`revoke`) whenever it stops waiting; if the thread took it first, the worker waits for
    `done`, so its own claims never overlap this one (no more runs than free slots)."""

    def __init__(
        self, claim: Callable[[], Sequence[Any]], limit: int, loop: asyncio.AbstractEventLoop, wake: Callable[[], None]
    ) -> None:
        self.limit = limit
        self.claimed: list[Any] = []
        self.error: Exception | None = None
        self.done: asyncio.Future[None] = loop.create_future()
        self._claim = claim
        self._loop = loop
        self._wake = wake
        self._lock = threading.Lock()
        self._state = "lent"

    def take(self) -> bool:
        """The LISTEN thread: may it claim? (Once; not after `revoke`.)"""
        with self._lock:
            if self._state != "lent":
                return False
            self._state = "taken"
            return True

    def run(self) -> bool:
        """The LISTEN thread, after `take`: claim, hand the runs to the loop. -> whether the
        wake-up was served (runs claimed, and room left: no runs left behind for others)."""
        try:
            self.claimed = list(self._claim())
        except Exception as exc:  # the worker logs it and claims again the usual way
            self.error = exc
        try:
            self._loop.call_soon_threadsafe(self._finish)
        except RuntimeError:  # the loop is closed: the worker is gone
            pass
        return self.error is None and 0 < len(self.claimed) < self.limit

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        self._wake()

    def revoke(self) -> bool:
        """The worker: take the loan back. False when the thread took it (then await `done`)."""
        with self._lock:
            if self._state == "lent":
                self._state = "revoked"
                return True
            return False


class QueueWake(NamedTuple):
    """WORK for `runs` new runs in one queue (one run: of `machine` and `version`). A store that
    can address a queue's workers wakes one idle worker for one run; others wake everyone."""

    queue: str
    runs: int
    machine: str = DEFAULT_MACHINE
    version: str | None = None
    message: bytes = WORK


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
        # Workers of this process with a LISTEN session (PostgreSQL), by worker id.
        self._listeners: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self._targeted: dict[str, tuple[float, int]] = {}  # worker id -> (last drain, claimed then)

    # --- targeted wake-ups (PostgreSQL) -------------------------------------------------------------
    def attach(self, worker_id: str, listener: Any) -> None:
        """`listener` (a PostgresListener) wakes `worker_id`; it learns from `idle` what the
        worker serves and how its targeted wake-ups went."""
        if all(hasattr(listener, name) for name in ("serve", "resolve", "lend")):
            self._listeners[worker_id] = listener

    @staticmethod
    def loan(
        claim: Callable[[], Sequence[Any]], limit: int, loop: asyncio.AbstractEventLoop, wake: Callable[[], None]
    ) -> ClaimLoan:
        return ClaimLoan(claim, limit, loop, wake)

    def lends(self, worker_id: str) -> bool:
        """Whether `worker_id` has a listener to lend a claim to (ClaimLoan)."""
        return worker_id in self._listeners

    def targeted(self, worker_id: str, drained_at: float, claimed: int) -> None:
        """The worker's loop read TARGETED datagrams in a drain begun at `drained_at`
        (`time.monotonic()`), with `claimed` runs claimed so far."""
        first = self._targeted.get(worker_id)
        self._targeted[worker_id] = (drained_at, claimed if first is None else first[1])

    def idle(
        self,
        worker_id: str,
        queues: Sequence[str],
        task_ids: Collection[str],
        machine: str,
        version: str | None,
        able: bool,
        claim_wanted: bool,
        claimed: int,
        loan: ClaimLoan | None = None,
    ) -> None:
        """The worker is about to wait. `able`: it has a free slot and takes runs (not stopping);
        `claim_wanted`: it may have work it did not claim; `claimed`: runs claimed so far.
        Its targeted wake-ups read so far were served iff a claim that began after them took
        runs and left it able to take more: a claim that returned fewer runs than it asked for
        took every run it could, the run it was woken for included, unless another worker had
        taken that run already. Otherwise they go to every worker of their queues. `loan`: a
        claim the listener may make itself (ClaimLoan; the worker revokes it when it wakes)."""
        listener = self._listeners.get(worker_id) if self._listeners else None
        if listener is None:
            return
        listener.serve(queues, task_ids, machine, version, able)
        listener.lend(loan)
        pending = self._targeted.pop(worker_id, None)
        if pending is not None:
            drained_at, claimed_before = pending
            listener.resolve(drained_at, able and not claim_wanted and claimed > claimed_before)

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
        self.drained_at = 0.0
        self.targeted = False

    def drain(self) -> set[bytes]:
        """Read every pending datagram; return the distinct messages. `targeted`: whether one
        was TARGETED; `drained_at`: when this drain began (`time.monotonic()`)."""
        self.drained_at = time.monotonic()
        seen: set[bytes] = set()
        while True:
            try:
                data = self.sock.recv(64)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            seen.add(data[:1])
        self.targeted = TARGETED in seen
        return seen

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()
