"""`retention_days`: from the config file (top level or `[retention]`), the environment and
`conveyor.configure`; 0 or false keeps finished runs forever."""

import pytest

from conveyor.core.errors import ConfigError
from conveyor.sdk import config as config_module


def load(tmp_path, text: str, env: dict[str, str] | None = None) -> config_module.Config:
    (tmp_path / "conveyor.toml").write_text(text)
    return config_module.load(tmp_path, env or {})


def test_default_is_thirty_days(tmp_path):
    assert load(tmp_path, 'project = "p"\n').retention_days == 30.0


@pytest.mark.parametrize(
    ("text", "days"),
    [
        ("retention_days = 7\n", 7.0),
        ("retention_days = 0.5\n", 0.5),
        ("retention_days = 0\n", None),
        ("retention_days = false\n", None),
        ("[retention]\ndays = 90\n", 90.0),
        ("[retention]\ndays = 0\n", None),
    ],
)
def test_file(tmp_path, text, days):
    assert load(tmp_path, text).retention_days == days


def test_environment_variable_and_configure_win(tmp_path):
    assert load(tmp_path, "retention_days = 7\n", {"CONVEYOR_RETENTION_DAYS": "3"}).retention_days == 3.0
    assert load(tmp_path, "retention_days = 7\n", {"CONVEYOR_RETENTION_DAYS": "0"}).retention_days is None
    from dataclasses import replace

    cfg = load(tmp_path, "retention_days = 7\n")
    assert replace(cfg, retention_days=0).retention_days is None
    assert replace(cfg, retention_days=14).retention_days == 14.0


@pytest.mark.parametrize("text", ['retention_days = "soon"\n', "retention_days = -1\n", "[retention]\nweeks = 2\n"])
def test_bad_values_are_errors(tmp_path, text):
    with pytest.raises(ConfigError):
        load(tmp_path, text)
