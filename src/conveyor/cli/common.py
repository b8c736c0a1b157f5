"""What every command shares: the consoles, opening the client, clear errors, formatting."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from conveyor.core.errors import ConveyorError, StoreError
from conveyor.core.status import RunStatus

if TYPE_CHECKING:
    from conveyor.sdk.client import Client


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Piped output (grep, tests, CI logs) gets wide lines instead of rich's 80-column default,
    # so run ids and messages are never folded.
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=200 if wide else None, highlight=False)


console = _console(False)
err = _console(True)

EXIT_ERROR = 1  # a ConveyorError, or a run that did not complete
EXIT_USAGE = 2  # bad input on the command line (bad JSON, unknown status), like click


class UsageError(ConveyorError):
    """Bad command-line input: exit code 2."""

    code = "USAGE_ERROR"


def database_path(url: str) -> str | None:
    """The file of a SQLite URL (None for other databases)."""
    if url.startswith("sqlite:") or "://" not in url:
        from conveyor.store.open import sqlite_path

        try:
            return os.path.abspath(sqlite_path(url))
        except ConveyorError:
            return None
    return None


def describe_error(exc: ConveyorError, url: str | None = None) -> str:
    """The message, naming the database for store errors that do not already."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, StoreError) and url:
        where = database_path(url) or url
        if where not in message:
            message = f"{message} (database: {where})"
    return message


def print_error(message: str) -> None:
    """One clear red line on stderr (the message may span lines, e.g. a traceback)."""
    text = Text("error: ", style="bold red")
    text.append(message)
    err.print(text, soft_wrap=True)


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    print_error(message)
    raise typer.Exit(code)


def report(exc: ConveyorError) -> int:
    """Print a ConveyorError as one clear message; -> the exit code."""
    url: str | None = None
    try:
        from conveyor.sdk import client as client_module

        current = client_module._default
        url = current.config.resolved_database_url if current is not None else None
    except Exception:  # the config itself may be what failed
        url = None
    print_error(describe_error(exc, url))
    return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_ERROR


def open_client(*, must_exist: bool = True) -> Client:
    """The project's client, its store opened (so errors surface here, naming the file).

    `must_exist`: a command that only reads refuses to create a fresh database."""
    from conveyor.sdk.client import get_client

    client = get_client()
    url = client.config.resolved_database_url
    path = database_path(url)
    if must_exist and path is not None and not os.path.exists(path):
        raise ConveyorError(
            f"no database at {path}: nothing has run in this project yet. Start `conveyor dev` or "
            "`conveyor worker` (or set CONVEYOR_DATABASE_URL)"
        )
    client.engine  # noqa: B018 - opens the store now
    return client


# --- formatting ----------------------------------------------------------------------------------


def new_table(title: str | None = None) -> Table:
    """A borderless table: compact on narrow terminals, and piped output stays awk-able."""
    return Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
        header_style="bold",
    )


STATUS_STYLE = {
    RunStatus.DELAYED: "magenta",
    RunStatus.QUEUED: "cyan",
    RunStatus.EXECUTING: "bold blue",
    RunStatus.WAITING: "magenta",
    RunStatus.COMPLETED: "green",
    RunStatus.FAILED: "red",
    RunStatus.CANCELED: "yellow",
    RunStatus.CRASHED: "bold red",
    RunStatus.TIMED_OUT: "red",
    RunStatus.EXPIRED: "yellow",
    RunStatus.SYSTEM_FAILURE: "bold red",
}

ALL_STATUSES = [s.value for s in RunStatus]


def status_text(status: RunStatus | str) -> Text:
    value = RunStatus(status)
    return Text(value.value, style=STATUS_STYLE.get(value, ""))


def parse_statuses(values: list[str] | None) -> list[str] | None:
    """`--status failed --status CRASHED,TIMED_OUT` -> ["FAILED", "CRASHED", "TIMED_OUT"]."""
    out: list[str] = []
    for value in values or []:
        for part in value.split(","):
            name = part.strip().upper().replace("-", "_")
            if not name:
                continue
            if name not in ALL_STATUSES:
                raise UsageError(f"unknown status {part.strip()!r}; one of {', '.join(ALL_STATUSES)}")
            out.append(name)
    return out or None


def split_list(values: list[str] | str | None) -> list[str]:
    """Repeated and/or comma-separated option values, in order, without blanks."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


def when(ts: float | None, *, precise: bool = False) -> str:
    """Local time: HH:MM:SS today, else with the date."""
    if ts is None:
        return "-"
    moment = datetime.fromtimestamp(ts)
    fmt = "%H:%M:%S.%f" if precise else "%H:%M:%S"
    text = moment.strftime(fmt)
    if precise:
        text = text[:-3]
    if moment.date() != datetime.now().date():
        text = moment.strftime("%Y-%m-%d ") + text
    return text


def iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="milliseconds")


def ago(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "-"
    return f"{seconds(max(0.0, (now or time.time()) - ts))} ago"


def seconds(value: float | None) -> str:
    """12ms, 1.25s, 3m04s, 1h02m."""
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 60:
        return f"{value:.2f}s" if value < 10 else f"{value:.1f}s"
    if value < 3600:
        return f"{int(value // 60)}m{int(value % 60):02d}s"
    return f"{int(value // 3600)}h{int(value % 3600 // 60):02d}m"


def span(value: float | None) -> str:
    """A configured length of time: 1s, 0.5s, 60s, 5m, 1h."""
    if value is None:
        return "-"
    if value < 120 or value % 60:
        return f"{value:g}s"
    if value < 7200 or value % 3600:
        return f"{value / 60:g}m"
    return f"{value / 3600:g}h"


def compact_json(value: Any, limit: int | None = None) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str, separators=(", ", ": "))
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def print_json(value: Any) -> None:
    """Machine-readable output: plain JSON on stdout, never colored or wrapped."""
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def retry_summary(retry: dict[str, Any] | None) -> str:
    if not retry:
        return "-"
    attempts = retry.get("max_attempts", 1)
    if attempts <= 1:
        return "no retries"
    out = f"{attempts} attempts, {span(retry.get('min_delay', 0))}..{span(retry.get('max_delay', 0))}"
    factor = retry.get("factor", 1)
    if factor != 1:
        out += f" x{factor:g}"
    if retry.get("randomize"):
        out += " jitter"
    return out
