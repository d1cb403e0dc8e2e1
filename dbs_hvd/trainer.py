"""The dbs-train epoch loop: data, model, DBS sampler and optimizer, emulation, logs.

It is also the reference for using the library in a script: the training loop
below is a plain Horovod loop except for the sampler and the optimizer wrapper.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from . import data, models
from .comm import check_same_on_all_ranks, default_exchange
from .emulate import DeviceEmulator, make_emulator
from .metrics import EpochRecord, JsonLinesLog, balance_efficiency
from .optim import DistributedOptimizer
from .plan import Bounds, PlanError
from .sampler import DynamicBatchSampler


@dataclass
class TrainConfig:
    """Everything a run depends on; identical on every rank (checked at start)."""

    model: str = "mlp"
    dataset: str = "digits"
    data_dir: Optional[str] = None
    samples: int = 4096  # synthetic data set size
    image_size: int = 8  # digits only: upsample to this size
    hidden: int = 128
    global_batch: int = 64
    epochs: int = 20
    lr: float = 0.05
    momentum: float = 0.9
    policy: str = "paper"
    rebalance_every: Optional[int] = None
    min_batch: int = 1
    max_batch: Optional[int] = None
    slowdown: Optional[str] = None
    virtual_device: Optional[str] = None
    seed: int = 0
    threads: int = 1
    workers: int = 0
    log: Optional[str] = None
    progress: bool = False


def evaluate(model: nn.Module, dataset: TensorDataset, batch: int = 1024) -> float:
    """Accuracy on the whole test set (every rank evaluates alike: no collective)."""
    model.eval()
    correct = 0
    with torch.no_grad():
        x_all, y_all = dataset.tensors
        for start in range(0, len(y_all), batch):
            out = model(x_all[start:start + batch])
            correct += int((out.argmax(1) == y_all[start:start + batch]).sum())
    model.train()
    return correct / len(y_all)


def _epoch_summary(epoch: int, optimizer, sampler: DynamicBatchSampler, start_plan,
                   loss: float, accuracy: float, seconds: float, policy: str) -> EpochRecord:
    """Sum the epoch's rebalance windows (every rank holds all ranks' figures)."""
    windows = [r for r in optimizer.rebalancer.history if r.epoch == epoch]
    world = sampler.world_size
    samples = np.zeros(world)
    compute = np.zeros(world)
    wait = np.zeros(world)
    plans = [list(start_plan.batch_sizes)]
    for record in windows:
        samples += [r["samples"] for r in record.ranks]
        compute += [r["compute_seconds"] for r in record.ranks]
        wait += [r["wait_seconds"] for r in record.ranks]
        if record.start_step < sampler.steps_per_epoch and list(record.plan_after) != plans[-1]:
            plans.append(list(record.plan_after))
    return EpochRecord(
        epoch=epoch, loss=loss, accuracy=accuracy, seconds=seconds,
        batch_sizes=list(start_plan.batch_sizes),
        next_batch_sizes=list(sampler.plan.batch_sizes),
        compute_seconds=compute.round(4).tolist(), wait_seconds=wait.round(4).tolist(),
        samples=samples.astype(int).tolist(),
        efficiency=balance_efficiency(samples, compute, compute + wait),
        policy=policy, plans=plans,
    )


def train(config: TrainConfig) -> list[EpochRecord]:
    """Run DBS training on all ranks of the job; returns the epoch records (all ranks)."""
    import horovod.torch as hvd
    from tqdm import tqdm

    hvd.init()
    rank, world = hvd.rank(), hvd.size()
    exchange = default_exchange()
    # First collective of the run: ranks launched with different settings fail
    # here, together, before any of them could diverge into other collectives.
    check_same_on_all_ranks(exchange, asdict(config))
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)

    emulator: DeviceEmulator = make_emulator(rank, world, config.slowdown, config.virtual_device)
    train_set, test_set = data.load(config.dataset, flatten=config.model == "mlp",
                                    seed=config.seed, samples=config.samples,
                                    data_dir=config.data_dir, image_size=config.image_size)
    model = models.build(config.model, train_set.tensors[0].shape[1:], hidden=config.hidden)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    sampler = DynamicBatchSampler(len(train_set), config.global_batch, seed=config.seed,
                                  bounds=Bounds(config.min_batch, config.max_batch))
    # The sampler yields index lists; a TensorDataset indexes them in one go.
    loader = DataLoader(train_set, sampler=sampler, batch_size=None, num_workers=config.workers)
    optimizer = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum),
        sampler, named_parameters=model.named_parameters(), policy=config.policy,
        rebalance_every=config.rebalance_every, exchange=exchange,
    )
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    criterion = nn.CrossEntropyLoss()
    log = JsonLinesLog(config.log) if (config.log and rank == 0) else None
    if rank == 0:
        print(f"dbs-train: {world} ranks, {config.model} on {config.dataset} "
              f"({len(train_set)} train / {len(test_set)} test), global batch "
              f"{config.global_batch}, policy {config.policy}, "
              f"{sampler.steps_per_epoch} steps/epoch, {sampler.dropped_per_epoch} samples "
              f"dropped/epoch, emulation: {config.slowdown or config.virtual_device or 'none'}",
              flush=True)

    records = []
    try:
        for epoch in range(config.epochs):
            sampler.set_epoch(epoch)
            start_plan = sampler.plan
            loss_sum = torch.zeros(2, dtype=torch.float64)
            started = time.perf_counter()
            batches = tqdm(loader, disable=not (config.progress and rank == 0),
                           desc=f"epoch {epoch}", leave=False)
            for x, y in batches:
                optimizer.zero_grad()
                forward_start = time.perf_counter()
                loss = criterion(model(x), y)
                forward = time.perf_counter() - forward_start
                emulator.before_backward(len(y), forward)
                backward_start = time.perf_counter()
                loss.backward()
                emulator.after_backward(forward, time.perf_counter() - backward_start)
                optimizer.step()
                loss_sum += torch.tensor([loss.item() * len(y), len(y)], dtype=torch.float64)
                batches.set_postfix(batch=list(sampler.plan.batch_sizes), refresh=False)
            seconds = time.perf_counter() - started
            totals = hvd.allreduce(loss_sum, op=hvd.Sum, name="dbs_hvd.epoch_loss")
            record = _epoch_summary(
                epoch, optimizer, sampler, start_plan, float(totals[0] / totals[1]),
                evaluate(model, test_set), seconds, config.policy,
            )
            records.append(record)
            if rank == 0:
                print(record.line(), flush=True)
                if log:
                    log.write(record)
    finally:
        if log:
            log.close()
    return records


__all__ = ["TrainConfig", "train", "evaluate", "PlanError"]
