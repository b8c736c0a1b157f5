"""Log capture: `conveyor.logger` and any stdlib logging done inside a run land in the run's log."""

from __future__ import annotations

import logging
from typing import Any

from conveyor.sdk import context

logger = logging.getLogger("conveyor.task")

# Attributes every LogRecord has; anything else came from `extra=` and is kept.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


class RunLogHandler(logging.Handler):
    """Installed on the root logger of a worker process. Cheap when no run is current."""

    def emit(self, record: logging.LogRecord) -> None:
        execution = context.current()
        if execution is None or record.levelno < execution.log_level or execution.replaying:
            return  # replayed code logged these lines the first time (DECISIONS.md)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break the run
            message = str(record.msg)
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        attributes: dict[str, Any] | None = None
        extra = {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}
        if extra or record.name != logger.name:
            attributes = {k: _plain(v) for k, v in extra.items()}
            if record.name != logger.name:
                attributes["logger"] = record.name
        if "\x00" in message:  # PostgreSQL text cannot hold NUL: a log line must never fail a commit
            message = message.replace("\x00", "\\x00")
        execution.channel.log(record.levelname, message, attributes, record.created)


def _plain(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\\x00")
    if value is None or isinstance(value, int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    try:
        return repr(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


_installed: RunLogHandler | None = None


def install_capture() -> None:
    """Route log records emitted inside runs to their run (idempotent)."""
    global _installed
    if _installed is not None:
        return
    _installed = RunLogHandler(level=logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(_installed)
    if root.level > logging.DEBUG or root.level == logging.NOTSET:
        # Let records reach the handler; console handlers keep their own levels.
        for handler in root.handlers:
            if handler is not _installed and handler.level == logging.NOTSET:
                handler.setLevel(root.level or logging.WARNING)
        root.setLevel(logging.DEBUG)
    logger.setLevel(logging.DEBUG)
