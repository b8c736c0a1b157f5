"""The per-run event log: stream chunks numbered with status and metadata events, fenced by
the lease; reads after a seq; the tag read that subscribe_tag polls."""

from conveyor.core.records import MetadataOp, StreamChunk


def chunk(c, data, key="tokens", ts=100.0):
    return StreamChunk(c.id, c.lease_token, c.attempt, key, data, ts)


def log(h, run_id, after=0):
    return [(e.seq, e.kind, e.data) for e in h.engine.events(run_id, after)]


def test_chunks_take_the_next_seqs_interleaved_with_metadata(h, clock):
    t = h.task("t")
    run = h.trigger(t)
    c = h.claim(t)[0]
    clock.advance(5)
    with h.engine.store.transaction() as tx:
        assert tx.metadata_apply(run, [MetadataOp("set", "stage", "a")], c.lease_token) == {"stage": "a"}
        assert tx.stream_append_many([chunk(c, '"x"'), chunk(c, '{"n":1,"l":[1,2]}')]) == [True, True]
        tx.metadata_apply(run, [MetadataOp("increment", "n", 2)], c.lease_token)
        assert tx.stream_append_many([chunk(c, "null", key="other", ts=101.5)]) == [True]
    assert h.complete(c) == [True]
    assert log(h, run) == [
        (1, "status", {"status": "QUEUED"}),
        (2, "status", {"status": "EXECUTING"}),
        (3, "metadata", {"op": "set", "key": "stage", "value": "a"}),
        (4, "stream", {"key": "tokens", "chunk": "x"}),
        (5, "stream", {"key": "tokens", "chunk": {"n": 1, "l": [1, 2]}}),
        (6, "metadata", {"op": "increment", "key": "n", "value": 2}),
        (7, "stream", {"key": "other", "chunk": None}),
        (8, "status", {"status": "COMPLETED"}),
    ]
    events = h.engine.events(run)
    assert [e.attempt for e in events[3:5]] == [1, 1]
    assert (events[3].created_at, events[6].created_at) == (100.0, 101.5)  # when the code produced them


def test_a_stream_append_bumps_the_run_s_updated_at(h, clock):
    t = h.task("t")
    run = h.trigger(t)
    c = h.claim(t)[0]
    clock.advance(7)
    with h.engine.store.transaction() as tx:
        tx.stream_append_many([chunk(c, "1")])
    assert h.engine.retrieve(run).updated_at == clock.now()


def test_chunks_of_several_runs_in_one_call_keep_each_run_s_order(h):
    t = h.task("t")
    a, b = h.trigger(t), h.trigger(t)
    ca, cb = sorted(h.claim(t), key=lambda c: c.id == b)
    batch = [chunk(ca, "1"), chunk(cb, "10"), chunk(ca, "2"), chunk(cb, "20"), chunk(ca, "3")]
    with h.engine.store.transaction() as tx:
        assert tx.stream_append_many(batch) == [True] * 5
        assert tx.stream_append_many([]) == []
    assert [(s, d["chunk"]) for s, k, d in log(h, a) if k == "stream"] == [(3, 1), (4, 2), (5, 3)]
    assert [(s, d["chunk"]) for s, k, d in log(h, b) if k == "stream"] == [(3, 10), (4, 20)]


def test_chunks_are_refused_without_the_lease_and_nothing_is_written(h):
    t = h.task("t")
    run, other = h.trigger(t), h.trigger(t)
    claimed = {c.id: c for c in h.claim(t)}
    c, d = claimed[run], claimed[other]
    wrong = StreamChunk(run, "not-the-token", 1, "tokens", "1", 1.0)
    with h.engine.store.transaction() as tx:
        assert tx.stream_append_many([wrong, chunk(d, "2"), wrong]) == [False, True, False]
    assert [k for _, k, _ in log(h, run)] == ["status", "status"]
    with h.engine.store.transaction() as tx:  # the refused chunks took no seq
        assert tx.stream_append_many([chunk(c, '"ok"')]) == [True]
    h.complete(c)
    before = log(h, run)
    assert [(s, k) for s, k, _ in before] == [(1, "status"), (2, "status"), (3, "stream"), (4, "status")]
    with h.engine.store.transaction() as tx:  # finished: no more chunks, even with its last token
        assert tx.stream_append_many([chunk(c, "3")]) == [False]
    assert log(h, run) == before


