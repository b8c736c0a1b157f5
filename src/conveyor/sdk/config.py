"""Project configuration: `conveyor.toml` or `[tool.conveyor]` in pyproject.toml, the
environment variables of SPEC §6, and `conveyor.configure(...)` in code (strongest last)."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from conveyor.core.backoff import RetryPolicy
from conveyor.core.errors import ConfigError

CONFIG_FILES = ("conveyor.toml", "pyproject.toml")


@dataclass(frozen=True)
class Config:
    project: str = "conveyor"
    root: Path = field(default_factory=Path.cwd)
    modules: tuple[str, ...] = ()
    database_url: str | None = None
    environment: str = "dev"
    retry: RetryPolicy = RetryPolicy()
    retry_enabled_in_dev: bool = True
    max_duration: float | None = None
    log_level: str = "INFO"
    max_payload_bytes: int = 512 * 1024
    max_step_bytes: int = 1024 * 1024
    synchronous: str = "normal"
    version: str | None = None
    retention_days: float | None = 30.0  # finished runs older than this are purged; None keeps them
    config_file: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "retention_days", retention(self.retention_days, "retention_days"))

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.root / '.conveyor' / 'dev.db'}"


def retention(value: Any, source: str) -> float | None:
    """`retention_days`: a number of days > 0; 0, false or None keep finished runs forever."""
    if value is None or value is False or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{source}: retention_days must be a number of days (0 or false: keep forever)")
    try:
        days = float(value)
    except ValueError:
        raise ConfigError(f"{source}: retention_days must be a number of days, got {value!r}") from None
    if days < 0 or days != days:
        raise ConfigError(f"{source}: retention_days must be >= 0, got {value!r}")
    return days or None


def find_root(start: Path | None = None) -> tuple[Path, Path | None]:
    """The nearest directory with conveyor.toml or pyproject.toml (and that file)."""
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        for name in CONFIG_FILES:
            candidate = directory / name
            if candidate.is_file():
                return directory, candidate
    return here, None


def _read_table(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if path.name == "pyproject.toml":
        return dict(data.get("tool", {}).get("conveyor", {}))
    return dict(data)


def _from_table(config: Config, table: dict[str, Any], source: str) -> Config:
    known = {
        "project",
        "modules",
        "database_url",
        "retry",
        "max_duration",
        "log_level",
        "environments",
        "max_payload_bytes",
        "max_step_bytes",
        "synchronous",
        "version",
        "environment",
        "retention_days",
        "retention",
    }
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(sorted(unknown))}")
    changes: dict[str, Any] = {}
    for name in ("project", "database_url", "log_level", "synchronous", "version", "environment"):
        if name in table:
            changes[name] = str(table[name])
    if "modules" in table:
        modules = table["modules"]
        changes["modules"] = tuple([modules] if isinstance(modules, str) else modules)
    if "max_duration" in table:
        changes["max_duration"] = float(table["max_duration"])
    for name in ("max_payload_bytes", "max_step_bytes"):
        if name in table:
            changes[name] = int(table[name])
    if "retention_days" in table:
        changes["retention_days"] = retention(table["retention_days"], source)
    if "retention" in table:
        section = table["retention"]
        extra = set(section) - {"days"} if isinstance(section, dict) else {"?"}
        if extra:
            raise ConfigError(f"{source}: [retention] takes only `days` (got {', '.join(sorted(extra))})")
        if "days" in section:
            changes["retention_days"] = retention(section["days"], f"{source} [retention]")
    if "retry" in table:
        retry = dict(table["retry"])
        changes["retry_enabled_in_dev"] = bool(retry.pop("enabled_in_dev", True))
        try:
            changes["retry"] = RetryPolicy(**retry)
        except TypeError as exc:
            raise ConfigError(f"{source}: bad [retry] table: {exc}") from None
    return replace(config, **changes)


def load(start: Path | None = None, env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ if env is None else env)
    root, path = find_root(start)
    config = Config(root=root, config_file=path)
    table: dict[str, Any] = {}
    if path is not None:
        table = _read_table(path)
        environments = table.pop("environments", {})
        config = _from_table(config, table, str(path))
    else:
        environments = {}
    environment = env.get("CONVEYOR_ENV") or config.environment
    config = replace(config, environment=environment)
    if environment in environments:
        config = _from_table(config, dict(environments[environment]), f"{path} [environments.{environment}]")
    if env.get("CONVEYOR_DATABASE_URL"):
        config = replace(config, database_url=env["CONVEYOR_DATABASE_URL"])
    if env.get("CONVEYOR_LOG_LEVEL"):
        config = replace(config, log_level=env["CONVEYOR_LOG_LEVEL"])
    if env.get("CONVEYOR_RETENTION_DAYS"):
        config = replace(config, retention_days=retention(env["CONVEYOR_RETENTION_DAYS"], "CONVEYOR_RETENTION_DAYS"))
    if env.get("CONVEYOR_SQLITE_SYNCHRONOUS"):
        config = replace(config, synchronous=env["CONVEYOR_SQLITE_SYNCHRONOUS"])
    if (
        config.database_url
        and config.database_url.startswith("sqlite:///")
        and not os.path.isabs(config.database_url[len("sqlite:///") :])
    ):
        # A relative SQLite path is relative to the project root, not the current directory.
        config = replace(config, database_url=f"sqlite:///{root / config.database_url[len('sqlite:///') :]}")
    return config
