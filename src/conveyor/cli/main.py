"""`conveyor ...` (typer + rich)."""

from __future__ import annotations

import typer
from rich.console import Console

from conveyor.core.errors import ConveyorError

app = typer.Typer(help="Conveyor: durable tasks for Python.", no_args_is_help=True, add_completion=False)
console = Console()
err = Console(stderr=True)


def _split(value: str | None) -> list[str]:
    return [p.strip() for p in (value or "").split(",") if p.strip()]


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
) -> None:
    """Run a worker: claim runs of the tasks in --modules and execute them."""
    from conveyor.sdk.client import get_client
    from conveyor.worker.main import run_worker
    from conveyor.worker.worker import WorkerOptions

    client = get_client()
    names = _split(modules) or list(client.config.modules)
    try:
        options = WorkerOptions(
            concurrency=concurrency,
            queues=_split(queues) or None,
            machine=machine,
            version=version,
            lease=lease,
            renew=renew,
            shutdown_grace=grace,
        )
        run_worker(names, options)
    except ConveyorError as exc:
        err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(1) from None


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema."""
    from conveyor.sdk.client import get_client
    from conveyor.store.open import open_store

    url = get_client().config.resolved_database_url
    try:
        store = open_store(url, auto_migrate=False, check_schema=False)
        applied = store.migrate()
    except ConveyorError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    done = f"applied {', '.join(map(str, applied))}" if applied else "up to date"
    console.print(f"{store.location}: schema version {store.schema_version()} ({done})")


def main() -> None:
    app()
