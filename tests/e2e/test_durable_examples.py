"""The durable examples (examples/chat.py for seed 001, examples/stories.py for seed 004)
against a real `conveyor worker` process.

One worker serves every test of the module: a private SQLite file through the e2e harness,
short leases, the examples' folder on its PYTHONPATH, the fakes' random failures off
(FAKE_FAILURE_RATE=0; failures are driven from the payload instead). Tests wait on
conditions with deadlines, never on fixed sleeps. The example modules are imported inside the
fixture, so this file is collected even where the APIs they use are missing.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from harness import Cluster, wait_until

import conveyor

from .conftest import clusters

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PLACEHOLDER = "https://images.example/placeholder.png"

pytestmark = pytest.mark.timeout(90)

_ids = itertools.count(int(time.time()) % 1_000_000 * 100)


class ExamplesCluster(Cluster):
    """The harness's cluster, with the examples importable by the worker and its pool children."""

    def env(self) -> dict[str, str]:
        env = super().env()
        env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLES), env["PYTHONPATH"]])
        env["FAKE_FAILURE_RATE"] = "0"
        env["PYTHONUNBUFFERED"] = "1"
        return env


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    sys.path.insert(0, str(EXAMPLES))
    try:
        with clusters(tmp_path_factory.mktemp("durable-examples"), ExamplesCluster) as make:
            cluster = make("chat,stories")
            worker = cluster.start_worker(concurrency=8)
            cluster.wait_ready([worker])
            import chat
            import fakes
            import stories

            yield SimpleNamespace(cluster=cluster, chat=chat, stories=stories, fakes=fakes)
    finally:
        sys.path.remove(str(EXAMPLES))


def subscribe(
    run_id: str,
    timeout: float = 30.0,
    after: int | None = None,
    on_update: Callable[[Any, list[tuple[float, Any]]], Awaitable[None]] | None = None,
) -> list[tuple[float, Any]]:
    """Every update of `conveyor.runs.subscribe(run_id)` until it ends (after the run's final
    status), with the time each arrived."""

    async def collect() -> list[tuple[float, Any]]:
        got: list[tuple[float, Any]] = []
        updates = conveyor.runs.subscribe(run_id) if after is None else conveyor.runs.subscribe(run_id, after=after)
        async for update in updates:
            got.append((time.time(), update))
            if on_update is not None:
                await on_update(update, got)
        return got

    return asyncio.run(asyncio.wait_for(collect(), timeout))


def tokens_of(updates: list[tuple[float, Any]]) -> list[str]:
    return [u.data["chunk"] for _, u in updates if u.type == "stream" and u.data["key"] == "tokens"]


def statuses_of(updates: list[tuple[float, Any]]) -> list[str]:
    return [u.data["status"] for _, u in updates if u.type == "status"]


def children(run_id: str) -> list[conveyor.Run]:
    return list(conveyor.runs.list(parent_id=run_id, limit=200))


def executions(run_id: str) -> int:
    """How many times the run's code was started (EXECUTING status events)."""
    return sum(1 for e in conveyor.runs.events(run_id) if e.kind == "status" and e.data.get("status") == "EXECUTING")


# --- seed 001: chat-message ----------------------------------------------------------------------


