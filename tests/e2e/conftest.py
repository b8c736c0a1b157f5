"""Fixtures of the real-process tests: a store file per test, worker processes ended (with
everything they started) at teardown, and the test process's client pointed at the store."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

SUPPORT = Path(__file__).resolve().parent / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))

import harness  # noqa: E402

import conveyor  # noqa: E402
from conveyor.sdk import client as client_module  # noqa: E402

C = TypeVar("C", bound=harness.Cluster)


@contextlib.contextmanager
def clusters(
    tmp_path: Path, build: Callable[..., C], after: Callable[[C], None] = lambda c: None
) -> Iterator[Callable[..., C]]:
    """`make(...)` builds a cluster in its own folder with `build(folder, ...)` and points this
    process's client at its store (creating the schema before any worker starts). At teardown
    every cluster's processes are ended, the client is dropped, then `after(cluster)` runs."""
    made: list[C] = []

    def make(*args: Any, **kwargs: Any) -> C:
        directory = tmp_path / f"cluster{len(made)}"
        directory.mkdir()
        cluster = build(directory, *args, **kwargs)
        made.append(cluster)
        client = conveyor.configure(database_url=cluster.url)
        client.engine  # noqa: B018
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.close()
        old = client_module.set_client(None)
        if old is not None:
            old.close()
        for cluster in made:
            after(cluster)


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[[str], harness.Cluster]]:
    with clusters(tmp_path, harness.Cluster) as make:
        yield make
