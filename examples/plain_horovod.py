"""A plain Horovod training script, as users write it today (the "before" of the pair).

    mpirun -np 2 python examples/plain_horovod.py
"""
import horovod.torch as hvd
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

hvd.init()
torch.manual_seed(0)
digits = load_digits()
train_set = TensorDataset(torch.tensor(digits.data / 16.0, dtype=torch.float32),
                          torch.tensor(digits.target))
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

sampler = DistributedSampler(train_set, num_replicas=hvd.size(), rank=hvd.rank(), seed=0)
loader = DataLoader(train_set, batch_size=64 // hvd.size(), sampler=sampler, drop_last=True)
optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                     named_parameters=model.named_parameters())
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
