"""Seed 004: a family-stories backend, the chain of 8 tasks moved from Trigger.dev.

    process-text-response                 the orchestrator, one run per submitted response
      -> transcribe-response              audio -> text (skipped for a text response)
      -> response-embeddings x N          one child per chunk: batch_trigger_and_wait (fan-out)
      -> response-tagging                 value tags
      -> wisdom-tagging                   advice found in the story
      -> quote-generation                 memorable quotes
      -> create-story-from-response       the story record
      -- a family member approves it      a wait token: create_token + for_token (WAITING, no worker)
      -> generate-podcast-from-story      a sync task (TTS + ffmpeg) in a worker's child process

What it shows: children with `trigger_and_wait` and a fan-out with `batch_trigger_and_wait`
(the parent is WAITING while they run and holds no worker slot; each child runs once, also
when the parent resumes and replays from the top); failed children coming back as a
`Result` for the parent to decide on; a human approval through a wait token with a timeout;
the seed's retry settings (3 attempts, 1 s..10 s, factor 2, randomized) and max duration
(1 h); priority for urgent responses; progress written by the children into the
orchestrator's metadata (`conveyor.metadata.parent` / `.root`); `conveyor.retry.on_throw` in
a sync task, without `await`.

The drivers below are what the app does: `submit_response` (a new response arrives),
`approve` (the family member's button: `conveyor.wait.complete_token`), `pending_approval`.
From the repository root, with `conveyor dev` running in examples/:

    python examples/stories.py submit --text "When I was nine we moved to the coast..."
    python examples/stories.py submit --audio https://files.example/grandma.wav --urgent
    python examples/stories.py approve RUN_ID            # or --reject
    python examples/stories.py show RUN_ID
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import fakes
from fakes import FakeControls
from pydantic import BaseModel, Field, model_validator

import conveyor
from conveyor import AbortRun, BatchItem, Context, Queue, Result, Retry, RunHandle, task

log = conveyor.logger
HERE = Path(__file__).resolve().parent

# The seed's trigger.config.ts: retries {maxAttempts 3, 1 s..10 s, factor 2, randomized}, maxDuration 1 h.
RETRY = Retry(max_attempts=3, min_delay=1.0, max_delay=10.0, factor=2.0, randomize=True)
MAX_DURATION = 3600
CHUNK_WORDS = 20  # words per embedded chunk


# --- payloads ------------------------------------------------------------------------------------


class ResponseIn(BaseModel):
    response_id: str
    family_id: str
    text: str | None = None  # a typed response...
    audio_url: str | None = None  # ...or a recorded one, transcribed first
    urgent: bool = False
    approval_timeout: float = Field(default=7 * 86400, gt=0, description="seconds to wait for the approval")
    fake: FakeControls | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ResponseIn:
        if (self.text is None) == (self.audio_url is None):
            raise ValueError("give exactly one of text and audio_url")
        return self


class AudioIn(BaseModel):
    response_id: str
    audio_url: str
    fake: FakeControls | None = None


class ChunkIn(BaseModel):
    response_id: str
    index: int
    text: str


class TextIn(BaseModel):
    response_id: str
    text: str


class StoryIn(BaseModel):
    response_id: str
    family_id: str
    text: str
    tags: list[str]
    wisdom: list[str]
    quotes: list[str]


class PodcastIn(BaseModel):
    story_id: str
    title: str
    text: str
    fake: FakeControls | None = None


def _chain_done(ctx: Context) -> None:
    """Every task of the chain appends its id to the orchestrator's metadata (the root of the tree)."""
    conveyor.metadata.root.append("done", ctx.task.id)


# --- the chain -----------------------------------------------------------------------------------


@task("transcribe-response", queue=Queue("transcription", concurrency_limit=4), retry=RETRY, max_duration=MAX_DURATION)
async def transcribe_response(audio: AudioIn, ctx: Context) -> dict[str, Any]:
    text = await fakes.transcribe(audio.audio_url, audio.fake, seed=audio.response_id, attempt=ctx.attempt.number)
    _chain_done(ctx)
    return {"text": text, "words": len(text.split())}


