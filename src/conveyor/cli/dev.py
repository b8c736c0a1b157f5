"""`conveyor dev`: the embedded SQLite database, a worker for the project's task modules that
restarts when code changes, and a view of what is running.

The worker runs as a child process (`python -m conveyor worker ...`). A code change stops it
with SIGTERM — running code gets `--grace` seconds, then its runs are handed back to the queue
at no cost of an attempt — and starts a fresh one that imports the new code. The child lives in
its own session, so Ctrl-C reaches only `conveyor dev`, which stops the child the same way.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.text import Text

from conveyor.cli import common
from conveyor.cli.common import console, fail
from conveyor.core.errors import ConveyorError
from conveyor.core.records import QueueInfo, Run
from conveyor.core.status import FINISHED

REFRESH = 1.0  # seconds between looks at the store
TICK = 0.1  # seconds between looks at the child's output, signals and file changes
FINISHED_NAMES = sorted(s.value for s in FINISHED)
RECENT = 8  # finished runs in the live view
EXECUTING_ROWS = 15


def dev(
    modules: str = typer.Option(None, "--modules", "-m", help="Task modules, comma-separated (default: config)"),
    concurrency: int = typer.Option(10, "--concurrency", "-c", help="Runs executed at once"),
    reload: bool = typer.Option(True, "--reload/--no-reload", help="Restart the worker when code changes"),
    grace: float = typer.Option(
        2.0, "--grace", help="On reload or stop: seconds running code may finish before its runs are handed back"
    ),
) -> None:
    """Develop locally: a worker that reloads on code changes, and a live view of what runs.

    Uses the embedded SQLite database (<project root>/.conveyor/dev.db unless a URL is set),
    migrated automatically. Ctrl-C stops: running code gets --grace seconds, then its runs
    go back to the queue without spending an attempt.
    """
    from conveyor.sdk.client import get_client
    from conveyor.store.open import open_store

    client = get_client()
    config = client.config
    url = config.resolved_database_url
    where = common.database_path(url) or url
    console.print(Text("conveyor dev", style="bold") + Text(f": database {where}"), soft_wrap=True)
    store = open_store(url, auto_migrate=False, check_schema=False, synchronous=config.synchronous)
    try:
        applied = store.migrate()
        version = store.schema_version()
    finally:
        store.close()
    if applied:
        console.print(f"conveyor dev: schema version {version} (applied {', '.join(map(str, applied))})")
    fixed = common.split_list(modules)
    if not (fixed or config.modules):
        fail("no task modules: pass --modules a.b,c.d or set `modules` in conveyor.toml / [tool.conveyor]")
    if concurrency < 1:
        fail(f"--concurrency must be >= 1, got {concurrency}", common.EXIT_USAGE)
    common.open_client(must_exist=False)
    supervisor = Supervisor(
        client=client,
        url=url,
        root=config.root,
        modules=fixed,
        concurrency=concurrency,
        grace=grace,
        reload=reload,
        live=sys.stdout.isatty(),
    )
    code = supervisor.run()
    if code:
        raise typer.Exit(code)


# --- what the view shows ---------------------------------------------------------------------------


@dataclass
class Snapshot:
    executing: list[Run] = field(default_factory=list)
    attempt_started: dict[str, float] = field(default_factory=dict)
    recent: list[Run] = field(default_factory=list)
    queues: list[QueueInfo] = field(default_factory=list)
    error: str | None = None
    taken_at: float = 0.0


def take_snapshot(client: Any) -> Snapshot:
    snap = Snapshot(taken_at=time.time())
    try:
        snap.executing = list(client.runs.list(status=["EXECUTING"], limit=200).data)
        snap.executing.sort(key=lambda r: r.started_at or 0)
        for run in snap.executing[:EXECUTING_ROWS]:
            attempts = client.engine.attempts(run.id)
            if attempts:
                snap.attempt_started[run.id] = attempts[-1].started_at
        finished = list(client.runs.list(status=FINISHED_NAMES, limit=50).data)
        snap.recent = sorted(finished, key=lambda r: r.finished_at or r.updated_at, reverse=True)
        snap.queues = client.queues.list()
    except ConveyorError as exc:
        snap.error = common.describe_error(exc, client.config.resolved_database_url)
    return snap


class Tracker:
    """Turns successive snapshots into one line per change of a run (started, retried, finished)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.executing: dict[str, int] = {}  # run id -> attempt we reported EXECUTING
        self.finished: set[str] = set()
        self.primed = False

    def changes(self, snap: Snapshot) -> list[Text]:
        if snap.error:
            return []
        out: list[tuple[float, Text]] = []
        if not self.primed:
            self.finished = {r.id for r in snap.recent}
            self.primed = True
        current = {r.id: r for r in snap.executing}
        gone = [run_id for run_id in self.executing if run_id not in current]
        for run in snap.executing:
            if self.executing.get(run.id) != run.attempts:
                self.executing[run.id] = run.attempts
                out.append((snap.attempt_started.get(run.id) or run.updated_at, self.line(run)))
        recent = {r.id: r for r in snap.recent}
        for run in snap.recent:
            if run.id not in self.finished:
                self.finished.add(run.id)
                out.append((run.finished_at or run.updated_at, self.line(run)))
        for run_id in gone:
            del self.executing[run_id]
            if run_id in recent:
                continue
            try:
                run = self.client.runs.retrieve(run_id)
            except ConveyorError:
                continue
            if run.finished:
                self.finished.add(run.id)
            out.append((run.finished_at or run.updated_at, self.line(run)))
        if len(self.finished) > 10_000:
            self.finished = {r.id for r in snap.recent}
        return [text for _, text in sorted(out, key=lambda item: item[0])]

    @staticmethod
    def line(run: Run) -> Text:
        stamp = run.finished_at or run.updated_at
        text = Text(common.when(stamp) + " ", style="dim")
        text.append_text(common.status_text(run.status))
        text.append(" " * max(1, 15 - len(run.status.value)))
        text.append(f"{run.task_id} ", style="bold")
        text.append(run.id)
        status = run.status.value
        if status == "EXECUTING":
            text.append(f" attempt {run.attempts}/{run.max_attempts}", style="dim")
        elif status == "QUEUED" and run.error:
            wait = run.available_at - time.time()
            text.append(f" retry in {common.seconds(max(0.0, wait))}", style="yellow")
        elif status == "QUEUED":
            text.append(" handed back to the queue", style="dim")
        elif run.finished and run.duration is not None:
            text.append(f" {common.seconds(run.duration)}", style="dim")
        if run.error and status != "COMPLETED":
            from conveyor.cli.runs import error_line

            text.append("  " + error_line(run.error), style="red")
        return text