def test_chat_reply_streams_tokens_live_and_completes(examples: SimpleNamespace) -> None:
    chat, fakes = examples.chat, examples.fakes
    text = f"How do I add a login page? #{next(_ids)}"
    run_id = chat.send_message(f"conv-{next(_ids)}", text, tokens=80, token_delay=0.025)
    updates = subscribe(run_id)

    expected = fakes.llm_tokens(text, 80)
    assert tokens_of(updates) == expected  # every token, in order
    assert statuses_of(updates)[-1] == "COMPLETED"
    seqs = [u.seq for _, u in updates]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(u.run_id == run_id for _, u in updates)
    metadata = [(u.data["key"], u.data.get("value")) for _, u in updates if u.type == "metadata"]
    assert ("status", "streaming") in metadata and ("status", "complete") in metadata

    run = conveyor.runs.retrieve(run_id)
    assert run.status == "COMPLETED", run.error
    assert run.output == {"message_id": run.payload["message_id"], "reply": "".join(expected), "tokens": 80}
    assert run.metadata["status"] == "complete"
    # Live, not at the end: the first token reached the subscriber well before the run finished
    # (the stream takes 80 x 25 ms = 2 s).
    first_token_at = next(at for at, u in updates if u.type == "stream")
    assert first_token_at < run.finished_at - 0.5

    # A subscriber that reconnects resumes after the last sequence number it saw.
    middle = seqs[len(seqs) // 2]
    resumed = subscribe(run_id, after=middle)
    assert [u.seq for _, u in resumed] == [s for s in seqs if s > middle]
    examples.cluster.check_logs()


def test_chat_reply_cancelled_mid_stream_ends_canceled_at_once(examples: SimpleNamespace) -> None:
    chat, fakes = examples.chat, examples.fakes
    text = f"Write a very long essay #{next(_ids)}"
    run_id = chat.send_message(f"conv-{next(_ids)}", text, tokens=400, token_delay=0.05)  # 20 s of tokens
    cancelled_at: list[float] = []

    async def stop_after_five_tokens(update: Any, got: list[tuple[float, Any]]) -> None:
        if not cancelled_at and len(tokens_of(got)) >= 5:
            cancelled_at.append(time.time())
            run = await asyncio.to_thread(chat.cancel_message, run_id)  # the app's stop button
            assert run.status in ("EXECUTING", "CANCELED")

    updates = subscribe(run_id, on_update=stop_after_five_tokens)
    ended_at = updates[-1][0]

    run = conveyor.runs.retrieve(run_id)
    assert run.status == "CANCELED"
    assert run.output is None
    assert run.error is not None and run.error["code"] == "CANCELED"
    assert statuses_of(updates)[-1] == "CANCELED"
    assert ended_at - cancelled_at[0] < 3.0  # async code stops within about a second
    streamed = tokens_of(updates)
    assert 5 <= len(streamed) < 100  # stopped mid-stream
    assert streamed == fakes.llm_tokens(text, 400)[: len(streamed)]
    assert run.metadata["status"] == "streaming"  # never reached "complete"
    assert run.attempts == 1
    # The on_cancel hook ran.
    wait_until(lambda: "reply cancelled" in [line.message for line in conveyor.runs.logs(run_id)], 5, "on_cancel")
    # Nothing was streamed after the run ended.
    assert tokens_of(subscribe(run_id)) == streamed
    examples.cluster.check_logs()


# --- seed 001: generate-project ------------------------------------------------------------------


def test_generate_project_runs_nine_steps_and_image_children_once(examples: SimpleNamespace) -> None:
    chat = examples.chat
    project_id = f"proj-{next(_ids)}"
    options: dict[str, Any] = {
        "images": 3,
        "fail_at_step": "check",  # attempt 1 fails in step 7: attempt 2 replays steps 1-6 and the children
        "fake": {"think": 0.01},
        "image_fake": {"think": 0.01, "fail_attempts": 1},  # each image call fails once, retried in place
    }
    handle = chat.start_project(project_id, "A todo app with a cat mascot", **options)
    assert chat.start_project(project_id, "A todo app with a cat mascot", **options).id == handle.id  # double click

    run = handle.wait(timeout=60)
    assert run.status == "COMPLETED", run.error
    assert run.attempts == 2
    assert sorted(run.output["images"]) == ["image-0", "image-1", "image-2"]
    assert PLACEHOLDER not in run.output["images"].values()
    assert run.output["preview_url"] == f"https://preview.example/{project_id}"

    # The nine steps, each stored once: steps 1-6 by attempt 1, "check" onwards by attempt 2.
    journal = {s.name: s for s in conveyor.runs.steps(run.id) if s.name in chat.PROJECT_STEPS}
    assert list(journal) == list(chat.PROJECT_STEPS)
    assert [journal[name].attempt for name in chat.PROJECT_STEPS] == [1] * 6 + [2] * 3
    # Log lines emitted while replaying are dropped. The function ran from the top five times
    # (attempt 1, its resumes after each of the 3 children, attempt 2); its first line is in the
    # log once, and so is the line after step 1 (every later run of it was a replay).
    messages = [line.message for line in conveyor.runs.logs(run.id)]
    assert messages.count(f"generating project {project_id}") == 1
    assert messages.count("step 1/9 done: load-project") == 1
    assert {f"step {n}/9 done: {name}" for n, name in enumerate(chat.PROJECT_STEPS, start=1)} <= set(messages)

    # The children: started once each (not again by attempt 2, nor by the resumes), completed,
    # with run-scoped idempotency keys, the parent's version, and the parent as root.
    kids = children(run.id)
    assert sorted(k.task_id for k in kids) == ["generate-image"] * 3
    for kid in kids:
        assert kid.status == "COMPLETED", kid.error
        assert kid.attempts == 1 and executions(kid.id) == 1
        assert kid.root_id == run.id and kid.version == run.version
        assert kid.output["url"] == run.output["images"][kid.payload["name"]]
        warnings = [line for line in conveyor.runs.logs(kid.id) if line.level == "WARNING"]
        assert len(warnings) == 1 and "retry.on_throw" in warnings[0].message  # one try failed, retried in place
    assert len({k.idempotency_key for k in kids}) == 3 and None not in {k.idempotency_key for k in kids}

    # Metadata from the children into the parent's (parent and root are the project here).
    assert run.metadata["images_done"] == 3
    assert sorted(run.metadata["events"]) == ["image-0 ready", "image-1 ready", "image-2 ready"]
    assert (run.metadata["progress"], run.metadata["step"], run.metadata["status"]) == (1.0, "publish", "complete")

    # COMPLETED keeps the key: the same project started again is still this run, with no new children.
    assert chat.start_project(project_id, "A todo app with a cat mascot", **options).id == run.id
    assert len(children(run.id)) == 3
    examples.cluster.check_logs()


# --- seed 004: the story chain -------------------------------------------------------------------


CHAIN = ["response-tagging", "wisdom-tagging", "quote-generation", "create-story-from-response"]


def test_story_chain_waits_for_approval_then_completes(examples: SimpleNamespace) -> None:
    stories = examples.stories
    response_id, family_id = f"resp-{next(_ids)}", f"fam-{next(_ids)}"
    audio = f"https://files.example/{response_id}.wav"
    handle = stories.submit_response(response_id, family_id, audio_url=audio, fake={"think": 0.01})
    assert stories.submit_response(response_id, family_id, audio_url=audio, fake={"think": 0.01}).id == handle.id

    token_id = wait_until(lambda: stories.pending_approval(handle.id), 60, "the chain to wait for its approval")
    run = conveyor.runs.retrieve(handle.id)
    assert run.status == "WAITING"
    assert run.metadata["approval_token"] == token_id and run.metadata["stage"] == "awaiting-approval"
    assert conveyor.queues.retrieve("responses").running == 0  # a WAITING run holds no slot

    chunks = run.metadata["chunks"]
    assert chunks >= 2  # a real fan-out
    before = children(run.id)
    assert Counter(k.task_id for k in before) == Counter(
        {"transcribe-response": 1, "response-embeddings": chunks, **dict.fromkeys(CHAIN, 1)}
    )
    assert all(k.status == "COMPLETED" for k in before), [(k.task_id, k.error) for k in before]
    embeddings = [k for k in before if k.task_id == "response-embeddings"]
    assert len({k.batch_id for k in embeddings}) == 1  # one batch
    assert sorted(k.output["index"] for k in embeddings) == list(range(chunks))
    assert run.metadata["chunks_embedded"] == chunks  # metadata.parent from each fan-out child

    # The approval, from outside the run (the app's button; the CLI works the same way).
    assert stories.approve(handle.id, by="grandpa") is True
    assert stories.approve(handle.id) is False  # a second completion changes nothing

    final = handle.wait(timeout=60)
    assert final.status == "COMPLETED", final.error
    assert final.output["approval"] == "approved" and final.output["approved_by"] == "grandpa"
    assert final.output["chunks"] == chunks
    assert final.output["podcast"]["podcast_url"].startswith("https://audio.example/")
    assert final.attempts == 1  # every resume continued the same attempt

    # Every child ran once: no child was started again by the parent's replays.
    after = children(final.id)
    expected = {"transcribe-response": 1, "response-embeddings": chunks, "generate-podcast-from-story": 1}
    assert Counter(k.task_id for k in after) == Counter({**expected, **dict.fromkeys(CHAIN, 1)})
    for kid in after:
        assert kid.status == "COMPLETED", (kid.task_id, kid.error)
        assert kid.attempts == 1 and executions(kid.id) == 1, kid.task_id
        assert kid.root_id == final.id and kid.version == final.version
    assert sorted(final.metadata["done"]) == sorted(k.task_id for k in after)  # metadata.root, once per child
    assert final.metadata["stage"] == "done"
    examples.cluster.check_logs()


def test_story_approval_timeout_comes_back_as_a_result(examples: SimpleNamespace) -> None:
    stories, fakes = examples.stories, examples.fakes
    text = " ".join(fakes.llm_text(f"story {n}", tokens=15) + "." for n in range(4))
    response_id = f"resp-{next(_ids)}"
    handle = stories.submit_response(response_id, f"fam-{next(_ids)}", text=text, approval_timeout=1.5)

    final = handle.wait(timeout=60)
    assert final.status == "COMPLETED", final.error
    assert final.output["approval"] == "timed out" and final.output["podcast"] is None
    assert final.metadata["stage"] == "approval-timed-out"
    kids = Counter(k.task_id for k in children(final.id))
    assert "transcribe-response" not in kids and "generate-podcast-from-story" not in kids  # a text response
    assert kids["response-embeddings"] == len(stories.split_into_chunks(text))
    assert stories.approve(handle.id) is False  # too late: the token timed out
    examples.cluster.check_logs()
