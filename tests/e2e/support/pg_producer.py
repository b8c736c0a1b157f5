"""A producer process of tests/e2e/test_postgres_faults.py: triggers `e2e-kill` runs one by one
until the `--stop` file exists (or `--max` runs), retrying each trigger until it succeeds, so
it carries on across a database restart. Each run has the idempotency key `p-<n>`: a trigger
that committed but whose answer was lost is retried into the same run, never a second one.

Appends `{"n", "id"}` per run to `--out` once its trigger returned, and `{"error", "t"}` per
failed try; writes `--ready` once the store is open.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import fault_tasks

import conveyor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ready", required=True)
    parser.add_argument("--stop", required=True)
    parser.add_argument("--first", type=int, default=0, help="the first n (and idempotency key p-<n>)")
    parser.add_argument("--max", type=int, default=100_000)
    parser.add_argument("--pause", type=float, default=0.002)
    parser.add_argument("--give-up", type=float, default=60.0, help="seconds one trigger may keep failing")
    args = parser.parse_args()

    client = conveyor.configure(database_url=args.url)
    client.engine  # open the store  # noqa: B018
    fd = os.open(args.out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    open(args.ready, "w").close()
    n = args.first
    while n < args.first + args.max and not os.path.exists(args.stop):
        first_try = time.monotonic()
        while True:
            try:
                payload = {"n": n, "ms": 20 + n * 37 % 280}  # 20..300 ms: runs are executing when the server stops
                handle = fault_tasks.kill_task.trigger(payload, idempotency_key=f"p-{n}")
                break
            except conveyor.ConveyorError as exc:
                line = {"error": f"{type(exc).__name__}: {exc}"[:300], "t": time.time()}
                os.write(fd, (json.dumps(line) + "\n").encode())
                if time.monotonic() - first_try > args.give_up:
                    raise
                time.sleep(0.1)
        os.write(fd, (json.dumps({"n": n, "id": handle.id, "t": time.time()}) + "\n").encode())
        n += 1
        time.sleep(args.pause)


if __name__ == "__main__":
    main()
