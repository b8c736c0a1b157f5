"""Crash and shutdown faults with real worker processes (issue 3 item 10; DECISIONS.md
"Attempts, leases, fencing" and "Tests of faults").

Workers are `conveyor worker` processes on one SQLite store with a 2 s lease renewed every
0.5 s. Tasks log every execution (run id, pid, attempt) and write their side effect keyed by
run id into a separate SQLite file (tests/e2e/support/recorder.py).
"""

from __future__ import annotations

import json
import random
import signal
import time

import fault_tasks
import harness
from harness import attempts_by_run, busy_victim, check_exactly_once, status_events, wait_until

import conveyor

LEASE = 2.0


def test_kill9_2000_runs_exactly_once(make_cluster):
    """2,000 runs, 3 workers, one kill -9-ed every few hundred ms, 20 times, each replaced at
    once: nothing lost, every run COMPLETED exactly once with the right output and one side
    effect, and every re-execution matched by a WORKER_LOST attempt."""
    started = time.monotonic()
    cluster = make_cluster("fault_tasks")
    rnd = random.Random(20240611)
    workers = [cluster.start_worker(concurrency=8) for _ in range(3)]
    cluster.wait_ready(workers)
    # Tens of ms per run: long enough that the 2,000 runs outlast the 20 kills, so every kill
    # lands while the victim has runs executing. One run in five is a sync task (pool child).
    items = [{"n": i, "ms": rnd.randint(30, 120)} for i in range(2000)]
    handles = fault_tasks.kill_task.batch_trigger(items[:800]) + fault_tasks.kill_task.batch_trigger(items[800:1600])
    handles += fault_tasks.kill_task_sync.batch_trigger(items[1600:])
    expected = {h.id: fault_tasks.expected_output(item["n"]) for h, item in zip(handles, items, strict=True)}
    ids = list(expected)

    kills_mid_run = 0
    unfinished_at_kills: list[int] = []
    for _ in range(20):
        time.sleep(rnd.uniform(0.15, 0.45))  # the kill schedule, not a wait for a condition
        victim, running = busy_victim(cluster, rnd)
        kills_mid_run += running > 0
        unfinished_at_kills.append(len(ids) - cluster.statuses(ids)["COMPLETED"])
        cluster.kill9(victim)
        cluster.start_worker(concurrency=8)  # replaced at once
    kills_done = time.monotonic()

    wait_until(
        lambda: cluster.statuses(ids)["COMPLETED"] == len(ids) or _finished_badly(cluster, ids),
        timeout=max(10.0, 75.0 - (time.monotonic() - started)),
        what="all 2,000 runs to finish",
        interval=0.1,
    )
    stats = check_exactly_once(cluster, expected)
    warnings = cluster.check_logs()
    # The same through the public API, for the runs that were lost at least once.
    retried = cluster.sql("SELECT task_id, id FROM runs WHERE attempt_count > 1 ORDER BY task_id, id")
    lost_sync = sum(task_id == "e2e-kill-sync" for task_id, _ in retried)
    assert retried and lost_sync, f"{len(retried)} runs retried, {lost_sync} of them sync"
    for _, run_id in retried[:20] + retried[-20:]:
        events = [e for e in conveyor.runs.events(run_id) if e.kind == "status"]
        assert [e.data["status"] for e in events].count("COMPLETED") == 1, events
        statuses = [a.status for a in conveyor.runs.attempts(run_id)]
        assert statuses == ["WORKER_LOST"] * (len(statuses) - 1) + ["COMPLETED"], statuses
    print(
        f"\nkill -9: {stats['runs']} runs COMPLETED once, {len(cluster.killed)} kills "
        f"({kills_mid_run} mid-run; unfinished runs at kills {unfinished_at_kills[0]}..{unfinished_at_kills[-1]}), "
        f"{stats['executions']} executions, {stats['reexecuted_runs']} runs re-executed "
        f"(+{stats['extra_executions']}), {stats['worker_lost_attempts']} WORKER_LOST attempts "
        f"({len(retried)} runs retried, {lost_sync} sync), {warnings} worker warnings, "
        f"{stats['side_effects']} side effects; drained {time.monotonic() - kills_done:.1f} s after the last kill, "
        f"total {time.monotonic() - started:.1f} s"
    )
    assert kills_mid_run >= 15, f"only {kills_mid_run} of 20 kills landed while the victim had runs executing"
    assert unfinished_at_kills[-1] > 0, "all runs finished before the last kill: the test lost its teeth"


