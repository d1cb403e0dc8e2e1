"""sampler.py: exactly-once reading, equal step counts, mid-epoch plan changes, state."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils.data import DataLoader, TensorDataset

from dbs_hvd.plan import Bounds, Plan, PlanError, apportion
from dbs_hvd.sampler import DynamicBatchSampler


def samplers(n, global_batch, world, seed=0, **kwargs):
    return [DynamicBatchSampler(n, global_batch, rank=r, world_size=world, seed=seed, **kwargs)
            for r in range(world)]


@st.composite
def epochs_with_plan_changes(draw):
    world = draw(st.integers(1, 6))
    global_batch = draw(st.integers(world, 64))
    dataset = draw(st.integers(global_batch, 400))
    steps = dataset // global_batch
    changes = draw(st.lists(
        st.tuples(st.integers(0, steps), st.lists(st.floats(0.1, 10), min_size=world,
                                                  max_size=world)),
        max_size=4))
    return world, global_batch, dataset, sorted(changes, key=lambda c: c[0])


@settings(max_examples=150, deadline=None)
@given(epochs_with_plan_changes(), st.integers(0, 3))
def test_each_sample_read_exactly_once_per_epoch_whatever_the_plans(case, epoch):
    world, global_batch, dataset, changes = case
    ranks = samplers(dataset, global_batch, world, seed=7)
    for s in ranks:
        s.set_epoch(epoch)
    iterators = [iter(s) for s in ranks]
    read = [[] for _ in range(world)]
    pending = list(changes)
    for step in range(ranks[0].steps_per_epoch):
        while pending and pending[0][0] <= step:
            _, weights = pending.pop(0)
            plan = Plan(tuple(apportion(np.array(weights), global_batch, Bounds())))
            for s in ranks:
                s.set_plan(plan)
        for r, it in enumerate(iterators):
            read[r].append(next(it))
    for it in iterators:
        assert next(it, None) is None  # every rank ran the same number of steps
    flat = [i for per_rank in read for batch in per_rank for i in batch]
    assert len(flat) == len(set(flat)) == ranks[0].steps_per_epoch * global_batch
    dropped = set(range(dataset)) - set(flat)
    assert len(dropped) == dataset % global_batch
    # Each step's pieces together are that step's global batch.
    for step in range(ranks[0].steps_per_epoch):
        together = sorted(i for r in range(world) for i in read[r][step])
        assert together == sorted(ranks[0].global_batch_indices(step).tolist())


def test_dropped_samples_differ_between_epochs():
    s = DynamicBatchSampler(100, 32, rank=0, world_size=1, seed=3)
    tails = []
    for epoch in range(3):
        s.set_epoch(epoch)
        tails.append(frozenset(s.permutation()[s.steps_per_epoch * 32:].tolist()))
    assert len(tails[0]) == 4 and len(set(tails)) == 3


def test_plan_cannot_change_a_step_already_handed_out():
    s = DynamicBatchSampler(64, 8, rank=0, world_size=2)
    it = iter(s)
    next(it), next(it)
    with pytest.raises(PlanError, match="already handed out"):
        s.set_plan(Plan((6, 2)), start_step=1)
    s.set_plan(Plan((6, 2)))
    assert len(next(it)) == 6 and s.plan_at(1).batch_sizes == (4, 4)


def test_consumed_batches_come_back_in_order_for_weighting():
    s = DynamicBatchSampler(40, 10, rank=1, world_size=2, plan=Plan((3, 7)))
    loader_order = [len(b) for b in s]
    assert loader_order == [7] * 4
    assert [s.pop_consumed().step for _ in range(4)] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="call optimizer.step"):
        s.pop_consumed()


def test_works_as_dataloader_batch_sampler_with_workers():
    data = TensorDataset(torch.arange(50.0))
    ranks = samplers(50, 10, 2)
    for s, plan_rank in zip(ranks, range(2)):
        s.set_plan(Plan((3, 7)))
    seen = []
    for s in ranks:
        s.set_epoch(1)
        loader = DataLoader(data, batch_sampler=s, num_workers=2)
        batches = [b[0] for b in loader]
        assert len(batches) == 5
        seen += [int(x) for b in batches for x in b]
    assert sorted(seen) == list(range(50))


def test_state_dict_round_trip_resumes_mid_epoch():
    a = DynamicBatchSampler(100, 10, rank=0, world_size=2, seed=5)
    a.set_epoch(2)
    a.set_plan(Plan((7, 3)), start_step=0)
    full = [b for b in a]
    state = a.state_dict(position=4)
    b = DynamicBatchSampler(100, 10, rank=0, world_size=2, seed=5)
    b.load_state_dict(state)
    assert b.epoch == 2 and len(b) == 6
    assert list(b) == full[4:]


def test_state_from_another_configuration_is_refused():
    state = DynamicBatchSampler(100, 10, rank=0, world_size=2, seed=5).state_dict()
    with pytest.raises(PlanError, match="seed=5"):
        DynamicBatchSampler(100, 10, rank=0, world_size=2, seed=6).load_state_dict(state)


def test_data_set_smaller_than_global_batch_is_refused():
    with pytest.raises(PlanError, match="fewer than the global batch"):
        DynamicBatchSampler(30, 64, rank=0, world_size=2)


def test_rank_outside_world_is_refused():
    with pytest.raises(PlanError, match="outside a world"):
        DynamicBatchSampler(30, 8, rank=2, world_size=2)
