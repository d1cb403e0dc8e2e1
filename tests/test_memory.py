"""Memory-capped ranks: per-rank caps, the cap after a failure, the retried step (memory.py).

The pure parts (caps in Bounds and apportion, fit_plan, cap_below,
lowered_bounds, the sampler's retried step, the injection) are tested here;
the protocol across ranks runs whole under mpirun (tests/mpi/mpi_memory.py).
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from dbs_hvd.memory import InjectedLimit, inject_out_of_memory, lowered_bounds, parse_injection
from dbs_hvd.options import MemoryOptions
from dbs_hvd.plan import (
    NO_CAP,
    Bounds,
    Plan,
    PlanError,
    apportion,
    cap_below,
    equalise_step_times,
    fit_plan,
)
from dbs_hvd.policies import make_policy
from dbs_hvd.sampler import DynamicBatchSampler, StepBatch
from tests.test_plan import stats, weights_batch_bounds


@st.composite
def capped_cases(draw):
    """test_plan's weights, global batch and bounds, with per-rank caps that can hold the batch."""
    weights, global_batch, bounds = draw(weights_batch_bounds())
    n = len(weights)
    caps = tuple(draw(st.lists(st.integers(bounds.min_batch, global_batch), min_size=n, max_size=n)))
    assume(np.minimum(caps, bounds.upper(global_batch)).sum() >= global_batch)
    return weights, global_batch, Bounds(bounds.min_batch, bounds.max_batch, caps)


@settings(max_examples=300, deadline=None)
@given(capped_cases())
def test_apportion_keeps_every_rank_within_its_own_cap(case):
    weights, global_batch, bounds = case
    sizes = apportion(weights, global_batch, bounds)
    assert sizes.sum() == global_batch
    assert sizes.min() >= bounds.min_batch
    assert np.all(sizes <= bounds.uppers(global_batch, len(weights)))
    Plan(tuple(sizes)).check(global_batch, bounds)


@settings(max_examples=200, deadline=None)
@given(capped_cases(), st.data())
def test_equalised_step_times_keep_every_rank_within_its_own_cap(case, data):
    weights, global_batch, bounds = case
    overhead = np.array(data.draw(st.lists(st.floats(0, 1e-2), min_size=len(weights),
                                           max_size=len(weights))))
    sizes = equalise_step_times(overhead, 1.0 / weights, global_batch, bounds)
    assert sizes.sum() == global_batch
    assert np.all(sizes <= bounds.uppers(global_batch, len(weights)))
    assert sizes.min() >= bounds.min_batch


@settings(max_examples=300, deadline=None)
@given(capped_cases(), st.data())
def test_fit_plan_moves_only_what_the_caps_forbid(case, data):
    weights, global_batch, bounds = case
    plan = Plan(tuple(apportion(weights, global_batch, Bounds(bounds.min_batch, bounds.max_batch))))
    fitted = fit_plan(plan, bounds)
    fitted.check(global_batch, bounds)
    before, after = np.array(plan.batch_sizes), np.array(fitted.batch_sizes)
    caps = bounds.uppers(global_batch, len(weights))
    over = before > caps
    if not over.any():
        assert fitted == plan  # a plan that fits is kept as it is
    else:
        assert np.all(after[over] == caps[over])  # capped ranks at their cap
        # The others only gain (within rounding of one sample), none loses.
        assert np.all(after[~over] >= np.floor(before[~over] * 0.999) - 1)


def test_fit_plan_shares_the_excess_in_proportion():
    assert fit_plan(Plan((40, 20, 20)), Bounds(rank_max=(30, 80, 80))).batch_sizes == (30, 25, 25)
    assert fit_plan(Plan((10, 20, 30)), Bounds(rank_max=(NO_CAP, NO_CAP, 27))).batch_sizes == (11, 22, 27)
    plan = Plan((10, 20, 30))
    assert fit_plan(plan, Bounds(rank_max=(10, 20, 30))) is plan


