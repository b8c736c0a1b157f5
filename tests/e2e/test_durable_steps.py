"""Durable steps with real processes: a run killed inside step 5 of 9 resumes on another worker
without running steps 0-4 again."""

from __future__ import annotations

import json

from harness import wait_until

import conveyor


def test_kill9_inside_step_5_of_9_resumes_without_redoing_steps(make_cluster):
    cluster = make_cluster("step_tasks")
    first = cluster.start_worker(concurrency=2)
    cluster.wait_ready([first])
    hold = cluster.dir / "hold"
    handle = conveyor.trigger("nine-steps", {"hold": str(hold)})
    wait_until(hold.exists, 30, "step 5 to start on the first worker")
    assert int(hold.read_text()) == first.pid
    second = cluster.start_worker(concurrency=2)
    cluster.wait_ready([second])
    cluster.kill9(first)
    run = handle.wait(timeout=60)

    effects = [json.loads(line) for line in (cluster.dir / "step-effects.log").read_text().splitlines()]
    by_step: dict[int, list[dict]] = {}
    for e in effects:
        by_step.setdefault(e["step"], []).append(e)
    assert run.status.value == "COMPLETED" and run.output == {"values": [n * n for n in range(9)]}
    assert all(len(by_step[n]) == 1 and by_step[n][0]["pid"] == first.pid for n in range(5))  # not again
    assert [e["pid"] for e in by_step[5]] == [first.pid, second.pid]  # step 5 ran again, elsewhere
    assert all(len(by_step[n]) == 1 and by_step[n][0]["pid"] == second.pid for n in range(6, 9))
    attempts = conveyor.runs.attempts(handle.id)
    assert [a.status for a in attempts] == ["WORKER_LOST", "COMPLETED"]
    journal = conveyor.runs.steps(handle.id)
    assert [s.attempt for s in journal] == [1] * 5 + [2] * 4
    cluster.check_logs()
    print(f"steps: {len(effects)} executions for 9 steps, attempts {[a.status for a in attempts]}")
