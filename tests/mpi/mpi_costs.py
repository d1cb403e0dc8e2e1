"""Multi-rank cost mode: updates equal one process's per-token update, samples read once,
and the policy learns seconds per unit of cost."""
import copy
import time

import numpy as np
import pytest
import torch
from problems import ScriptedPolicy
from torch import nn
from torch.utils.data import DataLoader

import dbs_hvd
from dbs_hvd.comm import DbsError, default_exchange

VOCAB = 11


def make_sequences(n, seed=0, longest=12):
    """``n`` token sequences of 1..longest targets each: (inputs, targets) pairs."""
    rng = np.random.default_rng(seed)
    samples = []
    for length in rng.integers(1, longest + 1, size=n):
        tokens = torch.as_tensor(rng.integers(0, VOCAB, size=length + 1))
        samples.append((tokens[:-1], tokens[1:]))
    return samples


def pad(batch):
    """Pad a batch to its longest sequence; the mask marks real targets."""
    longest = max(len(x) for x, _ in batch)
    x = torch.zeros(len(batch), longest, dtype=torch.long)
    y = torch.zeros(len(batch), longest, dtype=torch.long)
    mask = torch.zeros(len(batch), longest, dtype=torch.float64)
    for row, (inputs, targets) in enumerate(batch):
        x[row, : len(inputs)], y[row, : len(targets)], mask[row, : len(targets)] = inputs, targets, 1
    return x, y, mask


def token_mean_loss(model, x, y, mask):
    """Cross entropy summed over the batch's real targets, divided by their number."""
    logits = model(x)
    losses = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), reduction="none")
    return (losses * mask.reshape(-1)).sum() / mask.sum()


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(VOCAB, 8), nn.Tanh(), nn.Linear(8, VOCAB)).double()


@pytest.mark.parametrize("order", ["sorted", "stream"])
@pytest.mark.parametrize("weight_at", ["gradients", "model_output"])
def test_cost_mode_updates_equal_one_process_on_the_global_batch(hvd, weight_at, order):
    world, global_batch = hvd.size(), 24
    data = make_sequences(240, seed=1)
    costs = [len(y) for _, y in data]
    model = make_model()
    reference = copy.deepcopy(model)
    uneven = tuple(range(1, world)) + (global_batch - sum(range(1, world)),)
    plans = [uneven, tuple(reversed(uneven))]
    sampler = dbs_hvd.DynamicBatchSampler(len(data), global_batch, seed=5,
                                          costs=dbs_hvd.SampleCosts(costs, order=order))
    optimizer = dbs_hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), sampler,
        named_parameters=model.named_parameters(), policy=ScriptedPolicy(global_batch, plans),
        rebalance=dbs_hvd.RebalanceOptions(every=3, budget=0, min_seconds=0),
        model=model if weight_at == "model_output" else None,
    )
    index_set = [(i, *data[i]) for i in range(len(data))]

    def collate(batch):
        return [i for i, *_ in batch], *pad([pair for _, *pair in batch])

    read = []
    for step, (idx, x, y, mask) in enumerate(DataLoader(index_set, batch_sampler=sampler,
                                                        collate_fn=collate)):
        plan = sampler.plan_at(step).batch_sizes
        whole = [costs[i] for i in sampler.global_batch_indices(step)]
        # This rank's share of the step's cost follows the plan within one sample's cost.
        share = sum(costs[i] for i in idx) / sum(whole)
        assert abs(share - plan[hvd.rank()] / global_batch) <= 2 * max(whole) / sum(whole)
        optimizer.zero_grad()
        token_mean_loss(model, x, y, mask).backward()
        optimizer.step()
        read += idx
    moves = [r.plan_after for r in optimizer.rebalancer.history if r.plan_after != r.plan_before]
    assert moves == plans, moves
    gathered = default_exchange().allgather(read)
    everything = [i for part in gathered for i in part]
    assert len(everything) == len(set(everything)) == sampler.steps_per_epoch * global_batch

    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    for step in range(sampler.steps_per_epoch):
        x, y, mask = pad([data[i] for i in sampler.global_batch_indices(step)])
        ref_opt.zero_grad()
        token_mean_loss(reference, x, y, mask).backward()
        ref_opt.step()
    moved = False
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=f"parameter {name}")
        moved |= not torch.equal(q, make_model().state_dict()[name])
    assert moved, "training changed nothing: the comparison would be empty"


