"""Multi-rank: model averaging weighted by samples; exact with H=1 and plain SGD."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import dbs_hvd
from dbs_hvd.averaging import ModelAveragingOptimizer
from dbs_hvd.comm import default_exchange
from dbs_hvd.plan import Plan
from problems import ScriptedPolicy, make_problem


def test_averaging_every_step_equals_the_global_batch_update(hvd):
    if hvd.size() != 3:
        pytest.skip("written for the plan (5, 17, 42) on 3 ranks")
    dataset, model = make_problem()
    reference = copy.deepcopy(model)
    sampler = dbs_hvd.DynamicBatchSampler(len(dataset), 64, seed=2, plan=Plan((5, 17, 42)))
    optimizer = ModelAveragingOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), sampler, model.named_parameters(),
        average_every=1, policy=ScriptedPolicy(64, [(30, 20, 14)]), rebalance_every=4,
    )
    for x, y in DataLoader(dataset, sampler=sampler, batch_size=None):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    x_all, y_all = dataset.tensors
    for step in range(sampler.steps_per_epoch):
        idx = torch.as_tensor(sampler.global_batch_indices(step))
        ref_opt.zero_grad()
        nn.functional.cross_entropy(reference(x_all[idx]), y_all[idx]).backward()
        ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-10, msg=f"parameter {name}")


def test_ranks_agree_after_each_averaging_and_the_loss_falls(hvd):
    dataset, model = make_problem(n=600)
    start = copy.deepcopy(model)
    sampler = dbs_hvd.DynamicBatchSampler(len(dataset), 60, seed=3)
    optimizer = ModelAveragingOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), sampler,
        model.named_parameters(), average_every=4, policy="dbs", rebalance_every=5,
    )
    # As dbs-train does: Horovod initialises the optimizer state with a step.
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    loss_fn = nn.CrossEntropyLoss()
    x_all, y_all = dataset.tensors
    before = loss_fn(start(x_all), y_all).item()
    exchange = default_exchange()
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for x, y in DataLoader(dataset, sampler=sampler, batch_size=None):
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
        # The epoch's last step always averages: every rank holds the same model.
        mine = [p.detach().clone() for p in model.parameters()]
        for theirs in exchange.allgather(mine):
            for a, b in zip(mine, theirs):
                assert torch.equal(a, b)
    assert loss_fn(model(x_all), y_all).item() < before
    windows = optimizer.rebalancer.history
    assert windows and all(sum(r.plan_after) == 60 for r in windows)