@pytest.mark.parametrize("failed, min_batch, shrink, cap", [
    (40, 1, 0.9, 36), (5, 1, 0.9, 4), (2, 1, 0.9, 1), (10, 8, 0.5, 8), (100, 1, 0.99, 99),
])
def test_cap_below_the_failed_size(failed, min_batch, shrink, cap):
    assert cap_below(failed, min_batch, shrink) == cap


@given(st.integers(2, 10_000), st.integers(1, 100), st.floats(0.01, 0.99))
def test_cap_below_is_always_below_the_failure(failed, min_batch, shrink):
    assume(min_batch < failed)
    cap = cap_below(failed, min_batch, shrink)
    assert min_batch <= cap < failed and cap <= max(min_batch, math.floor(failed * shrink))


def test_bounds_with_per_rank_caps():
    bounds = Bounds(max_batch=50, rank_max=(20, 80, 40))
    assert bounds.uppers(100, 3).tolist() == [20, 50, 40]
    assert bounds.with_cap(2, 30, 3).rank_max == (20, 80, 30)
    assert bounds.with_cap(0, 60, 3).rank_max == (20, 80, 40)  # a cap never rises
    assert Bounds().with_cap(1, 7, 2).uppers(64, 2).tolist() == [64, 7]
    assert "rank_max" not in repr(Bounds(2, 7))  # the repr of uncapped bounds is unchanged


@pytest.mark.parametrize("bounds, world, message", [
    (Bounds(rank_max=(30, 30)), 2, r"per-rank caps rank_max=\(30, 30\) sum to 60, below the "
                                   r"global batch 64.*pass global_batch= of at most 60"),
    (Bounds(rank_max=(30, 30, 30)), 2, r"rank_max= gives 3 per-rank caps \(30, 30, 30\) for 2 ranks"),
    (Bounds(min_batch=4, rank_max=(3, 64)), 2, r"rank_max= caps rank 0 at 3 samples, below min_batch 4"),
])
def test_caps_that_cannot_work_are_reported_naming_max_batch(bounds, world, message):
    with pytest.raises(PlanError, match=message):
        bounds.check(64, world)


def test_plan_check_names_the_rank_over_its_cap():
    with pytest.raises(PlanError, match=r"gives rank 1 40 samples, outside \[1, 30\]"):
        Plan((24, 40)).check(64, Bounds(rank_max=(64, 30)))


def test_lowered_bounds_after_failures():
    options = MemoryOptions(shrink=0.5)
    bounds = lowered_bounds(Bounds(rank_max=(64, 64, 64)), {0: 40, 2: 30}, 3, 96, options)
    assert bounds.rank_max == (20, 64, 15)
    with pytest.raises(PlanError, match=r"out of memory on rank 1 at 40 samples.*sum to 84, below "
                                        r"the global batch 96"):
        lowered_bounds(Bounds(rank_max=(32, 64, 32)), {1: 40}, 3, 96, options)
    with pytest.raises(PlanError, match=r"out of memory on rank 0 at 1 samples.*below min_batch 1"):
        lowered_bounds(Bounds(), {0: 1}, 2, 64, options)


def test_memory_options_are_checked():
    with pytest.raises(ValueError, match=r"MemoryOptions\(shrink=...\) must be a fraction in \(0, 1\)"):
        MemoryOptions(shrink=1.0)


@pytest.mark.parametrize("policy, multiple", [("dbs", 1), ("paper", 1), ("paper", 4)])
def test_policies_plan_within_caps_set_after_they_were_built(policy, multiple):
    built = make_policy(policy, 64, Bounds(), batch_multiple=multiple)
    built.set_bounds(Bounds(rank_max=(NO_CAP, 20)))
    current = Plan((32, 32))
    for _ in range(12):  # rank 1 is four times as fast: it would take about 51 of 64
        current = built.next_plan(stats(list(current.batch_sizes), [current.batch_sizes[0] / 10,
                                                                    current.batch_sizes[1] / 40]),
                                  fit_plan(current, built.bounds))
        assert current.batch_sizes[1] <= 20
    assert current.batch_sizes == (44, 20)