@task("response-embeddings", queue=Queue("embeddings", concurrency_limit=8), retry=RETRY, max_duration=MAX_DURATION)
async def response_embeddings(chunk: ChunkIn, ctx: Context) -> dict[str, Any]:
    vector = fakes.embed(chunk.text)  # "INSERT INTO embeddings (response_id, chunk, vector) ... ON CONFLICT DO NOTHING"
    conveyor.metadata.parent.increment("chunks_embedded", 1)
    _chain_done(ctx)
    return {"index": chunk.index, "dims": len(vector), "vector": vector}


@task("response-tagging", queue=Queue("tagging", concurrency_limit=4), retry=RETRY, max_duration=MAX_DURATION)
async def response_tagging(item: TextIn, ctx: Context) -> dict[str, Any]:
    _chain_done(ctx)
    return {"tags": fakes.tag_values(item.text)}


@task("wisdom-tagging", queue=Queue("tagging", concurrency_limit=4), retry=RETRY, max_duration=MAX_DURATION)
async def wisdom_tagging(item: TextIn, ctx: Context) -> dict[str, Any]:
    advice = [s for s in fakes.extract_quotes(item.text, count=3) if len(s.split()) > 6]
    _chain_done(ctx)
    return {"wisdom": advice, "tags": fakes.tag_values(" ".join(advice) or item.text, count=2)}


@task("quote-generation", queue=Queue("tagging", concurrency_limit=4), retry=RETRY, max_duration=MAX_DURATION)
async def quote_generation(item: TextIn, ctx: Context) -> dict[str, Any]:
    _chain_done(ctx)
    return {"quotes": fakes.extract_quotes(item.text)}


@task("create-story-from-response", queue=Queue("stories", concurrency_limit=4), retry=RETRY, max_duration=MAX_DURATION)
async def create_story(item: StoryIn, ctx: Context) -> dict[str, Any]:
    title = " ".join(item.text.split()[:5]).rstrip(".,") + "..."
    _chain_done(ctx)
    return {
        "story_id": f"story_{item.response_id}",
        "title": title,
        "tags": sorted({*item.tags}),
        "quotes": item.quotes,
    }


@task(
    "generate-podcast-from-story",
    queue=Queue("podcasts", concurrency_limit=2),
    retry=RETRY,
    max_duration=MAX_DURATION,
    # machine="large-1x" would send it to workers started with `--machine large-1x` (ffmpeg is heavy).
)
def generate_podcast(story: PodcastIn, ctx: Context) -> dict[str, Any]:
    """A plain `def` (blocking TTS and ffmpeg): it runs in a worker's child process, where a
    cancel or max_duration can still stop it. The same durable calls work without `await`."""
    tries = itertools.count(1)

    def synthesize() -> dict[str, Any]:
        return fakes.synthesize_speech_sync(story.text, story.fake, seed=story.story_id, attempt=next(tries))

    audio = conveyor.retry.on_throw(synthesize, max_attempts=3, min_delay=0.5, max_delay=5.0)  # blocks
    _chain_done(ctx)
    return {"story_id": story.story_id, "podcast_url": audio["url"], "seconds": audio["seconds"]}


def split_into_chunks(text: str) -> list[str]:
    words = text.split()
    return [" ".join(words[i : i + CHUNK_WORDS]) for i in range(0, len(words), CHUNK_WORDS)] or [text]


