"""No-harm benchmark: what DBS costs where it is not needed, epoch by epoch in one job.

The hetero benchmark compares separate jobs. On this shared 2-core machine a
job's total moves by 5-10% between runs minutes apart, more than the 2% a
no-harm target allows, so those ratios cannot say whether DBS costs 1% or 4%.
Here one mpirun job trains several copies of the same model from the same
initial weights, one per policy: plain Horovod (``hvd.DistributedOptimizer``
with an equal split, as users run it today), plain Horovod again (the
control: what "no difference" measures) and the DBS policies. Each round
trains every copy for one epoch, in an order that rotates from round to
round, so all copies meet the same machine within seconds of each other.

Reported per copy: the median over rounds of its epoch time over plain
Horovod's epoch time in the same round, and the quartiles of that ratio.
The first round (start-up: allocation, first allreduces) is left out.

    python -m benchmarks.no_harm                  # MLP and equal CNN, 2 ranks, about 7 minutes
    python -m benchmarks.no_harm --only mlp --rounds 60
    python -m benchmarks.no_harm --only mlp --copies "static,static every 2 steps,dbs"

Writes results.json and results.md to --out (default runs/no_harm).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.hetero import GRID_8, rotation
from tests.harness import run_job

PLAIN = "horovod"
CONTROL = "horovod again"
# dbs with every batch a multiple of 8 samples (GRID_8, as in the hetero benchmark):
# on two equal ranks a move must be of 8 samples, which noise of a few percent never asks.
# The "static ..." copies split what dbs costs into its parts: static on dbs's
# rebalance schedule pays dbs's rebalances without ever moving the plan, and
# static rebalancing every 2 or 5 steps, whatever they cost, prices one rebalance
# (their epoch time over static's, per extra rebalance).
COPY_SETTINGS = {PLAIN: {"policy": "horovod"}, CONTROL: {"policy": "horovod"},
                 GRID_8: {"policy": "dbs", "batch_multiple": 8},
                 "static on the dbs schedule": {"policy": "static", "rebalance_every": 2},
                 "static every 2 steps": {"policy": "static", "rebalance_every": 2,
                                          "rebalance_budget": 0.0, "rebalance_min_seconds": 0.0},
                 "static every 5 steps": {"policy": "static", "rebalance_every": 5,
                                          "rebalance_budget": 0.0, "rebalance_min_seconds": 0.0},
                 "dbs with a 0.5 s floor": {"policy": "dbs", "rebalance_min_seconds": 0.5}}
KNOWN_COPIES = ("static", "paper", "dbs", *COPY_SETTINGS)


@dataclass
class Setup:
    name: str
    ranks: int
    args: list[str]  # TrainConfig fields as --key value pairs
    rounds: int
    copies: tuple[str, ...] = (PLAIN, CONTROL, "static", "dbs")


def setups(quick: bool) -> list[Setup]:
    """The two no-harm checks of the hetero benchmark (same models, data and batch)."""
    scale = 4 if quick else 1
    return [
        # 400k parameters, about 5 ms per step, most of it the allreduce.
        Setup("allreduce-bound MLP [1,1] 2 ranks", 2,
              ["--model", "mlp", "--hidden", "128", "--samples", "6400"], rounds=150 // scale,
              copies=(PLAIN, CONTROL, "static", "dbs", GRID_8)),
        # Compute-bound CNN, equal ranks: DBS has nothing to balance.
        Setup("equal CNN [1,1] 2 ranks", 2, ["--model", "cnn", "--samples", "1280"],
              rounds=40 // scale),
    ]


def parse_copies(text: str) -> tuple[str, ...]:
    """``--copies``: known names, plain Horovod first (every ratio is to it), no repeats."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in KNOWN_COPIES]
    if unknown or len(set(names)) != len(names):
        problem = f"unknown copies {unknown}" if unknown else "a copy named twice"
        raise SystemExit(f"no_harm: --copies {text!r}: {problem}; name each copy once, from: "
                         f"{', '.join(KNOWN_COPIES)}")
    return (PLAIN, *[name for name in names if name != PLAIN])


def ratios_to_plain(rounds: list[dict[str, float]], skip: int = 1) -> dict[str, list[float]]:
    """Per copy, its epoch time over plain Horovod's, one ratio per round after ``skip``."""
    kept = rounds[skip:]
    order = list(rounds[0]) if rounds else []  # round 0 runs the copies in their given order
    return {copy: [r[copy] / r[PLAIN] for r in kept] for copy in order} if kept else {}


