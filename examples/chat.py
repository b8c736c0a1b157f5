"""Seed 001: an AI coding app's background work (moved from Inngest), as durable tasks.

- `chat-message` (the seed's processMessage): the AI reply to a chat message, streamed token by
  token with `conveyor.streams.pipe("tokens", ...)` to whoever subscribes
  (`conveyor.runs.subscribe(run_id)`), its status kept in metadata. The app stores the run id
  with the message, so "stop generating" cancels the run at once (`cancel_message`).
- `generate-project` (generateProject): nine durable steps (`conveyor.step`), so a retry or a
  crash resumes after the last finished step; the project's images are child runs started with
  `trigger_and_wait` and idempotency keys from `conveyor.idempotency_key(...)`, so a retry never
  renders an image twice; progress in metadata, which the children update too
  (`conveyor.metadata.parent` / `.root`).
- `generate-image`: one image, its flaky API call retried in place with `conveyor.retry.on_throw`.

The drivers below are what the app's API routes would do: `send_message` (POST /api/messages),
`cancel_message` (DELETE /api/messages), `stream_reply` (the browser's live view),
`start_project` (POST /api/projects/generate). From the repository root, with `conveyor dev`
running in examples/:

    python examples/chat.py "How do I add a login page?"                  # stream a reply
    python examples/chat.py "Write a long essay" --tokens 400 --cancel-after 1
    python examples/chat.py --project "A todo app with a cat mascot"
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import itertools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import fakes
from fakes import APP_DB, FakeControls, TransientError
from pydantic import BaseModel, Field

import conveyor
from conveyor import Concurrency, Context, Queue, Retry, RunHandle, task

log = conveyor.logger
HERE = Path(__file__).resolve().parent


# --- payloads (typed: a bad payload is refused when triggered) ---------------------------------


class ChatMessageIn(BaseModel):
    conversation_id: str
    message_id: str
    text: str = Field(min_length=1)
    fake: FakeControls | None = None  # demo/test knobs: token_delay, tokens (see fakes.py)


class ProjectIn(BaseModel):
    project_id: str
    description: str = Field(min_length=1)
    images: int = Field(default=3, ge=0, le=20, description="how many images the project gets")
    fail_at_step: str | None = Field(default=None, description="demo/test knob: attempt 1 fails in this step")
    fake: FakeControls | None = None  # for the LLM calls of the steps
    image_fake: FakeControls | None = None  # for the image API (e.g. fail_attempts=1: retried in place)


class ImageIn(BaseModel):
    project_id: str
    name: str
    prompt: str
    size: str = "1024x1024"
    fake: FakeControls | None = None


# --- chat-message --------------------------------------------------------------------------------


def load_context(conversation_id: str, text: str) -> dict[str, Any]:
    """The conversation's context from the app's database (a fake): what the LLM is asked."""
    history = [m for m in APP_DB["messages"].values() if m.get("conversation_id") == conversation_id]
    return {"prompt": text, "history": len(history)}


def save_reply(conversation_id: str, message_id: str, reply: str) -> dict[str, Any]:
    """Store the finished reply with the message (Convex in the seed)."""
    APP_DB["messages"][message_id] = {"conversation_id": conversation_id, "status": "complete", "content": reply}
    return {"message_id": message_id, "chars": len(reply)}


def mark_cancelled(msg: ChatMessageIn, ctx: Context) -> None:
    """`on_cancel`: the user pressed stop. The tokens streamed so far stay in the run's stream."""
    APP_DB["messages"][msg.message_id] = {"conversation_id": msg.conversation_id, "status": "cancelled"}
    log.info("reply cancelled", extra={"message_id": msg.message_id})


@task(
    "chat-message",
    queue=Queue("chat", concurrency_limit=20),
    concurrency=Concurrency(limit=1, key=lambda m: m["conversation_id"]),  # one reply at a time per conversation
    retry=Retry(max_attempts=3, min_delay=1.0, max_delay=10.0),
    max_duration=300,
    on_cancel=mark_cancelled,
)
async def chat_message(msg: ChatMessageIn, ctx: Context) -> dict[str, Any]:
    conveyor.metadata.set("status", "processing")
    context = await conveyor.step("load-context", load_context, msg.conversation_id, msg.text)
    conveyor.metadata.set("status", "streaming")
    # Every token is stored in order with the run and published live; the call returns them all.
    # A cancel lands at the stream's next `await`: the run ends CANCELED, with no output.
    tokens = await conveyor.streams.pipe("tokens", fakes.llm_stream(context["prompt"], msg.fake))
    reply = "".join(tokens)
    await conveyor.step("save-reply", save_reply, msg.conversation_id, msg.message_id, reply)
    conveyor.metadata.set("status", "complete")
    log.info("reply streamed", extra={"message_id": msg.message_id, "tokens": len(tokens)})
    return {"message_id": msg.message_id, "reply": reply, "tokens": len(tokens)}


