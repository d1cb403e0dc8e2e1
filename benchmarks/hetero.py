"""Heterogeneity benchmark: plain Horovod vs the DBS paper's rule vs ours, side by side.

Every scenario runs each policy under real mpirun on this machine, interleaved
(repeat 1: horovod, paper, dbs; repeat 2: ...), on the same seeds, model and
emulated devices, so machine noise hits all policies alike. Only ratios are
reported: time relative to plain Horovod in the same scenario (medians of
totals, and "paired": the median of per-repeat ratios, see paired_ratios, with
their lowest and highest), and balance efficiency (ideal /
actual epoch time, dbs_hvd.train.metrics.balance_efficiency). For the no-harm
checks, benchmarks/no_harm.py compares policies epoch by epoch inside one job.

    python -m benchmarks.hetero            # full run, 3 repeats (40-55 minutes on 2 cores)
    python -m benchmarks.hetero --quick    # under 3 minutes, for checks
    python -m benchmarks.hetero --only accuracy   # final accuracy vs plain Horovod, 3 seeds
    python -m benchmarks.hetero --only virtual    # sleep-only devices: the policy without core sharing
    python -m benchmarks.hetero --only external   # real heterogeneity: CPU quotas, pinned cores,
                                                  # noisy neighbours (benchmarks/external.py)

Writes results.json, results.md and hetero.png to --out (default runs/hetero).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dbs_hvd.train.metrics import read_jsonl
from tests.harness import run_job

# A compute-bound CNN (about 0.15 s of compute per step per rank at B=128 on
# this kind of machine, DESIGN.md "Measuring") and an allreduce-bound MLP.
CNN = ["--model", "cnn", "--dataset", "synthetic", "--lr", "0.05"]
MLP = ["--model", "mlp", "--dataset", "synthetic", "--hidden", "128", "--lr", "0.05"]
# Sleep-only devices (--virtual-device): a step costs exactly A + C x batch
# milliseconds on top of a tiny model's real compute (a 2k-parameter MLP on
# digits, well under a millisecond), so ranks do not compete for the two
# cores and the right plan is known. These rows separate what the policy
# reaches from what this machine's shared cores allow the CNN rows.
VIRTUAL = ["--model", "mlp", "--dataset", "digits", "--hidden", "32", "--lr", "0.05"]


@dataclass
class Scenario:
    name: str
    ranks: int
    args: list[str]
    policies: list[str]
    epochs: int
    global_batch: int = 128
    samples: int = 1280
    note: str = ""
    repeats: int | None = None  # overrides --repeats (accuracy scenarios: seeds are the repeats)
    # False where a run trains for about a second (the digits accuracy runs: 15
    # epochs of 0.08 s), so that one slow first epoch moves its time ratio by 30%.
    timed: bool = True


# Accuracy at equal epochs: a task that is learnable in seconds (the synthetic
# CNN task stays near chance in a few epochs), one heterogeneous setup, 3 seeds.
ACCURACY_SEEDS = (0, 1, 2)
ACCURACY_PREFIX = "accuracy: digits MLP [1,3] 2 ranks, seed "


def accuracy_scenarios() -> list[Scenario]:
    return [
        Scenario(f"{ACCURACY_PREFIX}{seed}", 2,
                 ["--model", "mlp", "--dataset", "digits", "--lr", "0.05",
                  "--slowdown", "1,3", "--seed", str(seed)],
                 ["horovod", "static", "paper", "dbs"], epochs=15, global_batch=64, repeats=1,
                 timed=False)
        for seed in ACCURACY_SEEDS
    ]


def accuracy_table(summary: dict) -> str:
    """Final test accuracy per seed and policy, and each policy's mean gap to plain Horovod."""
    rows = {name[len(ACCURACY_PREFIX):]: policies for name, policies in summary.items()
            if name.startswith(ACCURACY_PREFIX)}
    if not rows:
        return ""
    policies = list(next(iter(rows.values())))
    lines = ["| seed | " + " | ".join(policies) + " |", "|---|" + "---|" * len(policies)]
    for seed, row in rows.items():
        lines.append(f"| {seed} | " + " | ".join(
            f"{100 * row[p]['final_accuracy']:.2f}%" if p in row else "failed"
            for p in policies) + " |")
    gaps = []
    for policy in policies:
        diffs = [row[policy]["final_accuracy"] - row["horovod"]["final_accuracy"]
                 for row in rows.values() if policy in row and "horovod" in row]
        gaps.append(f"{100 * statistics.mean(diffs):+.2f}" if diffs else "n/a")
    lines.append("| mean gap to horovod (points) | " + " | ".join(gaps) + " |")
    return "\n".join(lines) + "\n"


