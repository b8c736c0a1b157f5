"""One process of the idempotency race: `--threads` threads each trigger every key `--rounds`
times (shuffled), all starting together when the `--go` file appears. Writes a JSON report:
for each key, every run id its callers got, with counts, and any errors."""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from collections import Counter, defaultdict

import idem_tasks

import conveyor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ready", required=True)
    parser.add_argument("--go", required=True)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--keys", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    client = conveyor.configure(database_url=args.url)
    client.engine  # open the store before the race  # noqa: B018
    keys = [f"key-{i:02d}" for i in range(args.keys)]
    seen: list[list[tuple[str, str]]] = [[] for _ in range(args.threads)]
    errors: list[str] = []
    barrier = threading.Barrier(args.threads)

    def work(index: int) -> None:
        rnd = random.Random(args.seed * 1000 + index)
        order: list[str] = []
        for _ in range(args.rounds):
            batch = list(keys)
            rnd.shuffle(batch)
            order += batch
        barrier.wait()
        mine = seen[index]
        for key in order:
            try:
                handle = idem_tasks.idem.trigger({"key": key}, idempotency_key=key)
            except Exception as exc:
                errors.append(f"{key}: {type(exc).__name__}: {exc}")
                continue
            mine.append((key, handle.id))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(args.threads)]
    open(args.ready, "w").close()
    while not os.path.exists(args.go):
        time.sleep(0.001)
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    ids: dict[str, Counter[str]] = defaultdict(Counter)
    for per_thread in seen:
        for key, run_id in per_thread:
            ids[key][run_id] += 1
    report = {
        "pid": os.getpid(),
        "calls": sum(len(s) for s in seen),
        "elapsed": elapsed,
        "ids": {k: dict(v) for k, v in ids.items()},
        "errors": errors[:50],
        "error_count": len(errors),
    }
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
