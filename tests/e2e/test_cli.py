"""The `conveyor` command line, end to end: real subprocesses against a temporary project.

Every wait is on a condition with a deadline; nothing asserts after a fixed sleep.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent
CONVEYOR = str(BIN / "conveyor")

TASKS = """
import asyncio
import time

import conveyor
from conveyor import Queue, Retry, task

VERSION = "v1"


@task("hello", retry=Retry(max_attempts=1))
async def hello(payload):
    conveyor.logger.info("greeting someone", extra={"who": payload.get("name"), "n": 7})
    conveyor.logger.warning("careful [red]markup[/red] stays text")
    return {"greeting": f"hello {payload.get('name')}", "version": VERSION}


@task("add")
def add(payload):
    return payload["a"] + payload["b"]


@task("slow", retry=Retry(max_attempts=1))
async def slow(payload):
    await asyncio.sleep(payload.get("seconds", 60))
    return "slept"


@task("boom", retry=Retry(max_attempts=1))
async def boom(payload):
    raise ValueError("boom: " + str(payload))


@task("paused-job", queue=Queue("pausable", concurrency_limit=2))
async def paused_job(payload):
    return "ran"
"""


# --- helpers ----------------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.pop("COLUMNS", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def make_project(root: Path, tasks: str = TASKS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "conveyor.toml").write_text('project = "cli-test"\nmodules = ["mytasks"]\n')
    (root / "mytasks.py").write_text(tasks)
    return root


def cli(project: Path, *args: str, timeout: float = 15, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CONVEYOR, *args],
        cwd=project,
        env=clean_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_json(project: Path, *args: str) -> Any:
    result = cli(project, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


class Proc:
    """A background `conveyor ...` process whose stdout and stderr are collected as they come."""

    def __init__(self, project: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [CONVEYOR, *args],
            cwd=project,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True).start()

    @staticmethod
    def _pump(stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def wait_output(self, pattern: str, count: int = 1, timeout: float = 10.0) -> list[str]:
        def found() -> list[str] | None:
            matches = re.findall(pattern, self.output)
            if len(matches) >= count:
                return matches
            if self.proc.poll() is not None:
                raise AssertionError(f"process exited ({self.proc.returncode}) before {pattern!r}:\n{self.output}")
            return None

        return wait_for(found, timeout, f"{pattern!r} x{count} in output")  # type: ignore[no-any-return]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"process did not stop within {timeout} s after {sig}:\n{self.output}") from None


def start_worker(project: Path, *args: str) -> Proc:
    worker = Proc(project, "worker", "--lease", "2", "--renew", "0.5", "--grace", "1", *args)
    worker.wait_output(r"conveyor worker ready")
    return worker


def run_status(project: Path, run_id: str) -> str:
    return str(cli_json(project, "runs", "show", run_id)["status"])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- a project with a worker, shared by the tests that only need one ------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = make_project(tmp_path_factory.mktemp("cli") / "proj")
    worker = start_worker(root)
    try:
        yield root
    finally:
        code = worker.stop()
        assert code == 0, worker.output


def test_python_m_conveyor_runs_the_cli(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "conveyor", "--help"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    for command in ("dev", "worker", "trigger", "runs", "tasks", "queues", "migrate"):
        assert command in result.stdout


def test_trigger_wait_prints_status_and_output(project: Path) -> None:
    result = cli(project, "trigger", "hello", "--payload", '{"name": "ada"}', "--wait", "--timeout", "10")
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    run_id, status = first.split()[:2]
    assert run_id.startswith("run_") and status == "COMPLETED"
    body = result.stdout[result.stdout.index("{") :]
    assert json.loads(body) == {"greeting": "hello ada", "version": "v1"}

    as_json = cli_json(project, "trigger", "add", "--payload", '{"a": 2, "b": 40}', "--wait")
    assert as_json["status"] == "COMPLETED" and as_json["output"] == 42  # a sync task, in the worker's pool


def test_trigger_options_reach_the_run(project: Path) -> None:
    result = cli(
        project,
        *("trigger", "hello", "-p", '{"name": "opt"}', "--tag", "user:1", "--tag", "cli,extra"),
        *("--idempotency-key", "k-1", "--concurrency-key", "user:1", "--delay", "3600", "--metadata", '{"m": 1}'),
    )
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.strip()
    assert re.fullmatch(r"run_\w+", run_id)
    again = cli(project, "trigger", "hello", "-p", '{"name": "opt"}', "--idempotency-key", "k-1")
    assert again.stdout.strip() == run_id  # a live key returns the existing run

    run = cli_json(project, "runs", "show", run_id)
    assert run["status"] == "DELAYED"
    assert run["tags"] == ["user:1", "cli", "extra"]
    assert run["idempotency_key"] == "k-1" and run["concurrency_key"] == "user:1"
    assert run["metadata"] == {"m": 1} and run["payload"] == {"name": "opt"}
    assert cli(project, "runs", "cancel", run_id).returncode == 0
    assert run_status(project, run_id) == "CANCELED"


def test_trigger_wait_on_a_failing_run_exits_nonzero_with_the_error(project: Path) -> None:
    result = cli(project, "trigger", "boom", "--payload", '{"x": 1}', "--wait", "--timeout", "10")
    assert result.returncode == 1, result.stdout + result.stderr
    assert " FAILED " in result.stdout
    assert "ValueError: boom: {'x': 1}" in result.stdout
    assert "Traceback" in result.stdout  # the task's stack, not the CLI's


def test_trigger_wait_timeout_exits_nonzero(project: Path) -> None:
    result = cli(project, "trigger", "slow", "--payload", '{"seconds": 30}', "--wait", "--timeout", "0.5")
    assert result.returncode == 1
    assert "after 0.5 s" in result.stderr and "Traceback" not in result.stderr
    run_id = re.search(r"run_\w+", result.stderr)
    assert run_id is not None
    assert cli(project, "runs", "cancel", run_id.group(0)).returncode == 0


def test_bad_json_is_a_usage_error(project: Path) -> None:
    result = cli(project, "trigger", "hello", "--payload", "{name: 1")
    assert result.returncode == 2
    assert "--payload is not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.count("\n") == 1  # one line

    from_stdin = cli(project, "trigger", "hello", "--payload", "-", stdin="[1, 2")
    assert from_stdin.returncode == 2 and "stdin" in from_stdin.stderr


def test_unknown_task_is_a_clear_error(project: Path) -> None:
    result = cli(project, "trigger", "no-such-task", "--payload", "{}")
    assert result.returncode == 1
    assert "no task 'no-such-task' is registered" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.startswith("error: ")


def test_runs_list_show_logs(project: Path) -> None:
    done = cli_json(project, "trigger", "hello", "-p", '{"name": "lister"}', "--tag", "listed", "--wait")
    run_id = done["id"]

    table = cli(project, "runs", "list", "--limit", "50")
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if run_id in line)
    assert "hello" in row and "COMPLETED" in row and "listed" in row

    page = cli_json(project, "runs", "list", "--task", "hello", "--status", "completed", "--tag", "listed")
    assert [r["id"] for r in page["data"]] == [run_id]
    assert cli_json(project, "runs", "list", "--status", "FAILED,CRASHED", "--task", "hello")["data"] == []
    bad = cli(project, "runs", "list", "--status", "DONE")
    assert bad.returncode == 2 and "unknown status 'DONE'" in bad.stderr

    show = cli(project, "runs", "show", run_id)
    assert show.returncode == 0, show.stderr
    for text in (run_id, "COMPLETED", "lister", "hello lister", "Attempts"):
        assert text in show.stdout
    shown = cli_json(project, "runs", "show", run_id)
    assert shown["attempt_list"][0]["status"] == "COMPLETED"

    logs = cli(project, "runs", "logs", run_id)
    assert logs.returncode == 0, logs.stderr
    info = next(line for line in logs.stdout.splitlines() if "greeting someone" in line)
    assert "INFO" in info and 'who="lister"' in info and "n=7" in info
    assert re.search(r"\d\d:\d\d:\d\d\.\d{3}", info)
    assert "careful [red]markup[/red] stays text" in logs.stdout
    lines = cli_json(project, "runs", "logs", run_id)
    assert [ln["level"] for ln in lines] == ["INFO", "WARNING"]
    assert lines[0]["attributes"] == {"who": "lister", "n": 7} and lines[0]["attempt"] == 1

    missing = cli(project, "runs", "show", "run_doesnotexist")
    assert missing.returncode == 1 and "no run 'run_doesnotexist'" in missing.stderr


def test_runs_show_error_has_the_stack(project: Path) -> None:
    result = cli(project, "trigger", "boom", "-p", '"x"', "--wait", "--json")
    assert result.returncode == 1  # the run did not complete
    failed = json.loads(result.stdout)
    assert failed["status"] == "FAILED" and failed["error"]["type"] == "ValueError"
    show = cli(project, "runs", "show", failed["id"])
    assert "FAILED" in show.stdout and "ValueError: boom: x" in show.stdout
    assert "Traceback (most recent call last)" in show.stdout and "mytasks.py" in show.stdout


def test_cancel_executing_run_and_watch_it(project: Path) -> None:
    run_id = cli(project, "trigger", "slow", "-p", '{"seconds": 60}').stdout.strip()
    wait_for(lambda: run_status(project, run_id) == "EXECUTING", what="the slow run to start")
    result = cli(project, "runs", "cancel", run_id)
    assert result.returncode == 0, result.stderr
    assert run_id in result.stdout
    wait_for(lambda: run_status(project, run_id) == "CANCELED", what="the worker to stop the code")
    watched = cli(project, "runs", "watch", run_id)
    assert watched.returncode == 1  # it did not complete
    assert "EXECUTING" in watched.stdout and "CANCELED" in watched.stdout
    again = cli(project, "runs", "cancel", run_id)
    assert again.returncode == 0 and "already CANCELED" in again.stdout


def test_replay_and_watch_until_completed(project: Path) -> None:
    original = cli_json(project, "trigger", "hello", "-p", '{"name": "again"}', "--wait")
    replayed = cli(project, "runs", "replay", original["id"])
    assert replayed.returncode == 0, replayed.stderr
    new_id = replayed.stdout.strip()
    assert new_id.startswith("run_") and new_id != original["id"]
    watched = cli(project, "runs", "watch", new_id, timeout=15)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert "COMPLETED" in watched.stdout and "greeting someone" in watched.stdout
    run = cli_json(project, "runs", "show", new_id)
    assert run["payload"] == {"name": "again"} and run["output"]["greeting"] == "hello again"


def test_tasks_lists_the_registry(project: Path) -> None:
    table = cli(project, "tasks")
    assert table.returncode == 0, table.stderr
    for task_id in ("hello", "add", "slow", "boom", "paused-job"):
        assert task_id in table.stdout
    paused_row = next(line for line in table.stdout.splitlines() if "paused-job" in line)
    assert "pausable" in paused_row and "queue 2" in paused_row and "small-1x" in paused_row
    records = {r["task_id"]: r for r in cli_json(project, "tasks")}
    assert records["hello"]["options"]["retry"]["max_attempts"] == 1
    assert records["add"]["queue"] == "add"
    workers = cli_json(project, "workers")
    assert len(workers) == 1 and "pausable" in workers[0]["queues"]


def test_queues_pause_and_resume(project: Path) -> None:
    listed = cli(project, "queues")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if "pausable" in line)
    assert " 2 " in row and "no" in row  # limit 2, not paused

    paused = cli(project, "queues", "pause", "pausable")
    assert paused.returncode == 0 and "paused" in paused.stdout
    try:
        held = cli(project, "trigger", "paused-job", "-p", "{}").stdout.strip()
        # A run on another queue triggered after it completes: the worker was free to take both.
        cli_json(project, "trigger", "hello", "-p", '{"name": "meanwhile"}', "--wait")
        assert run_status(project, held) == "QUEUED"
        queue = next(q for q in cli_json(project, "queues") if q["name"] == "pausable")
        assert queue["paused"] is True and queue["queued"] == 1 and queue["concurrency_limit"] == 2
        row = next(line for line in cli(project, "queues").stdout.splitlines() if "pausable" in line)
        assert "paused" in row
    finally:
        resumed = cli(project, "queues", "resume", "pausable")
    assert resumed.returncode == 0 and "resumed" in resumed.stdout
    wait_for(lambda: run_status(project, held) == "COMPLETED", what="the held run to start after resume")

    unknown = cli(project, "queues", "pause", "no-such-queue")
    assert unknown.returncode == 1 and "no queue 'no-such-queue'" in unknown.stderr


# --- errors that must name the file, and the worker's import error ---------------------------------


def test_import_error_exits_nonzero_with_the_traceback(tmp_path: Path) -> None:
    project = make_project(tmp_path / "broken")
    (project / "badtasks.py").write_text("import conveyor\n\nVALUE = 1 / 0\n")
    result = cli(project, "worker", "--modules", "badtasks")
    assert result.returncode != 0
    assert "importing task module 'badtasks' failed" in result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert "ZeroDivisionError: division by zero" in result.stderr and "badtasks.py" in result.stderr

    missing = cli(project, "worker", "--modules", "not_a_module")
    assert missing.returncode != 0 and "ModuleNotFoundError" in missing.stderr


def test_missing_database_names_the_file(tmp_path: Path) -> None:
    project = make_project(tmp_path / "fresh")
    for args in (("runs", "list"), ("tasks",), ("queues",), ("trigger", "hello")):
        result = cli(project, *args)
        assert result.returncode == 1, args
        assert str(project / ".conveyor" / "dev.db") in result.stderr
        assert "Traceback" not in result.stderr
    assert not (project / ".conveyor" / "dev.db").exists()  # reading never creates it


def test_newer_schema_names_the_file(tmp_path: Path) -> None:
    project = make_project(tmp_path / "future")
    migrated = cli(project, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    db = project / ".conveyor" / "dev.db"
    assert str(db) in migrated.stdout
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (9999, 'future', 0)")
    for args in (("runs", "list"), ("migrate",)):
        result = cli(project, *args)
        assert result.returncode == 1, args
        assert "newer" in result.stderr and str(db) in result.stderr
        assert "Traceback" not in result.stderr


def test_locked_database_names_the_file(tmp_path: Path) -> None:
    project = make_project(tmp_path / "locked")
    assert cli(project, "migrate").returncode == 0
    db = project / ".conveyor" / "dev.db"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\ntime.sleep(60)\n",
            str(db),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        env_timeout = cli(project, "migrate", timeout=30)
    finally:
        holder.kill()
        holder.wait()
    assert env_timeout.returncode == 1
    assert str(db) in env_timeout.stderr and "locked" in env_timeout.stderr
    assert "Traceback" not in env_timeout.stderr


# --- conveyor dev ------------------------------------------------------------------------------------


def test_dev_no_reload_runs_a_task_and_stops_on_sigint(tmp_path: Path) -> None:
    project = make_project(tmp_path / "dev")
    dev = Proc(project, "dev", "--no-reload", "--concurrency", "4")
    try:
        dev.wait_output(r"conveyor worker ready")
        assert f"database {project / '.conveyor' / 'dev.db'}" in dev.stdout
        child_pid = int(re.findall(r"conveyor worker ready: pid (\d+)", dev.output)[0])

        done = cli_json(project, "trigger", "add", "-p", '{"a": 1, "b": 2}', "--wait")
        assert done["status"] == "COMPLETED" and done["output"] == 3
        dev.wait_output(rf"COMPLETED\s+add {done['id']}")  # the plain-line view (stdout is not a TTY)
        assert "EXECUTING" in dev.stdout or "COMPLETED" in dev.stdout
        assert "\x1b[" not in dev.stdout  # no Live view, no escape codes

        code = dev.stop(signal.SIGINT)
    finally:
        if dev.proc.poll() is None:
            dev.stop(signal.SIGKILL)
    assert code == 0, dev.output
    assert "conveyor dev: stopped" in dev.stdout
    assert "Traceback" not in dev.output
    assert not pid_alive(child_pid)
    assert cli_json(project, "workers") == []  # the worker deregistered


def test_dev_reloads_when_code_changes(tmp_path: Path) -> None:
    project = make_project(tmp_path / "reload")
    dev = Proc(project, "dev")
    try:
        dev.wait_output(r"conveyor worker ready")
        first = cli_json(project, "trigger", "hello", "-p", '{"name": "r"}', "--wait")
        assert first["output"]["version"] == "v1"

        source = (project / "mytasks.py").read_text()
        (project / "mytasks.py").write_text(source.replace('VERSION = "v1"', 'VERSION = "v2-reloaded"'))
        dev.wait_output(r"mytasks\.py changed; restarting the worker")
        dev.wait_output(r"conveyor worker ready", count=2)
        second = cli_json(project, "trigger", "hello", "-p", '{"name": "r"}', "--wait")
        assert second["output"]["version"] == "v2-reloaded"

        # A broken edit: the worker exits with the traceback, dev waits for the fix.
        (project / "mytasks.py").write_text(source + "\nraise RuntimeError('half-written')\n")
        dev.wait_output(r"RuntimeError: half-written")
        dev.wait_output(r"exited with code 1; it restarts when a file changes")
        (project / "mytasks.py").write_text(source.replace('VERSION = "v1"', 'VERSION = "v3"'))
        dev.wait_output(r"conveyor worker ready", count=3)
        third = cli_json(project, "trigger", "hello", "-p", '{"name": "r"}', "--wait")
        assert third["output"]["version"] == "v3"
        code = dev.stop(signal.SIGINT)
    finally:
        if dev.proc.poll() is None:
            dev.stop(signal.SIGKILL)
    assert code == 0, dev.output


def test_dev_on_a_terminal_shows_the_live_view(tmp_path: Path) -> None:
    import pty

    project = make_project(tmp_path / "tty")
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [CONVEYOR, "dev", "--no-reload"],
        cwd=project,
        env=clean_env(COLUMNS="120", LINES="40", TERM="xterm"),
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    screen: list[str] = []

    def pump() -> None:
        while True:
            try:
                data = os.read(controller, 65536)
            except OSError:
                return
            if not data:
                return
            screen.append(data.decode(errors="replace"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    plain = lambda: re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", "".join(screen))  # noqa: E731
    try:
        wait_for(lambda: "worker ready" in plain() and "Executing (" in plain(), what="the live view")
        run_id = cli(project, "trigger", "slow", "-p", '{"seconds": 30}').stdout.strip()
        wait_for(lambda: run_id in plain() and "Executing (1)" in plain(), what="the executing run in the view")
        assert "Recently finished" in plain() and "Queues" in plain()
        assert "\x1b[" in "".join(screen)  # a terminal gets the Live view, not plain lines
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0, plain()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
        os.close(controller)
    assert "conveyor dev: stopped" in plain()
    # Stopping handed the unfinished run back to the queue, at no cost of an attempt.
    run = cli_json(project, "runs", "show", run_id)
    assert run["status"] == "QUEUED" and run["attempts"] == 0


def test_runs_purge_deletes_old_finished_runs(tmp_path: Path) -> None:
    from conveyor.core.clock import FakeClock
    from conveyor.core.records import ClaimRequest, Outcome, OutcomeKind, QueueSpec, TaskRecord
    from conveyor.engine import Engine, TriggerOptions
    from conveyor.store.sqlite import SQLiteStore

    project = make_project(tmp_path / "p")
    clock = FakeClock(time.time() - 40 * 86400)  # the runs finished 40 days ago
    store = SQLiteStore(str(project / ".conveyor" / "dev.db"), clock)
    engine = Engine(store)
    task = TaskRecord(task_id="old", queue="old")
    engine.register([task], [QueueSpec("old", None)])
    ids = [r for r, _ in engine.insert([engine.prepare(task, "{}", TriggerOptions()) for _ in range(3)])]
    claimed = engine.claim(ClaimRequest("dev", "w", ["old"], ["old"], 10, 30.0))
    engine.exchange([Outcome(c.id, c.lease_token, OutcomeKind.COMPLETED, output="1") for c in claimed], [], None)
    unfinished = engine.insert([engine.prepare(task, "{}", TriggerOptions())])[0][0]
    store.close()

    assert cli_json(project, "runs", "purge", "--older-than", "50") == {"purged": 0, "older_than_days": 50.0}
    result = cli(project, "runs", "purge", "--batch", "2")  # the default: retention_days = 30
    assert result.returncode == 0, result.stderr
    assert "purged 3 finished run(s) older than 30 day(s)" in result.stdout
    assert cli(project, "runs", "show", ids[0]).returncode != 0
    assert run_status(project, unfinished) == "QUEUED"
    (project / "conveyor.toml").write_text('project = "cli-test"\nmodules = ["mytasks"]\nretention_days = 0\n')
    result = cli(project, "runs", "purge")
    assert result.returncode == 2 and "retention is off" in result.stderr
