"""Fixtures of the real-process tests: a store file per test, worker processes ended (with
everything they started) at teardown, and the test process's client pointed at the store."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SUPPORT = Path(__file__).resolve().parent / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))

import harness  # noqa: E402

import conveyor  # noqa: E402
from conveyor.sdk import client as client_module  # noqa: E402


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[[str], harness.Cluster]]:
    made: list[harness.Cluster] = []

    def make(modules: str) -> harness.Cluster:
        directory = tmp_path / f"cluster{len(made)}"
        directory.mkdir()
        cluster = harness.Cluster(directory, modules)
        made.append(cluster)
        client = conveyor.configure(database_url=cluster.url)
        client.engine  # creates the schema before any worker starts  # noqa: B018
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.close()
        old = client_module.set_client(None)
        if old is not None:
            old.close()
