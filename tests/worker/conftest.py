"""An in-process worker on a real clock, on its own thread, with short leases."""

from __future__ import annotations

import asyncio
import threading

import pytest
import worker_tasks

from conveyor.sdk import client as client_module
from conveyor.worker.worker import Worker, WorkerOptions


@pytest.fixture
def store_url(tmp_path):
    """The store the worker and the test share (a module may override it, e.g. with both drivers)."""
    return f"sqlite:///{tmp_path / 'worker.db'}"


@pytest.fixture
def live_client(store_url):
    made = client_module.configure(database_url=store_url)
    yield made
    client_module.set_client(None)
    made.close()


@pytest.fixture
def start_worker(live_client):
    started: list[tuple[Worker, threading.Thread]] = []

    def start(concurrency: int = 4, **options) -> Worker:
        tasks = [t for t in vars(worker_tasks).values() if isinstance(t, conveyor_task_type())]
        opts = WorkerOptions(
            concurrency=concurrency,
            lease=2,
            renew=0.5,
            modules=["worker_tasks"],
            database_url=live_client.config.resolved_database_url,
            **options,
        )
        worker = Worker(live_client.engine, tasks, opts)
        thread = threading.Thread(target=lambda: asyncio.run(worker.run()), daemon=True)
        thread.start()
        assert worker.started.wait(30), "worker did not start"
        started.append((worker, thread))
        return worker

    yield start
    for worker, thread in started:
        worker.request_stop(0)
        thread.join(30)
        assert not thread.is_alive(), "worker did not stop"


def conveyor_task_type():
    from conveyor.sdk.task import Task

    return Task
