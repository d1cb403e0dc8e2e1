"""Step time with each step split by count against split by cost, side by side.

The workload is examples/char_lm.py's: a small byte-level transformer on
paragraphs of the standard library's sources, whose lengths vary from a few
bytes to the cap. Two variants train in one job, each with its own model,
sampler and DBS optimizer (the ``dbs`` policy), in interleaved rounds of
``--steps`` steps (the variant that goes first alternates):

* ``count``: the plan splits each global batch's sample count (the default
  sampler);
* ``cost``: the plan splits each global batch's bytes (``SampleCosts``).

A rank can be made slower with ``--slowdown`` (after each step's compute it
sleeps ``f - 1`` times that compute, as dbs-train's ``--slowdown`` does), so
the two effects show: balancing speeds, and balancing the work of each step.

    mpirun -np 2 python -m benchmarks.cost_split --rounds 5 --steps 30 --slowdown 1,2

Rank 0 prints one row per round and variant (wall seconds of the round's
steps, the share of the ranks' step time spent waiting in the allreduce, the
final plan), then the median ratio of cost to count over the rounds after
the first (which the policies spend learning). ``--out FILE`` writes the rows
and the summary as JSON. Compare ratios, not seconds: machines are noisy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import horovod.torch as hvd
import torch
from torch import nn
from torch.utils.data import DataLoader

import dbs_hvd

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "char_lm.py"


def load_example() -> Any:
    """The example script as a module: its corpus, padding and model."""
    spec = importlib.util.spec_from_file_location("char_lm", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["char_lm"] = module
    spec.loader.exec_module(module)
    return module


class Variant:
    """One way of splitting, with its own model, sampler and optimizer, trained round by round."""

    def __init__(self, name: str, lm: Any, corpus: list[bytes], args: argparse.Namespace) -> None:
        self.name = name
        costs = dbs_hvd.SampleCosts([len(s) - 1 for s in corpus]) if name == "cost" else None
        self.sampler = dbs_hvd.DynamicBatchSampler(len(corpus), args.global_batch, seed=args.seed,
                                                   costs=costs)
        self.loader = DataLoader(corpus, batch_sampler=self.sampler, collate_fn=lm.pad)
        torch.manual_seed(args.seed)
        self.model = lm.CharTransformer(args.max_len)
        self.optimizer = dbs_hvd.DistributedOptimizer(
            torch.optim.Adam(self.model.parameters(), lr=3e-3), self.sampler,
            named_parameters=[(f"{name}.{n}", p) for n, p in self.model.named_parameters()],
        )
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        self.vocab = lm.VOCAB
        self.batches = self._stream()
        self.history_seen = 0

    def _stream(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        epoch = 0
        while True:
            self.sampler.set_epoch(epoch)
            yield from self.loader
            epoch += 1

    def train(self, steps: int, slowdown: float) -> float:
        """Train ``steps`` steps; return the mean per-byte loss of this rank's batches."""
        losses = []
        for _ in range(steps):
            x, y, mask = next(self.batches)
            began = time.perf_counter()
            self.optimizer.zero_grad()
            terms = nn.functional.cross_entropy(
                self.model(x).reshape(-1, self.vocab), y.reshape(-1), reduction="none"
            ) * mask.reshape(-1)
            loss = terms.sum() / mask.sum()
            loss.backward()
            if slowdown > 1:
                time.sleep((slowdown - 1) * (time.perf_counter() - began))
            self.optimizer.step()
            losses.append(loss.item())
        return statistics.fmean(losses)

    def wait_share(self) -> float:
        """The ranks' allreduce wait as a share of their step time, over the windows since the
        last call."""
        records = list(self.optimizer.rebalancer.history)[self.history_seen :]
        self.history_seen += len(records)
        compute = sum(w.compute_seconds for r in records for w in r.ranks)
        wait = sum(w.wait_seconds for r in records for w in r.ranks)
        return wait / (compute + wait) if compute + wait > 0 else 0.0


def barrier() -> None:
    hvd.allreduce(torch.zeros(1), name="cost_split.barrier")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="steps per variant per round")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--slowdown", default="", help="per-rank factors, e.g. 1,2 (default all 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write rows and summary as JSON")
    args = parser.parse_args(argv)

    hvd.init()
    torch.set_num_threads(1)
    factors = [float(f) for f in args.slowdown.split(",")] if args.slowdown else [1.0] * hvd.size()
    if len(factors) != hvd.size():
        raise SystemExit(f"--slowdown gives {len(factors)} factors for {hvd.size()} ranks")
    lm = load_example()
    corpus = lm.read_corpus(args.samples, args.max_len, args.seed)
    variants = {name: Variant(name, lm, corpus, args) for name in ("count", "cost")}
    rows = []
    for round_ in range(args.rounds):
        order = ["count", "cost"] if round_ % 2 == 0 else ["cost", "count"]
        for name in order:
            variant = variants[name]
            barrier()
            began = time.perf_counter()
            loss = variant.train(args.steps, factors[hvd.rank()])
            barrier()
            seconds = time.perf_counter() - began
            rows.append({"round": round_, "variant": name, "seconds": seconds,
                         "wait_share": variant.wait_share(), "loss": loss,
                         "plan": list(variant.sampler.plan.batch_sizes)})
            if hvd.rank() == 0:
                row = rows[-1]
                print(f"round {round_} {name:5s} {seconds:7.3f} s  wait {row['wait_share']:.3f}  "
                      f"loss {loss:.3f}  plan {row['plan']}", flush=True)
    by_round = {(r["round"], r["variant"]): r["seconds"] for r in rows}
    ratios = [by_round[(k, "cost")] / by_round[(k, "count")] for k in range(1, args.rounds)]
    summary = {"cost_over_count": statistics.median(ratios) if ratios else None,
               "ratios": ratios, "slowdown": factors, "steps": args.steps,
               "global_batch": args.global_batch, "max_len": args.max_len}
    if hvd.rank() == 0:
        if ratios:
            print(f"cost / count, median over rounds 1-{args.rounds - 1}: "
                  f"{summary['cost_over_count']:.3f} (each: {', '.join(f'{r:.3f}' for r in ratios)})")
        if args.out is not None:
            args.out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
