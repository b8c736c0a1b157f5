"""The worker's end of LISTEN/NOTIFY, and how producers address one idle worker.

Channels (all in the connection's database):

- the environment's channel: wake-ups that name no queue (a run handed back, retries due,
  timers to re-plan); every listener of the environment hears them;
- a queue's channel (`queue_channel`): "work in this queue", heard by every worker serving it;
- a queue's *slot* channels (`slot_channel`: the queue's channel, a dot, a slot number
  0..SLOTS-1): "work in this queue, for the worker in that slot alone";
- the worker's own channel (cancels).

Slots are advisory locks (two-int form: a class hashed from database, schema, environment, queue
and kind, and the slot number). A worker's LISTEN session takes the lowest free slot of each
queue it serves (`own`, exclusive, for as long as it serves the queue), LISTENs on the slot's
channel, and while it has a free slot *advertises* it: `avail` (exclusive, per slot) and `any`
(shared, one per queue), each in the classes of the runs it can take (the machine, and runs
without a version plus runs of its version, or of every version when it has none). Session locks
go with the session: a worker that dies stops advertising when the server notices.

A producer that makes exactly one run in a queue sends `pick_notify` in its COMMIT's round trip:
one exclusive try of `any` says whether anybody advertises (that is all a system without idle
workers pays); if somebody does, shared tries of `avail` from slot 0 up find the first who does,
and the NOTIFY goes to that slot's channel. Otherwise, and for a batch, it goes to the queue's
channel. So an idle system wakes one worker per trigger, not all of them. (Reading `pg_locks`
instead cost 0.15 ms per trigger; this statement costs 7-11 us more than a plain NOTIFY when
nobody advertises: docs/performance.md.)

No wake-up is lost to that choice:

- the slot's owner LISTENs on the slot channel before it advertises and as long as it owns the
  slot, so a NOTIFY that picked it reaches it even after it stopped advertising;
- the listener hands a targeted wake-up to the worker (`TARGETED`) only while it advertises for
  that queue; otherwise it forwards it at once to the queue's channel;
- the worker reports each targeted wake-up back (`resolve`): served (a claim that began after it
  took runs and did not fill the worker) or not (full, stopping, claimed nothing), and the
  listener forwards those not served to the queue's channel. One not reported within
  `_WATCHDOG` seconds (a blocked event loop, a dropped datagram) is forwarded too;
- a producer *pins* the slot it picked (`pg_try_advisory_xact_lock_shared(pin, slot)`, held to
  its commit); before a listener stops listening on a slot channel (closing, or dropping a
  queue) it stops advertising and takes that pin exclusively, for the rest of its session (it
  waits for the producers that pinned it, and keeps every later one out), then forwards whatever
  targeted wake-ups it got and did not serve. A producer that cannot take its pin notifies the
  queue's channel instead;
- a session that dies (kill -9, lost connection) takes its locks with it; a NOTIFY that picked
  it between the death and the server noticing is lost, and the workers' one-second safety poll
  finds that run. A reconnected listener reports `None` ("some may have been missed").

A wholly idle worker also lends this thread a claim (`lend`, engine.notify.ClaimLoan): on a
wake-up for work the thread makes it at once, on the pool, and hands the runs to the worker's
loop, instead of waking the loop, which would hand the claim to the worker's store thread (two
thread hand-offs, about 0.2 ms of the trigger -> start latency; docs/performance.md). A targeted
wake-up the loan served needs no report; one it did not (nothing claimed, or the worker filled
up) is forwarded at once.

A worker advertises only for queues whose every task in the registry it serves, so the run it
is picked for is one it can take. A run of a task the registry does not know (yet: it is read
every `_REGISTRY_TTL` seconds) may pick a worker that cannot take it: that worker claims nothing
and forwards it (one hop more); only if it claimed another run at the same moment does that run
wait for the safety poll.

A producer's tries are transaction locks held to its commit: for an instant they can keep an
advertising worker from taking its `avail`/`any` locks (it tries again `_RETRY` seconds later),
and two producers committing at once while nobody advertises see each other's `any` and scan
the 16 slots for nothing (about 0.1 ms).

The connection is its own (not pooled): LISTEN and session locks belong to a session. When it
breaks (a server restart) the thread reconnects with a growing pause and then reports `None`,
so the worker checks for everything at once.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import psycopg
from psycopg import sql

log = logging.getLogger("conveyor.store")

_POLL = 0.5  # how often the thread looks at its stop flag
_MAX_PAUSE = 5.0
_WATCHDOG = 0.25  # a targeted wake-up the worker has not reported by then is forwarded
_RETRY = 0.002  # a producer's try held an advert lock: try again this much later
_REGISTRY_TTL = 10.0  # how often an advertising listener re-reads which tasks its queues hold
_MAX_ADVERTISED_QUEUES = 32  # more and the worker is woken by its queues' channels only
_PIN_TIMEOUT = "1s"  # the longest a closing listener waits for producers that picked it
SLOTS = 16  # workers per queue that can be woken alone; more are woken by the queue's channel

TARGETED = b"t"  # delivered for a wake-up addressed to this worker alone (engine.notify.TARGETED)
_WORK = b"w"
_WORK_PAYLOAD = _WORK.decode()
_NAME_LIMIT = 63 - 3  # NOTIFY channels are identifiers (63 bytes); room for ".<slot>"


def _channel(schema: str, kind: str, environment: str, name: str) -> str:
    full = f"conveyor.{schema}.{kind}.{environment}.{name}"
    if len(full.encode()) <= _NAME_LIMIT:
        return full
    return f"conveyor.{kind}." + hashlib.sha1(full.encode()).hexdigest()[:40]


def queue_channel(schema: str, environment: str, queue: str) -> str:
    return _channel(schema, "q", environment, queue)


def slot_channel(queue_channel: str, slot: int) -> str:
    return f"{queue_channel}.{slot}"


def _class(*parts: str) -> int:
    """An advisory lock class (the first int of pg_advisory_lock(int, int)), >= 0."""
    return int.from_bytes(hashlib.sha1("\0".join(parts).encode()).digest()[:4], "big") & 0x7FFFFFFF


class QueueLocks(NamedTuple):
    """The lock classes of one queue: `own` and `pin` by slot; `avail` (by slot) and `any` (0)
    for each class of runs."""

    own: int
    pin: int
    avail: tuple[int, ...]
    any: tuple[int, ...]


@functools.lru_cache(maxsize=1024)
def _locks(
    database: str, schema: str, environment: str, queue: str, machine: str, kinds: tuple[str, ...]
) -> QueueLocks:
    base = (database, schema, environment, queue)
    return QueueLocks(
        _class("own", *base),
        _class("pin", *base),
        tuple(_class("avail", *base, machine, k) for k in kinds),
        tuple(_class("any", *base, machine, k) for k in kinds),
    )


def worker_locks(
    database: str, schema: str, environment: str, queue: str, machine: str, version: str | None
) -> QueueLocks:
    """A worker advertises for runs without a version, and for its version (or all of them)."""
    return _locks(database, schema, environment, queue, machine, ("run:any", f"worker:{version or '*'}"))


def run_locks(
    database: str, schema: str, environment: str, queue: str, machine: str, version: str | None
) -> QueueLocks:
    """Who can take a run: anyone (no version), or workers of its version or of every version."""
    kinds = (f"worker:{version}", "worker:*") if version else ("run:any",)
    return _locks(database, schema, environment, queue, machine, kinds)


@functools.cache
def _pick_statement(classes: int) -> str:
    anybody = " OR ".join(f"NOT pg_try_advisory_xact_lock(%(any{i})s::int4, 0)" for i in range(classes))
    advertised = " OR ".join(f"NOT pg_try_advisory_xact_lock_shared(%(avail{i})s::int4, s)" for i in range(classes))
    return f"""
