"""Shared pieces of the multi-rank test files."""
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dbs_hvd.plan import Plan, Policy


class ScriptedPolicy(Policy):
    """Returns the given plans in order: forces uneven plans through the real machinery."""

    name = "scripted"

    def __init__(self, global_batch, plans):
        super().__init__(global_batch)
        self.plans = list(plans)

    def propose(self, stats, current):
        return Plan(self.plans.pop(0)) if self.plans else current


def make_problem(seed=0, n=512, features=10, classes=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=gen)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, classes)).double()
    return TensorDataset(x, y), model


def train_single_process(model, dataset, sampler, epochs):
    """Train ``model`` in one process on ``sampler``'s global batches, epoch by epoch
    (SGD, lr 0.1, momentum 0.9): the reference a DBS run must end equal to."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x_all, y_all = dataset.tensors
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for step in range(sampler.steps_per_epoch):
            idx = torch.as_tensor(sampler.global_batch_indices(step))
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
            optimizer.step()
    return model
