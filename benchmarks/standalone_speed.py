"""One process's training speed alone, in samples per second, for the ideal of a scenario.

Run under a rank's hetero_ranks.py spec, it trains dbs-train's model on its data
at one batch size for ``--seconds`` after a warm-up and prints
``SAMPLES_PER_SECOND <value>``. The sum over ranks is the ideal speed of the
whole job: no plan can train faster than every rank busy all the time.

    python launch/hetero_ranks.py --rank 1 --share 1,0.25 -- \\
        python -m benchmarks.standalone_speed --model cnn-flat --dataset digits-shifted --batch 13
"""
from __future__ import annotations

import argparse
import time

import torch

from dbs_hvd.train import data, models


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--lr-schedule", help="accepted with the workload's flags; not used")
    parser.add_argument("--eval-every", help="accepted with the workload's flags; not used")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time after warm-up")
    parser.add_argument("--warmup", type=float, default=0.5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train_set, _ = data.load(args.dataset, flatten=args.model == "mlp", image_size=args.image_size)
    model = models.build(args.model, train_set.tensors[0].shape[1:], hidden=args.hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    x_all, y_all = train_set.tensors
    step, samples, started, measuring = 0, 0, time.perf_counter(), False
    while True:
        at = (step * args.batch) % (len(x_all) - args.batch)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x_all[at:at + args.batch]),
                                                 y_all[at:at + args.batch])
        loss.backward()
        optimizer.step()
        step += 1
        now = time.perf_counter()
        if not measuring and now - started >= args.warmup:
            measuring, started, samples = True, now, 0
        elif measuring:
            samples += args.batch
            if now - started >= args.seconds:
                break
    print(f"SAMPLES_PER_SECOND {samples / (now - started):.3f}", flush=True)


if __name__ == "__main__":
    main()