def _finished_badly(cluster: harness.Cluster, ids: list[str]) -> bool:
    statuses = cluster.statuses(ids)
    return sum(n for s, n in statuses.items() if s not in ("COMPLETED", "QUEUED", "EXECUTING")) > 0


def _delay(policy, attempt: int) -> float:
    """DECISIONS.md: delay before attempt n+1 = min(max_delay, min_delay * factor**(n-1))."""
    return min(policy.max_delay, policy.min_delay * policy.factor ** (attempt - 1))


def test_retry_policies_honoured_under_faults(make_cluster):
    """Deterministic failures retried with the task's backoff while workers are killed: a task
    failing N times then succeeding takes N+1 attempts (plus one per attempt lost to a kill),
    every retry waits at least the backoff; max_attempts=2 always failing ends FAILED after 2
    attempts (CRASHED if the last one was lost)."""
    started = time.monotonic()
    cluster = make_cluster("fault_tasks")
    rnd = random.Random(77)
    workers = [cluster.start_worker(concurrency=8) for _ in range(3)]
    cluster.wait_ready(workers)
    flaky_items = [{"n": i, "fail_times": i % 5, "ms": rnd.randint(50, 250)} for i in range(60)]
    fail_items = [{"n": i, "ms": rnd.randint(50, 250)} for i in range(20)]
    flaky = dict(zip([h.id for h in fault_tasks.flaky.batch_trigger(flaky_items)], flaky_items, strict=True))
    failing = dict(zip([h.id for h in fault_tasks.always_fail.batch_trigger(fail_items)], fail_items, strict=True))
    ids = [*flaky, *failing]

    for _ in range(5):
        time.sleep(rnd.uniform(0.3, 0.7))  # the kill schedule
        victim, _ = busy_victim(cluster, rnd)
        cluster.kill9(victim)
        cluster.start_worker(concurrency=8)
    final = {"COMPLETED", "FAILED", "CRASHED"}
    wait_until(
        lambda: sum(n for s, n in cluster.statuses(ids).items() if s in final) == len(ids),
        timeout=60,
        what="every run to reach a final status",
        interval=0.1,
    )

    rows = cluster.sql(
        "SELECT id, status, output, error, attempt_count, max_attempts FROM runs "
        "WHERE id IN (SELECT value FROM json_each(?))",
        [json.dumps(ids)],
    )
    runs = {r[0]: r for r in rows}
    attempts = attempts_by_run(cluster, ids)
    events = status_events(cluster, ids)
    ends: dict[tuple[str, int], float] = {}
    starts: dict[tuple[str, int], int] = {}
    for rec in cluster.executions():
        key = (rec["run"], rec["attempt"])
        if rec["k"] == "E":
            ends[key] = rec["t"]
        else:
            starts[key] = starts.get(key, 0) + 1
    effects = cluster.effects()
    problems: list[str] = []
    exact = lost_total = 0
    lateness: list[float] = []

    def check_backoff(run_id: str, policy, runs_attempts: list[harness.Attempt]) -> None:
        for prev, nxt in zip(runs_attempts, runs_attempts[1:], strict=False):
            # A failure is reported after the task's end record; a lost attempt when recovered.
            failed_at = ends.get((run_id, prev.number)) if prev.status == "FAILED" else prev.finished_at
            if failed_at is None:
                problems.append(f"{run_id}: attempt {prev.number} {prev.status} without a failure time")
                continue
            waited, due = nxt.started_at - failed_at, _delay(policy, prev.number)
            lateness.append(waited - due)
            if waited < due - 0.002:
                problems.append(
                    f"{run_id}: attempt {nxt.number} started {waited:.3f} s after attempt {prev.number} "
                    f"{prev.status}; the backoff is {due:.3f} s"
                )

    for run_id, item in flaky.items():
        _, status, output, _, count, _ = runs[run_id]
        n_fail = item["fail_times"]
        runs_attempts = attempts[run_id]
        numbers = [a.number for a in runs_attempts]
        if status != "COMPLETED" or json.loads(output) != fault_tasks.expected_output(item["n"]):
            problems.append(f"{run_id}: {status} {output}")
        if numbers != list(range(1, count + 1)) or runs_attempts[-1].status != "COMPLETED":
            problems.append(f"{run_id}: attempts {[(a.number, a.status) for a in runs_attempts]}, count {count}")
            continue
        lost_late = 0
        for a in runs_attempts[:-1]:
            if a.status == "WORKER_LOST":
                lost_total += 1
                lost_late += a.number > n_fail
            elif a.number > n_fail or a.status != "FAILED":
                problems.append(f"{run_id}: attempt {a.number} is {a.status} (fails {n_fail} times)")
            elif f"planned failure of attempt {a.number}" not in (a.error or {}).get("message", ""):
                problems.append(f"{run_id}: attempt {a.number} error {a.error}")
        if count != n_fail + 1 + lost_late:
            problems.append(f"{run_id}: {count} attempts for {n_fail} failures and {lost_late} late losses")
        exact += count == n_fail + 1 and lost_late == 0
        completed = [e for e in events[run_id] if e[2].get("status") == "COMPLETED"]
        if len(completed) != 1:
            problems.append(f"{run_id}: {len(completed)} COMPLETED events")
        if effects.get(run_id, (None,))[0] != fault_tasks.expected_output(item["n"]):
            problems.append(f"{run_id}: side effect {effects.get(run_id)}")
        check_backoff(run_id, fault_tasks.FLAKY, runs_attempts)

    final_counts = {"FAILED": 0, "CRASHED": 0}
    for run_id in failing:
        _, status, _, error, count, max_attempts = runs[run_id]
        runs_attempts = attempts[run_id]
        statuses = [a.status for a in runs_attempts]
        if count != 2 or max_attempts != 2 or [a.number for a in runs_attempts] != [1, 2]:
            problems.append(f"{run_id}: {count}/{max_attempts} attempts {statuses}")
            continue
        lost_total += statuses.count("WORKER_LOST")
        error = json.loads(error or "null") or {}
        if statuses[1] == "FAILED":
            ok = status == "FAILED" and "always fails (attempt 2)" in error.get("message", "")
        else:
            ok = statuses[1] == "WORKER_LOST" and status == "CRASHED" and error.get("code") == "WORKER_LOST"
        if not ok or statuses[0] not in ("FAILED", "WORKER_LOST"):
            problems.append(f"{run_id}: ended {status} {error} after attempts {statuses}")
        final_counts[status] = final_counts.get(status, 0) + 1
        finals = [e for e in events[run_id] if e[2].get("status") in ("FAILED", "CRASHED", "COMPLETED")]
        if len(finals) != 1:
            problems.append(f"{run_id}: final status events {finals}")
        if run_id in effects:
            problems.append(f"{run_id}: a failing run wrote a side effect")
        check_backoff(run_id, fault_tasks.TWICE, runs_attempts)

    for (run_id, number), n in starts.items():
        if n > 1:
            problems.append(f"{run_id}: attempt {number} executed {n} times")
    assert not problems, "\n".join(problems[:40])
    assert lost_total >= 1, "no attempt was lost: the kills missed every run"
    assert final_counts["FAILED"] >= 1, final_counts
    cluster.check_logs()
    print(
        f"\nretries under faults: {len(flaky)} flaky runs COMPLETED ({exact} with exactly N+1 attempts, the rest "
        f"also lost attempts), {len(failing)} max_attempts=2 runs ended {final_counts}, {lost_total} WORKER_LOST "
        f"attempts, {len(lateness)} backoffs honoured (start after the due time by {min(lateness):.3f}.."
        f"{max(lateness):.3f} s), {len(cluster.killed)} kills, {time.monotonic() - started:.1f} s"
    )


