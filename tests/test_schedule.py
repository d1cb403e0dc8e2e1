"""schedule.py: the rebalance interval, stretched by the measured cost of rebalancing."""
import math

import pytest
from hypothesis import assume, given, strategies as st

from dbs_hvd.balancer import Rebalancer
from dbs_hvd.comm import LocalExchange
from dbs_hvd.policies import StaticPolicy
from dbs_hvd.sampler import DynamicBatchSampler
from dbs_hvd.optim import DynamicBatchState
from dbs_hvd.schedule import RebalanceSchedule, rebalance_due
from dbs_hvd.timing import StepTimer


def test_without_a_budget_the_interval_is_exactly_k():
    schedule = RebalanceSchedule(5)
    assert schedule.update(rebalance_seconds=1.0, step_seconds=0.001) == 5


def test_short_steps_stretch_the_interval_until_the_cost_fits_the_budget():
    # 4 ms per rebalance, 7 ms steps, 2% budget: a window of at least 200 ms.
    schedule = RebalanceSchedule(5, budget=0.02, cost_window=1)
    assert schedule.update(0.004, 0.007) == math.ceil(0.004 / (0.02 * 0.007)) == 29


def test_long_steps_keep_the_minimum_interval():
    # A compute-bound 150 ms step: a 4 ms rebalance is far below 2% of 5 steps.
    assert RebalanceSchedule(5, budget=0.02).update(0.004, 0.15) == 5


def test_one_slow_rebalance_does_not_stretch_the_interval():
    schedule = RebalanceSchedule(2, budget=0.1)
    assert schedule.update(0.001, 0.01) == 2
    assert schedule.update(0.001, 0.01) == 2
    assert schedule.update(0.1, 0.01) == 2  # a descheduled rank, once


def test_rebalances_that_stay_slow_stretch_it():
    schedule = RebalanceSchedule(2, budget=0.1)
    intervals = [schedule.update(cost, 0.01) for cost in (0.001, 0.001, 0.1, 0.1, 0.1)]
    assert intervals[:3] == [2, 2, 2] and intervals[4] == 100  # 3 of the last 5 are slow
    for _ in range(3):
        interval = schedule.update(0.001, 0.01)
    assert interval == 2  # and it comes back once they are fast again


@given(fast=st.lists(st.floats(0, 0.01), min_size=4, max_size=30), where=st.integers(0, 4))
def test_one_outlier_among_the_last_five_never_raises_the_cost_above_the_fast_ones(fast, where):
    schedule = RebalanceSchedule(2, budget=0.02)
    costs = list(fast)
    costs.insert(len(costs) - where, 10.0)  # one spike among the last five
    for cost in costs:
        schedule.update(cost, 0.1)
    assert schedule.cost <= max(cost for cost in costs[-5:] if cost != 10.0)


def test_missing_or_bad_measurements_keep_the_interval():
    schedule = RebalanceSchedule(3, budget=0.05)
    assert schedule.update(None, 0.01) == 3
    assert schedule.update(0.01, None) == 3
    assert schedule.update(float("nan"), 0.0) == 3


def test_a_floor_in_seconds_spaces_out_very_short_steps_without_any_budget():
    # 5 ms steps, at least 0.15 s between rebalances: every 30 steps.
    schedule = RebalanceSchedule(2, min_seconds=0.15)
    assert schedule.update(rebalance_seconds=None, step_seconds=0.005) == 30


def test_the_floor_in_seconds_leaves_long_steps_at_k():
    # 120 ms compute-bound steps: 2 steps already span 0.24 s.
    assert RebalanceSchedule(2, budget=0.02, min_seconds=0.15).update(0.001, 0.12) == 2


def test_the_longer_of_floor_and_budget_wins():
    # A 10 ms rebalance on 5 ms steps at 2%: the budget asks for 100 steps, the floor 30.
    schedule = RebalanceSchedule(2, budget=0.02, cost_window=1, min_seconds=0.15)
    assert schedule.update(0.010, 0.005) == 100
    assert schedule.update(0.0001, 0.005) == 30


