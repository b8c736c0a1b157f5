"""`conveyor runs list|show|cancel|replay|logs|watch|purge`."""

from __future__ import annotations

import json
import time
from typing import Any, cast

import typer
from rich.console import Group
from rich.table import Table
from rich.text import Text

from conveyor.cli import common
from conveyor.cli.common import console, open_client, print_json
from conveyor.core.records import Attempt, LogLine, Run, RunEvent

app = typer.Typer(help="Inspect and act on runs.", no_args_is_help=True)


# --- printing -----------------------------------------------------------------------------------------


def attempts_text(run: Run) -> str:
    return f"{run.attempts}/{run.max_attempts}"


def duration_of(run: Run, now: float | None = None) -> float | None:
    """Executing time: what the store counted, or the time since start for a running run."""
    if run.started_at is None:
        return None
    if run.status.value == "EXECUTING" and not run.finished_at:
        return max(0.0, (now or time.time()) - run.started_at)
    return run.duration


def error_line(error: dict[str, Any] | None) -> str:
    if not error:
        return ""
    kind = error.get("type") or error.get("code") or "Error"
    message = error.get("message") or ""
    return f"{kind}: {message}" if message else str(kind)


def print_error_block(error: dict[str, Any] | None) -> None:
    if not error:
        return
    head = Text("error: ", style="bold red")
    head.append(error_line(error))
    if error.get("code"):
        head.append(f"  [{error['code']}]", style="dim")
    console.print(head, soft_wrap=True)
    stack = error.get("stack")
    if stack:
        console.print(Text(str(stack).rstrip(), style="red"), soft_wrap=True)


def print_result(run: Run) -> None:
    """A finished run as `trigger --wait` and `runs watch` end: status line, then output or error."""
    line = Text(run.id + " ")
    line.append_text(common.status_text(run.status))
    line.append(f" in {common.seconds(run.duration)}, attempt {attempts_text(run)}")
    console.print(line, soft_wrap=True)
    if run.status.value == "COMPLETED":
        console.print(Text(json.dumps(run.output, indent=2, ensure_ascii=False, default=str)), soft_wrap=True)
    else:
        print_error_block(run.error)


def _kv(table: Table, name: str, value: Any) -> None:
    if value is None or value == "" or value == [] or value == {}:
        return
    table.add_row(Text(name, style="bold"), value if isinstance(value, Text) else Text(str(value)))


def _json_block(title: str, value: Any) -> Group:
    return Group(
        Text(title, style="bold"),
        Text(json.dumps(value, indent=2, ensure_ascii=False, default=str)),
    )


def attempts_table(attempts: list[Attempt]) -> Table:
    table = common.new_table("Attempts")
    with_worker = console.width >= 120
    for column in ("#", "STATUS", "STARTED", "DURATION", *(("WORKER",) if with_worker else ()), "ERROR"):
        table.add_column(column, no_wrap=column != "ERROR")
    for a in attempts:
        status: Text | str = a.status or "-"
        try:
            status = common.status_text(a.status)
        except ValueError:
            pass
        took = a.finished_at - a.started_at if a.finished_at is not None else None
        error = error_line(a.error)
        if a.error and a.error.get("code"):
            error = f"[{a.error['code']}] {error}"
        cells: list[Any] = [str(a.number), status, common.when(a.started_at, precise=True), common.seconds(took)]
        if with_worker:
            cells.append(a.worker_id or "-")
        table.add_row(*cells, Text(error))
    return table


def log_text(line: LogLine) -> Text:
    style = {"DEBUG": "dim", "WARNING": "yellow", "ERROR": "red", "CRITICAL": "bold red"}.get(line.level, "")
    text = Text(common.when(line.ts, precise=True) + " ", style="dim")
    text.append(f"{line.level:<7} ", style=style or "bold")
    text.append(f"#{line.attempt} ", style="dim")
    text.append(line.message, style=style)
    if line.attributes:
        attrs = " ".join(f"{k}={common.compact_json(v)}" for k, v in line.attributes.items())
        text.append("  " + attrs, style="cyan")
    return text


def log_dict(line: LogLine) -> dict[str, Any]:
    return {
        "ts": line.ts,
        "level": line.level,
        "attempt": line.attempt,
        "message": line.message,
        "attributes": line.attributes,
    }


def event_text(event: RunEvent) -> Text:
    text = Text(common.when(event.created_at, precise=True) + " ", style="dim")
    text.append(f"#{event.seq} ", style="dim")
    data = event.data if isinstance(event.data, dict) else {"value": event.data}
    if event.kind == "status" and "status" in data:
        text.append_text(common.status_text(data["status"]))
        if event.attempt:
            text.append(f" attempt {event.attempt}", style="dim")
        rest = {k: v for k, v in data.items() if k != "status"}
        if rest:
            text.append(" " + common.compact_json(rest, 300))
    elif event.kind == "metadata":
        text.append("metadata ", style="cyan")
        text.append(f"{data.get('op')} {data.get('key')}")
        if data.get("op") != "delete":
            text.append(" " + common.compact_json(data.get("value"), 300))
    else:
        text.append(f"{event.kind} ", style="cyan")
        text.append(common.compact_json(data, 300))
    return text


