"""The bundled examples (examples/) against a real `conveyor worker` process.

One worker serves every test of the module (cwd examples/, a private SQLite file, short
leases). The fakes' failures are switched off at random (FAKE_FAILURE_RATE=0) and driven from
the payload instead, so every run behaves the same way each time. Tests wait on conditions
with deadlines, never on fixed sleeps.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

import conveyor
from conveyor.sdk import client as client_module

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CONVEYOR = ROOT / ".venv" / "bin" / "conveyor"
T = TypeVar("T")

pytestmark = pytest.mark.timeout(60)

_ids = itertools.count(int(time.time()) % 1_000_000 * 100)


def wait_for(condition: Callable[[], T], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("examples")
    url = f"sqlite:///{tmp / 'conveyor.db'}"
    env = dict(os.environ, CONVEYOR_DATABASE_URL=url, FAKE_FAILURE_RATE="0", PYTHONUNBUFFERED="1")
    env.pop("CONVEYOR_ENV", None)
    old = client_module.set_client(None)
    client = conveyor.configure(database_url=url)
    sys.path.insert(0, str(EXAMPLES))
    out = open(tmp / "worker.log", "w")  # noqa: SIM115 - closed in the teardown
    process = subprocess.Popen(
        [str(CONVEYOR), "worker", "--modules", "telegram_bot,documents", "--lease", "2", "--renew", "0.5"],
        cwd=EXAMPLES,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: process.poll() is not None or client.engine.workers(), 20, "the worker to start")
        assert process.poll() is None, f"the worker exited:\n{(tmp / 'worker.log').read_text()}"
        import documents
        import telegram_bot

        yield {"telegram": telegram_bot, "documents": documents, "client": client, "log": tmp / "worker.log"}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        out.close()
        sys.path.remove(str(EXAMPLES))
        client.close()
        client_module.set_client(old)
        print((tmp / "worker.log").read_text()[-5000:])


def update(user_id: int, text: str | None = "hello", update_id: int | None = None, **fake: Any) -> dict[str, Any]:
    """A Telegram update as the webhook would POST it (plus the fakes' knobs)."""
    update_id = next(_ids) if update_id is None else update_id
    message: dict[str, Any] = {
        "message_id": update_id,
        "date": int(time.time()),
        "chat": {"id": user_id, "type": "private"},
        "from": {"id": user_id, "first_name": "Test", "is_bot": False},
    }
    if text is not None:
        message["text"] = text
    else:
        message["sticker"] = {"file_id": "CAACAgIAAxk"}
    body: dict[str, Any] = {"update_id": update_id, "message": message}
    if fake:
        body["fake"] = fake
    return body


def retry_times(run_id: str) -> list[float]:
    return [
        e.data["retry_at"] for e in conveyor.runs.events(run_id) if isinstance(e.data, dict) and "retry_at" in e.data
    ]


# --- Telegram ------------------------------------------------------------------------------------


def test_duplicate_update_id_gives_one_run(worker: dict[str, Any]) -> None:
    tg = worker["telegram"]
    user = next(_ids)
    body = update(user, "hi twice")
    with ThreadPoolExecutor(8) as pool:
        handles = list(pool.map(lambda _: tg.receive_update(body), range(16)))
    assert {h.id for h in handles} == {handles[0].id}
    run = handles[0].wait(15)
    assert run.status == "COMPLETED", run.error
    assert run.idempotency_key == f"tg-{body['update_id']}"
    assert run.tags == ["telegram", f"user:{user}"]
    assert run.payload["message"]["from"]["id"] == user  # Telegram's own field name is kept
    # A redelivery after the run finished still finds it (COMPLETED keeps the key).
    assert tg.receive_update(body).id == run.id
    runs = conveyor.runs.list(task="handle-telegram-update", tags=[f"user:{user}"])
    assert [r.id for r in runs] == [run.id]
    assert run.metadata["progress"] == 1.0
    assert [line.message for line in conveyor.runs.logs(run.id)] == ["update received", "reply sent"]


def test_invalid_update_fails_at_once_with_abort_run(worker: dict[str, Any]) -> None:
    tg = worker["telegram"]
    user = next(_ids)
    sticker = tg.receive_update(update(user, text=None))
    no_message = tg.receive_update({"update_id": next(_ids), "my_chat_member": {"chat": {"id": user}}})
    for handle in (sticker, no_message):
        run = handle.wait(15)
        assert run.status == "FAILED"
        assert run.attempts == 1
        assert run.error["code"] == "ABORTED"
        assert [a.status for a in conveyor.runs.attempts(run.id)] == ["FAILED"]
    # A payload that does not fit the model is refused at the call: no run is created.
    with pytest.raises(conveyor.InvalidPayload, match="update_id"):
        tg.receive_update({"update_id": "not-a-number", "message": update(user)["message"]})
    assert [r.id for r in conveyor.runs.list(tags=[f"user:{user}"])] == [sticker.id]


def test_rate_limit_is_retried_when_handle_error_says(worker: dict[str, Any]) -> None:
    tg = worker["telegram"]
    retry_after = 3.0  # outside the backoff range of the first retry (1..2 s), so the two differ
    run = tg.receive_update(update(next(_ids), "busy?", rate_limit=retry_after)).wait(15)
    assert run.status == "COMPLETED", run.error
    assert run.output["attempt"] == 2
    first, second = conveyor.runs.attempts(run.id)
    assert first.status == "FAILED" and "429" in first.error["message"]
    (retry_at,) = retry_times(run.id)
    # handle_error ran between the attempt's start and its end and asked for "now + retry_after".
    assert first.started_at + retry_after <= retry_at <= first.finished_at + retry_after
    assert second.started_at >= retry_at - 0.01


def test_transient_ai_failure_is_retried_with_backoff(worker: dict[str, Any]) -> None:
    tg = worker["telegram"]
    run = tg.receive_update(update(next(_ids), "flaky", fail_attempts=1)).wait(15)
    assert run.status == "COMPLETED", run.error
    first, second = conveyor.runs.attempts(run.id)
    assert "503" in first.error["message"]
    (retry_at,) = retry_times(run.id)
    # Retry(min_delay=1, factor=2, randomize=True): the first retry waits 1 s * (1 + U[0, 1)).
    assert first.started_at + 1.0 <= retry_at <= first.finished_at + 2.0
    assert second.started_at >= retry_at - 0.01


def test_one_users_updates_never_overlap(worker: dict[str, Any]) -> None:
    tg = worker["telegram"]
    ann, bob = next(_ids), next(_ids)
    handles: dict[int, list[Any]] = {ann: [], bob: []}
    for user, count in ((ann, 3), (bob, 2)):
        for n in range(count):
            handles[user].append(tg.receive_update(update(user, f"message {n}", think=0.3)))
    runs = {user: [h.wait(15) for h in hs] for user, hs in handles.items()}
    for user_runs in runs.values():
        assert all(r.status == "COMPLETED" for r in user_runs), [r.error for r in user_runs]

    def spans(user: int) -> list[tuple[float, float]]:
        return sorted((r.output["started_at"], r.output["finished_at"]) for r in runs[user])

    for user in (ann, bob):
        for (_, end), (start, _) in itertools.pairwise(spans(user)):
            assert start >= end, f"two runs of user {user} overlapped"
        # The slots too: no attempt of one user was claimed before the previous one settled.
        attempts = sorted((a.started_at, a.finished_at) for r in runs[user] for a in conveyor.runs.attempts(r.id))
        for (_, end), (start, _) in itertools.pairwise(attempts):
            assert start >= end
    # Different users are not serialised against each other.
    assert any(a0 < b1 and b0 < a1 for a0, a1 in spans(ann) for b0, b1 in spans(bob))


# --- documents -----------------------------------------------------------------------------------


def test_document_jobs_complete(worker: dict[str, Any]) -> None:
    docs = worker["documents"]
    prefix = f"t{next(_ids)}"
    handles = docs.enqueue_demo_mix(prefix=prefix, jobs=4)
    runs = [h.wait(20) for h in handles]
    assert [r.status for r in runs] == ["COMPLETED"] * len(runs), [(r.task_id, r.error) for r in runs]
    by_task: dict[str, list[Any]] = {}
    for run in runs:
        by_task.setdefault(run.task_id, []).append(run)
    assert len(by_task["trigger-ingestion-job"]) == 4
    assert len({r.batch_id for r in by_task["trigger-ingestion-job"]}) == 1  # one atomic batch
    assert sum(r.output["documents"] for r in by_task["trigger-ingestion-job"]) == 1 + 2 + 3 + 1

    # Fan-outs: every child run exists, points at its parent, and completes.
    def children(run: Any) -> list[Any]:
        return conveyor.runs.list(parent_id=run.id).data

    for run in by_task["trigger-ingestion-job"]:
        (metering,) = wait_for(lambda run=run: children(run), 5, "the metering child")
        assert metering.task_id == "meter-org-documents-job"
        assert conveyor.runs.wait(metering.id, 15).output["metered"] == len(run.payload["documents"])
    (org,) = by_task["delete-organization-job"]
    namespaces = [conveyor.runs.wait(i, 15) for i in org.output["namespace_runs"]]
    assert {r.parent_id for r in namespaces} == {org.id}
    for ns in namespaces:
        assert ns.status == "COMPLETED", ns.error
        deletes = [conveyor.runs.wait(i, 15) for i in ns.output["delete_runs"]]
        assert deletes and all(d.status == "COMPLETED" and d.parent_id == ns.id for d in deletes)
    (stale,) = by_task["delete-ingest-job"]
    assert [conveyor.runs.wait(i, 15).status for i in stale.output["delete_runs"]] == ["COMPLETED"]

    ingest = conveyor.queues.retrieve("ingest")
    assert (ingest.concurrency_limit, ingest.paused) == (2, False)
    assert conveyor.queues.retrieve("delete-document").concurrency_limit == 5
