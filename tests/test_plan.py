"""plan.py: the invariants of every plan, by example and by property (hypothesis)."""
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from dbs_hvd.plan import (
    Bounds, Plan, PlanError, WindowStats, apportion, equalise_step_times, round_to_total,
    solve_clipped_linear,
)
from dbs_hvd.policies import PaperPolicy, StaticPolicy, make_policy


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
    policy = PaperPolicy(100)
    plan = policy.next_plan(stats([50, 50], [1.0, 3.0]), Plan((50, 50)))
    assert plan.batch_sizes == (75, 25)


def test_min_batch_floor_holds_for_a_very_slow_rank():
    policy = PaperPolicy(64, Bounds(min_batch=4))
    plan = policy.next_plan(stats([32, 32], [1.0, 1e6]), Plan((32, 32)))
    assert plan.batch_sizes == (60, 4)


def test_max_batch_cap_moves_the_rest_to_the_others():
    policy = PaperPolicy(90, Bounds(1, 40))
    plan = policy.next_plan(stats([30, 30, 30], [1.0, 10.0, 10.0]), Plan((30, 30, 30)))
    assert plan.batch_sizes == (40, 25, 25)


def test_equal_split_and_static_policy():
    assert Plan.equal(10, 3).batch_sizes == (4, 3, 3)
    policy = StaticPolicy(10)
    assert policy.next_plan(stats([4, 3, 3], [1, 9, 9]), Plan((4, 3, 3))).batch_sizes == (4, 3, 3)
    # A plan given at the start (dbs-train --plan) is kept as well.
    assert policy.next_plan(stats([8, 1, 1], [1, 9, 9]), Plan((8, 1, 1))).batch_sizes == (8, 1, 1)


def test_single_rank_gets_the_whole_batch():
    assert PaperPolicy(32).next_plan(stats([32], [2.0]), Plan((32,))).batch_sizes == (32,)


