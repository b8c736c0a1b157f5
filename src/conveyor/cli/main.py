"""`conveyor ...` (typer + rich). Commands parse and print; the work is in the sdk and the engine."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Any

import typer
from rich.text import Text

from conveyor.cli import common, dev, queues, runs
from conveyor.cli.common import console, err, fail, open_client, print_json
from conveyor.core.errors import ConveyorError


class _App(typer.Typer):
    """A Typer app that turns every ConveyorError into one clear red message and exit 1."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ConveyorError as exc:
            sys.exit(common.report(exc))


app = _App(
    help="Conveyor: durable tasks for Python.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


app.command()(dev.dev)


# --- worker -----------------------------------------------------------------------------------------


@app.command()
def worker(
    modules: str = typer.Option(None, "--modules", "-m", help="Task modules, comma-separated (default: config)"),
    concurrency: int = typer.Option(10, "--concurrency", "-c", help="Runs executed at once"),
    queues: str = typer.Option(None, "--queues", "-q", help="Only these queues, comma-separated"),
    machine: str = typer.Option("small-1x", "--machine", help="The machine preset this worker serves"),
    version: str = typer.Option(None, "--version", help="Serve only runs of this version"),
    lease: float = typer.Option(30.0, "--lease", help="Lease seconds"),
    renew: float = typer.Option(10.0, "--renew", help="Lease renewal interval, seconds"),
    grace: float = typer.Option(30.0, "--grace", help="Seconds to let running code finish on SIGTERM"),
    parent_pid: int = typer.Option(None, "--parent-pid", hidden=True, help="Stop when this process is gone"),
) -> None:
    """Run a worker: claim runs of the tasks in --modules and execute them.

    SIGTERM or Ctrl-C stops it gracefully: no new claims, running code gets --grace seconds,
    then the rest is handed back (QUEUED, no attempt spent). A second signal hands back at once.
    """
    from conveyor.cli import workerrun
    from conveyor.sdk.client import get_client
    from conveyor.worker.worker import WorkerOptions

    client = get_client()
    names = common.split_list(modules) or list(client.config.modules)
    if not names:
        fail("no task modules: pass --modules a.b,c.d or set `modules` in conveyor.toml / [tool.conveyor]")
    options = WorkerOptions(
        concurrency=concurrency,
        queues=common.split_list(queues) or None,
        machine=machine,
        version=version,
        lease=lease,
        renew=renew,
        shutdown_grace=grace,
    )
    workerrun.run(names, options, parent_pid)


# --- trigger ------------------------------------------------------------------------------------------


def _read_json(value: str | None, option: str) -> Any:
    """JSON text, `@file.json` or `-` (stdin). Bad JSON is a usage error (exit 2)."""
    if value is None:
        return None
    source = option
    if value == "-":
        value, source = sys.stdin.read(), f"{option} (stdin)"
    elif value.startswith("@"):
        path = value[1:]
        try:
            with open(path) as handle:
                value = handle.read()
        except OSError as exc:
            fail(f"{option}: cannot read {path}: {exc.strerror}", common.EXIT_USAGE)
        source = f"{option} ({path})"
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        fail(f"{source} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", common.EXIT_USAGE)


@app.command()
def trigger(
    task_id: str = typer.Argument(..., metavar="TASK", help="The task id"),
    payload: str = typer.Option(None, "--payload", "-p", help="JSON payload; @file.json reads a file, - stdin"),
    wait: bool = typer.Option(False, "--wait", "-w", help="Wait for the run to finish; print status and output"),
    timeout: float = typer.Option(None, "--timeout", help="With --wait: give up waiting after this many seconds"),
    idempotency_key: str = typer.Option(None, "--idempotency-key", help="A live key returns the existing run"),
    idempotency_key_ttl: float = typer.Option(None, "--idempotency-key-ttl", help="Seconds the key stays live"),
    delay: float = typer.Option(None, "--delay", help="Seconds before the run may start (DELAYED until then)"),
    ttl: float = typer.Option(None, "--ttl", help="EXPIRED if not started within this many seconds"),
    tags: list[str] = typer.Option(None, "--tag", "-t", help="A tag (repeat for more)"),
    queue: str = typer.Option(None, "--queue", help="Run on this queue instead of the task's"),
    concurrency_key: str = typer.Option(None, "--concurrency-key", help="Serialise runs sharing this key"),
    priority: int = typer.Option(None, "--priority", help="Seconds of head start within its queue"),
    max_attempts: int = typer.Option(None, "--max-attempts", help="Attempts, the first included"),
    machine: str = typer.Option(None, "--machine", help="Machine preset"),
    version: str = typer.Option(None, "--version", help="Run on workers of this version"),
    metadata: str = typer.Option(None, "--metadata", help="Initial metadata, a JSON object"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
) -> None:
    """Trigger a task by id (known from the task registry that workers write).

    Prints the run id. With --wait, prints the final status and output, and exits 1 unless
    the run COMPLETED.
    """
    import conveyor

    data = _read_json(payload, "--payload")
    meta = _read_json(metadata, "--metadata")
    options: dict[str, Any] = {
        "idempotency_key": idempotency_key,
        "idempotency_key_ttl": idempotency_key_ttl,
        "delay": delay,
        "ttl": ttl,
        "queue": queue,
        "concurrency_key": concurrency_key,
        "priority": priority,
        "max_attempts": max_attempts,
        "machine": machine,
        "version": version,
        "metadata": meta,
    }
    options = {k: v for k, v in options.items() if v is not None}
    tag_list = common.split_list(tags)
    if tag_list:
        options["tags"] = tag_list
    client = open_client()
    handle = conveyor.trigger(task_id, data, **options)
    if not (wait or timeout is not None):
        if as_json:
            print_json({"id": handle.id})
        else:
            console.print(handle.id, soft_wrap=True)
        return
    _warn_if_unserved(client, task_id, queue)
    if not as_json:
        err.print(Text(f"triggered {task_id}: {handle.id}, waiting...", style="dim"))
    try:
        run = handle.wait(timeout)
    except TimeoutError:
        current = client.runs.retrieve(handle.id)
        fail(
            f"run {handle.id} is still {current.status.value} after {timeout:g} s; it goes on "
            f"(`conveyor runs watch {handle.id}`)"
        )
    except KeyboardInterrupt:
        err.print(f"stopped waiting; run {handle.id} goes on (`conveyor runs show {handle.id}`)")
        raise typer.Exit(130) from None
    if as_json:
        print_json(run.to_dict())
    else:
        from conveyor.cli.runs import print_result

        print_result(run)
    if run.status.value != "COMPLETED":
        raise typer.Exit(common.EXIT_ERROR)


def _warn_if_unserved(client: Any, task_id: str, queue: str | None) -> None:
    try:
        name = queue or client.engine.task(task_id).queue
        workers = client.engine.workers()
    except ConveyorError:
        return
    if not any(not w.queues or name in w.queues for w in workers):
        err.print(
            Text(
                f"warning: no live worker serves queue {name!r}; the run waits until one starts "
                "(`conveyor dev` or `conveyor worker`)",
                style="yellow",
            )
        )


# --- registry, workers, schema ----------------------------------------------------------------------


@app.command()
def tasks(as_json: bool = typer.Option(False, "--json", help="Print JSON")) -> None:
    """The task registry: every task a worker has registered in this environment."""
    client = open_client()
    records = client.engine.tasks()
    if as_json:
        print_json([asdict(r) for r in records])
        return
    if not records:
        console.print(f"no tasks registered in environment {client.engine.environment!r} (start a worker)")
        return
    table = common.new_table()
    for column in ("TASK", "QUEUE", "LIMIT", "MACHINE", "RETRY", "MAX DURATION", "VERSION", "REGISTERED"):
        table.add_column(column, no_wrap=column in ("TASK", "QUEUE"))
    for r in records:
        o = r.options
        limits = []
        if o.get("queue_limit"):
            limits.append(f"queue {o['queue_limit']}")
        if o.get("key_limit"):
            limits.append(f"per key {o['key_limit']}")
        table.add_row(
            r.task_id,
            r.queue,
            ", ".join(limits) or "-",
            r.machine,
            common.retry_summary(o.get("retry")),
            common.span(o.get("max_duration")),
            r.version or "-",
            common.ago(r.updated_at),
        )
    console.print(table)


@app.command()
def workers(as_json: bool = typer.Option(False, "--json", help="Print JSON")) -> None:
    """Live workers of this environment (seen within the last 30 s)."""
    client = open_client()
    found = client.engine.workers()
    if as_json:
        print_json([asdict(w) for w in found])
        return
    if not found:
        console.print(f"no live workers in environment {client.engine.environment!r}")
        return
    table = common.new_table()
    for column in ("WORKER", "HOST", "PID", "QUEUES", "MACHINE", "VERSION", "STARTED", "LAST SEEN"):
        table.add_column(column, no_wrap=column == "WORKER")
    for w in found:
        table.add_row(
            w.id,
            w.host,
            str(w.pid),
            ", ".join(w.queues) or "all",
            w.machine,
            w.version or "any",
            common.when(w.started_at),
            common.ago(w.last_seen_at),
        )
    console.print(table)


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema."""
    from conveyor.sdk.client import get_client
    from conveyor.store.open import open_store

    url = get_client().config.resolved_database_url
    store = open_store(url, auto_migrate=False, check_schema=False)
    try:
        applied = store.migrate()
        version = store.schema_version()
    finally:
        store.close()
    done = f"applied {', '.join(map(str, applied))}" if applied else "up to date"
    console.print(f"{store.location}: schema version {version} ({done})", soft_wrap=True)


app.add_typer(runs.app, name="runs")
app.add_typer(queues.app, name="queues")


def main() -> None:
    app(prog_name="conveyor")