# A benchmark "policy" is a dbs-train --policy; dbs-average: our policy in
# model-averaging mode (local SGD, parameters averaged every 8 steps); "fixed
# B1,B2": the static policy on that plan from the first step. Fixed plans
# around the measured balance of [1,4] show what balance this machine allows
# at all: no policy can beat the best fixed plan by more than noise in steady
# state, and the plan a policy finds can be compared with it.
POLICY_FLAGS = {"dbs-average": ["--policy", "dbs", "--mode", "average", "--average-every", "8"]}
FIXED_1_4 = ["fixed 100,28", "fixed 104,24", "fixed 108,20"]
# On [1,2,4]: the plan dbs settled at in earlier runs, and the split by the
# nominal speeds (4:2:1). Three ranks share two cores there, so speeds depend on
# the plan; these rows show what efficiency a plan that never moves reaches.
FIXED_1_2_4 = ["fixed 76,40,10", "fixed 72,36,18"]
# The noise floor of a no-harm check: plain Horovod run again in the same
# rotation. Its ratio to the first plain Horovod is what "no difference"
# measures on this machine, so a DBS ratio is read against it, not against 1.0.
HOROVOD_AGAIN = "horovod again"
POLICY_FLAGS[HOROVOD_AGAIN] = ["--policy", "horovod"]
# dbs reading each rank's first step at a new batch size as speed, as it did
# before --discount-new-sizes (the GPU-like scenario's other rows leave it out).
NEW_SIZES_COUNTED = "dbs, new sizes counted"
POLICY_FLAGS[NEW_SIZES_COUNTED] = ["--policy", "dbs", "--discount-new-sizes", "off"]
# dbs with every batch a multiple of M samples (--batch-multiple, grid.py): fewer
# new sizes on the GPU-like devices; on the MLP, noise-driven moves under M stop.
GRID_4 = "dbs on a grid of 4"
POLICY_FLAGS[GRID_4] = ["--policy", "dbs", "--batch-multiple", "4"]
GRID_8 = "dbs on a grid of 8"
POLICY_FLAGS[GRID_8] = ["--policy", "dbs", "--batch-multiple", "8"]


def policy_flags(policy: str) -> list[str]:
    """The dbs-train flags of a benchmark policy ("fixed B1,B2,...": static on that plan)."""
    if policy.startswith("fixed "):
        return ["--policy", "static", "--plan", policy.split()[1]]
    return POLICY_FLAGS.get(policy, ["--policy", policy])


def rotation(policies: list[str], repeat: int) -> list[str]:
    """The order of the policies in one repeat: rotated by one each repeat, so that
    no policy always runs first (after a pause) or right after the same neighbour."""
    shift = repeat % len(policies)
    return policies[shift:] + policies[:shift]