def summarise(rounds: list[dict[str, float]], skip: int = 1) -> dict[str, dict[str, float]]:
    """Median and quartiles of each copy's ratio to plain Horovod."""
    summary = {}
    for copy, values in ratios_to_plain(rounds, skip).items():
        low, median, high = statistics.quantiles(values, n=4) if len(values) > 1 else \
            (values[0],) * 3
        summary[copy] = {"median": median, "q1": low, "q3": high, "rounds": len(values)}
    return summary


def markdown(results: dict[str, dict]) -> str:
    lines = ["| setup | copy | epoch time vs plain Horovod (median over rounds) | quartiles "
             "| rounds |", "|---|---|---|---|---|"]
    for name, result in results.items():
        for copy, row in result["summary"].items():
            lines.append(f"| {name} | {copy} | {row['median']:.3f} | {row['q1']:.3f}-"
                         f"{row['q3']:.3f} | {row['rounds']} |")
    return "\n".join(lines) + "\n"


def worker(argv: list[str]) -> int:
    """One rank of the job: build every copy, train them in rotating rounds, rank 0 writes."""
    import horovod.torch as hvd
    import torch
    from torch import nn

    from dbs_hvd.comm import default_exchange
    from dbs_hvd.train import trainer
    from dbs_hvd.train.cli import train_config
    from dbs_hvd.train.emulate import make_emulator

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--copies", required=True)
    parser.add_argument("--result", required=True)
    own, rest = parser.parse_known_args(argv)
    config = train_config(rest)
    trainer.init_horovod(config)
    rank, world = hvd.rank(), hvd.size()
    exchange = default_exchange()
    emulator = make_emulator(rank, world)  # equal devices: no emulated slowdown
    criterion = nn.CrossEntropyLoss()
    copies = {}
    for name in own.copies.split(","):
        copy_config = replace(config, **COPY_SETTINGS.get(name, {"policy": name}))
        train_set, _, device, model = trainer.build_data_and_model(
            copy_config, hvd.local_rank(), hvd.local_size())
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        run = trainer.build_run(copy_config, model, train_set, exchange, device, world, rank)
        hvd.broadcast_optimizer_state(run.optimizer, root_rank=0)
        copies[name] = (model, run, device)

    def train_epoch(name: str, epoch: int) -> float:
        model, run, device = copies[name]
        run.set_epoch(epoch)
        hvd.allreduce(torch.zeros(1), name="no_harm.barrier")  # start the epoch together
        # dbs-train's own epoch loop (it reads each step's loss, as a training loop does).
        return trainer.train_epoch(model, criterion, run.optimizer, emulator, device, run.loader,
                                   epoch, epoch * run.steps_per_epoch).seconds

    trainer.freeze_setup_objects()  # as dbs-train does before its first epoch
    rounds = []
    for index in range(own.rounds):
        rounds.append({name: train_epoch(name, index)
                       for name in rotation(list(copies), index)})
    if rank == 0:
        Path(own.result).write_text(json.dumps(rounds))
    return 0


def run_setup(setup: Setup, workdir: Path, timeout: float = 900) -> dict:
    result_file = workdir / f"{abs(hash(setup.name))}.json"
    command = [sys.executable, "-m", "benchmarks.no_harm", "--worker",
               "--rounds", str(setup.rounds), "--copies", ",".join(setup.copies),
               "--result", str(result_file), "--dataset", "synthetic", "--lr", "0.05",
               "--global-batch", "128", *setup.args]
    job = run_job(command, np=setup.ranks, timeout=timeout)
    if not job.ok:
        raise RuntimeError(f"{setup.name} failed:\n{job.describe(tail_lines=20)}")
    rounds = json.loads(result_file.read_text())
    return {"rounds": rounds, "summary": summarise(rounds)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the rounds")
    parser.add_argument("--rounds", type=int, help="rounds per setup (default: 150 MLP, 40 CNN)")
    parser.add_argument("--only", help="run only setups whose name contains this text")
    parser.add_argument("--copies", help="comma-separated copies to train instead of each "
                        f"setup's own (plain Horovod always runs first); known: {', '.join(KNOWN_COPIES)}")
    parser.add_argument("--out", default="runs/no_harm", help="output folder")
    args = parser.parse_args(argv)
    copies = parse_copies(args.copies) if args.copies else None
    chosen = [s for s in setups(args.quick)
              if not args.only or args.only.lower() in s.name.lower()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setup in chosen:
            if args.rounds:
                setup.rounds = args.rounds
            if copies:
                setup.copies = copies
            started = time.monotonic()
            results[setup.name] = run_setup(setup, Path(tmp))
            print(f"{setup.name}: {setup.rounds} rounds in {time.monotonic() - started:.0f} s",
                  flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
