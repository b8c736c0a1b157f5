"""An independent limit monitor: its own process, reading only what tasks write (exec.log).

An execution counts as running from its start record to its end record, or to the death of
the process that wrote the start record (DECISIONS.md, "Tests of faults"). The log is read in
file order, which is the real order of the writes, and pids are checked between reads, so
the monitor never counts a finished execution as running for long.

    python monitor.py --log exec.log --out report.json --stop stop-file \
        [--queue-limit QUEUE=N ...] [--key-limit QUEUE=N ...]

Runs until the stop file exists, then reads the log to its end and writes the JSON report:
maxima per queue and per (queue, key), the violations seen, and counts.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from typing import Any


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed, not yet reaped process is a zombie: its code has stopped
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Monitor:
    def __init__(self, queue_limits: dict[str, int], key_limits: dict[str, int]) -> None:
        self.queue_limits = queue_limits
        self.key_limits = key_limits
        self.open: dict[tuple[str, int, int], dict[str, Any]] = {}  # (run, attempt, pid) -> start record
        self.by_queue: Counter[str] = Counter()
        self.by_key: Counter[tuple[str, str]] = Counter()
        self.max_queue: Counter[str] = Counter()
        self.max_key: Counter[tuple[str, str]] = Counter()
        self.violations: list[dict[str, Any]] = []
        self.starts = 0
        self.ends = 0
        self.deaths = 0
        self.unmatched_ends = 0

    def _close(self, ident: tuple[str, int, int]) -> None:
        rec = self.open.pop(ident)
        self.by_queue[rec["queue"]] -= 1
        if rec.get("key") is not None:
            self.by_key[(rec["queue"], rec["key"])] -= 1

    def event(self, rec: dict[str, Any]) -> None:
        ident = (rec["run"], rec["attempt"], rec["pid"])
        if rec["k"] == "S":
            self.starts += 1
            self.open[ident] = rec
            queue, key = rec["queue"], rec.get("key")
            self.by_queue[queue] += 1
            self.max_queue[queue] = max(self.max_queue[queue], self.by_queue[queue])
            limit = self.queue_limits.get(queue)
            if limit is not None and self.by_queue[queue] > limit:
                self._violation(f"{self.by_queue[queue]} running in queue {queue} (limit {limit})", rec)
            if key is not None:
                self.by_key[(queue, key)] += 1
                n = self.by_key[(queue, key)]
                self.max_key[(queue, key)] = max(self.max_key[(queue, key)], n)
                klimit = self.key_limits.get(queue)
                if klimit is not None and n > klimit:
                    self._violation(f"{n} running with key {key!r} in queue {queue} (limit {klimit})", rec)
        elif rec["k"] == "E":
            self.ends += 1
            if ident in self.open:
                self._close(ident)
            else:
                self.unmatched_ends += 1

    def _violation(self, what: str, rec: dict[str, Any]) -> None:
        running = [r for r in self.open.values() if r["queue"] == rec["queue"]]
        if len(self.violations) < 50:
            self.violations.append({"what": what, "record": rec, "running": running})

    def reap(self) -> None:
        pids = {ident[2] for ident in self.open}
        for pid in pids:
            if not alive(pid):
                for ident in [i for i in self.open if i[2] == pid]:
                    self._close(ident)
                    self.deaths += 1

    def report(self) -> dict[str, Any]:
        return {
            "starts": self.starts,
            "ends": self.ends,
            "closed_by_death": self.deaths,
            "unmatched_ends": self.unmatched_ends,
            "still_open": len(self.open),
            "max_queue": dict(self.max_queue),
            "max_key": {f"{q}/{k}": n for (q, k), n in self.max_key.items()},
            "violations": self.violations,
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stop", required=True)
    parser.add_argument("--queue-limit", action="append", default=[])
    parser.add_argument("--key-limit", action="append", default=[])
    parser.add_argument("--poll", type=float, default=0.003)
    args = parser.parse_args()

    def limits(items: list[str]) -> dict[str, int]:
        return {q: int(n) for q, n in (item.rsplit("=", 1) for item in items)}

    monitor = Monitor(limits(args.queue_limit), limits(args.key_limit))
    if not os.path.exists(args.log):
        open(args.log, "ab").close()
    buffer = b""
    with open(args.log, "rb") as log:
        open(args.out + ".ready", "w").close()
        while True:
            stopping = os.path.exists(args.stop)
            chunk = log.read()
            if chunk:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        monitor.event(json.loads(line))
            # A pid found dead now wrote every line it ever will before this check; closing its
            # executions after the lines read so far counts them as running a little longer
            # than they did (never shorter). Records it wrote after the read are closed next time.
            monitor.reap()
            if stopping and not chunk:
                break
            if not chunk:
                time.sleep(args.poll)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(monitor.report(), f, indent=1)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