def send_message(conversation_id: str, text: str, message_id: str | None = None, **fake: Any) -> str:
    """POST /api/messages: start the reply and keep its run id with the message, for the cancel
    button. Returns the run id."""
    message_id = message_id or f"msg_{time.time_ns()}"
    payload: dict[str, Any] = {"conversation_id": conversation_id, "message_id": message_id, "text": text}
    if fake:
        payload["fake"] = fake
    handle = chat_message.trigger(payload, tags=[f"conversation:{conversation_id}"])
    APP_DB["messages"][message_id] = {"conversation_id": conversation_id, "status": "processing", "run_id": handle.id}
    return handle.id


def cancel_message(run_id: str) -> conveyor.Run:
    """DELETE /api/messages: stop the reply now. The code gets its cancellation at its next
    `await` (within about a second); the run becomes CANCELED once the code has stopped."""
    return conveyor.runs.cancel(run_id)


async def stream_reply(run_id: str, out: TextIO | None = None) -> str | None:
    """The browser's live view: print the tokens as they arrive. The subscription ends after
    the run's final status, which is returned (COMPLETED, CANCELED, ...)."""
    out = out or sys.stdout
    status = None
    async for update in conveyor.runs.subscribe(run_id):
        if update.type == "stream" and update.data["key"] == "tokens":
            out.write(update.data["chunk"])
            out.flush()
        elif update.type == "status":
            status = update.data["status"]
        elif update.type == "metadata" and update.data.get("key") == "status":
            log.debug("message status: %s", update.data.get("value"))
    return status


# --- generate-project ----------------------------------------------------------------------------

PROJECT_STEPS = (
    "load-project",
    "plan",
    "scaffold",
    "write-files",
    "place-images",
    "install-dependencies",
    "check",
    "save-files",
    "publish",
)


def load_project(project_id: str, description: str) -> dict[str, Any]:
    return {"id": project_id, "description": description, "template": "nextjs"}


async def plan_project(description: str, images: int, controls: FakeControls | None, seed: str, attempt: int) -> dict:
    outline = await fakes.llm_complete(f"plan: {description}", controls, seed, attempt)
    words = outline.lower().split()
    return {
        "outline": outline,
        "files": ["app/page.tsx", "app/layout.tsx", "app/globals.css", "README.md"],
        "images": [{"name": f"image-{n}", "prompt": f"{description}, {words[n % len(words)]}"} for n in range(images)],
    }


def scaffold(plan: dict[str, Any]) -> dict[str, Any]:
    return {"dirs": sorted({path.rsplit("/", 1)[0] for path in plan["files"] if "/" in path})}


async def write_files(plan: dict[str, Any], controls: FakeControls | None, seed: str, attempt: int) -> dict[str, str]:
    files = {}
    for path in plan["files"]:
        files[path] = await fakes.llm_complete(f"write {path} for: {plan['outline']}", controls, seed, attempt)
    return files


def place_images(files: dict[str, str], images: dict[str, str]) -> dict[str, str]:
    tags = "".join(f'\n<img alt="{name}" src="{url}" />' for name, url in sorted(images.items()))
    return {**files, "app/page.tsx": files["app/page.tsx"] + tags}


def install_dependencies(files: dict[str, str]) -> dict[str, Any]:
    return {"packages": ["next", "react", "react-dom"] + (["tailwindcss"] if "app/globals.css" in files else [])}


def check_project(files: dict[str, str]) -> dict[str, Any]:
    return {"files": len(files), "errors": 0, "warnings": sum("TODO" in text for text in files.values())}


def save_files(project_id: str, files: dict[str, str]) -> dict[str, Any]:
    APP_DB["projects"].setdefault(project_id, {})["files"] = sorted(files)
    return {"saved": len(files)}


def publish(project_id: str) -> dict[str, Any]:
    return {"preview_url": f"https://preview.example/{project_id}"}


@task(
    "generate-image",
    # The parent's queue, whose limit is 1: no deadlock, since a parent waiting in
    # trigger_and_wait is WAITING and holds no slot while its child runs.
    queue=Queue("projects", concurrency_limit=1),
    retry=Retry(max_attempts=3, min_delay=1.0, max_delay=10.0),
    max_duration=300,
)
async def generate_image(image: ImageIn, ctx: Context) -> dict[str, Any]:
    tries = itertools.count(1)

    async def render() -> dict[str, Any]:
        seed = f"{image.project_id}:{image.name}"
        return await fakes.generate_image(image.prompt, image.size, image.fake, seed, next(tries))

    # The image API is flaky: retry the call in place, a few times, before failing the run.
    result = await conveyor.retry.on_throw(render, max_attempts=4, min_delay=0.2, max_delay=2.0)
    conveyor.metadata.set("url", result["url"])
    conveyor.metadata.parent.increment("images_done", 1)  # the project's progress, from the child
    conveyor.metadata.root.append("events", f"{image.name} ready")
    return result


