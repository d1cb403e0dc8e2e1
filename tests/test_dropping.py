"""Ranks with zero samples: the decision to leave a straggler out and bring it back (dropping.py).

The runtime path (weight 0, probes, exactness, exactly-once) runs under
mpirun: tests/mpi/mpi_zero.py, launched by tests/test_memory.py.
"""
import collections

import numpy as np
import pytest

from dbs_hvd.dropping import ZeroSamplePolicy, choose_ranks, plan_among
from dbs_hvd.options import ZeroSampleOptions
from dbs_hvd.plan import Bounds, Plan, PlanError, WindowStats
from dbs_hvd.policies import PaperPolicy
from dbs_hvd.sampler import DynamicBatchSampler, StepBatch

FAST = np.array([5e-4, 5e-4, 5e-4])  # seconds per sample


def test_plan_among_leaves_the_inactive_ranks_at_zero():
    sizes, step = plan_among(np.zeros(3), np.array([1e-3, 2e-3, 1e-3]), 60, Bounds(),
                             np.array([True, True, False]))
    assert sizes.tolist() == [40, 20, 0] and step == pytest.approx(0.04)
    # Per-rank caps are those of the active ranks.
    sizes, _ = plan_among(np.zeros(3), FAST, 60, Bounds(rank_max=(100, 25, 100)),
                          np.array([False, True, True]))
    assert sizes.tolist() == [0, 25, 35]
    with pytest.raises(PlanError):
        plan_among(np.zeros(3), FAST, 60, Bounds(rank_max=(100, 25, 30)), np.array([False, True, True]))


def test_a_rank_with_a_large_fixed_cost_is_left_out():
    overhead = np.array([0.0, 0.0, 0.08])
    # Measured with it: 80 ms. Without it: 30 samples x 0.5 ms = 15 ms.
    assert choose_ranks(overhead, FAST, 60, Bounds(), np.ones(3, bool), 0.081, 0.2).tolist() == [
        True, True, False]


def test_a_rank_slow_per_sample_only_is_kept_with_a_small_batch():
    # Ten times slower per sample but no fixed cost: a small batch balances it, and
    # leaving it out would only lengthen the others' steps.
    per_sample = np.array([5e-4, 5e-4, 5e-3])
    _, with_all = plan_among(np.zeros(3), per_sample, 60, Bounds(), np.ones(3, bool))
    assert choose_ranks(np.zeros(3), per_sample, 60, Bounds(), np.ones(3, bool), with_all, 0.2) is None


def test_the_gain_must_be_beaten():
    overhead = np.array([0.0, 0.0, 0.018])
    # Without rank 2: 15 ms; with it the step measured 18.1 ms: a gain of 17%.
    assert choose_ranks(overhead, FAST, 60, Bounds(), np.ones(3, bool), 0.0181, 0.2) is None
    assert choose_ranks(overhead, FAST, 60, Bounds(), np.ones(3, bool), 0.0181, 0.1) is not None


def test_a_left_out_rank_comes_back_when_it_pays():
    active = np.array([True, True, False])
    # Its probes now say 0.1 ms per sample: with it the step is about 5.5 ms, not 15 ms.
    per_sample = np.array([5e-4, 5e-4, 1e-4])
    assert choose_ranks(np.zeros(3), per_sample, 60, Bounds(), active, 0.015, 0.2).tolist() == [
        True, True, True]
    # Still slow: it stays out.
    assert choose_ranks(np.array([0, 0, 0.08]), FAST, 60, Bounds(), active, 0.015, 0.2) is None


def test_never_the_last_rank_nor_more_than_max_dropped():
    overhead = np.array([0.0, 0.05, 0.08])
    assert choose_ranks(overhead, FAST, 60, Bounds(), np.array([True, True, False]), 0.05, 0.2,
                        max_dropped=1) is None
    assert choose_ranks(np.zeros(1), FAST[:1], 60, Bounds(), np.ones(1, bool), 1.0, 0.0) is None
    # The only rank with samples is never left out, however slow; bringing the other
    # back does not pay while this one's fixed cost sets the step.
    assert choose_ranks(np.array([0.0, 0.08]), FAST[:2], 60, Bounds(), np.array([False, True]),
                        0.08, 0.2) is None


