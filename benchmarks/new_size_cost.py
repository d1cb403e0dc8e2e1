"""What a training step costs the first time it runs at a batch size, against once seen.

DBS changes each rank's batch size, and on a GPU the first step at a new size
builds kernel plans for the new shapes (cuDNN), a one-off cost that a timer
reads as a slow rank; dbs_hvd leaves those steps out of a rank's measured speed
(--discount-new-sizes, timing.py). This measures that cost for the benchmark
CNN on one device, in one process, no Horovod needed:

    python -m benchmarks.new_size_cost --device cuda --image-size 128

For each batch size, in the order given: the first step (never seen), the
median of the next five, and one more step after every size has been run
(seen, but after other sizes: on a CPU the first step after another size is
slower too, from caches, which this column separates from a one-off cost).
Results in benchmarks/results/gpu_check.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Sequence

import torch

from dbs_hvd.train.models import small_cnn


def measure(device: torch.device, image_size: int, sizes: Sequence[int],
            repeats: int = 5) -> list[dict]:
    """Milliseconds per step at each size: first, median of ``repeats`` more, and seen again."""
    torch.manual_seed(0)
    model = small_cnn(3, image_size).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(batch: int) -> float:
        x = torch.randn(batch, 3, image_size, image_size, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        sync()
        started = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        sync()
        return 1e3 * (time.perf_counter() - started)

    warm_up = max(sizes) + 1  # a size not measured: start-up costs land here
    for _ in range(3):
        step(warm_up)
    rows = []
    for batch in sizes:
        first = step(batch)
        rows.append({"batch": batch, "first_ms": first,
                     "again_ms": statistics.median(step(batch) for _ in range(repeats))})
    for row in rows:
        row["seen_after_others_ms"] = step(row["batch"])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--sizes", default="1,2,3,5,10,16,20,39,47,100,170,256,512",
                        help="comma-separated batch sizes, each measured in this order")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(part) for part in args.sizes.split(",")]
    if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
        parser.error("--sizes takes distinct positive batch sizes, e.g. 1,2,5,10")
    device = torch.device(args.device)
    rows = measure(device, args.image_size, sizes)
    cudnn = torch.backends.cudnn.version() if device.type == "cuda" else None
    print(f"torch {torch.__version__}, {device}, cuDNN {cudnn}, CNN on 3x{args.image_size}"
          f"x{args.image_size}; milliseconds per training step")
    print("| batch | first | again (median of 5) | seen, after other sizes | first - again |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['batch']} | {row['first_ms']:.2f} | {row['again_ms']:.2f} | "
              f"{row['seen_after_others_ms']:.2f} | {row['first_ms'] - row['again_ms']:.2f} |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"device": str(device), "torch": torch.__version__, "cudnn": cudnn,
                       "image_size": args.image_size, "rows": rows}, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