@task(
    "process-text-response",
    queue=Queue("responses", concurrency_limit=10),
    retry=RETRY,
    max_duration=MAX_DURATION,  # execution time only: the days spent WAITING for approval do not count
    priority=lambda r: 300 if r.get("urgent") else 0,  # urgent responses start as if queued 5 minutes earlier
    idempotency_key=lambda r: f"response-{r['response_id']}",
)
async def process_text_response(response: ResponseIn, ctx: Context) -> dict[str, Any]:
    """The orchestrator. It runs from the top again after every wait; each child call below
    returns its recorded result on those replays instead of starting the child again."""
    rid = response.response_id
    conveyor.metadata.set("stage", "transcribing")
    if response.audio_url is not None:
        transcript = await transcribe_response.trigger_and_wait(
            {"response_id": rid, "audio_url": response.audio_url, "fake": _dump(response.fake)}
        )
        text = _unwrap(transcript)["text"]
    else:
        assert response.text is not None
        text = response.text

    conveyor.metadata.set("stage", "embedding")
    chunks = await conveyor.step("chunk", split_into_chunks, text)
    conveyor.metadata.set("chunks", len(chunks))
    embedded = await response_embeddings.batch_trigger_and_wait(
        [
            BatchItem({"response_id": rid, "index": i, "text": chunk}, {"idempotency_key": conveyor.idempotency_key(i)})
            for i, chunk in enumerate(chunks)
        ]
    )
    failed = [r.run_id for r in embedded if not r.ok]
    if failed:
        # The results are recorded: a retry of this run would see the same failures. Stop here.
        raise AbortRun(f"{len(failed)} of {len(chunks)} embedding runs failed: {', '.join(failed)}")

    conveyor.metadata.set("stage", "tagging")
    tags = _unwrap(await response_tagging.trigger_and_wait({"response_id": rid, "text": text}))["tags"]
    wisdom = _unwrap(await wisdom_tagging.trigger_and_wait({"response_id": rid, "text": text}))
    quotes = _unwrap(await quote_generation.trigger_and_wait({"response_id": rid, "text": text}))["quotes"]

    conveyor.metadata.set("stage", "creating-story")
    story = (
        await create_story.trigger_and_wait(
            {
                "response_id": rid,
                "family_id": response.family_id,
                "text": text,
                "tags": tags + wisdom["tags"],
                "wisdom": wisdom["wisdom"],
                "quotes": quotes,
            }
        )
    ).unwrap()

    # A family member approves the story before the podcast is made. The run is WAITING until
    # then: no worker, no slot; the token's id is in the metadata for the app's approve button.
    token = await conveyor.wait.create_token(
        timeout=response.approval_timeout, tags=["approval", f"family:{response.family_id}"]
    )
    conveyor.metadata.set("approval_token", token.id)
    conveyor.metadata.set("stage", "awaiting-approval")
    log.info("story %s awaits approval", story["story_id"], extra={"token": token.id, "url": token.url})
    decision = await conveyor.wait.for_token(token)
    if not decision.ok:  # error code TIMEOUT: nobody answered in time
        conveyor.metadata.set("stage", "approval-timed-out")
        return {"response_id": rid, "story": story, "approval": "timed out", "podcast": None}
    answer = decision.output if isinstance(decision.output, dict) else {}
    if not answer.get("approved"):
        conveyor.metadata.set("stage", "rejected")
        return {"response_id": rid, "story": story, "approval": "rejected", "podcast": None}

    conveyor.metadata.set("stage", "podcast")
    podcast = await generate_podcast.trigger_and_wait(
        {"story_id": story["story_id"], "title": story["title"], "text": text, "fake": _dump(response.fake)},
        priority=300 if response.urgent else 0,
    )
    conveyor.metadata.set("stage", "done")
    return {
        "response_id": rid,
        "story": story,
        "approval": "approved",
        "approved_by": answer.get("by"),
        "chunks": len(chunks),
        "podcast": _unwrap(podcast),
    }


def _unwrap(result: Result) -> Any:
    """A child's output. A child that failed has used its own retries, and its failure is
    recorded in this run's journal: a retry of this run would meet it again, so fail now."""
    try:
        return result.unwrap()
    except conveyor.RunFailed as exc:  # names the child run
        raise AbortRun(str(exc)) from exc