def queue_summary(queues: list[QueueInfo]) -> str:
    """The queues with something in them (or paused), for the plain-line view."""
    parts = []
    for q in queues:
        if not (q.queued or q.running or q.delayed or q.paused):
            continue
        part = f"{q.name} {q.queued} queued/{q.running} running"
        if q.delayed:
            part += f"/{q.delayed} delayed"
        if q.paused:
            part += " (paused)"
        if q.unservable:
            part += f" ({q.unservable} unservable)"
        parts.append(part)
    return "queues: " + ("; ".join(parts) if parts else f"{len(queues)} idle")


def render(snap: Snapshot, status: Text, where: str) -> RenderableType:
    now = time.time()
    header = Text("conveyor dev", style="bold")
    header.append(f" · {where} · worker ")
    header.append_text(status)
    parts: list[RenderableType] = [header]
    if snap.error:
        parts.append(Text(f"error: {snap.error}", style="red"))
    running = common.new_table(f"Executing ({len(snap.executing)})")
    for column in ("ID", "TASK", "ATTEMPT", "ELAPSED"):
        running.add_column(column, no_wrap=True)
    for run in snap.executing[:EXECUTING_ROWS]:
        started = snap.attempt_started.get(run.id) or run.started_at or now
        running.add_row(run.id, run.task_id, f"{run.attempts}/{run.max_attempts}", common.seconds(now - started))
    if len(snap.executing) > EXECUTING_ROWS:
        running.add_row(f"... {len(snap.executing) - EXECUTING_ROWS} more", "", "", "")
    parts.append(running)
    recent = common.new_table("Recently finished")
    for column in ("ID", "TASK", "STATUS", "DURATION", "FINISHED", "ERROR"):
        recent.add_column(column, no_wrap=column != "ERROR")
    from conveyor.cli.runs import error_line

    for run in snap.recent[:RECENT]:
        recent.add_row(
            run.id,
            run.task_id,
            common.status_text(run.status),
            common.seconds(run.duration),
            common.ago(run.finished_at, now),
            Text(error_line(run.error) if run.status.value != "COMPLETED" else "", style="red"),
        )
    parts.append(recent)
    if snap.queues:
        from conveyor.cli.queues import queues_table

        parts.append(queues_table(snap.queues, "Queues"))
    parts.append(Text("Ctrl-C to stop", style="dim"))
    return Group(*parts)


