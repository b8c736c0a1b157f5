"""PostgresStore: psycopg 3 with a psycopg_pool pool; every transaction on one pooled connection.

Connections are in autocommit mode and each `transaction()` / `read()` issues its own BEGIN, so
nothing is left open between uses. The configured schema holds every object (`conveyor` unless
`?schema=` or `schema=` says otherwise).
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row
from psycopg_pool import ConnectionPool, PoolTimeout

from conveyor.core.clock import SYSTEM_CLOCK, Clock
from conveyor.core.errors import ConfigError, SchemaMismatch, StoreBusy, StoreConflict, StoreError, StoreReadOnly
from conveyor.core.records import ClaimedRun, ClaimRequest, NewRun
from conveyor.store import common
from conveyor.store.base import Store
from conveyor.store.postgres import migrate
from conveyor.store.postgres import sql as q
from conveyor.store.postgres.listen import PostgresListener, pick_notify, queue_channel, run_locks
from conveyor.store.postgres.tx import PostgresTx

_BEGIN = "BEGIN"
_RECONNECT_TIMEOUT = 3.0  # seconds the pool retries one failed connection (after 1 s, 2 s) before a fresh try
_PROBE_AFTER = 1.0  # no pooled connection within this: is the server there at all?
_BEGIN_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"


def split_url(url: str) -> tuple[str, str | None]:
    """A postgresql:// URL -> (the URL psycopg understands, the `schema` query parameter)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in query if k == "schema"), None)
    rest = [(k, v) for k, v in query if k != "schema"]
    return urlunsplit(parts._replace(query=urlencode(rest))), schema