def scenarios(quick: bool) -> list[Scenario]:
    all_three = ["horovod", "paper", "dbs"]
    if quick:
        return [
            Scenario("[1,4] 2 ranks", 2, CNN + ["--slowdown", "1,4"], all_three, epochs=3,
                     samples=768),
            Scenario("equal [1,1] 2 ranks", 2, CNN, ["horovod", "dbs"], epochs=2, samples=768),
        ]
    return [
        Scenario("[1,4] 2 ranks", 2, CNN + ["--slowdown", "1,4"], all_three + FIXED_1_4,
                 epochs=10, note="fixed plans: the reachable balance on this machine"),
        Scenario("[1,2,4] 3 ranks", 3, CNN + ["--slowdown", "1,2,4"], all_three + FIXED_1_2_4,
                 epochs=10, global_batch=126,
                 note="fixed plans: what a plan that never moves reaches"),
        Scenario("[1,1,1,4] 4 ranks", 4, CNN + ["--slowdown", "1,1,1,4"], all_three, epochs=8),
        Scenario("disturbances p=0.3 x3, 3 ranks", 3,
                 CNN + ["--disturb", "p=0.3,factor=3,epochs=3", "--seed", "4"], all_three,
                 epochs=10, global_batch=126),
        Scenario("step change: rank 1 x4 at step 25, 2 ranks", 2,
                 CNN + ["--step-change", "1:25:4"], all_three, epochs=6),
        # Cheap and noisy (a no-harm check measures a ratio near 1): more repeats.
        Scenario("equal [1,1] 2 ranks", 2, CNN, ["horovod", "dbs", HOROVOD_AGAIN], epochs=6,
                 repeats=5),
        Scenario("allreduce-bound MLP [1,1] 2 ranks", 2, MLP,
                 ["horovod", "static", "dbs", HOROVOD_AGAIN, GRID_8], epochs=6, samples=6400,
                 note="400k parameters, little compute per step", repeats=8),
        Scenario("model averaging H=8 vs gradients, [1,4] 2 ranks", 2,
                 CNN + ["--slowdown", "1,4"], ["horovod", "dbs", "dbs-average"], epochs=10),
        # Balanced at 72,36,18 (154 ms per step); the fixed row is that plan.
        Scenario("virtual [1,2,4] 3 ranks", 3, VIRTUAL + ["--virtual-device", "10:2,10:4,10:8"],
                 all_three + ["fixed 72,36,18"], epochs=6, global_batch=126, repeats=2,
                 note="sleep-only devices: no contention for cores, the balanced plan known"),
        # The slow rank also has 6x the per-step overhead (60 ms against 10), so
        # a split by speed alone is not the balance (the paper's rule gets there
        # over epochs). The fixed row is the balance: its slowest step, 41 x 3 ms
        # + 10 ms on the fast ranks (5 x 12 ms + 60 ms on the slow one), is the
        # shortest any plan reaches (tests/test_hetero.py checks by brute force).
        Scenario("virtual [1,1,1,4] 4 ranks", 4,
                 VIRTUAL + ["--virtual-device", "10:3,10:3,10:3,60:12"],
                 all_three + ["fixed 41,41,41,5"], epochs=6, repeats=2,
                 note="sleep-only devices: no contention for cores, the balanced plan known"),
        # The two speed-change scenarios above on equal sleep-only devices
        # (10 + 2b ms), with the same seed and change.
        Scenario("virtual disturbances p=0.3 x3, 3 ranks", 3,
                 VIRTUAL + ["--virtual-device", "10:2", "--disturb", "p=0.3,factor=3,epochs=3",
                            "--seed", "4"],
                 all_three, epochs=10, global_batch=126, repeats=2,
                 note="sleep-only devices: the disturbances alone move the speeds"),
        Scenario("virtual step change: rank 1 x4 at step 25, 2 ranks", 2,
                 VIRTUAL + ["--virtual-device", "10:2", "--step-change", "1:25:4"],
                 all_three, epochs=6, repeats=2,
                 note="sleep-only devices: the change alone moves the speeds"),
        # A GPU's steps: short, mostly fixed cost, and 20 ms more at the first
        # step of each batch size (kernel plans for new shapes; 13-35 ms measured
        # on an H200, benchmarks/results/gpu_check.md). Balanced at 107,21 (29 ms per step);
        # --discount-new-sizes on is what --device cuda sets by default.
        Scenario("virtual GPU-like [1,4], 20 ms per new batch size, 2 ranks", 2,
                 VIRTUAL + ["--virtual-device", "2:0.25:20,8:1:20", "--discount-new-sizes", "on"],
                 all_three + [NEW_SIZES_COUNTED, GRID_4, "fixed 107,21"], epochs=8, samples=2560,
                 repeats=3,
                 note="sleep-only devices with a one-off cost per new batch size"),
    ] + accuracy_scenarios()


