"""Realtime: follow runs' event logs (status changes, metadata operations, stream chunks) as
they grow, over the database itself (SPEC §5; DECISIONS.md, "What the first schema carries").

    async for update in conveyor.runs.subscribe(run_id):          # ends at the final status
    async for update in conveyor.runs.subscribe_tag("user:42"):   # every run with the tag

A subscriber first reads what is stored after its cursor (a late subscriber gets what was
already streamed), then sleeps until something may have changed, and reads again.

Not hammering the database: one watcher thread per store (per process) polls the store's
change token (SQLite: `PRAGMA data_version` on a connection of its own, which never writes,
so every commit of any other connection changes it; PostgreSQL: the cluster's transaction
horizon) every `poll` seconds while subscribers exist, and wakes them when it changed. A
subscriber reads the log only when woken, or every `FALLBACK` seconds as a safety net. On
PostgreSQL the token can move before a commit becomes visible (it tracks transaction ids, not
commits), so after each change the watcher keeps waking subscribers for `LINGER` seconds.

Per-run order is the log's: events of one run come in `seq` order, each exactly once. A
subscription by tag keeps a cursor per run; it follows the tag's unfinished runs by id and
finds new ones in a recent window of the tag's index (`run_tags` is keyed by environment,
tag, run id, and run ids sort by creation time), so a poll never reads all the tag's runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from conveyor.core.errors import RunNotFound
from conveyor.core.records import RunEvent
from conveyor.core.status import FINISHED, RunStatus
from conveyor.engine import Engine
from conveyor.store.base import Store, Tx

POLL = 0.02  # seconds between change-token checks while someone subscribes
FALLBACK = 1.0  # read anyway after this long without a change (a safety net)
LINGER = 0.25  # PostgreSQL: keep waking subscribers this long after the token moved
TAG_WINDOW = 120.0  # seconds: runs of a tag created this recently are looked for on each poll
PAGE = 1000  # events read per run per round

_FINISHED = frozenset(s.value for s in FINISHED)


@dataclass(frozen=True, slots=True)
class RunUpdate:
    """One event of a run's log. `type`: "status" (data {"status": ..., ...}), "metadata"
    ({"op", "key", "value"}) or "stream" ({"key", "chunk"}). `seq` numbers the run's events:
    `subscribe(run_id, after=seq)` resumes after it. `attempt`: the attempt that wrote it
    (None for changes made outside an attempt): chunks streamed again by a retried attempt
    carry its number."""

    run_id: str
    seq: int
    type: str
    data: Any
    created_at: float
    attempt: int | None = None

    @property
    def finished(self) -> bool:
        """This update moves the run to a finished status (its last one)."""
        return self.type == "status" and isinstance(self.data, dict) and self.data.get("status") in _FINISHED


def _update(event: RunEvent) -> RunUpdate:
    return RunUpdate(event.run_id, event.seq, event.kind, event.data, event.created_at, event.attempt)


# --- the watcher: one change-token poll per store, for every subscriber of the process -------------


class _Subscriber:
    __slots__ = ("loop", "event", "poll")

    def __init__(self, loop: asyncio.AbstractEventLoop, poll: float) -> None:
        self.loop = loop
        self.event = asyncio.Event()
        self.poll = poll

    def wake(self) -> None:
        """From the watcher thread."""
        with contextlib.suppress(RuntimeError):  # the subscriber's loop is closed
            self.loop.call_soon_threadsafe(self.event.set)

    async def sleep(self, fallback: float) -> None:
        """Until woken (something may have changed) or `fallback` seconds passed. Not
        `asyncio.wait_for`: on Python 3.11 it swallows a cancellation that arrives as the
        event is set, and a cancelled subscription would go on."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(fallback):
                await self.event.wait()


class _Watcher:
    """A daemon thread that polls `store.change_token()` while subscribers exist. It holds the
    store weakly and ends when the store is gone. On SQLite its connection (one per thread) only
    reads the token, so every commit by any other connection, in this process or another,
    changes it."""

    def __init__(self, store: Store) -> None:
        self._store = weakref.ref(store)
        self._linger = 0.0 if store.dialect == "sqlite" else LINGER
        self._cond = threading.Condition()
        self._subscribers: set[_Subscriber] = set()
        self._thread = threading.Thread(target=self._run, name="conveyor-realtime", daemon=True)
        self._thread.start()

    def add(self, subscriber: _Subscriber) -> None:
        with self._cond:
            self._subscribers.add(subscriber)
            self._cond.notify()

    def remove(self, subscriber: _Subscriber) -> None:
        with self._cond:
            self._subscribers.discard(subscriber)

    def _run(self) -> None:
        token: int | None = None
        hot_until = 0.0
        while True:
            with self._cond:
                while not self._subscribers:
                    self._cond.wait(timeout=5.0)
                    if self._store() is None:
                        return
                # A subscriber whose loop was closed without closing it (a leaked generator).
                self._subscribers -= {s for s in self._subscribers if s.loop.is_closed()}
                subscribers = list(self._subscribers)
                if not subscribers:
                    continue
            interval = min(s.poll for s in subscribers)
            store = self._store()
            if store is None:
                return
            try:
                current: int | None = store.change_token()
            except Exception:
                current = None  # the subscribers' own reads will meet (and report) the error
            del store
            now = time.monotonic()
            if current is None or current != token:
                token = current
                hot_until = now + self._linger
                for s in subscribers:
                    s.wake()
            elif now < hot_until:
                for s in subscribers:
                    s.wake()
            time.sleep(interval)