def test_the_sampler_retries_a_step_under_the_fitted_plan():
    sampler = DynamicBatchSampler(200, 60, rank=2, world_size=3, seed=1, plan=Plan((10, 20, 30)))
    sampler._weighted = True
    batches = iter(sampler)
    first = next(batches)
    failed = sampler.pop_consumed()
    assert (failed.step, failed.batch_size, len(first)) == (0, 30, 30)
    bounds = Bounds().with_cap(2, 27, 3)
    again = sampler.retry_step(failed, bounds)
    # The same global batch, split anew: rank 2's piece is its last 27 samples.
    assert again == sampler.global_batch_indices(0)[33:].tolist()
    assert sampler.plan_at(0).batch_sizes == (11, 22, 27)
    assert sampler.pop_consumed() == StepBatch(0, 0, 27)
    # Later steps use the fitted plan; every sample of the epoch is still read once.
    assert [len(b) for b in batches] == [27, 27]
    pieces = [sampler.indices(s, r) for s in range(3) for r in range(3)]
    flat = [i for piece in pieces for i in piece]
    assert len(flat) == len(set(flat)) == 180


def test_a_step_prefetched_by_some_rank_keeps_its_plan():
    sampler = DynamicBatchSampler(300, 60, rank=0, world_size=2, seed=1, plan=Plan((20, 40)))
    sampler._weighted = True
    next(iter(sampler))
    failed = sampler.pop_consumed()
    # Another rank handed out steps 0-2 already: step 1 and 2 keep (20, 40), step 3 on is fitted.
    sampler.retry_step(failed, Bounds(rank_max=(60, 35)), keep_until=3)
    assert [sampler.plan_at(s).batch_sizes for s in range(5)] == [
        (25, 35), (20, 40), (20, 40), (25, 35), (25, 35)]


def test_retrying_a_step_never_handed_out_is_refused():
    sampler = DynamicBatchSampler(300, 60, rank=0, world_size=2, seed=1)
    with pytest.raises(PlanError, match="cannot retry step 0 of epoch 0"):
        sampler.retry_step(StepBatch(0, 0, 30), Bounds())


def test_injection_is_parsed_and_named_in_errors():
    assert parse_injection(None) == parse_injection("") == []
    assert parse_injection("0:8, 2:30:backward") == [InjectedLimit(0, 8), InjectedLimit(2, 30, "backward")]
    for bad in ("1", "a:3", "1:0", "1:3:sideways", "1:2:forward:x"):
        with pytest.raises(ValueError, match="DBS_HVD_INJECT_OOM takes RANK:N"):
            parse_injection(bad)


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_injected_failure_fires_only_in_training_at_the_limit(phase):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    hooks = inject_out_of_memory(model, [InjectedLimit(1, 5, phase), InjectedLimit(0, 2)], rank=1)
    model(torch.randn(4, 3)).sum().backward()  # below the limit
    with torch.no_grad():
        model(torch.randn(50, 3))  # evaluation never fails
    model.zero_grad()
    with pytest.raises(torch.OutOfMemoryError, match="rank 1 fails at local batches of 5"):
        model(torch.randn(5, 3)).sum().backward()
    # In the backward phase the last layer's gradient arrived (and would have entered
    # the allreduce) before the failure; the first layer's never did.
    assert (model[2].weight.grad is not None) == (phase == "backward")
    assert model[0].weight.grad is None
    for handle in hooks:
        handle.remove()
    model(torch.randn(9, 3)).sum().backward()


@pytest.mark.mpi
@pytest.mark.parametrize("np", [2, 3])
def test_memory_guard_under_mpirun(run_mpi_file, np):
    # Injected failures on one rank: every sample once, the single-process update,
    # identical caps everywhere, user caps held, and too-small caps failing alike.
    run_mpi_file("mpi_memory.py", np=np, timeout=300)


@pytest.mark.mpi
@pytest.mark.parametrize("np", [2, 3])
def test_zero_sample_ranks_under_mpirun(run_mpi_file, np):
    # Ranks given 0 samples: weight 0 and probes leave every update the single-process
    # one and every sample trained once; a straggler is left out and comes back.
    run_mpi_file("mpi_zero.py", np=np, timeout=300)
