"""A user's elastic DBS script (dbs_hvd.ElasticState under hvd.elastic.run).

Launched by tests/test_dropin.py under ``horovodrun`` in elastic mode on 3
workers, one of which is killed mid-run. Every process logs the samples each
of its steps trained on and rank 0 logs its commits, to OUT/reads-PID.jsonl;
at the end rank 0 saves the model to OUT/final.pt.

    python elastic_dropin_train.py OUT
"""
import json
import os
import sys
import time
from pathlib import Path

EPOCHS, COMMIT_EVERY, GLOBAL_BATCH, SAMPLES, SEED = 3, 4, 48, 480, 0


def main(out: Path) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import dbs_hvd
    import horovod.torch as hvd
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from problems import make_problem

    log = open(out / f"reads-{os.getpid()}.jsonl", "a", encoding="utf-8")

    def write(**fields):
        log.write(json.dumps(fields) + "\n")
        log.flush()

    hvd.init()
    dataset, model = make_problem(n=SAMPLES)
    indexed = TensorDataset(torch.arange(SAMPLES), *dataset.tensors)
    sampler = dbs_hvd.DynamicBatchSampler(SAMPLES, GLOBAL_BATCH, seed=SEED)
    loader = DataLoader(indexed, batch_sampler=sampler)
    optimizer = dbs_hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sampler,
        named_parameters=model.named_parameters(), policy="paper",
        rebalance=dbs_hvd.RebalanceOptions(every=2, budget=0, min_seconds=0))
    state = dbs_hvd.ElasticState(model, optimizer, sampler)

    def commit(state):
        state.commit()
        if hvd.rank() == 0:
            write(kind="commit", epoch=sampler.epoch, step=sampler.steps_trained,
                  world=hvd.size(), plan=list(sampler.plan.batch_sizes))

    @hvd.elastic.run
    def train(state):
        for epoch in range(state.epoch, EPOCHS):
            sampler.set_epoch(epoch)
            for index, x, y in loader:
                batch = sampler.peek_consumed()  # this step's record: epoch, step, size
                optimizer.zero_grad()
                time.sleep(0.002 * len(y) * (1 + hvd.rank() % 2))  # ranks of two speeds
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
                write(kind="read", epoch=batch.epoch, step=batch.step, rank=hvd.rank(),
                      world=hvd.size(), indices=index.tolist())
                if sampler.steps_trained % COMMIT_EVERY == 0:
                    commit(state)
            commit(state)

    train(state)
    if hvd.rank() == 0:
        torch.save(model.state_dict(), out / "final.pt")
        print(f"done on {hvd.size()} ranks, plan {list(sampler.plan.batch_sizes)}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
