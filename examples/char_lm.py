"""A tiny character-level transformer language model, trained with DBS in cost mode.

    mpirun -np 2 python examples/char_lm.py
    horovodrun -np 2 -H localhost:2 python examples/char_lm.py --epochs 2

The corpus is the Python standard library's own source, read at run time from
the directory of the ``os`` module, so nothing is downloaded. Each blank-line
separated paragraph of a source file (a function, a class header, a block of
imports) is one sample of bytes, cut to ``--max-len``; samples differ in length
from a few bytes to the cap. Every sample's cost is its number of target bytes,
``dbs_hvd.SampleCosts`` makes the sampler split each global batch's bytes (not
its sample count) in proportion to the ranks' speeds, and each rank pads its
own batch to its longest sample. The loss is the mean over the batch's real
target bytes, which is what cost mode's gradient weight (a rank's share of the
step's bytes) needs for the update to be the one-process update on the global
batch.

Rank 0 prints the loss (the mean over every rank's target bytes since the
previous line) every ``--print-every`` steps, and the plan at the end.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import horovod.torch as hvd
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

import dbs_hvd

VOCAB = 256  # bytes


def read_corpus(samples: int, max_len: int, seed: int) -> list[bytes]:
    """``samples`` paragraphs of the standard library's sources, at most ``max_len`` bytes each.

    The files are read in sorted order and the paragraphs chosen with a seeded
    generator, so every rank builds the same data set.
    """
    paragraphs = []
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        text = path.read_bytes()
        for paragraph in text.split(b"\n\n"):
            paragraph = paragraph.strip(b"\n")
            if len(paragraph) >= 8:
                paragraphs.append(paragraph[:max_len])
    if len(paragraphs) < samples:
        raise SystemExit(f"the corpus has {len(paragraphs)} paragraphs; ask for at most that many --samples")
    chosen = np.random.default_rng(seed).choice(len(paragraphs), size=samples, replace=False)
    return [paragraphs[i] for i in sorted(chosen)]


def pad(batch: list[bytes]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, targets and a mask of real targets, padded on the right to the longest sample."""
    longest = max(len(sample) for sample in batch) - 1
    x = torch.zeros(len(batch), longest, dtype=torch.long)
    y = torch.zeros(len(batch), longest, dtype=torch.long)
    mask = torch.zeros(len(batch), longest)
    for row, sample in enumerate(batch):
        tokens = torch.tensor(list(sample))
        x[row, : len(sample) - 1] = tokens[:-1]
        y[row, : len(sample) - 1] = tokens[1:]
        mask[row, : len(sample) - 1] = 1.0
    return x, y, mask


class CharTransformer(nn.Module):
    """A causal transformer over bytes: embeddings, a few encoder layers, a byte classifier.

    Padding sits on the right and attention is causal, so a real position never
    attends to padding and the outputs do not depend on how far a batch is padded.
    """

    def __init__(self, max_len: int, width: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Embedding(max_len, width)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(width, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        h = self.embed(x) + self.position(torch.arange(length))
        causal = nn.Transformer.generate_square_subsequent_mask(length)
        return self.out(self.encoder(h, mask=causal, is_causal=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096, help="paragraphs in the data set")
    parser.add_argument("--max-len", type=int, default=128, help="longest sample, in bytes")
    parser.add_argument("--global-batch", type=int, default=64, help="samples per step, all ranks")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--print-every", type=int, default=10)
    parser.add_argument("--order", choices=["sorted", "stream"], default="sorted",
                        help="SampleCosts order: split each step sorted by length or in stream order")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    corpus = read_corpus(args.samples, args.max_len, args.seed)
    costs = dbs_hvd.SampleCosts([len(sample) - 1 for sample in corpus], order=args.order)
    sampler = dbs_hvd.DynamicBatchSampler(len(corpus), args.global_batch, seed=args.seed, costs=costs)
    loader = DataLoader(corpus, batch_sampler=sampler, collate_fn=pad)
    model = CharTransformer(args.max_len)
    optimizer = dbs_hvd.DistributedOptimizer(
        torch.optim.Adam(model.parameters(), lr=args.lr), sampler,
        named_parameters=model.named_parameters(),
    )
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    step, window, began = 0, torch.zeros(3, dtype=torch.float64), time.perf_counter()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y, mask in loader:
            optimizer.zero_grad()
            losses = nn.functional.cross_entropy(
                model(x).reshape(-1, VOCAB), y.reshape(-1), reduction="none"
            ) * mask.reshape(-1)
            loss = losses.sum() / mask.sum()  # mean over this rank's real target bytes
            loss.backward()
            optimizer.step()
            window += torch.tensor([losses.sum().item(), mask.sum().item(), 1], dtype=torch.float64)
            step += 1
            if step % args.print_every == 0 or step == args.steps:
                total = hvd.allreduce(window, op=hvd.Sum, name="char_lm.loss")
                if hvd.rank() == 0:
                    print(f"epoch {epoch} step {step} loss {total[0] / total[1]:.4f} "
                          f"bytes/step {total[1] * hvd.size() / total[2]:.0f} "
                          f"plan {list(sampler.plan.batch_sizes)}", flush=True)
                window.zero_()
            if step == args.steps:
                break
        if step == args.steps:
            break
    if hvd.rank() == 0:
        print(f"trained {step} steps in {time.perf_counter() - began:.1f} s; "
              f"final plan {list(sampler.plan.batch_sizes)}", flush=True)


if __name__ == "__main__":
    main()