@pytest.mark.parametrize("policy", ["paper", "dbs"])
def test_the_policy_learns_seconds_per_unit_of_cost(hvd, policy):
    # Each rank sleeps in proportion to its batch's cost, the last rank three
    # times as long per unit: split by cost, the plan must settle at 3:1
    # between rank 0 and the last rank, whatever the sample counts are.
    if hvd.size() != 2:
        pytest.skip("written for 2 ranks")
    global_batch, per_unit = 32, 0.0003
    data = make_sequences(32 * 16, seed=2)
    costs = [len(y) for _, y in data]
    model = make_model()
    sampler = dbs_hvd.DynamicBatchSampler(len(data), global_batch, seed=3,
                                          costs=dbs_hvd.SampleCosts(costs))
    optimizer = dbs_hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), sampler,
        named_parameters=model.named_parameters(), policy=policy,
        rebalance=dbs_hvd.RebalanceOptions(every=2, budget=0, min_seconds=0),
    )
    slowness = 3.0 if hvd.rank() == 1 else 1.0
    counts = []
    for x, y, mask in DataLoader(data, batch_sampler=sampler, collate_fn=pad):
        optimizer.zero_grad()
        time.sleep(per_unit * slowness * float(mask.sum()))
        token_mean_loss(model, x, y, mask).backward()
        optimizer.step()
        counts.append(len(x))
    final = optimizer.rebalancer.history[-1]
    plan = final.plan_after
    assert abs(plan[0] - 24) <= 2, [r.plan_after for r in optimizer.rebalancer.history]
    # The windows counted cost in the plan's units: the ranks' units add up to B per step.
    for record in optimizer.rebalancer.history:
        steps = record.ranks[0].steps
        assert sum(w.samples for w in record.ranks) == pytest.approx(global_batch * steps)
    # ... and the split is by cost: rank 0, given the cheap samples, reads more than 3/4 of them.
    gathered = default_exchange().allgather(counts[-4:])
    assert sum(gathered[0]) > 0.75 * sum(map(sum, gathered)), gathered


def test_ranks_given_different_costs_fail_alike_at_set_up(hvd):
    data = make_sequences(60, seed=4)
    costs = [len(y) + (hvd.rank() if i == 0 else 0) for i, (_, y) in enumerate(data)]
    model = make_model()
    sampler = dbs_hvd.DynamicBatchSampler(len(data), 12, costs=dbs_hvd.SampleCosts(costs))
    with pytest.raises(DbsError, match="different settings.*costs"):
        dbs_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sampler,
                                     named_parameters=model.named_parameters())


def test_a_cost_mode_sampler_without_the_wrapper_refuses_even_an_equal_plan(hvd):
    # Equal counts still carry unequal costs: plain Horovod averaging would weight them wrongly.
    data = make_sequences(60, seed=6)
    sampler = dbs_hvd.DynamicBatchSampler(len(data), 6 * hvd.size(),
                                          costs=dbs_hvd.SampleCosts([len(y) for _, y in data]))
    assert len(set(sampler.plan.batch_sizes)) == 1
    with pytest.raises(DbsError, match="batches of different costs"):
        next(iter(sampler))


def test_cost_mode_with_accumulation_and_prefetching_workers_stays_exact(hvd):
    # Two backward passes per optimizer step, each micro-batch weighted by its
    # own cost share, and DataLoader workers fetching ahead, so a new plan can
    # begin between the micro-batches of one optimizer step.
    world, global_batch, passes = hvd.size(), 18, 2
    data = make_sequences(18 * 9, seed=8)  # 9 steps: the last group has one micro-batch
    costs = [len(y) for _, y in data]
    model = make_model(seed=3)
    reference = copy.deepcopy(model)
    uneven = tuple(range(1, world)) + (global_batch - sum(range(1, world)),)
    plans = [uneven, tuple(reversed(uneven)), uneven]
    sampler = dbs_hvd.DynamicBatchSampler(len(data), global_batch, seed=9,
                                          costs=dbs_hvd.SampleCosts(costs))
    optimizer = dbs_hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), sampler,
        named_parameters=model.named_parameters(), policy=ScriptedPolicy(global_batch, plans),
        rebalance=dbs_hvd.RebalanceOptions(every=2, budget=0, min_seconds=0),
        backward_passes_per_step=passes,
    )
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=pad, num_workers=2,
                        prefetch_factor=2)
    steps = sampler.steps_per_epoch
    for i, (x, y, mask) in enumerate(loader):
        (token_mean_loss(model, x, y, mask) / passes).backward()
        if (i + 1) % passes == 0 or i + 1 == steps:
            optimizer.step()
            optimizer.zero_grad()
    assert sampler.steps_trained == steps
    moves = [r.plan_after for r in optimizer.rebalancer.history if r.plan_after != r.plan_before]
    assert len(moves) >= 2, moves

    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    for i in range(steps):
        x, y, mask = pad([data[j] for j in sampler.global_batch_indices(i)])
        (token_mean_loss(reference, x, y, mask) / passes).backward()
        if (i + 1) % passes == 0 or i + 1 == steps:
            ref_opt.step()
            ref_opt.zero_grad()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=f"parameter {name}")