# --- commands -----------------------------------------------------------------------------------------


@app.command("list")
def list_runs(
    task: str = typer.Option(None, "--task", help="Only runs of this task"),
    status: list[str] = typer.Option(None, "--status", "-s", help="Only these statuses (repeat or comma-separate)"),
    tags: list[str] = typer.Option(None, "--tag", "-t", help="Runs with any of these tags (repeat)"),
    limit: int = typer.Option(20, "--limit", "-n", min=1, max=1000, help="At most this many runs"),
    cursor: str = typer.Option(None, "--cursor", help="Continue after this run id (the next page)"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
) -> None:
    """Runs, newest first."""
    statuses = common.parse_statuses(status)
    client = open_client()
    page = client.runs.list(
        task=task, status=statuses, tags=common.split_list(tags) or None, limit=limit, cursor=cursor
    )
    if as_json:
        print_json({"data": [r.to_dict() for r in page.data], "next_cursor": page.next_cursor})
        return
    if not page.data:
        console.print("no runs")
        return
    now = time.time()
    # Narrow terminals drop the least useful columns rather than truncating ids.
    columns = ["ID", "TASK", "STATUS", "ATTEMPT", "DURATION"]
    if console.width >= 95:
        columns.insert(4, "CREATED")
    if console.width >= 110:
        columns.append("TAGS")
    table = common.new_table()
    for column in columns:
        table.add_column(column, no_wrap=column != "TAGS")
    for r in page.data:
        cells: dict[str, Any] = {
            "ID": r.id,
            "TASK": r.task_id,
            "STATUS": common.status_text(r.status),
            "ATTEMPT": attempts_text(r),
            "CREATED": common.when(r.created_at),
            "DURATION": common.seconds(duration_of(r, now)),
            "TAGS": Text(", ".join(r.tags)),
        }
        table.add_row(*(cells[c] for c in columns))
    console.print(table)
    if page.next_cursor:
        console.print(Text(f"more: conveyor runs list --cursor {page.next_cursor}", style="dim"), soft_wrap=True)


@app.command()
def show(
    run_id: str = typer.Argument(..., metavar="ID"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (the run and its attempts)"),
) -> None:
    """A run: its fields, payload, output, error with stack, and attempts."""
    client = open_client()
    run = client.runs.retrieve(run_id)
    attempts: list[Attempt] = cast(Any, client.runs.attempts(run_id))
    if as_json:
        print_json({**run.to_dict(), "attempt_list": [_attempt_dict(a) for a in attempts]})
        return
    fields = Table.grid(padding=(0, 2))
    fields.add_column()
    fields.add_column()
    _kv(fields, "id", run.id)
    _kv(fields, "task", run.task_id)
    status = common.status_text(run.status)
    if run.cancel_requested and not run.finished:
        status.append(" (cancel requested)", style="yellow")
    _kv(fields, "status", status)
    _kv(fields, "queue", run.queue)
    _kv(fields, "attempts", attempts_text(run))
    _kv(fields, "environment", run.environment)
    _kv(fields, "created", common.iso(run.created_at))
    if run.status.value in ("DELAYED", "QUEUED") and run.available_at > time.time():
        _kv(fields, "available at", common.iso(run.available_at))
    _kv(fields, "started", common.iso(run.started_at) if run.started_at else None)
    _kv(fields, "finished", common.iso(run.finished_at) if run.finished_at else None)
    _kv(fields, "duration", common.seconds(duration_of(run)) if run.started_at else None)
    _kv(fields, "tags", ", ".join(run.tags))
    _kv(fields, "idempotency key", run.idempotency_key)
    _kv(fields, "concurrency key", run.concurrency_key)
    _kv(fields, "priority", run.priority or None)
    _kv(fields, "ttl", common.span(run.ttl) if run.ttl else None)
    _kv(fields, "max duration", common.span(run.max_duration) if run.max_duration else None)
    _kv(fields, "machine", run.machine)
    _kv(fields, "version", run.version)
    _kv(fields, "parent", run.parent_id)
    _kv(fields, "root", run.root_id if run.root_id != run.parent_id else None)
    _kv(fields, "batch", run.batch_id)
    console.print(fields)
    console.print(_json_block("payload", run.payload))
    if run.metadata:
        console.print(_json_block("metadata", run.metadata))
    if run.status.value == "COMPLETED":
        console.print(_json_block("output", run.output))
    if run.error:
        print_error_block(run.error)
    if attempts:
        console.print(attempts_table(attempts))


def _attempt_dict(a: Attempt) -> dict[str, Any]:
    return {
        "number": a.number,
        "status": a.status,
        "worker_id": a.worker_id,
        "started_at": a.started_at,
        "finished_at": a.finished_at,
        "error": a.error,
    }


@app.command()
def cancel(
    run_id: str = typer.Argument(..., metavar="ID"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
) -> None:
    """Cancel a run: at once if it has not started; an executing run's worker stops its code."""
    client = open_client()
    before = client.runs.retrieve(run_id)
    run = client.runs.cancel(run_id)
    if as_json:
        print_json(run.to_dict())
        return
    if before.finished:
        console.print(Text(f"{run.id} is already {run.status.value}; nothing to cancel", style="yellow"))
        return
    line = Text(run.id + " ")
    line.append_text(common.status_text(run.status))
    if not run.finished:
        line.append(" - cancel requested; its worker is stopping the code", style="yellow")
    console.print(line, soft_wrap=True)


@app.command()
def purge(
    older_than: float = typer.Option(
        None, "--older-than", help="Days since a run finished (default: the configured retention_days, 30)"
    ),
    batch: int = typer.Option(500, "--batch", help="Runs deleted per transaction (small: short locks)"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
) -> None:
    """Delete finished runs (and their attempts, events, logs, tags, steps) older than the retention.

    Workers already do this slowly in their maintenance loop; this does it now, in batches of
    --batch runs, each its own short transaction. Runs whose idempotency key is still live are kept.
    """
    client = open_client()
    days = older_than if older_than is not None else client.config.retention_days
    if days is None:
        common.fail("retention is off (retention_days = 0): pass --older-than DAYS", common.EXIT_USAGE)
    if days < 0 or batch < 1:
        common.fail("--older-than must be >= 0 and --batch >= 1", common.EXIT_USAGE)
    total = 0
    started = time.monotonic()
    while True:
        purged = client.engine.purge(days, batch)
        total += purged
        if purged < batch:
            break
    if as_json:
        print_json({"purged": total, "older_than_days": days})
        return
    console.print(
        f"purged {total:,} finished run(s) older than {days:g} day(s) in {time.monotonic() - started:.1f} s "
        f"({client.store.location})",
        soft_wrap=True,
    )


@app.command()
def replay(
    run_id: str = typer.Argument(..., metavar="ID"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
) -> None:
    """Start a new run of the same task with the same payload and options; prints its id."""
    client = open_client()
    handle = client.runs.replay(run_id)
    if as_json:
        print_json({"id": handle.id, "replay_of": run_id})
    else:
        console.print(handle.id, soft_wrap=True)


@app.command()
def logs(
    run_id: str = typer.Argument(..., metavar="ID"),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines until the run finishes"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (one object per line with --follow)"),
) -> None:
    """The log lines a run wrote (conveyor.logger and stdlib logging), with level, time, attributes."""
    client = open_client()
    seen = 0
    poll = 0.05
    while True:
        run = client.runs.retrieve(run_id)
        lines: list[LogLine] = cast(Any, client.runs.logs(run_id))
        fresh, seen = lines[seen:], len(lines)
        if as_json and not follow:
            print_json([log_dict(line) for line in fresh])
            return
        for line in fresh:
            if as_json:
                print(json.dumps(log_dict(line), default=str), flush=True)
            else:
                console.print(log_text(line), soft_wrap=True)
        if not follow or run.finished:
            if not lines and not as_json:
                console.print(Text(f"no log lines ({run.id} is {run.status.value})", style="dim"))
            return
        time.sleep(poll)
        poll = min(poll * 1.5, 0.5)


@app.command()
def watch(
    run_id: str = typer.Argument(..., metavar="ID"),
    as_json: bool = typer.Option(False, "--json", help="Print events as JSON lines"),
) -> None:
    """Follow a run: its events and log lines as they happen, until it finishes.

    Exits 1 unless the run COMPLETED.
    """
    client = open_client()
    seq = 0
    logged = 0
    poll = 0.02
    while True:
        run = client.runs.retrieve(run_id)
        events: list[RunEvent] = cast(Any, client.runs.events(run_id, after=seq))
        lines: list[LogLine] = cast(Any, client.runs.logs(run_id))[logged:]
        logged += len(lines)
        items: list[tuple[float, int, Any]] = [(e.created_at, 0, e) for e in events]
        items += [(ln.ts, 1, ln) for ln in lines]
        for _, _, item in sorted(items, key=lambda x: (x[0], x[1])):
            if isinstance(item, RunEvent):
                seq = max(seq, item.seq)
                if as_json:
                    print(json.dumps({"type": "event", **_event_dict(item)}, default=str), flush=True)
                else:
                    console.print(event_text(item), soft_wrap=True)
            elif as_json:
                print(json.dumps({"type": "log", **log_dict(item)}, default=str), flush=True)
            else:
                console.print(log_text(item), soft_wrap=True)
        if run.finished and not events and not lines:
            if as_json:
                print(json.dumps({"type": "run", **run.to_dict()}, default=str), flush=True)
            else:
                print_result(run)
            if run.status.value != "COMPLETED":
                raise typer.Exit(common.EXIT_ERROR)
            return
        if events or lines:
            poll = 0.02
        else:
            time.sleep(poll)
            poll = min(poll * 1.5, 0.5)


def _event_dict(event: RunEvent) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "kind": event.kind,
        "attempt": event.attempt,
        "data": event.data,
        "created_at": event.created_at,
    }