@dataclass
class RunResult:
    scenario: str
    policy: str
    repeat: int
    epochs: list[dict] = field(default_factory=list)
    error: str = ""

    @property
    def total_seconds(self) -> float:
        return sum(e["seconds"] for e in self.epochs)

    @property
    def steady_efficiency(self) -> float | None:
        """Median balance efficiency over epochs 2..10 (the first is the static one)."""
        values = [e["efficiency"] for e in self.epochs[1:]
                  if isinstance(e["efficiency"], float) and e["efficiency"] == e["efficiency"]]
        return statistics.median(values) if values else None


def run_once(scenario: Scenario, policy: str, repeat: int, workdir: Path) -> RunResult:
    log = workdir / f"{abs(hash((scenario.name, policy, repeat)))}.jsonl"
    flags = policy_flags(policy)
    command = [sys.executable, "-m", "dbs_hvd.train.cli", *scenario.args, *flags,
               "--epochs", str(scenario.epochs), "--global-batch", str(scenario.global_batch),
               "--samples", str(scenario.samples), "--log", str(log)]
    job = run_job(command, np=scenario.ranks, timeout=900)
    result = RunResult(scenario.name, policy, repeat)
    if not job.ok:
        result.error = job.describe(tail_lines=15)
        return result
    result.epochs = read_jsonl(log)
    return result


def paired_ratios(runs: list[RunResult], plain: list[RunResult]) -> list[float]:
    """Each run's total time over its own repeat's plain Horovod time (the mean of
    both plain runs where the scenario repeats plain Horovod as a control).

    Pairing within a repeat removes the machine's drift between repeats, which
    on this 2-core machine moved repeat totals by up to 40% on the MLP.
    """
    per_repeat: dict[int, list[float]] = {}
    for run in plain:
        per_repeat.setdefault(run.repeat, []).append(run.total_seconds)
    return [run.total_seconds / statistics.mean(per_repeat[run.repeat])
            for run in runs if run.repeat in per_repeat]


def summarise(scenario: Scenario, results: list[RunResult]) -> dict:
    """Per policy: median total time over repeats, ratios to plain Horovod, efficiency."""
    mine = [r for r in results if r.scenario == scenario.name and not r.error]
    base = statistics.median(r.total_seconds for r in mine if r.policy == "horovod")
    plain = [r for r in mine if r.policy in ("horovod", HOROVOD_AGAIN)]
    rows = {}
    for policy in scenario.policies:
        runs = [r for r in mine if r.policy == policy]
        if not runs:
            continue
        total = statistics.median(r.total_seconds for r in runs)
        effs = [r.steady_efficiency for r in runs if r.steady_efficiency is not None]
        paired = paired_ratios(runs, plain) if scenario.timed else []
        rows[policy] = {
            "time_vs_horovod": total / base if scenario.timed else None,
            # The median and the lowest-highest of the per-repeat ratios: two
            # policies whose ranges overlap widely were not told apart here.
            "paired_vs_horovod": statistics.median(paired) if paired else None,
            "paired_range": [min(paired), max(paired)] if paired else None,
            "steady_efficiency": statistics.median(effs) if effs else None,
            "final_accuracy": statistics.median(r.epochs[-1]["accuracy"] for r in runs),
            "final_plan": runs[-1].epochs[-1]["next_batch_sizes"],
        }
    return rows