SELECT pg_notify(CASE WHEN pg_try_advisory_xact_lock_shared(%(pin)s::int4, t.s)
                      THEN %(queue_channel)s || '.' || t.s ELSE %(queue_channel)s END, '{_WORK_PAYLOAD}')
FROM (SELECT CASE WHEN {anybody}
             THEN (SELECT s FROM generate_series(0, {SLOTS - 1}) s WHERE {advertised} LIMIT 1) END AS s) t
"""


def pick_notify(locks: QueueLocks, channel: str) -> tuple[str, dict[str, object]]:
    """The producer's statement for one new run in the queue of `channel` (see above): the first
    advertised slot, pinned to the commit, else the queue's channel."""
    statement = _pick_statement(len(locks.any))
    params: dict[str, object] = {"pin": locks.pin, "queue_channel": channel}
    params.update({f"any{i}": c for i, c in enumerate(locks.any)})
    params.update({f"avail{i}": c for i, c in enumerate(locks.avail)})
    return statement, params


_OWN = f"SELECT s FROM generate_series(0, {SLOTS - 1}) s WHERE pg_try_advisory_lock(%s::int4, s) LIMIT 1"
# -> (avail class or NULL, any class or NULL) for each lock taken
_ADVERTISE = (
    "SELECT a, NULL::int4 FROM unnest(%(avail)s::int4[]) a WHERE pg_try_advisory_lock(a, %(slot)s::int4)"
    " UNION ALL SELECT NULL, c FROM unnest(%(any)s::int4[]) c WHERE pg_try_advisory_lock_shared(c, 0)"
)
_WITHDRAW = (
    "SELECT pg_advisory_unlock(a, %(slot)s::int4) FROM unnest(%(avail)s::int4[]) a"
    " UNION ALL SELECT pg_advisory_unlock_shared(c, 0) FROM unnest(%(any)s::int4[]) c"
)
# Session-level and never released: the session stops listening on those slot channels.
_CLOSE_PINS = (
    "SELECT set_config('lock_timeout', %s, false), pg_advisory_lock(p, s)"
    " FROM unnest(%s::int4[], %s::int4[]) AS x(p, s)"
)
_FORWARD = "SELECT pg_notify(c, 'w') FROM unnest(%s::text[]) c"


