"""What one rebalance's collectives cost a training job, against what they time themselves at.

A rebalance gathers every rank's window and broadcasts rank 0's decision.
The schedule (dbs_hvd/schedule.py) prices rebalances by their measured
duration, so a collective that slows training by more than it times itself
at is underpriced. Here one mpirun job trains a small MLP with plain
Horovod (``hvd.DistributedOptimizer``, the allreduce-bound model of the
no-harm benchmark) and, every 2 steps, runs one gather + broadcast of a
rebalance-sized record in one of several ways. Rounds of 50 steps per
variant rotate the order, and each variant's cost is its extra time per
call over the steps with no collective, in the same round:

* ``block``: ``MpiExchange(wait="block")``, mpi4py's blocking pickled
  ``allgather`` + ``bcast``;
* ``poll``: ``MpiExchange(wait="poll")``, non-blocking collectives whose
  wait spins briefly, then sleeps between polls;
* ``poll, no spin``: the same, sleeping from the first poll;
* ``sleep``: ``time.sleep`` of about a rebalance's own duration, which costs
  what it lasts: the yardstick.

    python -m benchmarks.exchange_cost                  # 2 ranks, 80 rounds, about 2 minutes
    python -m benchmarks.exchange_cost --np 3 --rounds 40

Writes results.json and results.md to --out (default runs/exchange_cost).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.hetero import rotation
from dbs_hvd.balancer import RankWindow
from tests.harness import run_job

STEPS = 50
VARIANTS = ("none", "block", "poll", "poll, no spin", "sleep")
# A window, as rebalance() sends it.
RECORD = RankWindow(steps=20, samples=1280, compute_seconds=0.1, wait_seconds=0.05,
                    steps_generated=30, rebalance_seconds=0.001)


def summarise(rounds: list[dict[str, float]], self_timed: dict[str, list[float]],
              skip: int = 2) -> dict[str, dict[str, float]]:
    """Per variant: median extra seconds per call over ``none`` in the same round, and
    the median of its own timing. The first ``skip`` rounds (start-up) are left out."""
    kept = rounds[skip:]
    calls = STEPS // 2
    summary = {}
    for variant in VARIANTS[1:]:
        summary[variant] = {
            "extra_ms_per_call": 1000 * statistics.median(
                (r[variant] - r["none"]) / calls for r in kept),
            "self_timed_ms": 1000 * statistics.median(self_timed[variant]),
            "ratio_to_none": statistics.median(r[variant] / r["none"] for r in kept),
        }
    return summary


def markdown(summary: dict[str, dict[str, float]], header: str) -> str:
    lines = [header, "", "| variant | extra training time per call (ms) | times itself at (ms) "
             "| epoch time vs none |", "|---|---|---|---|"]
    for variant, row in summary.items():
        lines.append(f"| {variant} | {row['extra_ms_per_call']:.2f} | {row['self_timed_ms']:.2f} "
                     f"| {row['ratio_to_none']:.3f} |")
    return "\n".join(lines) + "\n"


def worker(rounds: int, result: str) -> int:
    """One rank: train, inserting each variant's collective every 2 steps; rank 0 writes."""
    import dbs_hvd  # noqa: F401  (claims MPI for mpi4py before Horovod, as dbs-train does)
    import horovod.torch as hvd
    import torch
    from torch import nn

    from dbs_hvd.comm import MpiExchange, default_exchange

    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
        named_parameters=model.named_parameters(), op=hvd.Average)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    criterion = nn.CrossEntropyLoss()
    exchanges = {"block": MpiExchange(wait="block"), "poll": MpiExchange(wait="poll"),
                 "poll, no spin": MpiExchange(wait="poll")}
    exchanges["poll, no spin"].spin_seconds = 0.0
    chosen_by_default = getattr(default_exchange(), "wait", None)
    decision = ("ok", ((32, 32), 30, 17)) if hvd.rank() == 0 else None
    self_timed: dict[str, list[float]] = {v: [] for v in VARIANTS}

    def collective(variant: str) -> None:
        started = time.perf_counter()
        if variant in exchanges:
            exchanges[variant].allgather(RECORD)
            exchanges[variant].broadcast(decision, root=0)
        elif variant == "sleep":
            time.sleep(0.0005)
        self_timed[variant].append(time.perf_counter() - started)

    times = []
    for index in range(rounds):
        this_round = {}
        for variant in rotation(list(VARIANTS), index):
            hvd.allreduce(torch.zeros(1), name="exchange_cost.barrier")
            started = time.perf_counter()
            for step in range(STEPS):
                optimizer.zero_grad()
                loss = criterion(model(x), y)
                loss.backward()
                optimizer.step()
                loss.item()
                if variant != "none" and step % 2 == 1:
                    collective(variant)
            this_round[variant] = time.perf_counter() - started
        times.append(this_round)
    if hvd.rank() == 0:
        Path(result).write_text(json.dumps({"rounds": times, "self_timed": self_timed,
                                            "default_wait": chosen_by_default}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(int(argv[1]), argv[2])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--np", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--rounds", type=int, default=80)
    parser.add_argument("--out", default="runs/exchange_cost", help="output folder")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (the first 2 are start-up and left out)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "raw.json"
    job = run_job([sys.executable, "-m", "benchmarks.exchange_cost", "--worker",
                   str(args.rounds), str(raw)], np=args.np, timeout=60 + 5 * args.rounds)
    if not job.ok:
        print(job.describe(tail_lines=20), file=sys.stderr)
        return 1
    data = json.loads(raw.read_text())
    summary = summarise(data["rounds"], data["self_timed"])
    base = statistics.median(r["none"] for r in data["rounds"][2:])
    header = (f"{args.np} ranks, {args.rounds} rounds; {STEPS} steps with no collective "
              f"take {1000 * base:.1f} ms (median); default_exchange() here waits by "
              f"{data['default_wait']!r}")
    (out / "results.json").write_text(json.dumps({"np": args.np, "rounds": args.rounds,
                                                  "none_ms": 1000 * base, "summary": summary,
                                                  "default_wait": data["default_wait"]},
                                                 indent=1))
    table = markdown(summary, header)
    (out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