def test_a_stale_lease_cannot_stream_after_the_run_was_claimed_again(h, clock):
    t = h.task("t", retry={"max_attempts": 3, "min_delay": 0, "max_delay": 0, "randomize": False})
    run = h.trigger(t)
    stale = h.claim(t, lease=2)[0]
    clock.advance(3)
    h.engine.maintain()  # lease expired: back to QUEUED
    fresh = h.claim(t)[0]
    with h.engine.store.transaction() as tx:
        assert tx.stream_append_many([chunk(stale, '"old"'), chunk(fresh, '"new"')]) == [False, True]
    streamed = [e for e in h.engine.events(run) if e.kind == "stream"]
    assert [(e.data["chunk"], e.attempt) for e in streamed] == [("new", 2)]


def test_event_list_after_a_seq(h):
    t = h.task("t")
    run = h.trigger(t)
    c = h.claim(t)[0]
    with h.engine.store.transaction() as tx:
        tx.stream_append_many([chunk(c, str(i)) for i in range(5)])
    assert [s for s, _, _ in log(h, run)] == [1, 2, 3, 4, 5, 6, 7]
    assert [s for s, _, _ in log(h, run, after=1)] == [2, 3, 4, 5, 6, 7]  # no derived first event
    assert [d["chunk"] for _, _, d in log(h, run, after=4)] == [2, 3, 4]
    assert log(h, run, after=7) == []
    with h.engine.store.read() as tx:
        assert [e.seq for e in tx.event_list(run, 0, limit=3)] == [1, 2, 3]
        assert [e.seq for e in tx.event_list(run, 3, limit=2)] == [4, 5]


def test_the_tag_read_windows_by_run_id_and_follows_runs_by_id(h):
    t = h.task("t")
    old_done = h.trigger(t, tags=["user:1"])
    old_running = h.trigger(t, tags=["user:1", "x"])
    recent = h.trigger(t, tags=["user:1"])
    untagged = h.trigger(t)
    other_tag = h.trigger(t, tags=["user:2"])
    claimed = {c.id: c for c in h.claim(t)}
    h.complete(claimed[old_done])
    h.complete(claimed[untagged])
    with h.engine.store.transaction() as tx:
        tx.stream_append_many([chunk(claimed[old_running], "1"), chunk(claimed[old_running], "2")])
    with h.engine.store.read() as tx:
        everything = tx.run_tag_seqs("dev", "user:1")
        window = tx.run_tag_seqs("dev", "user:1", recent)
        at_start = tx.run_tag_seqs("dev", "user:1", recent, unfinished=True)
        followed = tx.run_tag_seqs("dev", "user:1", recent, [old_done, other_tag, "run_nope"])
        elsewhere = tx.run_tag_seqs("prod", "user:1")
        beyond = tx.run_tag_seqs("dev", "user:1", "run_ffffffffffff")
    assert everything == sorted([(old_done, 3, "COMPLETED"), (old_running, 4, "EXECUTING"), (recent, 2, "EXECUTING")])
    assert window == [(recent, 2, "EXECUTING")]
    assert at_start == sorted([(old_running, 4, "EXECUTING"), (recent, 2, "EXECUTING")])
    # Followed runs are read by id, whatever their tags (the subscriber only follows its own).
    assert followed == sorted([(old_done, 3, "COMPLETED"), (recent, 2, "EXECUTING"), (other_tag, 2, "EXECUTING")])
    assert elsewhere == [] and beyond == []
