"""plan.py: the invariants of every plan, by example and by property (hypothesis)."""
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from dbs_hvd.plan import (
    Bounds, Plan, PlanError, ProportionalPolicy, StaticPolicy, WindowStats, apportion,
)
from dbs_hvd.policies import make_policy


def stats(samples, seconds):
    return WindowStats(np.array(samples, float), np.array(seconds, float),
                       np.ones(len(samples)))


@st.composite
def weights_batch_bounds(draw):
    n = draw(st.integers(1, 64))
    weights = np.array(draw(st.lists(st.floats(1e-3, 1e3), min_size=n, max_size=n)))
    global_batch = draw(st.integers(n, 4096))
    min_batch = draw(st.integers(1, global_batch // n))
    max_batch = draw(st.one_of(st.none(), st.integers(math.ceil(global_batch / n), global_batch)))
    assume(max_batch is None or max_batch >= min_batch)
    return weights, global_batch, Bounds(min_batch, max_batch)


@settings(max_examples=300, deadline=None)
@given(weights_batch_bounds())
def test_apportion_sums_to_global_batch_within_bounds(case):
    weights, global_batch, bounds = case
    sizes = apportion(weights, global_batch, bounds)
    assert sizes.sum() == global_batch
    assert sizes.min() >= bounds.min_batch
    assert sizes.max() <= bounds.upper(global_batch)


@settings(max_examples=300, deadline=None)
@given(weights_batch_bounds())
def test_apportion_is_monotone_in_speed(case):
    weights, global_batch, bounds = case
    sizes = apportion(weights, global_batch, bounds)
    order = np.argsort(weights, kind="stable")
    for slower, faster in zip(order, order[1:]):
        if weights[faster] > weights[slower]:
            assert sizes[faster] >= sizes[slower]


@settings(max_examples=200, deadline=None)
@given(weights_batch_bounds())
def test_apportion_rounds_within_one_of_the_unbounded_share(case):
    weights, global_batch, _ = case
    sizes = apportion(weights, global_batch, Bounds(1, None))
    exact = global_batch * weights / weights.sum()
    # Clamping to min 1 may move small shares up; everything else is within 1.
    unclamped = exact >= 1
    if unclamped.all():
        assert np.all(np.abs(sizes - exact) < 1 + 1e-9)


def test_proportional_policy_matches_speed_ratio():
    policy = ProportionalPolicy(100)
    plan = policy.next_plan(stats([50, 50], [1.0, 3.0]), Plan((50, 50)))
    assert plan.batch_sizes == (75, 25)


def test_min_batch_floor_holds_for_a_very_slow_rank():
    policy = ProportionalPolicy(64, Bounds(min_batch=4))
    plan = policy.next_plan(stats([32, 32], [1.0, 1e6]), Plan((32, 32)))
    assert plan.batch_sizes == (60, 4)


def test_max_batch_cap_moves_the_rest_to_the_others():
    policy = ProportionalPolicy(90, Bounds(1, 40))
    plan = policy.next_plan(stats([30, 30, 30], [1.0, 10.0, 10.0]), Plan((30, 30, 30)))
    assert plan.batch_sizes == (40, 25, 25)


def test_equal_split_and_static_policy():
    assert Plan.equal(10, 3).batch_sizes == (4, 3, 3)
    policy = StaticPolicy(10)
    assert policy.next_plan(stats([4, 3, 3], [1, 9, 9]), Plan((4, 3, 3))).batch_sizes == (4, 3, 3)
    # A plan given at the start (dbs-train --plan) is kept as well.
    assert policy.next_plan(stats([8, 1, 1], [1, 9, 9]), Plan((8, 1, 1))).batch_sizes == (8, 1, 1)


def test_single_rank_gets_the_whole_batch():
    assert ProportionalPolicy(32).next_plan(stats([32], [2.0]), Plan((32,))).batch_sizes == (32,)


def test_plan_offsets_and_weights():
    plan = Plan((5, 17, 42))
    assert [plan.offset(r) for r in range(3)] == [0, 5, 22]
    assert plan.weight(1) == pytest.approx(17 / 64)
    np.testing.assert_allclose(plan.shares.sum(), 1.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_timing_is_rejected_naming_the_rank(bad):
    with pytest.raises(PlanError, match=r"rank 1 reported compute time"):
        ProportionalPolicy(64).next_plan(stats([32, 32], [1.0, bad]), Plan((32, 32)))


@pytest.mark.parametrize("global_batch, n, bounds, message", [
    (2, 4, Bounds(), "smaller than the world size"),
    (0, 1, Bounds(), "positive integer"),
    (-8, 2, Bounds(), "positive integer"),
    (16, 4, Bounds(min_batch=5), "exceeds the global batch"),
    (64, 4, Bounds(1, 10), "is below the global batch"),
    (64, 2, Bounds(0), "at least 1"),
])
def test_impossible_configurations_raise_clear_errors(global_batch, n, bounds, message):
    with pytest.raises(PlanError, match=message):
        Plan.equal(global_batch, n, bounds)


def test_stats_from_a_different_world_size_are_rejected():
    with pytest.raises(PlanError, match="stats from 3 ranks"):
        ProportionalPolicy(30).next_plan(stats([10, 10, 10], [1, 1, 1]), Plan((15, 15)))


def test_unknown_policy_lists_the_known_ones():
    with pytest.raises(PlanError, match="choose one of"):
        make_policy("fastest", 64)