def test_plan_offsets_and_weights():
    plan = Plan((5, 17, 42))
    assert [plan.offset(r) for r in range(3)] == [0, 5, 22]
    assert plan.weight(1) == pytest.approx(3 * 17 / 64)
    assert sum(plan.weight(r) for r in range(3)) / 3 == pytest.approx(1.0)
    assert [Plan((16, 16, 16)).weight(r) for r in range(3)] == [1.0, 1.0, 1.0]
    np.testing.assert_allclose(plan.shares.sum(), 1.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_timing_is_rejected_naming_the_rank(bad):
    with pytest.raises(PlanError, match=r"rank 1 reported compute time"):
        PaperPolicy(64).next_plan(stats([32, 32], [1.0, bad]), Plan((32, 32)))


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
        PaperPolicy(30).next_plan(stats([10, 10, 10], [1, 1, 1]), Plan((15, 15)))


def test_unknown_policy_lists_the_known_ones():
    with pytest.raises(PlanError, match="choose one of"):
        make_policy("fastest", 64)


def _bisect_reference(slope, offset, lower, upper, total):
    """The obvious float bisection on the level, as a check on the exact solver."""
    def total_at(level):
        return np.clip(slope * level + offset, lower, upper).sum()

    low, high = -1e12, 1e12
    for _ in range(400):
        mid = 0.5 * (low + high)
        if total_at(mid) < total:
            low = mid
        else:
            high = mid
    return np.clip(slope * high + offset, lower, upper)


@settings(max_examples=300)
@given(data=st.data(), n=st.integers(1, 40))
def test_clipped_linear_solver_matches_bisection_and_hits_the_total(data, n):
    floats = st.floats(0.01, 100.0)
    slope = np.array(data.draw(st.lists(floats, min_size=n, max_size=n)))
    offset = np.array(data.draw(st.lists(st.floats(-500.0, 500.0), min_size=n, max_size=n)))
    lower = np.array(data.draw(st.lists(st.integers(1, 5), min_size=n, max_size=n)), float)
    upper = lower + np.array(data.draw(st.lists(st.integers(0, 300), min_size=n, max_size=n)))
    total = data.draw(st.floats(lower.sum(), upper.sum()))
    sizes = solve_clipped_linear(slope, offset, lower, upper, total)
    assert sizes.sum() == pytest.approx(total, rel=1e-9, abs=1e-6)
    assert np.all(sizes >= lower - 1e-9) and np.all(sizes <= upper + 1e-9)
    np.testing.assert_allclose(sizes, _bisect_reference(slope, offset, lower, upper, total),
                               rtol=1e-6, atol=1e-6)


def test_clipped_linear_solver_rejects_what_it_cannot_solve():
    with pytest.raises(PlanError, match="cannot reach the global batch"):
        solve_clipped_linear(1.0, 0.0, [1, 1], [10, 10], 25)
    with pytest.raises(PlanError, match="positive slopes"):
        solve_clipped_linear([1.0, 0.0], 0.0, 1, 10, 5)


def _greedy_min_max(start, count, overhead, per_sample, limit, add=True):
    """Reference: move ``count`` units one at a time, each to (or from) where the step
    after it is shortest (from where it is longest): exact for costs that grow with b."""
    import heapq

    sizes = np.array(start, dtype=np.int64)
    sign = 1 if add else -1

    def key(rank):
        batch = sizes[rank] + 1 if add else sizes[rank]
        return (sign * (overhead[rank] + per_sample[rank] * batch), rank)

    heap = [key(r) for r in range(len(sizes)) if sign * (limit[r] - sizes[r]) > 0]
    heapq.heapify(heap)
    for _ in range(count):
        _, rank = heapq.heappop(heap)
        sizes[rank] += sign
        if sign * (limit[rank] - sizes[rank]) > 0:
            heapq.heappush(heap, key(rank))
    return sizes


@st.composite
def step_costs_and_bounds(draw):
    n = draw(st.integers(1, 40))
    costs = st.floats(1e-4, 1.0)
    per_sample = np.array(draw(st.lists(costs, min_size=n, max_size=n)))
    overhead = np.array(draw(st.lists(st.floats(0.0, 5.0), min_size=n, max_size=n)))
    low = np.array(draw(st.lists(st.integers(1, 8), min_size=n, max_size=n)))
    high = low + np.array(draw(st.lists(st.integers(0, 200), min_size=n, max_size=n)))
    total = draw(st.integers(int(low.sum()), int(high.sum())))
    return overhead, per_sample, low, high, total


def _longest_step(sizes, overhead, per_sample):
    return float(np.max(overhead + per_sample * sizes))


@settings(max_examples=300, deadline=None)
@given(step_costs_and_bounds())
def test_min_max_rounding_is_optimal_and_never_worse_than_largest_remainder(case):
    overhead, per_sample, low, high, total = case
    targets = solve_clipped_linear(1.0 / per_sample, -overhead / per_sample, low, high, total)
    bounds = Bounds(1, None)
    sizes = round_to_total(targets, total, bounds, low, high, step_cost=(overhead, per_sample))
    assert sizes.sum() == total
    assert np.all(sizes >= low) and np.all(sizes <= high)
    best = _greedy_min_max(low, total - int(low.sum()), overhead, per_sample, high)
    assert _longest_step(sizes, overhead, per_sample) == pytest.approx(
        _longest_step(best, overhead, per_sample), rel=1e-12)
    nearest = round_to_total(targets, total, bounds, low, high)
    assert (_longest_step(sizes, overhead, per_sample)
            <= _longest_step(nearest, overhead, per_sample) * (1 + 1e-12))


def test_min_max_rounding_gives_the_unit_to_the_rank_whose_step_grows_least():
    # Floors 10 and 11 leave one sample over. Largest remainder (0.6 over 0.4)
    # gives it to the slow rank, whose step becomes 1 + 0.1 * 12 = 2.2; min-max
    # gives it to the fast one (1 + 0.01 * 11), and the longest step stays 2.1.
    overhead, per_sample = np.array([1.0, 1.0]), np.array([0.01, 0.1])
    targets = np.array([10.4, 11.6])
    assert round_to_total(targets, 22, Bounds()).tolist() == [10, 12]
    assert round_to_total(targets, 22, Bounds(),
                          step_cost=(overhead, per_sample)).tolist() == [11, 11]


@settings(max_examples=200, deadline=None)
@given(step_costs_and_bounds())
def test_min_max_rounding_takes_units_from_the_longest_steps(case):
    # Targets at the upper bounds overshoot the total: the surplus must come
    # off where the steps are longest.
    overhead, per_sample, low, high, total = case
    surplus = int(high.sum()) - total
    assume(surplus > 0)
    sizes = round_to_total(high.astype(float), total, Bounds(1, None), low, high,
                           step_cost=(overhead, per_sample))
    assert sizes.sum() == total
    assert np.all(sizes >= low) and np.all(sizes <= high)
    reference = _greedy_min_max(high, surplus, overhead, per_sample, low, add=False)
    assert _longest_step(sizes, overhead, per_sample) == pytest.approx(
        _longest_step(reference, overhead, per_sample), rel=1e-12)


@settings(max_examples=200, deadline=None)
@given(step_costs_and_bounds())
def test_equal_step_times_plan_is_the_min_max_optimum_within_the_bounds(case):
    overhead, per_sample, _, _, total = case
    n = len(per_sample)
    assume(total >= n)
    bounds = Bounds(1, None)
    sizes = equalise_step_times(overhead, per_sample, total, bounds)
    assert sizes.sum() == total and sizes.min() >= 1
    best = _greedy_min_max(np.ones(n), total - n, overhead, per_sample, np.full(n, total))
    assert _longest_step(sizes, overhead, per_sample) == pytest.approx(
        _longest_step(best, overhead, per_sample), rel=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(1e-3, 1.0), min_size=2, max_size=30))
def test_the_compute_spread_is_the_standard_deviation_of_the_steps(steps):
    from dbs_hvd.timing import WindowTotals

    window = WindowTotals()
    for seconds in steps:
        window.add(8, seconds, 0.0)
    spread = WindowStats.from_windows([window, WindowTotals(steps=1, samples=8, compute_seconds=0.1,
                                                            compute_squares=0.01)]).compute_spread()
    # sum of squares minus n * mean^2 cancels: the error is relative to the mean, not the spread
    assert spread[0] == pytest.approx(np.std(steps, ddof=1), abs=1e-6 * max(steps))
    assert math.isnan(spread[1])  # one step: no spread