def window(samples, seconds, steps):
    return WindowStats(np.array(samples, float), np.array(seconds, float), np.array(steps, float))


def test_the_policy_leaves_a_straggler_out_after_confirming_and_brings_it_back():
    policy = ZeroSamplePolicy(PaperPolicy(60), ZeroSampleOptions(enabled=True, probe_samples=2))
    plan = Plan((20, 20, 20))
    # Rank 2 takes 80 ms per step at any batch; ranks 0 and 1 0.5 ms per sample.
    def measured(plan, straggler):
        b = np.array(plan.batch_sizes, float)
        seconds = 2 * np.array([5e-4 * b[0], 5e-4 * b[1], straggler(b[2])])
        samples = b * 2 if b[2] else np.array([b[0] * 2, b[1] * 2, 2.0])  # one probe of 2
        return window(samples, seconds, [2, 2, 2])

    slow = lambda b: 0.08  # noqa: E731
    plans = []
    for _ in range(5):
        plan = policy.next_plan(measured(plan, slow), plan)
        plans.append(plan.batch_sizes)
    assert plans[-1] == (30, 30, 0), plans
    first_out = plans.index((30, 30, 0))
    assert plans[first_out - 1][2] > 0  # the change was confirmed over two rebalances
    # Its probe now takes 0.2 ms: far off its model, it is measured afresh and comes back.
    fast = lambda b: 1e-4 * max(b, 2)  # noqa: E731
    for _ in range(3):
        plan = policy.next_plan(measured(plan, fast), plan)
        plans.append(plan.batch_sizes)
    assert plans[-1][2] > 20, plans


def test_a_window_without_a_probe_carries_the_last_one_forward():
    policy = ZeroSamplePolicy(PaperPolicy(60), ZeroSampleOptions(enabled=True))
    plan = Plan((30, 30, 0))
    policy._last[2] = (2.0, 0.08, 1.0)
    points = {0: [(30.0, 0.015)], 1: [(30.0, 0.015)], 2: [(2.0, 0.08)]}
    policy._history = {rank: collections.deque(p, maxlen=8) for rank, p in points.items()}
    # Rank 2 ran no probe in this window: no samples, and no compute to speak of.
    out = policy.next_plan(window([60, 60, 0], [0.03, 0.03, 0.0], [2, 2, 2]), plan)
    assert out.batch_sizes == (30, 30, 0)
    assert list(policy._history[2]) == [(2.0, 0.08)]  # nothing new was measured


def test_zero_sample_options_are_checked():
    for bad in (dict(probe_every=0), dict(probe_samples=0), dict(gain=1.0), dict(max_dropped=0),
                dict(confirm=0)):
        with pytest.raises(ValueError, match="ZeroSampleOptions"):
            ZeroSampleOptions(**bad)


def test_the_sampler_hands_a_rank_with_zero_samples_a_probe_every_k_steps():
    sampler = DynamicBatchSampler(300, 60, rank=2, world_size=3, seed=3,
                                  bounds=Bounds(allow_zero=True), plan=Plan((30, 30, 0)))
    sampler._weighted = True
    sampler.probe = (2, 4)
    pieces = list(sampler)
    assert [len(p) for p in pieces] == [4, 0, 4, 0, 4]
    assert pieces[2] == sampler.global_batch_indices(2)[:4].tolist()
    batches = [sampler.pop_consumed() for _ in range(5)]
    assert batches[0] == StepBatch(0, 0, 0, probe=4) and batches[1] == StepBatch(0, 1, 0)


def test_plans_with_zeros_need_allow_zero():
    with pytest.raises(PlanError, match=r"gives rank 2 0 samples, outside \[1, 60\]"):
        Plan((30, 30, 0)).check(60, Bounds())
    Plan((30, 30, 0)).check(60, Bounds(allow_zero=True))
