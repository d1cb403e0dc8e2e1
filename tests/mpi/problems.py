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