# --- the supervisor ----------------------------------------------------------------------------------


class _CodeFilter:
    """Python files and the project config; not caches, virtualenvs or the database."""

    def __init__(self) -> None:
        import watchfiles

        self._default = watchfiles.DefaultFilter(
            ignore_dirs=(*watchfiles.DefaultFilter.ignore_dirs, ".conveyor", "venv", ".ruff_cache", "site-packages")
        )

    def __call__(self, change: Any, path: str) -> bool:
        if not self._default(change, path):
            return False
        name = os.path.basename(path)
        return name.endswith(".py") or name in ("conveyor.toml", "pyproject.toml")


class Supervisor:
    def __init__(
        self,
        *,
        client: Any,
        url: str,
        root: Path,
        modules: list[str],
        concurrency: int,
        grace: float,
        reload: bool,
        live: bool,
    ) -> None:
        self.client = client
        self.url = url
        self.where = common.database_path(url) or url
        self.root = Path(root)
        self.modules = modules
        self.concurrency = concurrency
        self.grace = grace
        self.reload = reload
        self.live_mode = live
        self.proc: subprocess.Popen[str] | None = None
        self.output: queue.Queue[str | None] = queue.Queue()
        self.changes: queue.Queue[set[str]] = queue.Queue()
        self.wake = threading.Event()
        self.signals = 0
        self.state = "starting"
        self.exit_reported = True
        self.live: Live | None = None
        self.snapshot: Snapshot | None = None
        self.watch_stop = threading.Event()

    # --- output --------------------------------------------------------------------------------
    def say(self, text: str | Text, style: str = "") -> None:
        line = text if isinstance(text, Text) else Text(text, style=style)
        target = self.live.console if self.live is not None else console
        target.print(line, soft_wrap=True)

    def drain_output(self) -> None:
        while True:
            try:
                line = self.output.get_nowait()
            except queue.Empty:
                return
            if line is None:
                continue
            if line.startswith("conveyor worker ready"):
                self.state = "ready"
                self.redraw()
            style = "red" if line.startswith("error:") else ("dim" if self.live_mode else "")
            self.say(Text(line, style=style))

    def redraw(self) -> None:
        if self.live is not None and self.snapshot is not None:
            self.live.update(render(self.snapshot, self.status_text(), self.where), refresh=True)

    def status_text(self) -> Text:
        pid = f" (pid {self.proc.pid})" if self.proc is not None else ""
        style = {"ready": "green", "starting": "yellow", "restarting": "yellow"}.get(self.state, "red")
        text = Text(self.state + pid, style=style)
        text.append(" · reload " + ("on" if self.reload else "off"), style="dim")
        return text

    # --- the child -----------------------------------------------------------------------------
    def module_names(self) -> list[str]:
        if self.modules:
            return self.modules
        from conveyor.sdk import config as config_module

        return list(config_module.load().modules)

    def spawn(self) -> bool:
        try:
            names = self.module_names()
        except ConveyorError as exc:
            self.say(f"cannot start the worker: {exc}", "red")
            self.state = "not running"
            return False
        if not names:
            self.say("cannot start the worker: no task modules in the config", "red")
            self.state = "not running"
            return False
        command = [
            sys.executable,
            "-m",
            "conveyor",
            "worker",
            "--modules",
            ",".join(names),
            "--concurrency",
            str(self.concurrency),
            "--grace",
            str(self.grace),
            "--parent-pid",
            str(os.getpid()),
        ]
        env = dict(os.environ)
        env["CONVEYOR_DATABASE_URL"] = self.url
        env["PYTHONUNBUFFERED"] = "1"
        # A rewrite within one second that keeps the file size would otherwise load a stale .pyc.
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.root), env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=env,
            start_new_session=True,
        )
        self.state = "starting"
        self.exit_reported = False
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        self.say(f"conveyor dev: worker starting (pid {self.proc.pid}), modules {', '.join(names)}")
        return True

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.output.put(line.rstrip("\n"))
            self.wake.set()
        self.output.put(None)
        self.wake.set()

    def stop_child(self) -> None:
        """SIGTERM (graceful: --grace for running code, then handed back); a second SIGTERM hands
        back at once; SIGKILL if it still has not exited."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            self.proc = None
            return
        proc.send_signal(signal.SIGTERM)
        signals_at_start = self.signals
        deadline = time.monotonic() + self.grace + 2.0
        hurried = False
        while proc.poll() is None:
            self.drain_output()
            if not hurried and (time.monotonic() > deadline or self.signals > max(signals_at_start, 1)):
                proc.send_signal(signal.SIGTERM)
                hurried = True
                deadline = time.monotonic() + 5.0
            elif hurried and time.monotonic() > deadline:
                self.say(f"the worker (pid {proc.pid}) did not stop; killing it", "red")
                proc.kill()
            self.wake.wait(0.05)
            self.wake.clear()
        self.drain_output()
        self.proc = None

    # --- watching files ------------------------------------------------------------------------
    def _watch(self, paths: list[str]) -> None:
        import watchfiles

        try:
            for batch in watchfiles.watch(
                *paths,
                watch_filter=_CodeFilter(),
                stop_event=self.watch_stop,
                debounce=400,
                step=50,
                rust_timeout=500,
                raise_interrupt=False,
            ):
                self.changes.put({path for _, path in batch})
                self.wake.set()
        except Exception as exc:  # e.g. out of inotify watches: keep running without reload
            self.output.put(f"conveyor dev: watching files failed ({exc}); reload is off")
            self.wake.set()

    def pending_changes(self) -> set[str]:
        changed: set[str] = set()
        while True:
            try:
                changed |= self.changes.get_nowait()
            except queue.Empty:
                return changed

    # --- the loop ------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signals += 1
        self.wake.set()

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        old = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def run(self) -> int:
        paths = [str(self.root)]
        cwd = os.getcwd()
        if not cwd.startswith(str(self.root)):
            paths.append(cwd)
        with self._signals():
            if self.reload:
                self.say(f"conveyor dev: reloading on changes under {', '.join(paths)}")
                threading.Thread(target=self._watch, args=(paths,), daemon=True).start()
            self.spawn()
            try:
                if self.live_mode:
                    with Live(console=console, auto_refresh=False, transient=False) as live:
                        self.live = live
                        code = self._loop()
                        self.live = None
                else:
                    code = self._loop()
            finally:
                self.watch_stop.set()
                self.stop_child()
        self.say("conveyor dev: stopped")
        return code

    def _loop(self) -> int:
        tracker = Tracker(self.client)
        next_look = 0.0
        last_summary = ""
        summary_at = 0.0
        last_error: str | None = None
        while True:
            self.wake.wait(TICK)
            self.wake.clear()
            self.drain_output()
            if self.signals:
                self.say("conveyor dev: stopping (Ctrl-C again to hand running runs back at once)")
                return 0
            changed = self.pending_changes()
            if changed:
                names = sorted(os.path.relpath(p, self.root) for p in changed)
                shown = ", ".join(names[:3]) + (f" (+{len(names) - 3})" if len(names) > 3 else "")
                self.say(f"conveyor dev: {shown} changed; restarting the worker", "yellow")
                self.state = "restarting"
                self.stop_child()
                if self.signals:
                    continue
                self.spawn()
            elif self.proc is not None and self.proc.poll() is not None and not self.exit_reported:
                self.exit_reported = True
                self.drain_output()
                code = self.proc.returncode
                self.state = f"exited ({code})"
                if not self.reload:
                    self.say(f"conveyor dev: the worker exited with code {code}", "red")
                    return code or 1
                self.say(f"conveyor dev: the worker exited with code {code}; it restarts when a file changes", "red")
            if time.monotonic() >= next_look:
                next_look = time.monotonic() + REFRESH
                snap = self.snapshot = take_snapshot(self.client)
                for text in tracker.changes(snap):
                    self.say(text)
                if self.live is not None:
                    self.redraw()
                    continue
                if snap.error != last_error and snap.error is not None:
                    self.say(f"error: {snap.error}", "red")
                last_error = snap.error
                summary = queue_summary(snap.queues)
                if not snap.error and summary != last_summary and time.monotonic() - summary_at >= 5.0:
                    last_summary, summary_at = summary, time.monotonic()
                    self.say(summary)
