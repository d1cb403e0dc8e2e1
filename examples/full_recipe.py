"""A fuller Horovod training script with dbs_hvd: what real scripts add to the basic loop.

LR schedule, gradient accumulation, mixed precision with gradient clipping
(Horovod's recipe), BatchNorm, DataLoader workers, evaluation on rank 0
between steps and a mid-epoch checkpoint that a second run resumes from.

    mpirun -np 2 python examples/full_recipe.py [--resume]
"""
import argparse
import os
import tempfile

import dbs_hvd  # before hvd.init(): under mpirun it initialises MPI through mpi4py
import horovod.torch as hvd
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=8)
parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
parser.add_argument("--checkpoint", default=os.path.join(tempfile.gettempdir(),
                                                         "dbs_hvd_full_recipe.pt"))
args = parser.parse_args()

hvd.init()
torch.manual_seed(0)
digits = load_digits()
train_set = TensorDataset(torch.tensor(digits.data / 16.0, dtype=torch.float32),
                          torch.tensor(digits.target))
model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))

ACCUMULATE = 2  # backward passes (micro-batches) per optimizer step
sampler = dbs_hvd.DynamicBatchSampler(len(train_set), global_batch=64, seed=0)
loader = DataLoader(train_set, batch_sampler=sampler, num_workers=2, persistent_workers=True)
optimizer = dbs_hvd.DistributedOptimizer(
    torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sampler,
    named_parameters=model.named_parameters(),
    model=model,  # BatchNorm: no rank gets fewer than 2 samples per micro-batch
    backward_passes_per_step=ACCUMULATE)
steps_per_epoch = -(-sampler.steps_per_epoch // ACCUMULATE)
scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.2,
                                                total_steps=args.epochs * steps_per_epoch)
scaler = torch.amp.GradScaler("cpu")

first_epoch = 0
if args.resume:
    state = torch.load(args.checkpoint, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    sampler.load_state_dict(state["sampler"])  # mid-epoch: continues at the saved step
    first_epoch = state["sampler"]["epoch"]
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
hvd.broadcast_optimizer_state(optimizer, root_rank=0)


def evaluate() -> float:
    model.eval()
    with torch.no_grad():
        x_all, y_all = train_set.tensors
        accuracy = (model(x_all).argmax(1) == y_all).float().mean().item()
    model.train()
    return accuracy


for epoch in range(first_epoch, args.epochs):
    sampler.set_epoch(epoch)
    for i, (x, y) in enumerate(loader):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss / ACCUMULATE).backward()
        last = i + 1 == len(loader)
        if (i + 1) % ACCUMULATE and not last:
            continue
        optimizer.synchronize()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), max_norm=5.0)
        with optimizer.skip_synchronize():
            scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad()
        if hvd.rank() == 0 and (i + 1) % 8 == 0:
            evaluate()  # between steps: not counted as rank 0's compute
        if not args.resume and epoch == args.epochs // 2 and (i + 1) == 2 * ACCUMULATE:
            if hvd.rank() == 0:  # a mid-epoch checkpoint; this run goes on training
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                            "sampler": sampler.state_dict()}, args.checkpoint)

accuracy = evaluate()
if hvd.rank() == 0:
    print(f"train accuracy {accuracy:.3f}")
    print(f"final plan {list(sampler.plan.batch_sizes)}")
