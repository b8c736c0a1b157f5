"""`conveyor queues` (list), `conveyor queues pause NAME`, `conveyor queues resume NAME`."""

from __future__ import annotations

from dataclasses import asdict

import typer
from rich.table import Table
from rich.text import Text

from conveyor.cli.common import console, new_table, open_client, print_json
from conveyor.core.records import QueueInfo

app = typer.Typer(help="Queues: depth, running, limit, paused. Subcommands pause and resume.")


def queues_table(queues: list[QueueInfo], title: str | None = None) -> Table:
    table = new_table(title)
    table.add_column("QUEUE", no_wrap=True)
    for column in ("QUEUED", "RUNNING", "LIMIT", "PAUSED", "DELAYED", "UNSERVABLE"):
        table.add_column(column, justify="right" if column != "PAUSED" else "left")
    for q in queues:
        table.add_row(
            q.name,
            str(q.queued),
            str(q.running),
            str(q.concurrency_limit) if q.concurrency_limit else "-",
            Text("paused", style="bold yellow") if q.paused else Text("no", style="dim"),
            str(q.delayed),
            Text(str(q.unservable), style="red") if q.unservable else Text("0", style="dim"),
        )
    return table


@app.callback(invoke_without_command=True)
def queues(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
) -> None:
    """Queues: depth (queued), running, limit, paused, delayed, unservable.

    Unservable: queued runs no live worker can serve (no worker of their machine or version).
    """
    if ctx.invoked_subcommand is not None:
        return
    client = open_client()
    found = client.queues.list()
    if as_json:
        print_json([asdict(q) for q in found])
        return
    if not found:
        console.print(f"no queues in environment {client.engine.environment!r} (start a worker)")
        return
    console.print(queues_table(found))
    if any(q.unservable for q in found):
        console.print(
            Text("unservable: queued runs no live worker can serve (no worker of their machine or version)", "dim")
        )


def _set(name: str, paused: bool, as_json: bool) -> None:
    client = open_client()
    info = client.queues.pause(name) if paused else client.queues.resume(name)
    if as_json:
        print_json(asdict(info))
        return
    if paused:
        console.print(
            f"queue {info.name} paused: {info.queued} queued run(s) wait until `conveyor queues resume {info.name}`",
            soft_wrap=True,
            markup=False,
        )
    else:
        console.print(f"queue {info.name} resumed ({info.queued} queued)", soft_wrap=True, markup=False)


@app.command()
def pause(
    name: str = typer.Argument(..., metavar="NAME"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
) -> None:
    """Pause a queue: no new runs start from it (running ones finish)."""
    _set(name, True, as_json)


@app.command()
def resume(
    name: str = typer.Argument(..., metavar="NAME"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
) -> None:
    """Resume a paused queue."""
    _set(name, False, as_json)