@task(
    "generate-project",
    queue=Queue("projects", concurrency_limit=1),
    idempotency_key=lambda p: f"project-{p['project_id']}",  # a double click starts one generation
    retry=Retry(max_attempts=3, min_delay=1.0, max_delay=10.0),
    max_duration=1800,
)
async def generate_project(project: ProjectIn, ctx: Context) -> dict[str, Any]:
    """The nine steps. On a retry or a resume the function runs again from the top: finished
    steps return their stored results at once, and finished children are not started again."""
    seed = project.project_id

    async def step(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        number = PROJECT_STEPS.index(name) + 1
        conveyor.metadata.set("step", name)

        async def body() -> Any:
            if project.fail_at_step == name and ctx.attempt.number == 1:
                raise TransientError(f"{name}: 503 Service Unavailable (attempt 1)")  # the demo knob
            result = fn(*args)
            return await result if inspect.isawaitable(result) else result

        value = await conveyor.step(name, body)
        conveyor.metadata.set("progress", round(number / len(PROJECT_STEPS), 3))
        log.info("step %d/%d done: %s", number, len(PROJECT_STEPS), name)
        return value

    log.info("generating project %s", project.project_id)  # dropped when replayed: in the log once
    conveyor.metadata.set("status", "generating")
    conveyor.metadata.set("images_total", project.images)
    info = await step("load-project", load_project, project.project_id, project.description)
    plan = await step("plan", plan_project, info["description"], project.images, project.fake, seed, ctx.attempt.number)
    await step("scaffold", scaffold, plan)
    files = await step("write-files", write_files, plan, project.fake, seed, ctx.attempt.number)

    # The images: one child run each. The parent suspends while a child runs (WAITING, no slot);
    # the key is scoped to this run, so a retry of the project finds the children it started.
    images: dict[str, str] = {}
    for image in plan["images"]:
        payload = {"project_id": project.project_id, "name": image["name"], "prompt": image["prompt"]}
        if project.image_fake is not None:
            payload["fake"] = project.image_fake.model_dump()
        result = await generate_image.trigger_and_wait(
            payload,
            idempotency_key=conveyor.idempotency_key("image", image["name"]),
            tags=[f"project:{project.project_id}"],
        )
        if result.ok:
            images[image["name"]] = result.output["url"]
        else:  # the parent decides: a placeholder rather than a failed project
            log.warning("image %s failed (%s): using a placeholder", image["name"], result.error.get("message"))
            images[image["name"]] = "https://images.example/placeholder.png"

    files = await step("place-images", place_images, files, images)
    deps = await step("install-dependencies", install_dependencies, files)
    report = await step("check", check_project, files)
    await step("save-files", save_files, project.project_id, files)
    site = await step("publish", publish, project.project_id)
    conveyor.metadata.set("status", "complete")
    return {
        "project_id": project.project_id,
        "files": sorted(files),
        "images": images,
        "packages": deps["packages"],
        "warnings": report["warnings"],
        "preview_url": site["preview_url"],
    }


def start_project(project_id: str, description: str, **options: Any) -> RunHandle:
    """POST /api/projects/generate. A second call for the same project returns the same run."""
    handle = generate_project.trigger(
        {"project_id": project_id, "description": description, **options}, tags=[f"project:{project_id}"]
    )
    APP_DB["projects"].setdefault(project_id, {})["run_id"] = handle.id
    return handle


# --- the command line ----------------------------------------------------------------------------


async def _follow(run_id: str, cancel_after: float | None) -> str | None:
    canceller = None
    if cancel_after is not None:

        async def cancel_later() -> None:
            await asyncio.sleep(cancel_after)
            await asyncio.to_thread(cancel_message, run_id)
            print("\n[stop pressed: cancel requested]", flush=True)

        canceller = asyncio.ensure_future(cancel_later())
    try:
        return await stream_reply(run_id)
    finally:
        if canceller is not None:
            canceller.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text", nargs="?", default="How do I add a login page?", help="the chat message")
    parser.add_argument("--tokens", type=int, help="length of the fake reply, in tokens")
    parser.add_argument("--delay", type=float, help="seconds between tokens (default 0.02)")
    parser.add_argument("--cancel-after", type=float, metavar="S", help="press stop after S seconds")
    parser.add_argument("--project", metavar="DESCRIPTION", help="generate a project instead")
    args = parser.parse_args()
    if not os.environ.get("CONVEYOR_DATABASE_URL"):  # the database of `conveyor dev` in examples/
        conveyor.configure(database_url=f"sqlite:///{HERE / '.conveyor' / 'dev.db'}")

    if args.project:
        handle = start_project(f"p{time.time_ns()}", args.project)
        print(f"generate-project {handle.id}: waiting (watch it: conveyor runs watch {handle.id})")
        run = handle.wait(timeout=300)
        print(run.status.value, run.output if run.status == "COMPLETED" else run.error)
        return

    fake: dict[str, Any] = {}
    if args.tokens:
        fake["tokens"] = args.tokens
    if args.delay is not None:
        fake["token_delay"] = args.delay
    run_id = send_message("demo-conversation", args.text, **fake)
    print(f"chat-message {run_id}")
    status = asyncio.run(_follow(run_id, args.cancel_after))
    run = conveyor.runs.retrieve(run_id)
    print(f"\n{status}: metadata {run.metadata}, output {'none' if run.output is None else 'stored'}")


if __name__ == "__main__":
    main()
