"""The same script with dbs_hvd: the three changed lines are marked "# DBS".

    mpirun -np 2 python examples/with_dbs.py
"""
import horovod.torch as hvd
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dbs_hvd

hvd.init()
torch.manual_seed(0)
digits = load_digits()
train_set = TensorDataset(torch.tensor(digits.data / 16.0, dtype=torch.float32),
                          torch.tensor(digits.target))
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

sampler = dbs_hvd.DynamicBatchSampler(len(train_set), global_batch=64, seed=0)  # DBS
loader = DataLoader(train_set, batch_sampler=sampler)  # DBS
optimizer = dbs_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                         sampler, named_parameters=model.named_parameters())  # DBS
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
hvd.broadcast_optimizer_state(optimizer, root_rank=0)

for epoch in range(10):
    sampler.set_epoch(epoch)
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

x_all, y_all = train_set.tensors
accuracy = (model(x_all).argmax(1) == y_all).float().mean().item()
if hvd.rank() == 0:
    print(f"train accuracy {accuracy:.3f}")
    print(f"final plan {list(sampler.plan.batch_sizes)}")