def test_lease_loss_without_attempts_left_crashes(make_cluster):
    """A worker killed mid-run: the run with no attempts left ends CRASHED (WORKER_LOST), once
    its lease has expired and not before; the run with one attempt left is retried after its
    backoff by another worker and completes."""
    cluster = make_cluster("fault_tasks")
    first = cluster.start_worker(concurrency=4)
    cluster.wait_ready([first])
    last_chance = fault_tasks.crashy.trigger({"n": 1}, max_attempts=1).id
    second_chance = fault_tasks.crashy.trigger({"n": 2}).id  # CRASHY: max_attempts=2
    wait_until(
        lambda: {last_chance, second_chance} <= {r["run"] for r in cluster.open_executions().get(first.pid, [])},
        timeout=15,
        what="both runs executing on the first worker",
    )
    other = cluster.start_worker(concurrency=4)
    cluster.wait_ready([other])
    killed_at = time.time()
    cluster.kill9(first)

    wait_until(
        lambda: (
            cluster.statuses([last_chance]) == {"CRASHED": 1} and cluster.statuses([second_chance]) == {"COMPLETED": 1}
        ),
        timeout=15,
        what="CRASHED and COMPLETED",
    )
    run = conveyor.runs.retrieve(last_chance)
    run_attempts = conveyor.runs.attempts(last_chance)
    assert run.status.value == "CRASHED" and run.attempts == 1 and run.max_attempts == 1
    assert run.error["code"] == "WORKER_LOST", run.error
    assert [(a.number, a.status) for a in run_attempts] == [(1, "WORKER_LOST")]
    # The lease (2 s) was renewed at most 0.5 s before the kill: it cannot expire sooner.
    after = run.finished_at - killed_at
    assert LEASE - 0.5 - 0.1 <= after <= LEASE + 3.0, f"CRASHED {after:.2f} s after the kill"
    statuses = [e.data.get("status") for e in conveyor.runs.events(last_chance) if e.kind == "status"]
    assert statuses == ["QUEUED", "EXECUTING", "CRASHED"], statuses

    retried = conveyor.runs.retrieve(second_chance)
    retried_attempts = conveyor.runs.attempts(second_chance)
    assert retried.output == fault_tasks.expected_output(2) and retried.attempts == 2
    assert [(a.number, a.status) for a in retried_attempts] == [(1, "WORKER_LOST"), (2, "COMPLETED")]
    waited = retried_attempts[1].started_at - retried_attempts[0].finished_at
    assert waited >= _delay(fault_tasks.CRASHY, 1) - 0.002, f"retried {waited:.3f} s after the loss"
    pids = cluster.worker_pids()
    assert pids[retried_attempts[0].worker_id] == first.pid and pids[retried_attempts[1].worker_id] == other.pid
    by_attempt = {(r["run"], r["attempt"]): r["pid"] for r in cluster.executions() if r["k"] == "S"}
    assert by_attempt == {(last_chance, 1): first.pid, (second_chance, 1): first.pid, (second_chance, 2): other.pid}
    cluster.check_logs()
    print(
        f"\nlease loss: CRASHED {after:.2f} s after kill -9 (lease {LEASE:g} s), the other run retried "
        f"{waited:.2f} s after its loss and COMPLETED on the other worker"
    )


