import pytest
from hypothesis import given
from hypothesis import strategies as st

from conveyor.core.backoff import RetryPolicy
from conveyor.core.errors import InvalidOptions

policies = st.builds(
    RetryPolicy,
    max_attempts=st.integers(1, 100),
    factor=st.floats(1, 10),
    min_delay=st.floats(0, 100),
    max_delay=st.floats(100, 10_000),
    randomize=st.booleans(),
)


def test_defaults_match_trigger_dev():
    p = RetryPolicy()
    assert (p.max_attempts, p.factor, p.min_delay, p.max_delay, p.randomize) == (3, 2.0, 1.0, 60.0, True)


def test_exact_sequence_without_randomness():
    p = RetryPolicy(max_attempts=10, factor=2, min_delay=1, max_delay=10, randomize=False)
    assert [p.delay_after(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


@given(policies, st.integers(1, 5000), st.floats(0, 0.999999))
def test_delay_is_within_bounds(policy, attempt, u):
    try:
        base = min(policy.max_delay, policy.min_delay * policy.factor ** (attempt - 1))
    except OverflowError:
        base = policy.max_delay if policy.min_delay else 0.0
    delay = policy.delay_after(attempt, rand=u)
    if policy.randomize:
        # <= 2 * base: base * (1 + u) can round up to it (a subnormal base, say).
        assert base <= delay <= 2 * base
    else:
        assert delay == base
    assert delay <= 2 * policy.max_delay


@given(policies, st.integers(1, 60))
def test_delay_never_shrinks_with_attempts(policy, attempt):
    assert policy.delay_after(attempt + 1, rand=0.5) >= policy.delay_after(attempt, rand=0.5)


@pytest.mark.parametrize(
    "kwargs", [{"max_attempts": 0}, {"factor": 0.5}, {"min_delay": -1}, {"min_delay": 5, "max_delay": 1}]
)
def test_invalid_policies_are_refused(kwargs):
    with pytest.raises(InvalidOptions):
        RetryPolicy(**kwargs)


def test_round_trip():
    p = RetryPolicy(max_attempts=5, factor=3, min_delay=0.5, max_delay=9, randomize=False)
    assert RetryPolicy.from_dict(p.to_dict()) == p
