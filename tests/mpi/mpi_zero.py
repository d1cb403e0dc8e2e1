"""Multi-rank: ranks given 0 samples join the allreduce with weight 0, probe, and come back."""
import copy
import time

import pytest
import torch
from problems import ScriptedPolicy, make_problem, train_single_process
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dbs_hvd
from dbs_hvd.comm import default_exchange
from dbs_hvd.plan import Bounds


def run_epochs(hvd, sampler, model, optimizer, epochs, cost):
    """Train; ``cost(epoch, rank, batch_size)`` is the sleep of a step that computes.

    Returns, per epoch, this rank's trained indices per step (empty for a step it
    had 0 samples, probe or not) and the steps it ran a probe at.
    """
    dataset, _ = make_problem(n=sampler.dataset_size)
    index_set = TensorDataset(torch.arange(len(dataset)), *dataset.tensors)
    trained, probes = [], []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        steps, probed = [], []
        for idx, x, y in DataLoader(index_set, sampler=sampler, batch_size=None):
            optimizer.zero_grad()
            if len(y):  # a rank with nothing to compute sleeps for nothing
                time.sleep(cost(epoch, hvd.rank(), len(y)))
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            (step,) = optimizer.dbs.last_step
            steps.append(idx.tolist() if step.batch_size else [])
            if step.probe:
                probed.append(step.step)
        trained.append(steps)
        probes.append(probed)
    return trained, probes


def assert_exactly_once(trained, sampler, epochs):
    """The ranks' trained pieces of each step make up its global batch, nothing twice."""
    gathered = default_exchange().allgather(trained)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for step in range(sampler.steps_per_epoch):
            pieces = [i for ranks in gathered for i in ranks[epoch][step]]
            assert sorted(pieces) == sorted(int(i) for i in sampler.global_batch_indices(step))


@pytest.mark.parametrize("model_output", [True, False])
def test_ranks_with_zero_samples_leave_the_update_exact(hvd, model_output):
    # Scripted plans leave one rank and then another out; the left-out rank probes
    # every 3 steps. Every update must still be the single-process one.
    world = hvd.size()
    global_batch = 60
    first = tuple([0] + [global_batch // (world - 1)] * (world - 1))
    second = tuple([global_batch - 7 * (world - 2)] + [7] * (world - 2) + [0])
    dataset, model = make_problem(n=600)
    reference = copy.deepcopy(model)
    sampler = dbs_hvd.DynamicBatchSampler(len(dataset), global_batch, seed=6,
                                          bounds=Bounds(allow_zero=True))
    sampler.probe = (3, 2)
    policy = ScriptedPolicy(global_batch, [first, first, second])
    policy.bounds = Bounds(allow_zero=True)
    optimizer = dbs_hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sampler,
        named_parameters=model.named_parameters(), policy=policy, rebalance_every=3,
        model=model if model_output else None,
    )
    trained, probes = run_epochs(hvd, sampler, model, optimizer, 2, lambda *_: 0.0)
    assert_exactly_once(trained, sampler, 2)
    # Epoch 0: steps 0-2 equal, then `first` (rank 0 out); epoch 1 `second` (the last rank
    # out), from epoch 1 on: a rebalance due one step before an epoch's end runs at its end.
    assert sampler.plan.batch_sizes == second
    # Asserted alike on every rank: a rank failing alone would strand the others.
    everyone = default_exchange().allgather((trained, probes))
    first_trained, first_probes = everyone[0]
    assert [len(piece) for piece in first_trained[0][3:]] == [0] * 7
    assert first_probes == [[3, 6, 9], []]  # every third step while out
    assert everyone[-1][1] == [[], [0, 3, 6, 9]]
    train_single_process(reference, dataset, sampler, 2)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-10, msg=f"parameter {name}")


def test_a_straggler_is_left_out_while_it_pays_and_comes_back_when_it_speeds_up(hvd):
    # The last rank costs 80 ms per step whatever its batch in epoch 0 (a large fixed
    # per-step cost), then 0.1 ms per sample, against the others' 0.5 ms.
    world, last = hvd.size(), hvd.size() - 1

    def cost(epoch, rank, batch):
        if rank == last:
            return 0.08 if epoch == 0 else 0.0001 * batch
        return 0.0005 * batch

    epochs, global_batch = 3, 60
    dataset, model = make_problem(n=1200)
    reference = copy.deepcopy(model)
    sampler = dbs_hvd.DynamicBatchSampler(len(dataset), global_batch, seed=8)
    optimizer = dbs_hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sampler,
        named_parameters=model.named_parameters(), policy="paper", rebalance_every=2,
        model=model,
        zero_samples=dbs_hvd.ZeroSampleOptions(enabled=True, probe_every=2, probe_samples=8),
    )
    trained, probes = run_epochs(hvd, sampler, model, optimizer, epochs, cost)
    history = [(r.epoch, r.plan_after) for r in optimizer.rebalancer.history]
    left_out = [e for e, plan in history if plan[last] == 0]
    assert left_out and left_out[0] == 0, history  # left out during epoch 0
    assert min(plan.count(0) for _, plan in history) == 0
    back = [e for e, plan in history if e >= 1 and plan[last] > 0]
    assert back, history  # back once it sped up
    # While the straggler is slow only it is left out. Later, with the straggler now the
    # fastest, the policy may leave another rank out where its measurements say so.
    assert all(plan[:last].count(0) == 0 for e, plan in history if e == 0), str(history)
    assert default_exchange().allgather(history) == [history] * world
    assert_exactly_once(trained, sampler, epochs)
    assert sum(map(len, default_exchange().allgather(probes)[last])) >= 1  # the straggler probed
    train_single_process(reference, dataset, sampler, epochs)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-10, msg=f"parameter {name}")