def test_kill9_stops_sync_code_of_the_killed_worker(make_cluster):
    """A sync run executes in a pool child of the worker. When the worker is kill -9-ed, the
    child's code must stop at once, not run on beside the re-execution that another worker
    starts once the lease expires (two executions of one run at once, a concurrency key
    overlapping itself)."""
    cluster = make_cluster("fault_tasks")
    first = cluster.start_worker(concurrency=4)
    cluster.wait_ready([first])
    run_id = fault_tasks.hang_sync.trigger({"n": 5}).id

    def started(attempt: int) -> dict | None:
        return next(
            (r for r in cluster.executions() if r["run"] == run_id and r["attempt"] == attempt and r["k"] == "S"),
            None,
        )

    child = wait_until(lambda: started(1), timeout=20, what="the sync run to start")["pid"]
    assert child != first.pid and harness.alive(child)
    other = cluster.start_worker(concurrency=4)
    cluster.wait_ready([other])
    killed_at = time.monotonic()
    cluster.kill9(first)
    wait_until(lambda: not harness.alive(child), timeout=LEASE + 5, what="the killed worker's pool child to stop")
    stopped_after = time.monotonic() - killed_at
    wait_until(lambda: cluster.statuses([run_id]) == {"COMPLETED": 1}, timeout=15, what="the run to complete")
    assert stopped_after < LEASE / 2, f"the killed worker's code ran on for {stopped_after:.2f} s (lease {LEASE:g} s)"
    attempts = conveyor.runs.attempts(run_id)
    assert [(a.number, a.status) for a in attempts] == [(1, "WORKER_LOST"), (2, "COMPLETED")]
    ends = [r for r in cluster.executions() if r["run"] == run_id and r["k"] == "E"]
    assert [r["attempt"] for r in ends] == [2], "the first execution must not have gone on to its end"
    assert other.pid in started(2)["ancestors"]
    cluster.check_logs()
    print(f"\nkill -9 and sync code: the pool child stopped {stopped_after * 1000:.0f} ms after its worker was killed")


