"""Multi-rank: DBS equals single-process training, reads each sample once, fails alike."""
import copy
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dbs_hvd
from dbs_hvd.comm import DbsError, default_exchange
from dbs_hvd.plan import Plan
from problems import ScriptedPolicy, make_problem


def assert_matches_single_process(model, reference, dataset, sampler, loss_fn):
    """Train ``reference`` in one process on the epoch's global batches (SGD, lr 0.1,
    momentum 0.9) and check that ``model``, trained with DBS, ended equal."""
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    x_all, y_all = dataset.tensors
    for step in range(sampler.steps_per_epoch):
        idx = torch.as_tensor(sampler.global_batch_indices(step))
        ref_opt.zero_grad()
        loss_fn(reference(x_all[idx]), y_all[idx]).backward()
        ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-10, msg=f"parameter {name}")


@pytest.mark.parametrize("weight_at", ["gradients", "model_output"])
def test_updates_equal_single_process_training_on_the_global_batch(hvd, weight_at):
    if hvd.size() != 3:
        pytest.skip("written for the plan (5, 17, 42) on 3 ranks")
    global_batch = 64
    dataset, model = make_problem()
    reference = copy.deepcopy(model)
    sampler = dbs_hvd.DynamicBatchSampler(len(dataset), global_batch, seed=11,
                                          plan=Plan((5, 17, 42)))
    policy = ScriptedPolicy(global_batch, [(30, 20, 14), (10, 44, 10)])
    optimizer = dbs_hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sampler,
        named_parameters=model.named_parameters(), policy=policy, rebalance_every=3,
        model=model if weight_at == "model_output" else None,
    )
    loader = DataLoader(dataset, sampler=sampler, batch_size=None)
    loss_fn = nn.CrossEntropyLoss()
    seen_sizes = []
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        seen_sizes.append(len(y))
    expected_sizes = [(5, 17, 42)] * 3 + [(30, 20, 14)] * 3 + [(10, 44, 10)] * 2
    assert seen_sizes == [sizes[hvd.rank()] for sizes in expected_sizes]
    assert_matches_single_process(model, reference, dataset, sampler, loss_fn)


@pytest.mark.parametrize("weight_at", ["gradients", "model_output"])
def test_equal_split_steps_skip_the_weighting_and_stay_exact(hvd, weight_at):
    # Equal split (weight exactly 1: plain Horovod's path, nothing scaled),
    # then an uneven plan, then the equal split again: every update must be
    # the single-process one, whichever path each step took.
    world, global_batch = hvd.size(), 60
    equal = (global_batch // world,) * world
    uneven = tuple(range(1, world)) + (global_batch - sum(range(1, world)),)
    dataset, model = make_problem(n=480)
    reference = copy.deepcopy(model)
    sampler = dbs_hvd.DynamicBatchSampler(len(dataset), global_batch, seed=3)
    optimizer = dbs_hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sampler,
        named_parameters=model.named_parameters(),
        policy=ScriptedPolicy(global_batch, [uneven, equal]), rebalance_every=3,
        model=model if weight_at == "model_output" else None,
    )
    loss_fn = nn.CrossEntropyLoss()
    seen = []
    for x, y in DataLoader(dataset, sampler=sampler, batch_size=None):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        seen.append(len(y))
    assert seen == [p[hvd.rank()] for p in [equal] * 3 + [uneven] * 3 + [equal] * 2]
    assert_matches_single_process(model, reference, dataset, sampler, loss_fn)


def test_every_sample_read_once_and_equal_step_counts_across_rebalances(hvd):
    dataset, model = make_problem(n=300)
    sampler = dbs_hvd.DynamicBatchSampler(len(dataset), 32, seed=5)
    optimizer = dbs_hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01), sampler,
        named_parameters=model.named_parameters(), policy="paper", rebalance_every=2,
    )
    index_set = TensorDataset(torch.arange(len(dataset)), *dataset.tensors)
    loader = DataLoader(index_set, sampler=sampler, batch_size=None)
    exchange = default_exchange()
    for epoch in range(2):
        sampler.set_epoch(epoch)
        read = []
        for idx, x, y in loader:
            optimizer.zero_grad()
            # Rank-dependent cost so the paper policy really moves the plan.
            time.sleep(0.0005 * len(y) * (1 + hvd.rank()))
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            read += idx.tolist()
        gathered = exchange.allgather({"read": read, "steps": len(loader)})
        everything = [i for g in gathered for i in g["read"]]
        assert len(everything) == len(set(everything)) == sampler.steps_per_epoch * 32
        assert {g["steps"] for g in gathered} == {sampler.steps_per_epoch}
    moved = [r for r in optimizer.rebalancer.history if r.plan_after != r.plan_before]
    assert moved, "the plan never moved: the test would not exercise rebalancing"


def test_every_rank_holds_the_identical_plan(hvd):
    dataset, model = make_problem(n=256)
    sampler = dbs_hvd.DynamicBatchSampler(len(dataset), 40, seed=1)
    optimizer = dbs_hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01), sampler,
        named_parameters=model.named_parameters(), rebalance_every=1,
    )
    for x, y in DataLoader(dataset, sampler=sampler, batch_size=None):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    mine = [r.plan_after for r in optimizer.rebalancer.history]
    assert all(sum(p) == 40 for p in mine)
    assert default_exchange().allgather(mine) == [mine] * hvd.size()


def test_a_budget_stretches_the_interval_alike_on_every_rank(hvd):
    # Steps of about a millisecond: a rebalance (two collectives and a plan)
    # costs more than 5% of two steps, so the interval must grow, and every
    # rank must rebalance at the same steps (or the collectives would mismatch).
    dataset, model = make_problem(n=4000)
    sampler = dbs_hvd.DynamicBatchSampler(len(dataset), 20, seed=2)
    optimizer = dbs_hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01), sampler,
        named_parameters=model.named_parameters(), rebalance_every=2, rebalance_budget=0.05,
    )
    for x, y in DataLoader(dataset, sampler=sampler, batch_size=None):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    mine = [(r.step, r.extra["interval"]) for r in optimizer.rebalancer.history]
    assert default_exchange().allgather(mine) == [mine] * hvd.size()
    assert max(interval for _, interval in mine) > 2, mine
    assert len(mine) < sampler.steps_per_epoch // 2


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_timing_on_one_rank_raises_on_every_rank(hvd, bad):
    dataset, model = make_problem(n=128)
    sampler = dbs_hvd.DynamicBatchSampler(len(dataset), 32)
    optimizer = dbs_hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01), sampler,
        named_parameters=model.named_parameters(),
    )
    rebalancer = optimizer.rebalancer
    rebalancer.timer.window.steps = 3
    rebalancer.timer.window.samples = 3 * sampler.plan.batch_sizes[hvd.rank()]
    rebalancer.timer.window.compute_seconds = bad if hvd.rank() == hvd.size() - 1 else 1.0
    with pytest.raises(DbsError, match=f"rank {hvd.size() - 1} reported compute time"):
        rebalancer.rebalance(step=2)
