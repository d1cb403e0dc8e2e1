"""Cost mode (costs.py, SampleCosts): the pure split of a step by cost, and the sampler,
weights and timing that follow it in one process.

Exactness of cost-weighted updates against one process is tested under mpirun
(tests/mpi/mpi_costs.py).
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dbs_hvd import SampleCosts
from dbs_hvd.balancer import Rebalancer
from dbs_hvd.comm import LocalExchange
from dbs_hvd.costs import check_costs, split_by_cost, units_of
from dbs_hvd.optim import DynamicBatchState
from dbs_hvd.plan import Plan, PlanError
from dbs_hvd.policies import StaticPolicy
from dbs_hvd.sampler import DynamicBatchSampler
from dbs_hvd.timing import StepTimer


@st.composite
def steps_and_plans(draw, min_count=1):
    world = draw(st.integers(1, 6))
    count = draw(st.integers(max(world * min_count, 1), 60))
    costs = draw(st.lists(st.integers(1, 500), min_size=count, max_size=count))
    cuts = sorted(draw(st.lists(st.integers(0, count), min_size=world - 1, max_size=world - 1)))
    sizes = np.diff([0, *cuts, count]).tolist()
    return np.array(costs, dtype=float), sizes


def rank_costs(costs, parts):
    return [float(costs[p].sum()) for p in parts]


@settings(max_examples=300, deadline=None)
@given(steps_and_plans(min_count=0), st.sampled_from(["sorted", "stream"]))
def test_the_split_reads_each_sample_once_and_meets_every_share_within_one_sample(case, order):
    costs, sizes = case
    parts = split_by_cost(costs, sizes, min_count=0, order=order)
    assert len(parts) == len(sizes)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(costs)))
    total, count = costs.sum(), len(costs)
    for rank, cost in enumerate(rank_costs(costs, parts)):
        # Each of a rank's two cuts lies within half a sample's cost of its target.
        assert abs(cost - total * sizes[rank] / count) <= costs.max() + 1e-9
    assert [p.tolist() for p in split_by_cost(costs, sizes, 0, order)] == [p.tolist() for p in parts]


@settings(max_examples=300, deadline=None)
@given(steps_and_plans(min_count=1))
def test_every_rank_gets_a_sample_and_the_floor_changes_only_splits_that_broke_it(case):
    costs, sizes = case
    free = split_by_cost(costs, sizes, min_count=0)
    floored = split_by_cost(costs, sizes, min_count=1)
    assert min(len(p) for p in floored) >= 1
    assert sorted(np.concatenate(floored).tolist()) == list(range(len(costs)))
    if min(len(p) for p in free) >= 1:
        assert [p.tolist() for p in floored] == [p.tolist() for p in free]


@settings(max_examples=200, deadline=None)
@given(steps_and_plans(min_count=1))
def test_sorted_order_gives_each_rank_costs_no_higher_than_the_next_ranks(case):
    costs, sizes = case
    parts = split_by_cost(costs, sizes, order="sorted")
    for low, high in zip(parts, parts[1:]):
        assert costs[low].max() <= costs[high].min()


@settings(max_examples=200, deadline=None)
@given(steps_and_plans(min_count=1))
def test_stream_order_cuts_the_step_into_consecutive_pieces(case):
    costs, sizes = case
    parts = split_by_cost(costs, sizes, order="stream")
    assert np.concatenate(parts).tolist() == list(range(len(costs)))


@settings(max_examples=200, deadline=None)
@given(steps_and_plans(min_count=1), st.integers(1, 9), st.sampled_from(["sorted", "stream"]))
def test_equal_costs_split_exactly_like_the_count(case, cost, order):
    costs, sizes = case
    if min(sizes) < 1:
        return
    parts = split_by_cost(np.full(len(costs), float(cost)), sizes, order=order)
    assert [len(p) for p in parts] == sizes
    assert np.concatenate(parts).tolist() == list(range(len(costs)))


def test_a_long_sample_moves_the_cut_by_cost_not_by_count():
    costs = np.array([10.0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 20])  # total 40
    parts = split_by_cost(costs, [6, 6], order="stream")  # targets: 20 and 20
    assert rank_costs(costs, parts) == [20.0, 20.0]
    assert [len(p) for p in parts] == [11, 1]


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_sizes": [2, 2]}, "sum to 4, not the 5"),
    ({"batch_sizes": [5, 0], "min_count": 3}, "min_count=3"),
    ({"batch_sizes": [3, 2], "order": "longest"}, "order="),
])
def test_the_split_refuses_inconsistent_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        split_by_cost(np.ones(5), **kwargs)


@pytest.mark.parametrize("costs, match", [
    ([1, 0, 2], "sample 1 has cost 0.0"),
    ([1, -3, 2], "sample 1 has cost -3.0"),
    ([1, float("nan")], "sample 1 has cost nan"),
    ([1, float("inf")], "finite positive"),
    ([], "non-empty 1-D"),
    ([[1, 2], [3, 4]], "non-empty 1-D"),
    (["a", "b"], "sequence of numbers"),
])
def test_bad_costs_are_refused_naming_the_argument(costs, match):
    with pytest.raises(ValueError, match=match):
        check_costs(costs)
    with pytest.raises(ValueError, match=r"SampleCosts\(costs=\.\.\.\)"):
        SampleCosts(costs)


def test_sample_costs_refuse_an_unknown_order_and_fingerprint_their_content():
    with pytest.raises(ValueError, match=r"SampleCosts\(order=\.\.\.\)"):
        SampleCosts([1, 2], order="random")
    assert SampleCosts([1, 2]).digest() == SampleCosts(np.array([1.0, 2.0])).digest()
    assert SampleCosts([1, 2]).digest() != SampleCosts([2, 1]).digest()
    assert SampleCosts([1, 2]).digest() != SampleCosts([1, 2], order="stream").digest()
    assert units_of(30.0, 120.0, 64) == 16.0


def test_the_sampler_refuses_costs_of_the_wrong_length_or_type():
    with pytest.raises(ValueError, match=r"costs= has 9 costs .* dataset_size=10"):
        DynamicBatchSampler(10, 4, rank=0, world_size=2, costs=SampleCosts(np.ones(9)))
    with pytest.raises(ValueError, match=r"costs= takes a dbs_hvd.SampleCosts"):
        DynamicBatchSampler(10, 4, rank=0, world_size=2, costs=np.ones(10))


def cost_samplers(costs, global_batch, world, **kwargs):
    return [DynamicBatchSampler(len(costs), global_batch, rank=r, world_size=world, seed=4,
                                costs=SampleCosts(costs), **kwargs) for r in range(world)]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(0, 2), st.data())
def test_cost_mode_reads_the_count_modes_global_batches_each_sample_once(world, epoch, data):
    global_batch = data.draw(st.integers(world, 24))
    n = data.draw(st.integers(global_batch, 150))
    costs = np.array(data.draw(st.lists(st.integers(1, 300), min_size=n, max_size=n)), float)
    ranks = cost_samplers(costs, global_batch, world)
    counted = DynamicBatchSampler(n, global_batch, rank=0, world_size=world, seed=4)
    change_at = data.draw(st.integers(0, ranks[0].steps_per_epoch))
    new = Plan(tuple(np.diff([0, *sorted(data.draw(st.lists(
        st.integers(world - 1, global_batch - 1), min_size=world - 1, max_size=world - 1))),
        global_batch]) + 0))
    if min(new.batch_sizes) < 1:
        new = Plan.equal(global_batch, world)
    for s in [*ranks, counted]:
        s.set_epoch(epoch)
    batches = [list(iter(s)) for s in ranks[:0]]  # nothing handed out before the change
    for s in ranks:
        s.set_plan(new, change_at)
    batches = [list(iter(s)) for s in ranks]
    read = []
    for step in range(ranks[0].steps_per_epoch):
        pieces = [b[step] for b in batches]
        assert min(len(p) for p in pieces) >= 1
        assert sorted(i for p in pieces for i in p) == sorted(counted.global_batch_indices(step))
        read += [i for p in pieces for i in p]
    assert len(read) == len(set(read)) == ranks[0].steps_per_epoch * global_batch


def test_step_batches_carry_cost_shares_that_weight_and_time_the_step():
    rng = np.random.default_rng(0)
    costs = rng.integers(1, 100, size=120).astype(float)
    plan = Plan((4, 8, 12))
    ranks = cost_samplers(costs, 24, 3, plan=plan)
    states, iterators = [], [iter(s) for s in ranks]
    for s in ranks:
        timer = StepTimer()
        states.append(DynamicBatchState(s, Rebalancer(s, StaticPolicy(24), LocalExchange(), timer),
                                        timer))
    expected_units, sample_counts = [0.0] * 3, [0] * 3
    # Every step but the epoch's last, which would rebalance (one process cannot).
    for step in range(ranks[0].steps_per_epoch - 1):
        batches = []
        step_cost = costs[ranks[0].global_batch_indices(step)].sum()
        for rank, (iterator, state) in enumerate(zip(iterators, states)):
            indices = next(iterator)
            batch = state.current_batch()
            assert batch.batch_size == len(indices)
            assert batch.cost == costs[indices].sum()
            assert batch.step_cost == step_cost
            expected_units[rank] += 24 * batch.cost / step_cost
            sample_counts[rank] += len(indices)
            batches.append(batch)
            state.finish_step(batch)
        weights = [state.weight_of(b) for state, b in zip(states, batches)]
        assert sum(weights) == pytest.approx(3.0)
        assert weights == pytest.approx([3 * b.cost / step_cost for b in batches])
        assert sum(b.units(24) for b in batches) == pytest.approx(24.0)
        for rank, b in enumerate(batches):  # within a sample's cost of the plan's share
            assert abs(b.cost - step_cost * plan.batch_sizes[rank] / 24) <= 100
    # The timing windows counted cost in the plan's units, not samples.
    counted = [state.timer.window.samples for state in states]
    assert counted == pytest.approx(expected_units)
    assert counted != pytest.approx(sample_counts)


def test_a_cost_mode_state_resumes_only_with_the_same_costs():
    costs = np.arange(1.0, 41.0)
    sampler = DynamicBatchSampler(40, 8, rank=0, world_size=2, costs=SampleCosts(costs))
    state = sampler.state_dict(position=2)
    again = DynamicBatchSampler(40, 8, rank=0, world_size=2, costs=SampleCosts(costs))
    again.load_state_dict(state)
    assert list(iter(again))[0] == sampler.indices(2)
    with pytest.raises(PlanError, match="costs="):
        DynamicBatchSampler(40, 8, rank=0, world_size=2,
                            costs=SampleCosts(costs[::-1].copy())).load_state_dict(state)
    with pytest.raises(PlanError, match="costs="):
        DynamicBatchSampler(40, 8, rank=0, world_size=2).load_state_dict(state)


def test_cost_mode_weights_gradients_by_cost_share_on_an_equal_plan():
    costs = np.array([1.0] * 6 + [9.0] * 2)  # a plan of (4, 4): cheap ones to rank 0
    sampler = DynamicBatchSampler(8, 8, rank=0, world_size=2, shuffle=False,
                                  costs=SampleCosts(costs))
    timer = StepTimer()
    state = DynamicBatchState(sampler, Rebalancer(sampler, StaticPolicy(8), LocalExchange(), timer),
                              timer)
    indices = next(iter(sampler))
    # Total 24, target 12 for rank 0: six ones and a nine (15) or six ones (6); 15 is nearer.
    assert indices == [0, 1, 2, 3, 4, 5, 6]
    assert state.weight() == pytest.approx(2 * 15 / 24)
    assert torch.tensor(state.weight()).item() != 1.0


@pytest.mark.mpi
@pytest.mark.parametrize("np", [2, 3])
def test_cost_mode_under_mpirun(run_mpi_file, np):
    run_mpi_file("mpi_costs.py", np=np, timeout=300)