def test_stale_worker_cannot_settle_runs_it_lost(make_cluster):
    """A worker frozen (SIGSTOP) past its lease while running: another worker recovers and
    completes its runs. When the frozen worker wakes up (SIGCONT) it cannot settle them: each
    run stays COMPLETED once, with the second attempt's output, and the worker goes on. The
    sync runs' pool children are not frozen: they finish while their worker is, so the woken
    worker holds stale outcomes that it must drop or the store must refuse."""
    cluster = make_cluster("fault_tasks")
    frozen = cluster.start_worker(concurrency=6)
    cluster.wait_ready([frozen])
    ids = [fault_tasks.stale.trigger({"n": n, "ms": 3000}).id for n in range(4)]
    ids += [fault_tasks.stale_sync.trigger({"n": n, "ms": 500}).id for n in range(4, 6)]
    wait_until(
        lambda: set(ids) <= {r["run"] for r in cluster.executions() if r["k"] == "S"},
        timeout=15,
        what="the runs to execute on the first worker",
    )
    other = cluster.start_worker(concurrency=4)
    cluster.wait_ready([other])
    frozen.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: cluster.statuses(ids) == {"COMPLETED": 6}, timeout=20, what="the other worker to finish")
    finally:
        frozen.proc.send_signal(signal.SIGCONT)

    def told(run_id: str) -> bool:  # the woken worker saw that it lost the run
        return any(run_id in line for line in cluster.log_lines("outcome refused", "lease lost"))

    wait_until(lambda: all(told(run_id) for run_id in ids), timeout=15, what="the woken worker to notice")
    # It still works: with the other worker gone, it runs a new run.
    other.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: other.proc.poll() is not None, timeout=15, what="the other worker to stop")
    cluster.workers.remove(other)
    canary = fault_tasks.stale.trigger({"n": 99, "ms": 1}).id
    wait_until(lambda: cluster.statuses([canary]) == {"COMPLETED": 1}, timeout=15, what="the woken worker to run")

    effects = cluster.effects()
    for n, run_id in enumerate(ids):
        run = conveyor.runs.retrieve(run_id)
        assert run.status.value == "COMPLETED" and run.output == {"n": n, "attempt": 2}, run.output
        assert [(a.number, a.status) for a in conveyor.runs.attempts(run_id)] == [(1, "WORKER_LOST"), (2, "COMPLETED")]
        statuses = [e.data.get("status") for e in conveyor.runs.events(run_id) if e.kind == "status"]
        assert statuses.count("COMPLETED") == 1 and statuses[-1] == "COMPLETED", statuses
        # The effect is keyed by run id: the first writer wins (a sync child of the frozen worker
        # may have written it before the other worker re-ran the run).
        assert effects[run_id][0] in ({"n": n, "attempt": 2}, {"n": n, "attempt": 1})
    # The woken worker either learns of the loss from its next renewal first and drops the
    # outcomes itself ("lease lost"), or submits them and the store refuses them (a race).
    refused, dropped = len(cluster.log_lines("outcome refused")), len(cluster.log_lines("lease lost"))
    cluster.check_logs(allow=("leases not renewed",))
    print(
        f"\nstale worker: {len(ids)} runs recovered and completed by another worker while one was frozen; "
        f"its late results were dropped ({dropped} on its next renewal) or refused by the store ({refused}), "
        f"and it then ran a new run"
    )


