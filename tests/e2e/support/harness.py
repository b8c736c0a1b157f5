"""Test-side helpers for the e2e tests: real worker processes, their store, what tasks wrote,
and the checks of DECISIONS.md "Tests of faults"."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

SUPPORT = Path(__file__).resolve().parent
REPO = SUPPORT.parents[2]
BIN = Path(sys.executable).parent
# The `conveyor` command under test (E2E_CONVEYOR names another build of it).
CONVEYOR = Path(
    os.environ.get("E2E_CONVEYOR")
    or (BIN / "conveyor" if (BIN / "conveyor").exists() else REPO / ".venv" / "bin" / "conveyor")
)

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie does not: its code has stopped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path
    started: float

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Cluster:
    """One store file, the worker processes on it, and the files the tasks write."""

    dir: Path
    modules: str
    workers: list[Worker] = field(default_factory=list)  # live (not killed/stopped by the test)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)  # everything ever started
    killed: list[tuple[int, float]] = field(default_factory=list)  # (pid, when)
    _conn: sqlite3.Connection | None = None
    _count: int = 0

    @property
    def db(self) -> Path:
        return self.dir / "store.db"

    @property
    def url(self) -> str:
        return f"sqlite:///{self.db}"

    @property
    def exec_log_path(self) -> Path:
        return self.dir / "exec.log"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["CONVEYOR_DATABASE_URL"] = self.url
        env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), *filter(None, [env.get("PYTHONPATH")])])
        env["E2E_DIR"] = str(self.dir)
        env.pop("CONVEYOR_ENV", None)
        return env

    # --- processes -------------------------------------------------------------------------------
    def spawn(self, argv: list[str], name: str) -> tuple[subprocess.Popen[bytes], Path]:
        """A child in its own process group, so teardown can end it and anything it started."""
        self._count += 1
        log = self.dir / f"{name}-{self._count}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv, cwd=self.dir, env=self.env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.processes.append(proc)
        return proc, log

    def start_worker(
        self, concurrency: int = 8, lease: float = 2.0, renew: float = 0.5, grace: float | None = None
    ) -> Worker:
        argv = [str(CONVEYOR), "worker", "--modules", self.modules, "--concurrency", str(concurrency)]
        argv += ["--lease", str(lease), "--renew", str(renew)]
        if grace is not None:
            argv += ["--grace", str(grace)]
        proc, log = self.spawn(argv, "worker")
        worker = Worker(proc, log, time.monotonic())
        self.workers.append(worker)
        return worker

    def registered_pids(self) -> set[int]:
        return {r[0] for r in self.sql("SELECT pid FROM workers")}

    def wait_ready(self, workers: Iterable[Worker], timeout: float = 30.0) -> None:
        """Until every worker has registered in the store (it then claims at once)."""
        pending = list(workers)

        def ready() -> bool:
            for w in pending:
                if w.proc.poll() is not None:
                    raise AssertionError(f"worker {w.pid} exited with {w.proc.returncode}:\n{tail(w.log)}")
            return {w.pid for w in pending} <= self.registered_pids()

        wait_until(ready, timeout, "workers to register")

    def kill9(self, worker: Worker) -> None:
        """kill -9 the worker process itself (as a crash would), and reap it at once."""
        os.kill(worker.pid, signal.SIGKILL)
        worker.proc.wait(10)
        self.killed.append((worker.pid, time.time()))
        self.workers.remove(worker)

    def close(self) -> None:
        for proc in self.processes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- the store, read directly --------------------------------------------------------------
    def sql(self, query: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        if self._conn is None:
            self._conn = sqlite3.connect(self.db, timeout=30, isolation_level=None)
            self._conn.execute("PRAGMA busy_timeout = 30000")
        return self._conn.execute(query, tuple(params)).fetchall()

    def statuses(self, run_ids: list[str]) -> Counter[str]:
        rows = self.sql("SELECT status FROM runs WHERE id IN (SELECT value FROM json_each(?))", [json.dumps(run_ids)])
        return Counter(r[0] for r in rows)

    def worker_pids(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.sql("SELECT id, pid FROM workers")}

    # --- what tasks wrote ------------------------------------------------------------------------
    def executions(self) -> list[dict[str, Any]]:
        if not self.exec_log_path.exists():
            return []
        with open(self.exec_log_path, "rb") as f:
            data = f.read()
        # A line being appended while we read may show only in part: it is read next time.
        complete = data[: data.rfind(b"\n") + 1]
        return [json.loads(line) for line in complete.split(b"\n") if line.strip()]

    def open_executions(self) -> dict[int, list[dict[str, Any]]]:
        """Started and not ended, by pid (as the log says; a killed pid's stay open)."""
        running: dict[tuple[str, int, int], dict[str, Any]] = {}
        for rec in self.executions():
            ident = (rec["run"], rec["attempt"], rec["pid"])
            if rec["k"] == "S":
                running[ident] = rec
            else:
                running.pop(ident, None)
        by_pid: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for rec in running.values():
            by_pid[rec["pid"]].append(rec)
        return by_pid

    def effects(self) -> dict[str, tuple[Any, int, int]]:
        path = self.dir / "effects.db"
        if not path.exists():
            return {}
        conn = sqlite3.connect(path, timeout=30)
        try:
            rows = conn.execute("SELECT run_id, value, pid, attempt FROM effects").fetchall()
        finally:
            conn.close()
        return {r[0]: (json.loads(r[1]), r[2], r[3]) for r in rows}

    def log_lines(self, *needles: str) -> list[str]:
        """Lines of the worker logs that contain any of `needles`."""
        found = []
        for log in sorted(self.dir.glob("worker-*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if any(n in line for n in needles):
                    found.append(f"{log.name}: {line}")
        return found

    def tracebacks(self) -> list[tuple[str, str]]:
        """(log name, traceback text) of every traceback in the worker logs."""
        found = []
        for log in sorted(self.dir.glob("worker-*.log")):
            block: list[str] | None = None
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith("Traceback"):
                    block = [line]
                elif block is not None:
                    block.append(line)
                    if line and not line[0].isspace():  # the exception line ends the traceback
                        found.append((log.name, "\n".join(block)))
                        block = None
        return found

    def check_logs(self, allow: tuple[str, ...] = (), allow_tracebacks: tuple[str, ...] = ()) -> int:
        """No worker printed a traceback or an error; returns the number of warnings (e.g. an
        outcome refused because the lease was lost). A kill -9 prints nothing itself, but a pool
        child or forkserver of the killed worker that was mid-handshake with it may print
        multiprocessing's EOFError as it exits: that one is expected. Error lines containing a
        string of `allow` are expected too, and tracebacks containing one of `allow_tracebacks`."""
        problems = [line for line in self.log_lines(" ERROR ", " CRITICAL ") if not any(a in line for a in allow)]
        for name, text in self.tracebacks():
            last = text.splitlines()[-1]
            expected = "multiprocessing/" in text and last.startswith("EOFError")
            if not expected and not any(a in text for a in allow_tracebacks):
                problems.append(f"{name}:\n{text}")
        assert not problems, "\n".join(problems[:10])
        return len(self.log_lines(" WARNING "))


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def busy_victim(cluster: Cluster, rnd: random.Random, patience: float = 1.5) -> tuple[Worker, int]:
    """A worker with runs executing right now (per the execution log: in the worker itself or
    in its pool children), so the kill lands mid-run; after `patience` seconds without one,
    any worker. Returns the victim and how many runs it was executing."""
    deadline = time.monotonic() + patience
    while True:
        running: Counter[int] = Counter()
        for records in cluster.open_executions().values():
            for rec in records:
                for w in cluster.workers:
                    running[w.pid] += w.pid == rec["pid"] or w.pid in rec["ancestors"]
        candidates = [w for w in cluster.workers if running[w.pid]]
        if candidates or time.monotonic() >= deadline:
            victim = rnd.choice(candidates or cluster.workers)
            return victim, running[victim.pid]
        time.sleep(0.01)


# --- the checks of "Tests of faults" ------------------------------------------------------------


@dataclass
class Attempt:
    number: int
    status: str
    worker_id: str | None
    started_at: float
    finished_at: float | None
    error: dict[str, Any] | None


def attempts_by_run(cluster: Cluster, run_ids: list[str]) -> dict[str, list[Attempt]]:
    rows = cluster.sql(
        """SELECT run_id, number, status, worker_id, started_at, finished_at, error FROM attempts
           WHERE run_id IN (SELECT value FROM json_each(?)) ORDER BY run_id, number""",
        [json.dumps(run_ids)],
    )
    out: dict[str, list[Attempt]] = defaultdict(list)
    for run_id, number, status, worker_id, started, finished, error in rows:
        out[run_id].append(Attempt(number, status, worker_id, started, finished, json.loads(error) if error else None))
    return out


def status_events(cluster: Cluster, run_ids: list[str]) -> dict[str, list[tuple[int, int | None, dict[str, Any]]]]:
    """(seq, attempt, data) of every status event, by run, in order."""
    rows = cluster.sql(
        """SELECT run_id, seq, attempt, data FROM run_events WHERE kind = 'status'
           AND run_id IN (SELECT value FROM json_each(?)) ORDER BY run_id, seq""",
        [json.dumps(run_ids)],
    )
    out: dict[str, list[tuple[int, int | None, dict[str, Any]]]] = defaultdict(list)
    for run_id, seq, attempt, data in rows:
        out[run_id].append((seq, attempt, json.loads(data)))
    return out


def handbacks_by_attempt(events: list[tuple[int, int | None, dict[str, Any]]]) -> Counter[int]:
    """Hand-backs of a run, by attempt number: a QUEUED status event right after an EXECUTING
    one, without retry_at (a retry carries it). A hand-back spends no attempt: the number is
    used again by the next execution."""
    out: Counter[int] = Counter()
    for (_, _, prev), (_, attempt, data) in zip(events, events[1:], strict=False):
        if prev.get("status") == "EXECUTING" and data.get("status") == "QUEUED" and "retry_at" not in data:
            out[attempt or 0] += 1
    return out


def check_exactly_once(
    cluster: Cluster, expected: dict[str, Any], handbacks: bool = False, lost_by_any: bool | set[int] = False
) -> dict[str, int]:
    """Every run COMPLETED exactly once with the right output; side effects == runs; every
    re-execution matched by a WORKER_LOST attempt; attempt numbers consistent. For tasks that
    never fail by themselves (any attempt before the last can only be a lost one).

    `handbacks`: a worker whose lease renewals stalled (a loaded machine, a database outage)
    stops its code and hands the run back, spending no attempt: an attempt number may then be
    executed once more per hand-back recorded for it. `lost_by_any`: attempts may be lost by
    workers that were never killed (their leases ran out while the database was down); a set:
    by these worker pids (ones seen to stall).

    Returns counts for the summary line; raises AssertionError listing what is wrong."""
    ids = list(expected)
    rows = cluster.sql(
        "SELECT id, status, output, attempt_count FROM runs WHERE id IN (SELECT value FROM json_each(?))",
        [json.dumps(ids)],
    )
    runs = {r[0]: r for r in rows}
    problems: list[str] = []

    def problem(text: str) -> None:
        if len(problems) < 40:
            problems.append(text)

    missing = [i for i in ids if i not in runs]
    if missing:
        problem(f"{len(missing)} runs lost (not in the store), e.g. {missing[:3]}")
    statuses = Counter(r[1] for r in runs.values())
    if statuses != Counter({"COMPLETED": len(ids)}):
        problem(f"statuses {dict(statuses)}, expected all {len(ids)} COMPLETED")
    for run_id, (_, status, output, _) in runs.items():
        if status == "COMPLETED" and json.loads(output) != expected[run_id]:
            problem(f"{run_id}: output {output} != {expected[run_id]}")

    events = status_events(cluster, ids)
    attempts = attempts_by_run(cluster, ids)
    pids = cluster.worker_pids()
    killed = {pid for pid, _ in cluster.killed}
    executions: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in cluster.executions():
        if rec["k"] == "S" and rec["run"] in expected:
            executions[rec["run"]].append(rec)

    worker_lost = reexecuted = extra_executions = handed_back = 0
    for run_id in ids:
        if run_id not in runs:
            continue
        count = runs[run_id][3]
        completed = [(seq, a) for seq, a, d in events[run_id] if d.get("status") == "COMPLETED"]
        if len(completed) != 1:
            problem(f"{run_id}: {len(completed)} COMPLETED status events (want exactly 1)")
        elif completed[0][1] != count:
            problem(f"{run_id}: COMPLETED event carries attempt {completed[0][1]}, the run says {count}")
        runs_attempts = attempts[run_id]
        numbers = [a.number for a in runs_attempts]
        if numbers != list(range(1, count + 1)):
            problem(f"{run_id}: attempt numbers {numbers}, attempt_count {count}")
            continue
        if runs_attempts[-1].status != "COMPLETED":
            problem(f"{run_id}: last attempt is {runs_attempts[-1].status}")
        lost = runs_attempts[:-1]
        for a in lost:
            if a.status != "WORKER_LOST":
                problem(f"{run_id}: attempt {a.number} is {a.status}, expected WORKER_LOST (task never fails)")
            elif (a.error or {}).get("code") != "WORKER_LOST":
                problem(f"{run_id}: attempt {a.number} WORKER_LOST without the WORKER_LOST error code: {a.error}")
            pid = pids.get(a.worker_id or "")
            excused = lost_by_any is True or (isinstance(lost_by_any, set) and pid in lost_by_any)
            if pid is not None and pid not in killed and not excused:
                problem(f"{run_id}: attempt {a.number} lost by worker pid {pid}, which was never killed")
        worker_lost += len(lost)
        backs = handbacks_by_attempt(events[run_id]) if handbacks else Counter()
        handed_back += sum(backs.values())
        per_attempt = Counter(rec["attempt"] for rec in executions[run_id])
        for number, n in per_attempt.items():
            if n > 1 + backs[number]:
                problem(f"{run_id}: attempt {number} executed {n} times ({backs[number]} hand-backs)")
            if not 1 <= number <= count:
                problem(f"{run_id}: an execution with attempt {number} outside 1..{count}")
        if not 1 <= per_attempt.get(count, 0) <= 1 + backs[count]:
            problem(f"{run_id}: the completing attempt {count} has {per_attempt.get(count, 0)} logged executions")
        last_of_attempt = {rec["attempt"]: rec for rec in executions[run_id]}
        for rec in executions[run_id]:
            number = rec["attempt"]
            if backs[number] and rec is not last_of_attempt[number]:
                continue  # an execution handed back: the attempt row now names the next worker
            if 1 <= number <= count:
                a = runs_attempts[number - 1]
                pid = pids.get(a.worker_id or "")
                # A pool child runs sync code: its worker is its grandparent (via the forkserver).
                # It may start a run its worker sent just before being killed: then it is an orphan.
                ours = pid in (rec["pid"], *rec["ancestors"]) or (pid in killed and 1 in rec["ancestors"])
                if pid is not None and not ours:
                    problem(f"{run_id}: attempt {number} held by worker pid {pid} but executed by pid {rec['pid']}")
        if len(executions[run_id]) > 1:
            reexecuted += 1
            extra_executions += len(executions[run_id]) - 1

    effects = cluster.effects()
    mine = {k: v for k, v in effects.items() if k in expected}
    if len(mine) != len(ids):
        problem(f"{len(mine)} side-effect rows for {len(ids)} runs")
    for run_id, (value, _, _) in mine.items():
        if value != expected[run_id]:
            problem(f"{run_id}: side effect {value} != {expected[run_id]}")
    assert not problems, "\n".join(problems)
    return {
        "runs": len(ids),
        "executions": sum(len(v) for v in executions.values()),
        "reexecuted_runs": reexecuted,
        "extra_executions": extra_executions,
        "worker_lost_attempts": worker_lost,
        "handed_back": handed_back,
        "side_effects": len(mine),
    }


LIMIT_KEYS = [f"user-{i}" for i in range(8)]


def trigger_limit_workload(rnd: random.Random, n: int = 400) -> dict[str, Any]:
    """The limit tests' workload on `limit_tasks`: runs over 8 keys, one in four keyed at
    trigger time, one in four a sync task (in a pool child) on the same queue and keys.
    -> {run id: expected output}."""
    import limit_tasks

    from conveyor import BatchItem

    keys = LIMIT_KEYS
    items: list[BatchItem] = []
    for i in range(n):
        key, ms = rnd.choice(keys), rnd.randint(10, 60)
        if i % 4 == 0:  # the trigger's concurrency_key replaces Concurrency.key(payload)
            items.append(BatchItem({"n": i, "key": "not-this-one", "ms": ms}, {"concurrency_key": key}))
        else:
            items.append(BatchItem({"n": i, "key": key, "ms": ms}))
    sync_items, async_items = items[1::4], [item for i, item in enumerate(items) if i % 4 != 1]
    expected = {}
    for task, batch in ((limit_tasks.limited, async_items), (limit_tasks.limited_sync, sync_items)):
        for handle, item in zip(task.batch_trigger(batch), batch, strict=True):
            expected[handle.id] = limit_tasks.expected_output(item.payload["n"])
    return expected


def kill_while_running(cluster: Any, rnd: random.Random, kills: int, ids: list[str], started: float) -> int:
    """kill -9 a busy worker every 0.5-1 s, `kills` times, replacing each at once; then wait
    until every run COMPLETED. -> how many kills landed while the victim ran something."""
    mid_run = 0
    for _ in range(kills):
        time.sleep(rnd.uniform(0.5, 1.0))  # the kill schedule
        victim, running = busy_victim(cluster, rnd, patience=3.0)
        mid_run += running > 0
        cluster.kill9(victim)
        cluster.start_worker(concurrency=8)
    wait_until(
        lambda: cluster.statuses(ids)["COMPLETED"] == len(ids),
        timeout=max(10.0, 80.0 - (time.monotonic() - started)),
        what="every run to complete",
        interval=0.1,
    )
    return mid_run