def markdown(summary: dict, scenario_list: list[Scenario]) -> str:
    lines = ["| scenario | policy | time vs plain Horovod | paired | paired, lowest-highest "
             "repeat | balance efficiency (median, epochs 2+) | final plan | final accuracy |",
             "|---|---|---|---|---|---|---|---|"]

    def figure(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    def span(values: list[float] | None) -> str:
        return "n/a" if not values else f"{values[0]:.3f}-{values[1]:.3f}"

    for scenario in scenario_list:
        for policy, row in summary.get(scenario.name, {}).items():
            lines.append(f"| {scenario.name} | {policy} | {figure(row['time_vs_horovod'])} "
                         f"| {figure(row['paired_vs_horovod'])} "
                         f"| {span(row.get('paired_range'))} "
                         f"| {figure(row['steady_efficiency'])} "
                         f"| {row['final_plan']} | {100 * row['final_accuracy']:.1f}% |")
    return "\n".join(lines) + "\n"


def plot(results: list[RunResult], scenario_list: list[Scenario], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(scenario_list), 2, figsize=(11, 3.2 * len(scenario_list)),
                             squeeze=False)
    for row, scenario in enumerate(scenario_list):
        sizes_ax, time_ax = axes[row]
        for result in results:
            if result.scenario != scenario.name or result.repeat != 0 or result.error:
                continue
            epochs = [e["epoch"] for e in result.epochs]
            time_ax.plot(epochs, [e["seconds"] for e in result.epochs], marker="o",
                         label=result.policy)
            if result.policy == "dbs":
                per_rank = list(zip(*[e["batch_sizes"] for e in result.epochs]))
                for rank, sizes in enumerate(per_rank):
                    sizes_ax.step(epochs, sizes, where="post", label=f"rank {rank}")
        sizes_ax.set_title(f"{scenario.name}: dbs batch sizes")
        sizes_ax.set_xlabel("epoch")
        sizes_ax.set_ylabel("local batch")
        sizes_ax.legend(fontsize=7)
        time_ax.set_title(f"{scenario.name}: epoch time (s)")
        time_ax.set_xlabel("epoch")
        time_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small scenarios, under 3 minutes")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved repeats per policy (default 3, 1 with --quick)")
    parser.add_argument("--only", help="run only scenarios whose name contains this text")
    parser.add_argument("--skip", help="leave out scenarios whose name contains this text")
    parser.add_argument("--out", default="runs/hetero", help="output folder")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    if args.only and args.only.startswith("external"):
        # The real-heterogeneity family lives in benchmarks/external.py (ranks
        # slowed by launch/hetero_ranks.py, not by dbs-train).
        from benchmarks import external

        chosen = [s for s in external.scenarios(args.quick) if args.only in s.name
                  and not (args.skip and args.skip in s.name)]
        out = Path(args.out if args.out != "runs/hetero" else "runs/external")
        return external.run_all(chosen, repeats, out)
    scenario_list = [s for s in scenarios(args.quick) if (not args.only or args.only in s.name)
                     and not (args.skip and args.skip in s.name)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in scenario_list:
            for repeat in range(scenario.repeats or repeats):
                for policy in rotation(scenario.policies, repeat):
                    result = run_once(scenario, policy, repeat, Path(tmp))
                    status = "FAILED" if result.error else f"{result.total_seconds:.1f}s"
                    print(f"{scenario.name:45s} {policy:8s} repeat {repeat}: {status}", flush=True)
                    if result.error:
                        print(result.error, file=sys.stderr)
                    results.append(result)
    summary = {s.name: summarise(s, results) for s in scenario_list}
    table = markdown(summary, scenario_list)
    accuracy = accuracy_table(summary)
    if accuracy:
        table += "\nFinal test accuracy at equal epochs:\n\n" + accuracy
    (out / "results.json").write_text(json.dumps({
        "summary": summary,
        "runs": [r.__dict__ for r in results],
        "scenarios": [s.__dict__ for s in scenario_list],
    }, indent=1))
    (out / "results.md").write_text(table)
    plot(results, scenario_list, out / "hetero.png")
    print(table)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
