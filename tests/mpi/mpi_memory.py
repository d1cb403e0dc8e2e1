"""Multi-rank: a rank running out of memory (injected) retries the step on all ranks, exactly."""
import copy
import time

import pytest
import torch
from problems import make_problem, train_single_process
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dbs_hvd
from dbs_hvd.comm import default_exchange
from dbs_hvd.memory import INJECT_ENV
from dbs_hvd.plan import Bounds, Plan, PlanError

EPOCHS = 2


def train(hvd, sampler, model, guard_options=None, model_output=True, policy="paper"):
    """Train EPOCHS epochs under a MemoryGuard; return the guard and each epoch's trained batches."""
    dataset, _ = make_problem(n=sampler.dataset_size)
    index_set = TensorDataset(torch.arange(len(dataset)), *dataset.tensors)
    optimizer = dbs_hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sampler,
        named_parameters=model.named_parameters(), policy=policy, rebalance_every=2,
        model=model if model_output else None,
    )
    guard = dbs_hvd.MemoryGuard(optimizer, guard_options, model=model)
    loss_fn = nn.CrossEntropyLoss()
    world, rank = hvd.size(), hvd.rank()

    def attempt(batch):
        _, x, y = batch
        optimizer.zero_grad()
        # The last rank is the fastest: the paper's rule gives it the most samples.
        time.sleep(0.0002 * len(y) * (world - rank))
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    trained = []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        batches = []
        for batch in DataLoader(index_set, sampler=sampler, batch_size=None):
            batch, _ = guard.step(batch, attempt, load=lambda idx: index_set[idx])
            batches.append(batch[0].tolist())
        trained.append(batches)
    return guard, trained


@pytest.mark.parametrize("phase", ["forward", "backward"])
@pytest.mark.parametrize("model_output", [True, False])
def test_out_of_memory_on_one_rank_retries_the_step_exactly_once(hvd, monkeypatch, phase, model_output):
    world = hvd.size()
    last = world - 1
    # The last rank starts with the largest batch and fails at `limit` samples or more.
    plan = {2: (20, 40), 3: (10, 20, 30)}[world]
    limit = {2: 35, 3: 25}[world]
    monkeypatch.setenv(INJECT_ENV, f"{last}:{limit}:{phase}")
    global_batch = sum(plan)
    dataset, model = make_problem(n=600)
    reference = copy.deepcopy(model)
    sampler = dbs_hvd.DynamicBatchSampler(len(dataset), global_batch, seed=4, plan=Plan(plan))
    guard, trained = train(hvd, sampler, model, model_output=model_output)

    # The failures, identical on every rank: the first at the first step, at the planned size.
    failures = [(f.epoch, f.step, f.failed, f.caps, f.plan) for f in guard.failures]
    assert failures, "no step failed: the injection did not fire"
    assert failures[0][:3] == (0, 0, {last: plan[last]})
    assert all(set(failed) == {last} and size >= limit for _, _, failed, _, _ in failures
               for size in failed.values())
    assert default_exchange().allgather(failures) == [failures] * world
    final_cap = failures[-1][3][last]
    assert final_cap < limit
    # Every plan from the last failure on keeps the failing rank under its cap.
    assert all(p.batch_sizes[last] <= final_cap
               for r in guard.optimizer.rebalancer.history for p in [Plan(r.plan_after)])
    # Exactly once: the ranks' trained batches cover each epoch's global batches, no repeats.
    gathered = default_exchange().allgather(trained)
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        read = [i for ranks in gathered for batch in ranks[epoch] for i in batch]
        expected = [int(i) for s in range(sampler.steps_per_epoch) for i in sampler.global_batch_indices(s)]
        assert len(read) == len(set(read)) == len(expected)
        assert sorted(read) == sorted(expected)
        assert {len(ranks[epoch]) for ranks in gathered} == {sampler.steps_per_epoch}
        # Step by step: the pieces of each step make up its global batch.
        for step in range(sampler.steps_per_epoch):
            pieces = sorted(i for ranks in gathered for i in ranks[epoch][step])
            assert pieces == sorted(int(i) for i in sampler.global_batch_indices(step))

    # The failing rank's batches after its failures stayed under the limit (checked on
    # every rank alike: a rank failing alone would strand the others).
    sizes = [len(b) for epoch in gathered[last] for b in epoch]
    assert max(sizes[len(failures):]) < limit

    # The update is the single-process one on the same global batches.
    train_single_process(reference, dataset, sampler, EPOCHS)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-10, msg=f"parameter {name}")


def test_user_caps_hold_from_the_first_plan(hvd, monkeypatch):
    # Per-rank caps given by the user: no failure, and no plan ever gives a rank more.
    monkeypatch.delenv(INJECT_ENV, raising=False)
    world = hvd.size()
    caps = tuple([40] * (world - 1) + [14])
    global_batch = 12 * world
    dataset, model = make_problem(n=480)
    sampler = dbs_hvd.DynamicBatchSampler(len(dataset), global_batch, seed=2,
                                          bounds=Bounds(rank_max=caps))
    guard, trained = train(hvd, sampler, model)
    assert guard.failures == []
    plans = [r.plan_after for r in guard.optimizer.rebalancer.history]
    assert all(p[-1] <= 14 for p in plans)
    moved = [p for p in plans if p != (12,) * world]
    assert moved, "the plan never moved: the caps were not exercised against the policy"
    # The last rank is the fastest and would take more than 14 (at least 16 of 24 on
    # two ranks, 19 of 36 on three): its cap holds it there while the others move.
    assert any(p[-1] == 14 for p in moved), plans


def test_caps_that_cannot_hold_the_global_batch_fail_alike_on_every_rank(hvd, monkeypatch):
    world = hvd.size()
    # Rank 0 fails at 26 samples or more; its peers hold just enough for a cap of 27 on it.
    monkeypatch.setenv(INJECT_ENV, "0:26")
    global_batch = 30 * world
    peer_cap = -(-(global_batch - 27) // (world - 1))
    caps = tuple([30] + [peer_cap] * (world - 1))
    dataset, model = make_problem(n=20 * global_batch)
    sampler = dbs_hvd.DynamicBatchSampler(len(dataset), global_batch, seed=1,
                                          bounds=Bounds(rank_max=caps))
    with pytest.raises(PlanError) as raised:
        train(hvd, sampler, model, policy="static")
    message = str(raised.value)
    # 30 fails (cap 27, the others take the rest), 27 fails (cap 24): the caps hold too few.
    assert "out of memory on rank 0 at 27 samples" in message
    room = 24 + peer_cap * (world - 1)
    assert f"sum to {room}, below the global batch {global_batch}" in message
    assert "rank_max=" in message
    assert default_exchange().allgather(message) == [message] * world
