"""Trigger a realistic mix of runs for the examples, then (with --wait) print how each ended.

    make dev                          # terminal 1, in the repository root
    python examples/demo.py --wait    # terminal 2

It uses the same database as `conveyor dev` in examples/ (examples/.conveyor/dev.db) unless
CONVEYOR_DATABASE_URL is set. It imports the task modules, so payloads are validated here and
the tasks' key functions (idempotency key from update_id, per-user concurrency key) apply.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import conveyor  # noqa: E402
from conveyor import RunHandle  # noqa: E402


def telegram_update(update_id: int, user_id: int, name: str, text: str | None, **fake: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "message_id": update_id,
        "date": int(time.time()),
        "chat": {"id": user_id, "type": "private"},
        "from": {"id": user_id, "first_name": name, "is_bot": False},
    }
    if text is None:
        message["sticker"] = {"file_id": "CAACAgIAAxkBAAEB"}
    else:
        message["text"] = text
    update: dict[str, Any] = {"update_id": update_id, "message": message}
    if fake:
        update["fake"] = fake
    return update


def trigger_mix() -> list[RunHandle]:
    import documents
    import telegram_bot

    base = int(time.time()) * 100  # fresh update ids on every run of the demo
    ann, bob = 1001, 1002
    updates = [
        telegram_update(base + 1, ann, "Ann", "Hi! Can you summarise my report?", think=0.5),
        telegram_update(base + 2, ann, "Ann", "Also, what's the deadline?", think=0.5),  # waits for the first
        telegram_update(base + 3, bob, "Bob", "hello", think=0.5),  # runs beside Ann's
        telegram_update(base + 4, bob, "Bob", "are you busy?", rate_limit=3),  # 429, retried after 3 s
        telegram_update(base + 5, bob, "Bob", "flaky one", fail_attempts=1),  # 503, retried with backoff
        telegram_update(base + 6, ann, "Ann", None),  # a sticker: AbortRun, no retries
    ]
    handles = [telegram_bot.receive_update(u) for u in updates]
    redelivered = telegram_bot.receive_update(updates[0])  # Telegram sent it again
    print(f"redelivered update {base + 1}: same run? {redelivered.id == handles[0].id}")
    handles += documents.enqueue_demo_mix(prefix=f"demo{base}")
    return handles


def summarise(handles: list[RunHandle], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for handle in handles:
        try:
            run = handle.wait(max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            run = conveyor.runs.retrieve(handle.id)
            print(f"{run.id}  {run.task_id:<26} {run.status.value:<10} still unfinished (is a worker up? `make dev`)")
            continue
        detail = str(run.output if run.status == "COMPLETED" else (run.error or {}).get("message"))
        print(f"{run.id}  {run.task_id:<26} {run.status.value:<10} attempts={run.attempts}  {detail[:70]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wait", action="store_true", help="wait for every run and print how it ended")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for all of them")
    args = parser.parse_args()
    if not os.environ.get("CONVEYOR_DATABASE_URL"):
        conveyor.configure(database_url=f"sqlite:///{HERE / '.conveyor' / 'dev.db'}")
    handles = trigger_mix()
    print(f"triggered {len(handles)} runs")
    if args.wait:
        summarise(handles, args.timeout)
        print("(the sticker update is expected to FAIL: AbortRun)")


if __name__ == "__main__":
    main()
