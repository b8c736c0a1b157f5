from hypothesis import given
from hypothesis import strategies as st

from conveyor.core.status import FINISHED, TRANSITIONS, UNFINISHED, RunStatus, can_transition, sources_of

statuses = st.sampled_from(list(RunStatus))


@given(statuses, statuses)
def test_finished_statuses_are_final(source, target):
    if source in FINISHED:
        assert not can_transition(source, target)


@given(statuses)
def test_no_status_moves_to_itself_except_retry_free(status):
    assert not can_transition(status, status)


@given(statuses, statuses)
def test_sources_of_agrees_with_table(source, target):
    assert (source in sources_of(target)) == can_transition(source, target)


def test_every_unfinished_status_can_be_canceled():
    for status in UNFINISHED:
        assert can_transition(status, RunStatus.CANCELED), status


def test_only_executing_completes():
    assert sources_of(RunStatus.COMPLETED) == {RunStatus.EXECUTING}
    assert sources_of(RunStatus.EXECUTING) == {RunStatus.QUEUED}


def test_every_status_is_reachable_from_a_trigger():
    reachable, frontier = set(), [RunStatus.QUEUED, RunStatus.DELAYED]
    while frontier:
        status = frontier.pop()
        if status not in reachable:
            reachable.add(status)
            frontier.extend(TRANSITIONS[status])
    assert reachable == set(RunStatus)