@dataclass(frozen=True)
class _Serving:
    """What the worker said it serves, and whether it has a free slot now."""

    queues: tuple[str, ...]
    task_ids: frozenset[str]
    machine: str
    version: str | None
    available: bool


class PostgresListener:
    def __init__(
        self,
        conninfo: str,
        channels: list[str],
        deliver: Callable[[bytes | None], None],
        connect_timeout: float = 10.0,
        on_close: Callable[[PostgresListener], None] | None = None,
        application_name: str = "conveyor",
        *,
        schema: str | None = None,
        environment: str | None = None,
        queues: Sequence[str] | None = None,
    ) -> None:
        """`channels`: the environment's and the worker's. With `schema` and `environment`, also
        the queues' channels: of `queues`, or (None) of every queue of the environment known
        when connecting, until `serve` names the worker's."""
        self.conninfo = conninfo
        self.channels = channels
        self.deliver = deliver
        self.connect_timeout = connect_timeout
        self._on_close = on_close
        self.application_name = application_name
        self.schema = schema
        self.environment = environment
        self._initial_queues = None if queues is None else tuple(queues)
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards what the worker's thread and this one share
        self._serving: _Serving | None = None
        self._serving_src: tuple[object, ...] = ()
        self._pending: deque[tuple[str, float]] = deque()  # targeted wake-ups delivered: (queue, when)
        self._to_forward: set[str] = set()
        self._advertised: frozenset[str] = frozenset()
        self._loan: Any = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # The rest is the listener thread's alone: what is applied on the connection.
        self._pid = 0
        self._queue_channels: dict[str, str] = {}  # channel -> queue
        self._slot_channels: dict[str, str] = {}  # channel -> queue
        self._slots: dict[str, int] = {}  # queue -> the slot this session owns
        self._held: dict[str, QueueLocks] = {}  # queue -> the advert locks held
        self._listened: tuple[str, ...] = ()
        self._targets_on = False
        self._retry_at: float | None = None
        self._registry: dict[str, set[str]] = {}
        self._registry_at = 0.0
        self._conn: psycopg.Connection | None = self._connect()  # the first one fails loudly
        self._thread = threading.Thread(target=self._run, name="conveyor-listen", daemon=True)
        self._thread.start()

    # --- the worker's side (its thread) -----------------------------------------------------------
    def serve(
        self, queues: Sequence[str], task_ids: Collection[str], machine: str, version: str | None, available: bool
    ) -> None:
        """What the worker serves, and whether it can take a run now (a free slot, not stopping).
        Cheap when nothing changed: the worker calls it each time it goes idle."""
        current = self._serving
        src = (queues, task_ids, machine, version)
        if current is not None and current.available == available and self._serving_src == src:
            return
        serving = _Serving(tuple(queues), frozenset(task_ids), machine, version or None, available)
        self._serving_src = src
        if serving == current:
            return
        with self._lock:
            self._serving = serving
        self._poke()

    def resolve(self, before: float, served: bool) -> None:
        """The worker's report on the targeted wake-ups this thread received before `before`
        (`time.monotonic()`; their runs were committed by then): `served` (a claim that began
        later took runs and did not fill the worker), or not (they are then forwarded to their
        queues' channels)."""
        with self._lock:
            queues = []
            while self._pending and self._pending[0][1] < before:
                queues.append(self._pending.popleft()[0])
            if served or not queues:
                return
            self._to_forward.update(queues)
        self._poke()

    def lend(self, loan: Any) -> None:
        """A claim the worker lends while it waits, wholly idle (engine.notify.ClaimLoan: `take`,
        `run`), or None: on a wake-up for work this thread claims at once rather than waking
        the worker's loop to do it."""
        self._loan = loan

    @property
    def advertised(self) -> frozenset[str]:
        """The queues this worker advertises a free slot for now (a producer may pick it)."""
        return self._advertised

    @property
    def listened(self) -> tuple[str, ...]:
        """The queues whose channels this session listens on."""
        return self._listened

    @property
    def slots(self) -> dict[str, int]:
        """queue -> the slot this session owns (it may be woken alone for that queue)."""
        return dict(self._slots)

    @property
    def backend_pid(self) -> int:
        return self._pid

    def _poke(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # full (the thread will look anyway), or closed
            pass

    # --- the listener thread ----------------------------------------------------------------------
    def _connect(self) -> psycopg.Connection:
        conn = psycopg.connect(
            self.conninfo,
            autocommit=True,
            connect_timeout=max(1, round(self.connect_timeout)),
            application_name=self.application_name,
        )
        try:
            conn.add_notify_handler(lambda n: self._handle(n.channel, n.payload, n.pid))
            self._pid = conn.info.backend_pid
            self._queue_channels, self._slot_channels, self._slots, self._held = {}, {}, {}, {}
            self._listened, self._targets_on, self._retry_at, self._registry_at = (), False, None, 0.0
            with self._lock:
                self._advertised = frozenset()
            serving = self._serving
            if serving is not None:
                queues = serving.queues
            elif self._initial_queues is not None:
                queues = self._initial_queues
            else:
                queues = self._every_queue(conn)
            self._listen(conn, queues, targets=serving is not None)
            # The worker's channel last: tests find the session by its last statement.
            conn.execute(sql.SQL("; ").join(sql.SQL("LISTEN {}").format(sql.Identifier(c)) for c in self.channels))
        except BaseException:
            conn.close()
            raise
        return conn

    def _every_queue(self, conn: psycopg.Connection) -> tuple[str, ...]:
        if self.schema is None or self.environment is None:
            return ()
        every = (
            "SELECT name FROM {0}.queues WHERE environment = %s "
            "UNION SELECT queue FROM {0}.tasks WHERE environment = %s"
        )
        rows = conn.execute(
            sql.SQL(every).format(sql.Identifier(self.schema)), [self.environment, self.environment]
        ).fetchall()
        return tuple(sorted(r[0] for r in rows))

    def _queue_channel(self, queue: str) -> str:
        return queue_channel(self.schema or "", self.environment or "", queue)

    def _locks(self, conn: psycopg.Connection, queue: str, serving: _Serving | None) -> QueueLocks:
        machine, version = (serving.machine, serving.version) if serving is not None else ("", None)
        return worker_locks(conn.info.dbname, self.schema or "", self.environment or "", queue, machine, version)

    def _listen(self, conn: psycopg.Connection, queues: Sequence[str], targets: bool) -> list[str]:
        """LISTEN on the queues' channels and (when `targets`) on the channels of slots owned
        in them, taking a slot where there is one free; UNLISTEN the others. -> the queues
        whose channel is new."""
        if self.schema is None or self.environment is None:
            queues = ()
        queue_channels = {self._queue_channel(q): q for q in queues}
        gone = [q for q in self._slots if not targets or q not in queue_channels.values()]
        if gone:
            self._close_slots(conn, gone)
        if targets:
            for q in queues:
                if q not in self._slots and len(self._slots) < _MAX_ADVERTISED_QUEUES:
                    row = conn.execute(_OWN, [self._locks(conn, q, None).own]).fetchone()
                    if row is not None:
                        self._slots[q] = row[0]
        slot_channels = {slot_channel(self._queue_channel(q), s): q for q, s in self._slots.items()}
        old = {**self._queue_channels, **self._slot_channels}
        new = {**queue_channels, **slot_channels}
        statements = [sql.SQL("LISTEN {}").format(sql.Identifier(c)) for c in new if c not in old]
        statements += [sql.SQL("UNLISTEN {}").format(sql.Identifier(c)) for c in old if c not in new]
        if statements:
            conn.execute(sql.SQL("; ").join(statements))
        added = [q for c, q in queue_channels.items() if c not in self._queue_channels]
        self._queue_channels, self._slot_channels = queue_channels, slot_channels
        self._listened, self._targets_on = tuple(queues), targets
        return added

    def _close_slots(self, conn: psycopg.Connection, queues: Collection[str]) -> None:
        """Before this session stops listening on the slot channels of `queues`: no adverts, and
        no producer still (or ever again) committing a NOTIFY that picked it (see above). The
        slots stay owned (and pinned) until the session ends, so no other worker takes them."""
        self._withdraw(conn, queues)
        pins = [(self._locks(conn, q, None).pin, self._slots[q]) for q in queues]
        try:
            conn.execute(_CLOSE_PINS, [_PIN_TIMEOUT, [p for p, _ in pins], [s for _, s in pins]])
        except psycopg.errors.LockNotAvailable:
            log.warning("a producer held its pin on this worker for %s; going on", _PIN_TIMEOUT)
        for q in queues:
            del self._slots[q]

    def _withdraw(self, conn: psycopg.Connection, queues: Collection[str]) -> None:
        held = [q for q in queues if q in self._held]
        if not held:
            return
        with self._lock:  # from here, targeted NOTIFYs for them are forwarded (`_handle`)
            self._advertised = self._advertised.difference(held)
        for q in held:
            locks = self._held.pop(q)
            conn.execute(_WITHDRAW, {"slot": self._slots[q], "avail": list(locks.avail), "any": list(locks.any)})

    def _advertise(self, conn: psycopg.Connection, queue: str, locks: QueueLocks) -> bool:
        """Take the advert locks of `queue`, all or none (a producer's try may hold one)."""
        slot = self._slots[queue]
        rows = conn.execute(_ADVERTISE, {"slot": slot, "avail": list(locks.avail), "any": list(locks.any)}).fetchall()
        avail, any_ = [a for a, _ in rows if a is not None], [c for _, c in rows if c is not None]
        if len(avail) == len(locks.avail) and len(any_) == len(locks.any):
            self._held[queue] = locks
            with self._lock:
                self._advertised = self._advertised | {queue}
            return True
        conn.execute(_WITHDRAW, {"slot": slot, "avail": avail, "any": any_})
        return False

    def _handle(self, channel: str, payload: str, pid: int) -> None:
        """One notification (on this thread, from `_wait` or from any statement's results)."""
        queue = self._slot_channels.get(channel)
        if queue is not None:
            with self._lock:
                if queue not in self._advertised:  # picked before we withdrew (full, stopping)
                    self._to_forward.add(queue)
                    return
            served = self._claim_here()
            if served is not None:
                if not served:  # nothing claimed, or the worker filled up: someone else's
                    with self._lock:
                        self._to_forward.add(queue)
                return
            with self._lock:
                self._pending.append((queue, time.monotonic()))
            self.deliver(TARGETED)
        elif pid == self._pid and channel in self._queue_channels:
            return  # our own forward
        elif payload != _WORK_PAYLOAD or self._claim_here() is None:
            self.deliver(payload.encode())

    def _claim_here(self) -> bool | None:
        """Make the claim the worker lent, if it did: -> whether that served the wake-up, or
        None (no loan: wake the worker)."""
        loan = self._loan
        if loan is None or not loan.take():
            return None
        self._loan = None
        return bool(loan.run())

    def _apply(self, conn: psycopg.Connection) -> None:
        """Bring the session in line with what the worker serves; forward what must be."""
        now = time.monotonic()
        with self._lock:
            serving = self._serving
            while self._pending and self._pending[0][1] + _WATCHDOG <= now:  # not reported: a blocked loop?
                self._to_forward.add(self._pending.popleft()[0])
        changed = serving is not None and (serving.queues != self._listened or not self._targets_on)
        if serving is not None and changed and self._listen(conn, serving.queues, targets=True):
            self.deliver(_WORK)  # NOTIFYs sent before we listened: look once
        advertise = self._advertisable(conn, serving, now)
        stale = [q for q, locks in self._held.items() if q not in advertise or locks != self._locks(conn, q, serving)]
        self._withdraw(conn, stale)
        self._retry_at = None
        for q in sorted(advertise - self._advertised):
            if not self._advertise(conn, q, self._locks(conn, q, serving)):
                self._retry_at = now + _RETRY
        self._forward(conn)

    def _forward(self, conn: psycopg.Connection) -> None:
        with self._lock:
            forward, self._to_forward = self._to_forward, set()
        if forward:
            conn.execute(_FORWARD, [[self._queue_channel(q) for q in sorted(forward)]])

    def _advertisable(self, conn: psycopg.Connection, serving: _Serving | None, now: float) -> frozenset[str]:
        """The queues to advertise for: none without a free slot; else the worker's queues it
        owns a slot in and whose every registered task it serves (so a run it is picked for is
        one it can take)."""
        if serving is None or not serving.available or not self._slots:
            return frozenset()
        if now - self._registry_at > _REGISTRY_TTL or not set(serving.queues) <= set(self._registry):
            rows = conn.execute(
                sql.SQL("SELECT queue, task_id FROM {}.tasks WHERE environment = %s AND queue = ANY(%s)").format(
                    sql.Identifier(self.schema or "")
                ),
                [self.environment, list(serving.queues)],
            ).fetchall()
            self._registry = {q: set() for q in serving.queues}
            for queue, task_id in rows:
                self._registry[queue].add(task_id)
            self._registry_at = now
        return frozenset(q for q in self._slots if self._registry.get(q, set()) <= serving.task_ids)

    def _wait(self, conn: psycopg.Connection) -> bool:
        """Until a notification, a word from the worker, the next watchdog deadline or retry, or
        _POLL. -> whether `_apply` has something to do: not after a plain notification, so the
        thread goes straight back to waiting (and lets go of the GIL the worker's loop, just
        woken by the datagram, is waiting for)."""
        now = time.monotonic()
        timeout = _POLL
        if self._retry_at is not None:
            timeout = max(0.0, min(timeout, self._retry_at - now))
        with self._lock:
            if self._to_forward:
                timeout = 0.0
            elif self._pending:
                timeout = max(0.0, min(timeout, self._pending[0][1] + _WATCHDOG - now))
        sock, wake = conn.pgconn.socket, self._wake_r.fileno()
        ready, _, _ = select.select([sock, wake], [], [], timeout)
        if wake in ready:
            try:
                while self._wake_r.recv(256):
                    pass
            except OSError:  # drained
                pass
        if sock in ready:
            self._receive(conn)
        return not ready or wake in ready or bool(self._to_forward)

    def _receive(self, conn: psycopg.Connection) -> None:
        pgconn = conn.pgconn
        pgconn.consume_input()
        encoding = conn.info.encoding
        while note := pgconn.notifies():
            self._handle(note.relname.decode(encoding), note.extra.decode(encoding), note.be_pid)

    def _run(self) -> None:
        pause = _POLL
        work = True
        while not self._stop.is_set():
            try:
                if self._conn is None:
                    self._conn = self._connect()
                    pause = _POLL
                    work = True
                    self.deliver(None)  # notifications sent while we were away are lost
                if work:
                    self._apply(self._conn)
                work = self._wait(self._conn)
            except Exception as exc:  # psycopg's errors; anything else is logged the same way
                if self._stop.is_set():
                    break
                log.warning("lost the LISTEN connection, reconnecting in %.1f s: %s", pause, exc)
                self._drop()
                self._stop.wait(pause)
                pause = min(pause * 2, _MAX_PAUSE)
        self._leave()
        self._drop()
        for sock in (self._wake_r, self._wake_w):
            sock.close()

    def _leave(self) -> None:
        """Closing: stop advertising, wait out the producers that picked this session, and
        forward every targeted wake-up the worker did not report served."""
        conn = self._conn
        if conn is None or conn.broken:
            return
        try:
            if self._slots:
                self._close_slots(conn, list(self._slots))
                self._receive(conn)
            with self._lock:
                self._to_forward.update(q for q, _ in self._pending)
                self._pending.clear()
            self._forward(conn)
        except psycopg.Error as exc:
            log.warning("closing the LISTEN connection: %s", exc)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    def close(self) -> None:
        self._stop.set()
        self._poke()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=_POLL * 4)
        if self._on_close is not None:
            self._on_close(self)