def describe(conninfo: str, schema: str) -> str:
    """A printable name of the database: no password."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error:
        return f"postgresql (schema {schema})"
    user = f"{params['user']}@" if params.get("user") else ""
    host = str(params.get("host") or "localhost")
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{user}{host}{port}/{params.get('dbname') or ''} (schema {schema})"


def translate(exc: Exception, location: str) -> Exception:
    """Map psycopg's errors onto Conveyor's hierarchy; every message names the database."""
    if isinstance(exc, PoolTimeout):
        return StoreBusy(
            f"no connection to the database {location} became free in time: raise pool_size, or look "
            f"for long transactions ({exc})"
        )
    if isinstance(exc, pgerrors.UndefinedTable | pgerrors.InvalidSchemaName):
        return SchemaMismatch(f"the database {location} has no Conveyor schema: run `conveyor migrate` ({exc})")
    if isinstance(exc, pgerrors.DeadlockDetected | pgerrors.SerializationFailure):
        return StoreConflict(f"the database {location} aborted a conflicting transaction: {exc}")
    if isinstance(exc, pgerrors.LockNotAvailable | pgerrors.QueryCanceled):
        return StoreBusy(f"the database {location} is busy: {exc}")
    if isinstance(exc, pgerrors.ReadOnlySqlTransaction):
        return StoreReadOnly(f"the database {location} is read-only: {exc}")
    if isinstance(exc, psycopg.OperationalError):
        return StoreError(f"cannot reach the database {location}: {exc}")
    return StoreError(f"database error on {location}: {exc}")


@contextmanager
def translated(location: str) -> Iterator[None]:
    try:
        yield
    except psycopg.IntegrityError:
        raise
    except psycopg.Error as exc:
        raise translate(exc, location) from exc


@dataclass
class _QueueWake:
    runs: int
    machine: str
    version: str | None


@dataclass
class _Pending:
    """What a transaction of `PostgresStore.transaction()` leaves for its COMMIT (see _Tx)."""

    queue_wakes: dict[tuple[str, str], _QueueWake] = field(default_factory=dict)


class _Tx(PostgresTx):
    """The Tx of `PostgresStore.transaction()`. BEGIN waits for the first statement that needs
    it: a transaction that only inserts one run (a trigger without an idempotency key) is sent
    at its commit as one statement that commits itself, with its NOTIFYs, in one round trip
    (`PostgresStore._commit_alone`; W3 latency). It can also wake the workers of one queue."""

    def __init__(
        self, conn: psycopg.Connection, store: PostgresStore, now: float | None, notifies: list[tuple[str, str]]
    ) -> None:
        super().__init__(conn, store, now, notifies)
        self.pending = _Pending()
        self.begun = False
        self.alone: tuple[str, NewRun] | None = None  # (environment, run): its insert waits for the commit
        self.claim_only = False  # run_claim of one queue, before anything else
        self.held = True  # `conn` is ours to give back to the pool

    def use(self, conn: psycopg.Connection) -> None:
        """Another pooled connection, before anything was done on this one."""
        self.conn = conn
        self.cur = conn.cursor(row_factory=tuple_row)
        self.held = True

    def _ready(self) -> None:
        if self.begun:
            return
        self.begun = True
        self.store.begin(self)
        if self.alone is not None:
            environment, run = self.alone
            self.alone = None
            PostgresTx.run_insert_many(self, environment, [run])

    def run_claim(self, request: ClaimRequest) -> list[ClaimedRun]:
        self.claim_only = not self.begun and self.alone is None and len(request.queues) == 1
        return super().run_claim(request)

    def _claim_alone(self, params: dict[str, Any]) -> list[Any]:
        """A claim that is this whole transaction (nothing before it; Engine writes nothing after
        a claim) is sent as one statement in autocommit, committed without waiting for the WAL
        flush: CLAIM_ALONE starts only runs of a queue without a limit and without a concurrency
        key, so a claim lost in a database crash (the server's, not a clean stop) can only make a
        run execute again, which at-least-once delivery allows; no limit can be exceeded by it.
        Every other commit waits for its flush (docs/architecture.md, "Commits")."""
        if self.begun or not self.claim_only:
            return super()._claim_alone(params)
        self.claim_only = False
        self.store.fresh(self)
        return self.cur.execute(self._sql(q.CLAIM_ALONE), self._params({**params, "commit": "off"})).fetchall()

    def run_insert_many(self, environment: str, runs: Sequence[NewRun]) -> list[tuple[str, bool]]:
        if self.begun or self.alone is not None or len(runs) != 1 or runs[0].idempotency_key is not None:
            return super().run_insert_many(environment, runs)
        self.alone = (environment, runs[0])
        return [(runs[0].id, True)]

    def wake_queue(self, environment: str, queue: str, runs: int, machine: str, version: str | None) -> bool:
        """When this transaction commits, wake for `runs` new runs in `queue`: one run wakes one
        idle worker that can take it (else every worker of the queue), more wake every worker of
        the queue. One NOTIFY per queue (PostgresStore._commit, listen.py)."""
        wake = self.pending.queue_wakes.get((environment, queue))
        if wake is None:
            self.pending.queue_wakes[(environment, queue)] = _QueueWake(runs, machine, version)
        else:
            wake.runs += runs
        return True


class PostgresStore(Store):
    dialect = "postgresql"

    def __init__(
        self,
        url: str,
        clock: Clock = SYSTEM_CLOCK,
        *,
        schema: str | None = None,
        pool_size: int = 10,
        pool_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        prepare_threshold: int | None = 5,
        application_name: str = "conveyor",
        auto_migrate: bool = True,
        check_schema: bool = True,
    ) -> None:
        """`url`: postgresql://user@host:port/db[?schema=name]. `auto_migrate` creates the schema
        when it does not exist; an existing schema at another version is refused unless
        `check_schema` is off (for `conveyor migrate`). `prepare_threshold=None` turns server-side
        prepared statements off (for PgBouncer in transaction mode)."""
        conninfo, url_schema = split_url(url)
        self.schema = schema or url_schema or q.DEFAULT_SCHEMA
        if not q.valid_schema(self.schema):
            raise ConfigError(f"bad schema name {self.schema!r}: use letters, digits and underscores")
        self.conninfo = conninfo
        self.clock = clock
        self.location = describe(conninfo, self.schema)
        self.connect_timeout = connect_timeout
        self.application_name = application_name
        self._listeners: set[PostgresListener] = set()
        # (environment, queue) last seen without a limit and with no keyed run first in line: a
        # claim there tries the one-statement path (PostgresTx._take_alone). A set's add and
        # discard are atomic under the GIL; a stale entry costs one statement, never a wrong claim.
        self.plain_queues: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        with translated(self.location), self._direct() as conn:
            if auto_migrate and migrate.current_version(conn, self.schema) == 0:
                migrate.apply(conn, self.schema, self._now_param())
            if check_schema:
                migrate.check(conn, self.schema, self.location)
        self.pool_timeout = pool_timeout
        self.pool = ConnectionPool(
            conninfo,
            min_size=1,
            max_size=max(1, pool_size),
            timeout=pool_timeout,
            # psycopg_pool retries a failed connection with a pause that doubles up to this
            # timeout (default 5 min): after a server restart the pool could stay empty for a
            # minute. Give up after a few seconds instead: the next request for a connection
            # starts a fresh attempt at once.
            reconnect_timeout=_RECONNECT_TIMEOUT,
            kwargs={
                "autocommit": True,
                "prepare_threshold": prepare_threshold,
                "connect_timeout": max(1, round(connect_timeout)),
                "application_name": application_name,
            },
            name=f"conveyor:{self.schema}",
            open=True,
        )

    # --- connections ------------------------------------------------------------------------------
    @contextmanager
    def _direct(self) -> Iterator[psycopg.Connection]:
        """A connection of its own (opening, migrations): fails fast when the server is down."""
        conn = psycopg.connect(
            self.conninfo,
            autocommit=True,
            connect_timeout=max(1, round(self.connect_timeout)),
            application_name=self.application_name,
        )
        try:
            yield conn
        finally:
            conn.close()

    def _now_param(self) -> float | None:
        """The injected clock's time, or None: SQL then uses the database's clock."""
        return None if self.clock.is_real() else self.clock.now()

    def _getconn(self) -> psycopg.Connection:
        """A pooled connection, waiting up to `pool_timeout` while all are busy; but when none
        comes within a second, the server is asked directly, so that a server that is down fails
        the call at once (StoreError, "cannot reach") rather than after the whole timeout."""
        deadline = time.monotonic() + self.pool_timeout
        while True:
            try:
                return self.pool.getconn(timeout=max(0.001, min(_PROBE_AFTER, deadline - time.monotonic())))
            except PoolTimeout:
                if time.monotonic() >= deadline:
                    raise
            with self._direct():  # raises OperationalError when the server is unreachable
                pass

    @contextmanager
    def _pooled(self) -> Iterator[psycopg.Connection]:
        with translated(self.location):
            conn = self._getconn()
            try:
                yield conn
            finally:
                self.pool.putconn(conn)

    @contextmanager
    def _session(self, begin: str) -> Iterator[psycopg.Connection]:
        """A pooled connection inside BEGIN ... COMMIT (ROLLBACK on error), for reads. A
        connection that died while idle in the pool (a server restart) is replaced before
        anything was done."""
        with translated(self.location):
            for attempt in range(3):
                conn = self._getconn()
                try:
                    conn.execute(begin)
                except BaseException as exc:
                    self.pool.putconn(conn)  # a broken one is discarded
                    if isinstance(exc, psycopg.OperationalError) and attempt < 2:
                        continue
                    raise
                break
            try:
                try:
                    yield conn
                except BaseException:
                    if not conn.broken:
                        with suppress(psycopg.Error):
                            conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            finally:
                self.pool.putconn(conn)

    def _commit(
        self, conn: psycopg.Connection, notifies: list[tuple[str, str]] | None, pending: _Pending | None
    ) -> None:
        """COMMIT, with the transaction's NOTIFYs in the same round trip (pipeline mode): a
        notification is delivered at commit wherever it was issued in the transaction, so
        sending it last changes only the latency."""
        picks, plain = self._wakes(conn, notifies or [], pending)
        statements = picks + [(q.NOTIFY, {"channel": c, "payload": p}) for c, p in plain]
        if not statements:
            conn.execute("COMMIT")
            return
        try:
            with conn.pipeline():
                for statement, params in statements:
                    conn.execute(statement, params)
                conn.execute("COMMIT")
        except BaseException:
            # A failed NOTIFY skips the COMMIT: leave no transaction open on the pooled connection.
            if not conn.broken and conn.info.transaction_status != TransactionStatus.IDLE:
                with suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
            raise

    def _wakes(
        self, conn: psycopg.Connection, notifies: list[tuple[str, str]], pending: _Pending | None
    ) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, str]]]:
        """A transaction's wake-ups -> (`pick_notify` statements, plain (channel, payload) NOTIFYs).
        A queue with one new run gets `pick_notify` (one idle worker that can take it, chosen and
        pinned in that statement; listen.py); more runs wake every worker of the queue."""
        picks: list[tuple[str, dict[str, Any]]] = []
        plain = list(notifies)
        for (environment, queue), wake in (pending.queue_wakes if pending is not None else {}).items():
            channel = queue_channel(self.schema, environment, queue)
            if wake.runs == 1:
                locks = run_locks(conn.info.dbname, self.schema, environment, queue, wake.machine, wake.version)
                picks.append(pick_notify(locks, channel))
            else:
                plain.append((channel, "w"))
        return picks, plain

    @contextmanager
    def transaction(self) -> Iterator[PostgresTx]:
        notifies: list[tuple[str, str]] = []
        with translated(self.location):
            tx = _Tx(self._getconn(), self, self._now_param(), notifies)
            try:
                try:
                    yield tx
                except BaseException:
                    if tx.begun and not tx.conn.broken:
                        with suppress(psycopg.Error):
                            tx.conn.execute("ROLLBACK")
                    raise
                if tx.begun:
                    self._commit(tx.conn, notifies, tx.pending)
                else:
                    self._commit_alone(tx, notifies)
            finally:
                if tx.held:
                    self.pool.putconn(tx.conn)

    def _reconnect(self, tx: _Tx) -> None:
        """Give `tx`'s connection back (a broken or closed one is discarded) and take another."""
        tx.held = False
        self.pool.putconn(tx.conn)
        tx.use(self._getconn())

    def begin(self, tx: _Tx) -> None:
        """BEGIN for a transaction of `transaction()`. A pooled connection that died while idle
        (a server restart) is replaced: nothing was done on it yet."""
        for attempt in range(3):
            try:
                tx.conn.execute(_BEGIN)
                return
            except psycopg.OperationalError:
                if attempt == 2:
                    raise
                self._reconnect(tx)

    def fresh(self, tx: _Tx) -> None:
        """Before a statement that cannot be sent twice goes out in autocommit on a pooled
        connection: replace a connection the server closed while it was idle (a restart). Such a
        connection has the server's goodbye waiting to be read; a live idle one has nothing."""
        for _ in range(3):
            ready, _w, _x = select.select([tx.conn.pgconn.socket], [], [], 0)
            if not ready:
                return
            tx.conn.close()
            self._reconnect(tx)

    def _commit_alone(self, tx: _Tx, notifies: list[tuple[str, str]]) -> None:
        """Commit a transaction that has not begun: its run's insert (`_Tx.alone`) and its
        NOTIFYs as one statement in autocommit (sql.insert_run_alone), or the NOTIFYs alone. It
        may be sent again on a fresh connection when the connection fails: the run's id makes
        the insert idempotent, and a wake-up twice costs one empty claim."""
        picks, plain = self._wakes(tx.conn, notifies, tx.pending)
        if tx.alone is None and not plain and not picks:
            return  # nothing was asked of the database
        # Queue wake-ups come from inserts: at most one run here, so at most one pick.
        expression = q.NOTIFY_EACH + "".join(f" + (SELECT count(*) FROM ({text}) AS pick)" for text, _ in picks)
        params: dict[str, Any] = {"channels": [c for c, _ in plain], "payloads": [p for _, p in plain]}
        for _, values in picks:
            params.update(values)
        if tx.alone is None:
            text = f"SELECT {expression}"
        else:
            environment, run = tx.alone
            params.update(PostgresTx.run_params(environment, run), tag_list=list(run.tags))
            text = q.insert_run_alone(expression)
        text, params = tx._sql(text), tx._params(params)
        for attempt in range(3):
            try:
                tx.cur.execute(text, params)
                return
            except psycopg.OperationalError:
                if attempt == 2 or not tx.conn.broken:
                    raise
                self._reconnect(tx)

    @contextmanager
    def read(self) -> Iterator[PostgresTx]:
        with self._session(_BEGIN_READ) as conn:
            yield PostgresTx(conn, self, self._now_param())

    @contextmanager
    def transaction_on(self, connection: object) -> Iterator[PostgresTx]:
        """A Tx in the caller's open transaction on a connection to this database: a psycopg (3)
        Connection, or a SQLAlchemy 2 `Connection` or `Session` (sync) on the `postgresql+psycopg`
        dialect, unwrapped to the psycopg connection underneath. SQLAlchemy is recognised by the
        module of the object's classes, never imported. A SQLAlchemy transaction that has not
        begun yet is begun here (as SQLAlchemy's own autobegin would); the caller commits it."""

        connection, what = common.dbapi_connection(connection)
        if not isinstance(connection, psycopg.Connection):
            raise ConfigError(
                f"connection= takes a psycopg (3) Connection, or a SQLAlchemy Connection or Session on the "
                f"postgresql+psycopg dialect, to {self.location}; got {what}"
            )
        status = connection.info.transaction_status
        if status == TransactionStatus.INERROR:
            raise ConfigError(f"connection= ({what}) is in a failed transaction: roll it back first")
        if connection.autocommit and status != TransactionStatus.INTRANS:
            raise ConfigError(
                f"connection= ({what}) needs an open transaction (psycopg: autocommit off, or inside "
                "`with conn.transaction():`; SQLAlchemy: not the AUTOCOMMIT isolation level), or the run "
                "would be committed on its own"
            )
        ours = conninfo_to_dict(self.conninfo).get("dbname")
        if ours and connection.info.dbname != ours:
            raise ConfigError(f"connection= ({what}) is to database {connection.info.dbname!r}, not to {self.location}")
        with translated(self.location):
            yield PostgresTx(connection, self, self._now_param())

    # --- schema ---------------------------------------------------------------------------------
    def schema_version(self) -> int:
        with self._pooled() as conn:
            return migrate.current_version(conn, self.schema)

    def migrate(self) -> list[int]:
        with self._pooled() as conn:
            return migrate.apply(conn, self.schema, self._now_param())

    def change_token(self) -> int:
        with self._pooled() as conn:
            row = conn.execute(q.CHANGE_TOKEN).fetchone()
            return int(row[0]) if row else 0

    # --- wake-ups -------------------------------------------------------------------------------
    def listen(
        self,
        environment: str,
        worker_id: str,
        deliver: Callable[[bytes | None], None],
        queues: Sequence[str] | None = None,
    ) -> PostgresListener:
        """The worker's LISTEN session (listen.py): the environment's channel, the worker's own,
        and the channels of `queues` (None: every queue of the environment, until the worker
        says which it serves, `PostgresListener.serve`)."""
        channels = [q.environment_channel(self.schema, environment), q.worker_channel(self.schema, worker_id)]
        with translated(self.location):
            listener = PostgresListener(
                self.conninfo,
                channels,
                deliver,
                self.connect_timeout,
                self._forget,
                self.application_name,
                schema=self.schema,
                environment=environment,
                queues=queues,
            )
        with self._lock:
            self._listeners.add(listener)
        return listener

    def _forget(self, listener: Any) -> None:
        with self._lock:
            self._listeners.discard(listener)

    def close(self) -> None:
        with self._lock:
            listeners, self._listeners = list(self._listeners), set()
        for listener in listeners:
            listener.close()
        self.pool.close()

    def __repr__(self) -> str:
        return f"PostgresStore({self.location!r})"
