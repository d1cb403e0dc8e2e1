"""Accuracy parity on real heterogeneity: plain Horovod and dbs over several seeds.

Both policies train the external family's workload (benchmarks/external.py) to
the end of its schedule on 2 ranks, the second under a CPU quota of a quarter
core (launch/hetero_ranks.py), once per seed. Plain Horovod's spread over the
seeds says whether the workload's final accuracy is stable; the difference
between dbs and plain Horovod on the same seed says whether balancing the
batch changes what is learnt (it should not: the update is the global-batch
update whatever the split).

    python -m benchmarks.accuracy_parity            # 5 seeds, 6 epochs
    python -m benchmarks.accuracy_parity --seeds 2 --epochs 1   # a quick check

Writes results.md and results.json to --out (default runs/accuracy_parity).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.external import ExternalScenario, run_once

POLICIES = ["horovod", "dbs"]


def scenario(epochs: int) -> ExternalScenario:
    """The [1, 0.25] quota scenario of the external family, trained for ``epochs``."""
    return ExternalScenario("accuracy parity [1,0.25] 2 ranks, 100 ms period", 2,
                            ["--share", "1,0.25", "--core", "0,1", "--period-ms", "100"],
                            [1, 0.25], list(POLICIES), epochs=epochs)


def summarise(accuracy: dict[str, dict[int, float]]) -> dict:
    """Spread per policy over the seeds, and dbs minus plain Horovod per seed (points)."""
    seeds = sorted(set.intersection(*(set(a) for a in accuracy.values())))
    out: dict = {"seeds": seeds, "policies": {}}
    for policy, by_seed in accuracy.items():
        values = [100 * by_seed[s] for s in seeds]
        out["policies"][policy] = {"accuracy": values, "mean": statistics.mean(values),
                                   "spread": max(values) - min(values)}
    out["difference"] = [100 * (accuracy["dbs"][s] - accuracy["horovod"][s]) for s in seeds]
    return out


def markdown(summary: dict, epochs: int) -> str:
    seeds = summary["seeds"]
    lines = [f"| policy | {' | '.join(f'seed {s}' for s in seeds)} | mean | spread (points) |",
             "|---|" + "---|" * (len(seeds) + 2)]
    for policy, row in summary["policies"].items():
        lines.append(f"| {policy} | " + " | ".join(f"{a:.2f}%" for a in row["accuracy"])
                     + f" | {row['mean']:.2f}% | {row['spread']:.2f} |")
    lines.append("| dbs - horovod | " + " | ".join(f"{d:+.2f}" for d in summary["difference"])
                 + f" | {statistics.mean(summary['difference']):+.2f} | |")
    lines.append("")
    lines.append(f"Final test accuracy after {epochs} epochs (3,590 test samples), 2 ranks, "
                 "the second under a quarter-core quota.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run (default 6)")
    parser.add_argument("--out", default="runs/accuracy_parity", help="output folder")
    args = parser.parse_args(argv)
    chosen = scenario(args.epochs)
    accuracy: dict[str, dict[int, float]] = {p: {} for p in POLICIES}
    plans: dict[str, dict[int, list[int]]] = {p: {} for p in POLICIES}
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for policy in POLICIES if seed % 2 == 0 else POLICIES[::-1]:
                run = run_once(chosen, policy, 0, Path(tmp), seed=seed)
                if run.error:
                    print(run.error, file=sys.stderr)
                    failed = True
                    continue
                accuracy[policy][seed] = run.epochs[-1]["accuracy"]
                plans[policy][seed] = run.epochs[-1]["next_batch_sizes"]
                print(f"seed {seed} {policy:8s} accuracy {100 * accuracy[policy][seed]:.2f}% "
                      f"final plan {plans[policy][seed]} ({run.total_seconds:.1f} s)", flush=True)
    summary = summarise(accuracy)
    summary["final_plans"] = plans
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(summary, args.epochs)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