def test_sigterm_hands_back_unfinished_runs(make_cluster):
    """SIGTERM with a short grace: runs that finish within it complete; the others (async and
    sync) are handed back QUEUED with no attempt spent, and another worker takes them at once."""
    cluster = make_cluster("fault_tasks")
    grace = 1.5
    leaving = cluster.start_worker(concurrency=8, grace=grace)
    cluster.wait_ready([leaving])
    long_runs = [fault_tasks.slow.trigger({"n": i, "first_s": 60}).id for i in range(3)]
    long_runs += [fault_tasks.slow_sync.trigger({"n": 10 + i, "first_s": 60}).id for i in range(2)]
    # These finish 0.3 s after the SIGTERM, within the grace.
    term_sent = str(cluster.dir / "term-sent")
    short_runs = [fault_tasks.slow.trigger({"n": 20 + i, "until": term_sent, "then_s": 0.3}).id for i in range(2)]
    everything = long_runs + short_runs
    wait_until(
        lambda: set(everything) <= {r["run"] for r in cluster.executions() if r["k"] == "S"},
        timeout=20,
        what="every run executing on the first worker",
    )
    staying = cluster.start_worker(concurrency=8)
    cluster.wait_ready([staying])
    assert cluster.statuses(everything) == {"EXECUTING": len(everything)}

    term_at = time.time()
    leaving.proc.send_signal(signal.SIGTERM)
    open(term_sent, "w").close()
    wait_until(lambda: leaving.proc.poll() is not None, timeout=grace + 10, what="the worker to exit")
    exited_after = time.time() - term_at
    assert leaving.proc.returncode == 0, harness.tail(leaving.log)
    cluster.workers.remove(leaving)
    wait_until(
        lambda: cluster.statuses(everything) == {"COMPLETED": len(everything)},
        timeout=20,
        what="every run to complete",
    )

    by_run: dict[str, list[dict]] = {}
    for rec in cluster.executions():
        if rec["k"] == "S":
            by_run.setdefault(rec["run"], []).append(rec)

    def on(rec: dict, worker: harness.Worker) -> bool:
        return worker.pid == rec["pid"] or worker.pid in rec["ancestors"]

    handovers = []
    for run_id in short_runs:
        run = conveyor.runs.retrieve(run_id)
        assert run.attempts == 1 and [a.status for a in conveyor.runs.attempts(run_id)] == ["COMPLETED"]
        assert len(by_run[run_id]) == 1 and on(by_run[run_id][0], leaving), by_run[run_id]
    for run_id in long_runs:
        run = conveyor.runs.retrieve(run_id)
        assert run.output == fault_tasks.expected_output(run.payload["n"])
        run_attempts = conveyor.runs.attempts(run_id)
        assert run.attempts == 1 and [(a.number, a.status) for a in run_attempts] == [(1, "COMPLETED")], run_attempts
        executions = by_run[run_id]
        assert [r["attempt"] for r in executions] == [1, 1], executions
        assert on(executions[0], leaving) and on(executions[1], staying), executions
        events = [e for e in conveyor.runs.events(run_id) if e.kind == "status"]
        assert [e.data["status"] for e in events] == ["QUEUED", "EXECUTING", "QUEUED", "EXECUTING", "COMPLETED"]
        released, taken = events[2].created_at, events[3].created_at
        # Handed back when the grace ran out (not before), and taken by the other worker at once.
        assert term_at + grace - 0.05 <= released <= term_at + grace + 1.5, released - term_at
        assert taken - released < 1.0, f"taken {taken - released:.2f} s after the hand-back"
        handovers.append(taken - released)
    effects = cluster.effects()
    assert {k: v[0] for k, v in effects.items()} == {
        run_id: fault_tasks.expected_output(conveyor.runs.retrieve(run_id).payload["n"]) for run_id in everything
    }
    cluster.check_logs()
    print(
        f"\nSIGTERM: {len(short_runs)} runs finished within the {grace:g} s grace, {len(long_runs)} handed back "
        f"(no attempt spent) and taken over {min(handovers) * 1000:.0f}..{max(handovers) * 1000:.0f} ms later; "
        f"the worker exited 0 after {exited_after:.2f} s"
    )
