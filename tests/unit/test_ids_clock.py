import threading

from conveyor.core.clock import FakeClock, SystemClock
from conveyor.core.ids import id_time, new_id


def test_ids_sort_by_creation_and_are_unique():
    ids = [new_id("run") for _ in range(10_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("run_") and len(i) == 32 for i in ids)


def test_ids_are_unique_across_threads():
    out: list[str] = []

    def make():
        out.extend(new_id("run") for _ in range(2000))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(out)) == len(out)


def test_id_time_round_trips():
    assert abs(id_time(new_id("run", now_ms=1_800_000_000_123)) - 1_800_000_000.123) < 1e-6


def test_fake_clock_moves_only_when_told():
    c = FakeClock(100.0)
    assert c.now() == 100.0
    c.advance(2.5)
    assert c.now() == 102.5
    c.set(5.0)
    assert c.now() == 5.0
    assert not c.is_real() and SystemClock().is_real()