def _dump(controls: FakeControls | None) -> dict[str, Any] | None:
    return None if controls is None else controls.model_dump()


# --- the app's side ------------------------------------------------------------------------------


def submit_response(
    response_id: str, family_id: str, *, text: str | None = None, audio_url: str | None = None, **extra: Any
) -> RunHandle:
    """A new response was submitted: start its chain. Resubmitting the same response id
    returns the run that already exists (the decorator's idempotency key)."""
    payload: dict[str, Any] = {"response_id": response_id, "family_id": family_id, "text": text, "audio_url": audio_url}
    return process_text_response.trigger({**payload, **extra}, tags=[f"family:{family_id}", f"response:{response_id}"])


def pending_approval(run_id: str) -> str | None:
    """The token a WAITING story chain waits for, if it waits for its approval now."""
    run = conveyor.runs.retrieve(run_id)
    if run.status == "WAITING" and run.metadata.get("stage") == "awaiting-approval":
        return run.metadata.get("approval_token")
    return None


def approve(run_id: str, approved: bool = True, by: str = "a family member") -> bool:
    """The approve (or reject) button. Completing the token resumes the run on any worker.
    Returns False if the token was already completed (or timed out): nothing changes then."""
    token_id = conveyor.runs.retrieve(run_id).metadata.get("approval_token")
    if token_id is None:
        raise LookupError(f"run {run_id} has not asked for an approval (yet)")
    return conveyor.wait.complete_token(token_id, {"approved": approved, "by": by})


# --- the command line ----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    submit = commands.add_parser("submit", help="submit a response and start its chain")
    source = submit.add_mutually_exclusive_group(required=True)
    source.add_argument("--text")
    source.add_argument("--audio", metavar="URL")
    submit.add_argument("--family", default="family-1")
    submit.add_argument("--urgent", action="store_true")
    submit.add_argument("--approval-timeout", type=float, default=7 * 86400, metavar="S")
    approve_cmd = commands.add_parser("approve", help="approve the story of a waiting chain")
    approve_cmd.add_argument("run_id")
    approve_cmd.add_argument("--reject", action="store_true")
    show = commands.add_parser("show", help="a chain's status, stage and children")
    show.add_argument("run_id")
    args = parser.parse_args()
    if not os.environ.get("CONVEYOR_DATABASE_URL"):  # the database of `conveyor dev` in examples/
        conveyor.configure(database_url=f"sqlite:///{HERE / '.conveyor' / 'dev.db'}")

    if args.command == "submit":
        handle = submit_response(
            f"r{time.time_ns()}",
            args.family,
            text=args.text,
            audio_url=args.audio,
            urgent=args.urgent,
            approval_timeout=args.approval_timeout,
        )
        print(f"process-text-response {handle.id}")
        deadline = time.monotonic() + 60
        while pending_approval(handle.id) is None and time.monotonic() < deadline:
            if conveyor.runs.retrieve(handle.id).status.finished:
                break
            time.sleep(0.2)
        run = conveyor.runs.retrieve(handle.id)
        if pending_approval(handle.id):
            print(f"{run.status.value}, token {run.metadata['approval_token']}")
            print(f"approve it: python examples/stories.py approve {handle.id}")
        else:
            print(run.status.value, run.metadata.get("stage"), run.error or "")
    elif args.command == "approve":
        changed = approve(args.run_id, approved=not args.reject)
        print("done: the chain resumes" if changed else "already answered: nothing changed")
        run = conveyor.runs.wait(args.run_id, timeout=60)
        print(run.status.value, json.dumps(run.output, indent=2))
    else:
        run = conveyor.runs.retrieve(args.run_id)
        print(run.status.value, run.metadata)
        for child in conveyor.runs.list(parent_id=run.id, limit=100):
            print(f"  {child.id}  {child.task_id:<28} {child.status.value}")


if __name__ == "__main__":
    main()
