"""Balance efficiency: the figure the benchmark's efficiency targets are read from."""
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dbs_hvd.train.metrics import balance_efficiency


def test_balanced_ranks_without_waiting_are_fully_efficient():
    assert balance_efficiency([100, 25], [1.0, 1.0], [1.0, 1.0]) == pytest.approx(1.0)


def test_imbalance_is_charged():
    # Rank 1 computes for 2 s, rank 0 for 1 s then waits 1 s: the ideal split of
    # the same work at the same speeds takes 4/3 s, the epoch took 2 s.
    efficiency = balance_efficiency([100, 100], [1.0, 2.0], [2.0, 2.0])
    assert efficiency == pytest.approx((200 / (100 + 50)) / 2.0)


def test_waiting_for_a_late_starter_is_not_imbalance():
    """Rank 0 finished evaluating first and waited 0.3 s in the first allreduce for
    rank 1 to begin the epoch: its wall is 1.3 s but the epoch trained for 1.0 s."""
    assert balance_efficiency([64, 64], [1.0, 1.0], [1.3, 1.0]) == pytest.approx(1.0)


def test_nothing_measured_is_nan():
    assert math.isnan(balance_efficiency([10, 0], [1.0, 0.0], [1.0, 1.0]))


@given(st.lists(st.tuples(st.integers(1, 500), st.floats(0.01, 10.0), st.floats(0.0, 5.0)),
                min_size=1, max_size=16))
def test_at_most_one_when_walls_hold_compute(ranks):
    """Every rank trained for the whole epoch (wall = that epoch), so no split beats it."""
    samples = [s for s, _, _ in ranks]
    compute = [c for _, c, _ in ranks]
    epoch = max(compute) + max(w for _, _, w in ranks)
    assert balance_efficiency(samples, compute, [epoch] * len(ranks)) <= 1.0 + 1e-9