_watchers: weakref.WeakKeyDictionary[Store, _Watcher] = weakref.WeakKeyDictionary()
_watchers_lock = threading.Lock()


@contextlib.contextmanager
def _subscription(store: Store, poll: float) -> Iterator[_Subscriber]:
    with _watchers_lock:
        watcher = _watchers.get(store)
        if watcher is None:
            watcher = _watchers[store] = _Watcher(store)
    subscriber = _Subscriber(asyncio.get_running_loop(), max(0.001, poll))
    watcher.add(subscriber)
    try:
        yield subscriber
    finally:
        watcher.remove(subscriber)


# --- one run -------------------------------------------------------------------------------------


async def subscribe(
    engine: Engine, run_id: str, after: int = 0, *, poll: float = POLL, fallback: float = FALLBACK
) -> AsyncIterator[RunUpdate]:
    """The run's updates after seq `after` in seq order: first what is stored, then live. Ends
    after the update that moves the run to a finished status (at once if that was at or
    before `after`). RunNotFound for an unknown run."""
    store, environment = engine.store, engine.environment

    def read(cursor: int) -> tuple[list[RunEvent], bool]:
        with store.read() as tx:
            status = tx.run_status_many(environment, [run_id]).get(run_id)
            if status is None:
                raise RunNotFound(f"no run {run_id!r} in environment {environment!r}")
            return tx.event_list(run_id, cursor, PAGE), RunStatus(status).finished

    cursor = after
    with _subscription(store, poll) as subscriber:
        while True:
            subscriber.event.clear()  # a change from now on wakes the next sleep
            events, finished = await asyncio.to_thread(read, cursor)
            for event in events:
                cursor = event.seq
                update = _update(event)
                yield update
                if update.finished:
                    return
            if len(events) >= PAGE:
                continue  # more stored: no need to wait
            if finished:
                return  # its final status was at or before `after`
            await subscriber.sleep(fallback)


# --- every run with a tag ------------------------------------------------------------------------


def _id_at(ts: float) -> str:
    """The smallest run id made at `ts` (ids: "run_" + 12 hex digits of milliseconds + ...)."""
    return f"run_{max(0, int(ts * 1000)):012x}"


def _timestamp(value: float | datetime | None) -> float | None:
    return value.timestamp() if isinstance(value, datetime) else value


class _TagFollower:
    """The cursors of one tag subscription."""

    def __init__(self, environment: str, tag: str, since: float) -> None:
        self.environment = environment
        self.tag = tag
        self.boundary = _id_at(since)  # runs with ids from here on start at their first event
        self.cursors: dict[str, int] = {}
        self.following: set[str] = set()  # unfinished runs, read by id on every poll
        self.started = False

    def read(self, tx: Tx) -> tuple[list[RunUpdate], bool]:
        """One round: -> (updates, more stored than one page of some run)."""
        window = _id_at(time.time() - TAG_WINDOW)
        if not self.started:
            rows = tx.run_tag_seqs(self.environment, self.tag, min(window, self.boundary), unfinished=True)
            for run_id, seq, _ in rows:
                self.cursors[run_id] = 0 if run_id >= self.boundary else seq
            self.started = True
        else:
            rows = tx.run_tag_seqs(self.environment, self.tag, window, sorted(self.following))
        per_run: list[list[RunUpdate]] = []
        more = False
        for run_id, seq, status in rows:
            cursor = self.cursors.setdefault(run_id, 0)  # unknown: created since the start
            if seq > cursor:
                events = tx.event_list(run_id, cursor, PAGE)
                if events:
                    per_run.append([_update(e) for e in events])
                    cursor = self.cursors[run_id] = events[-1].seq
                more = more or len(events) >= PAGE
            if status in _FINISHED and cursor >= seq:
                self.following.discard(run_id)
            else:
                self.following.add(run_id)
        # Forget finished runs that left the window: nothing will bring them back.
        for run_id in [r for r in self.cursors if r < window and r not in self.following]:
            del self.cursors[run_id]
        # Runs interleaved by time, each run's updates in seq order.
        return list(heapq.merge(*per_run, key=lambda u: u.created_at)), more


async def subscribe_tag(
    engine: Engine,
    tag: str,
    after: float | datetime | None = None,
    *,
    poll: float = POLL,
    fallback: float = FALLBACK,
) -> AsyncIterator[RunUpdate]:
    """Updates of every run with the tag, including runs created after the call; never ends.
    `after` (epoch seconds or a datetime): runs with the tag created since then are delivered
    from their first update; runs created before, from the call on. None: from the call on
    (a run created after it is delivered whole)."""
    store = engine.store
    since = _timestamp(after)
    # No `after`: runs from the next millisecond on are "created after the call" (ids have
    # millisecond resolution: a run made just before the call may share its millisecond).
    follower = _TagFollower(engine.environment, tag, time.time() + 0.001 if since is None else since)

    def read() -> tuple[list[RunUpdate], bool]:
        with store.read() as tx:
            return follower.read(tx)

    with _subscription(store, poll) as subscriber:
        while True:
            subscriber.event.clear()
            updates, more = await asyncio.to_thread(read)
            for update in updates:
                yield update
            if not more:
                await subscriber.sleep(fallback)