@pytest.mark.parametrize("kwargs, match", [
    ({"min_steps": 0}, "rebalance_every must be a positive"),
    ({"min_steps": 2, "min_seconds": -0.1}, "rebalance_min_seconds must be a number"),
    ({"min_steps": 2, "min_seconds": float("inf")}, "rebalance_min_seconds must be a number"),
    ({"min_steps": 5, "budget": 0.0}, "rebalance_budget must be a fraction"),
    ({"min_steps": 5, "budget": 1.5}, "rebalance_budget must be a fraction"),
    ({"min_steps": 2, "cost_window": 0}, "cost_window must be a positive"),
    ({"min_steps": 2, "settled_stretch": 0.5}, "settled_stretch must be a factor >= 1"),
])
def test_bad_settings_say_what_to_give(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RebalanceSchedule(**kwargs)


@given(k=st.integers(1, 50), budget=st.floats(0.001, 0.5),
       costs=st.lists(st.tuples(st.floats(0, 1), st.floats(1e-5, 10)), min_size=1, max_size=20))
def test_interval_is_at_least_k_and_keeps_the_estimated_cost_within_budget(k, budget, costs):
    schedule = RebalanceSchedule(k, budget=budget)
    for cost, step in costs:
        interval = schedule.update(cost, step)
        assert interval >= k
        # The estimated cost of one rebalance is at most `budget` of the window's time.
        assert schedule.cost <= budget * step * interval * (1 + 1e-9)
        if interval > k:  # stretched no further than needed (up to float rounding)
            assert schedule.cost >= budget * step * (interval - 1) * (1 - 1e-9)


@given(k=st.integers(1, 50), min_seconds=st.floats(0, 5),
       budget=st.one_of(st.none(), st.floats(0.001, 0.5)),
       costs=st.lists(st.tuples(st.floats(0, 1), st.floats(1e-5, 10)), min_size=1, max_size=20))
def test_interval_spans_at_least_the_floor_in_seconds_and_no_more_than_needed(
        k, min_seconds, budget, costs):
    schedule = RebalanceSchedule(k, budget=budget, min_seconds=min_seconds)
    for cost, step in costs:
        interval = schedule.update(cost, step)
        assert interval >= k
        assert interval * step >= min_seconds * (1 - 1e-9)
        by_budget = 0 if budget is None else schedule.cost / (budget * step)
        if interval > k:  # the floor or the budget needed every step of it
            assert max(min_seconds / step, by_budget) > (interval - 1) * (1 - 1e-9)


def test_rebalancer_stretches_the_interval_from_its_own_measured_cost():
    sampler = DynamicBatchSampler(10_000, 10, rank=0, world_size=1)
    now = [0.0]
    timer = StepTimer(clock=lambda: now[0])
    timer.mark_start()
    schedule = RebalanceSchedule(2, budget=0.5)
    rebalancer = Rebalancer(sampler, StaticPolicy(10), LocalExchange(), timer, schedule=schedule)
    assert rebalancer.interval == 2
    for step in range(3):
        now[0] += 1e-9  # steps of a nanosecond: any real rebalance costs far more
        timer.end_step(10)
        record = rebalancer.rebalance(step)
    assert rebalancer.interval > 2 and record.extra["interval"] == rebalancer.interval
    assert record.ranks[0].rebalance_seconds > 0
    rebalancer.restart_schedule()
    assert rebalancer.interval == 2


def test_a_window_due_just_before_the_epoch_end_runs_on_to_it():
    # The allreduce-bound MLP's case: 50 steps per epoch, an interval of 23.
    # The window due at step 45 would leave 4 steps to a second rebalance at
    # the epoch end; it is extended to the end instead.
    sampler = DynamicBatchSampler(50 * 8, 8, rank=0, world_size=1)
    timer = StepTimer()
    rebalancer = Rebalancer(sampler, StaticPolicy(8), LocalExchange(), timer,
                            schedule=RebalanceSchedule(23))
    state = DynamicBatchState(sampler, rebalancer, timer)
    for _ in sampler:
        state.finish_step(state.current_batch())
    assert [record.step for record in rebalancer.history] == [22, 49]


def test_rebalance_due_examples():
    assert rebalance_due(window_steps=23, interval=23, steps_left_in_epoch=27)
    assert not rebalance_due(window_steps=23, interval=23, steps_left_in_epoch=4)
    assert not rebalance_due(window_steps=22, interval=23, steps_left_in_epoch=27)
    assert not rebalance_due(window_steps=100, interval=None, steps_left_in_epoch=27)
    assert rebalance_due(window_steps=2, interval=2, steps_left_in_epoch=1)


@given(steps=st.integers(1, 300), interval=st.integers(1, 60))
def test_windows_are_one_interval_except_the_last_of_the_epoch_which_is_at_most_one_and_a_half(
        steps, interval):
    # One epoch of at least half an interval (a shorter one carries its window
    # on: the test across epochs below), as rebalance_due decides it alone.
    assume(steps >= interval / 2)
    windows, open_steps = [], 0
    for step in range(steps):
        open_steps += 1
        left = steps - 1 - step
        if rebalance_due(open_steps, interval, left):
            windows.append(open_steps)
            open_steps = 0
    assert sum(windows) == steps
    assert all(window == interval for window in windows[:-1])
    assert windows[-1] < 1.5 * interval or windows[-1] == interval
    # The last window is never a short remnant, unless the epoch itself is short.
    assert windows[-1] >= min(steps, interval / 2)


def test_at_the_epoch_end_a_window_of_half_an_interval_rebalances_and_a_shorter_one_runs_on():
    assert rebalance_due(window_steps=12, interval=23, steps_left_in_epoch=0)
    assert not rebalance_due(window_steps=11, interval=23, steps_left_in_epoch=0)
    assert rebalance_due(window_steps=1, interval=None, steps_left_in_epoch=0)  # epoch ends only


@given(epochs=st.lists(st.integers(1, 80), min_size=1, max_size=12), interval=st.integers(1, 60))
def test_windows_across_short_and_long_epochs_stay_between_half_and_one_and_a_half_intervals(
        epochs, interval):
    windows, open_steps = [], 0
    for length in epochs:
        for step in range(length):
            open_steps += 1
            if rebalance_due(open_steps, interval, length - 1 - step):
                windows.append(open_steps)
                open_steps = 0
    assert sum(windows) + open_steps == sum(epochs)
    assert all(interval / 2 <= window <= 1.5 * interval for window in windows)
    assert open_steps < interval / 2  # what is left unmeasured at the end: less than half an interval
    # An epoch of at least half an interval ends on a rebalance, as before.
    if epochs[-1] >= interval / 2:
        assert open_steps == 0


def test_epochs_shorter_than_half_the_interval_share_a_window_and_each_keeps_its_own_totals():
    # 5 steps per epoch, an interval of 23: a rebalance at every epoch end would
    # measure windows of 5 steps. The windows run on to the first epoch end at
    # which they hold half an interval (11.5 steps): 15 steps, the third epoch's.
    sampler = DynamicBatchSampler(5 * 8, 8, rank=0, world_size=1)
    now = [0.0]
    timer = StepTimer(clock=lambda: now[0])
    rebalancer = Rebalancer(sampler, StaticPolicy(8), LocalExchange(), timer,
                            schedule=RebalanceSchedule(23))
    state = DynamicBatchState(sampler, rebalancer, timer)
    per_epoch = []
    for epoch in range(6):
        sampler.set_epoch(epoch)
        for _ in sampler:
            batch = state.current_batch()
            now[0] += 0.001 * (epoch + 1)  # a step of (epoch + 1) ms
            state.finish_step(batch)
        per_epoch.append(state.last_epoch)
    assert [(record.epoch, record.step, record.ranks[0].steps) for record in rebalancer.history] == [
        (2, 4, 15), (5, 4, 15)]
    assert [totals.steps for totals in per_epoch] == [5] * 6
    assert [totals.samples for totals in per_epoch] == [40] * 6
    assert [round(totals.compute_seconds, 9) for totals in per_epoch] == [
        round(0.005 * (epoch + 1), 9) for epoch in range(6)]


def test_an_elastic_restart_drops_the_interrupted_worlds_steps_from_the_epoch_totals():
    # The new world trains again from its last commit, so the epoch's figures
    # cover only what it trained.
    sampler = DynamicBatchSampler(5 * 8, 8, rank=0, world_size=1)
    timer = StepTimer()
    rebalancer = Rebalancer(sampler, StaticPolicy(8), LocalExchange(), timer)
    state = DynamicBatchState(sampler, rebalancer, timer)
    sampler.set_epoch(0)
    for step, _ in enumerate(sampler):
        state.finish_step(state.current_batch())
        if step == 2:
            state.restart(LocalExchange(), StaticPolicy(8))
    assert state.last_epoch.steps == 2 and timer.totals.steps == 5


def test_imbalanced_windows_keep_the_interval_short_where_the_budget_would_stretch_it():
    # 8 ms rebalances on 100 ms steps: the 2% budget asks for 4 steps. A window
    # whose slowest rank ran 80% above the mean (a disturbance starting) makes
    # answering late the larger cost: sqrt(cost / (rate * loss)) is well under
    # one step here, so the interval goes back to K.
    schedule = RebalanceSchedule(2, budget=0.02, cost_window=1)
    assert schedule.update(0.008, 0.1, window_steps=2, imbalance=0.05) == 4
    assert schedule.update(0.008, 0.1, window_steps=4, imbalance=0.8) == 2
    assert schedule.change_bound(0.008) == pytest.approx(math.sqrt(0.008 / (1 / 0.6 * 0.8)))


def test_imbalance_within_the_noise_of_shared_cores_leaves_the_budget_alone():
    schedule = RebalanceSchedule(2, budget=0.02, cost_window=1)
    for _ in range(20):
        assert schedule.update(0.008, 0.1, window_steps=4, imbalance=0.2) == 4
    assert schedule.change_bound(0.008) is None


def test_changes_older_than_the_memory_no_longer_count():
    schedule = RebalanceSchedule(2, budget=0.02, cost_window=1, change_memory=5.0)
    schedule.update(0.008, 0.1, window_steps=4, imbalance=0.8)
    assert schedule.interval == 2
    for _ in range(12):  # 4.8 s of settled windows: the change is still remembered
        schedule.update(0.008, 0.1, window_steps=4, imbalance=0.0)
    assert schedule.change_bound(0.008) is not None
    schedule.update(0.008, 0.1, window_steps=4, imbalance=0.0)  # 5.2 s after it
    assert schedule.change_bound(0.008) is None and schedule.interval == 4


@given(k=st.integers(1, 20), budget=st.floats(0.001, 0.5), min_seconds=st.floats(0, 1),
       windows=st.lists(st.tuples(st.floats(0, 0.1), st.floats(1e-4, 1), st.integers(1, 50),
                                  st.floats(0, 5)), min_size=1, max_size=30))
def test_changes_only_shorten_the_budget_interval_never_below_k_or_the_floor(
        k, budget, min_seconds, windows):
    with_changes = RebalanceSchedule(k, budget=budget, min_seconds=min_seconds)
    budget_only = RebalanceSchedule(k, budget=budget, min_seconds=min_seconds)
    for cost, step, steps, imbalance in windows:
        interval = with_changes.update(cost, step, window_steps=steps, imbalance=imbalance)
        assert interval <= budget_only.update(cost, step, window_steps=steps, imbalance=None)
        assert interval >= k
        assert interval * step >= min_seconds * (1 - 1e-9)


def test_a_settled_plan_stretches_the_floor_in_seconds_up_to_its_limit():
    # 16 ms steps, a 1.5 ms rebalance, floor 0.15 s: 10 steps while the plan moves; each
    # rebalance that keeps it doubles the floor, up to 4 x 0.15 s = 38 steps.
    schedule = RebalanceSchedule(2, budget=0.02, min_seconds=0.15)
    assert schedule.update(0.0015, 0.016, window_steps=10, imbalance=0.0, moved=True) == 10
    kept = [schedule.update(0.0015, 0.016, window_steps=10, imbalance=0.0, moved=False)
            for _ in range(4)]
    assert kept == [19, 38, 38, 38]
    # A plan change brings the floor back at once.
    assert schedule.update(0.0015, 0.016, window_steps=38, imbalance=0.0, moved=True) == 10


def test_an_imbalanced_window_keeps_the_floor_unstretched_while_remembered():
    schedule = RebalanceSchedule(2, budget=0.02, min_seconds=0.15, change_memory=5.0)
    schedule.update(0.0015, 0.016, window_steps=10, imbalance=0.8, moved=False)
    for _ in range(31):  # 4.96 s after the change ended: still remembered
        assert schedule.update(0.0015, 0.016, window_steps=10, imbalance=0.0, moved=False) == 10
    assert schedule.update(0.0015, 0.016, window_steps=10, imbalance=0.0, moved=False) == 19


def test_a_stretch_of_one_or_no_floor_in_seconds_keeps_the_interval():
    unstretched = RebalanceSchedule(2, budget=0.02, min_seconds=0.15, settled_stretch=1.0)
    no_floor = RebalanceSchedule(2, budget=0.02)
    for _ in range(5):
        assert unstretched.update(0.0015, 0.016, window_steps=10, imbalance=0.0, moved=False) == 10
        assert no_floor.update(0.0015, 0.016, window_steps=10, imbalance=0.0, moved=False) == 5


@given(k=st.integers(1, 20), min_seconds=st.floats(0, 1), stretch=st.floats(1, 8),
       windows=st.lists(st.tuples(st.floats(1e-4, 1), st.booleans(), st.floats(0, 1)),
                        min_size=1, max_size=30))
def test_the_stretched_floor_stays_between_the_floor_and_its_limit(k, min_seconds, stretch, windows):
    schedule = RebalanceSchedule(k, min_seconds=min_seconds, settled_stretch=stretch)
    for step, moved, imbalance in windows:
        interval = schedule.update(None, step, window_steps=k, imbalance=imbalance, moved=moved)
        assert interval >= k and interval * step >= min_seconds * (1 - 1e-9)
        assert interval <= max(k, math.ceil(stretch * min_seconds / step))
        if moved:
            assert interval == max(k, math.ceil(min_seconds / step))


def test_rebalancer_tells_the_schedule_whether_the_plan_moved():
    # A static policy never moves the plan: with a floor of 0.15 s on 16 ms steps the
    # interval grows from 2 steps to 19, then 38, and stays there.
    sampler = DynamicBatchSampler(10_000, 10, rank=0, world_size=1)
    now = [0.0]
    timer = StepTimer(clock=lambda: now[0])
    timer.mark_start()
    rebalancer = Rebalancer(sampler, StaticPolicy(10), LocalExchange(), timer,
                            schedule=RebalanceSchedule(2, min_seconds=0.15))
    intervals = [rebalancer.interval]
    for window in range(4):
        for _ in range(intervals[-1]):
            now[0] += 0.016
            timer.end_step(10)
        intervals.append(rebalancer.rebalance(window).extra["interval"])
    assert intervals == [2, 19, 38, 38, 38]


def test_window_imbalance_is_the_slowest_compute_per_step_over_the_mean():
    from dbs_hvd.plan import WindowStats
    import numpy as np

    stats = WindowStats(samples=np.array([10.0, 10.0, 10.0]), steps=np.array([2.0, 2.0, 2.0]),
                        compute_seconds=np.array([0.2, 0.2, 0.5]))
    assert stats.imbalance() == pytest.approx(0.25 / 0.15 - 1.0)
    balanced = WindowStats(samples=np.ones(2), steps=np.ones(2), compute_seconds=np.ones(2))
    assert balanced.imbalance() == 0.0
