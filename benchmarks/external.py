"""Real heterogeneity from outside the framework: CPU quotas, pinned cores, noisy neighbours.

Each scenario runs every policy under real mpirun with launch/hetero_ranks.py
between the launcher and dbs-train, interleaved over repeats (rotated order),
on the same seed: plain Horovod, the paper's rule, dbs, and fixed plans (a
sweep around the split by the ranks' nominal shares). Nothing inside dbs-train
slows any rank.

Reported per policy: time against plain Horovod (median of totals, and the
median of per-repeat ratios), time against the ideal (the epoch's samples over
the sum of each rank's standalone speed, measured in the same run under the
same spec: benchmarks/standalone_speed.py), plan moves per epoch, and CPU
seconds charged per rank (the wrapper's rusage of the rank).

    python -m benchmarks.hetero --only external     # every external scenario
    python -m benchmarks.external --quick           # one small scenario, for checks

Writes results.json, results.md and external.png to --out (default
runs/external). A family run in several jobs (``--only`` with texts separated
by ``|``) is joined with ``--merge DIR ...``.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.hetero import plot, rotation
from dbs_hvd.train.metrics import read_jsonl
from tests.harness import run_job

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "launch" / "hetero_ranks.py"
# A compute-bound CNN on digits placed at random on a noisy 24x24 canvas, the learning
# rate annealed over the run (cosine): its final accuracy is stable across seeds
# (benchmarks/accuracy_parity.py checks it over 5 seeds).
WORKLOAD = ["--model", "cnn-flat", "--dataset", "digits-shifted", "--lr", "0.05",
            "--lr-schedule", "cosine"]
# A tiny model: the digits MLP on 8x8 inputs, whose steps are mostly fixed cost.
TINY = ["--model", "mlp", "--dataset", "digits", "--lr", "0.05"]
# Plain Horovod as it comes: Horovod's spinning wait, 1 ms cycle and Open MPI's
# polling waits. The "horovod" rows run with dbs-train's settings (the quiet wait,
# the cycle set for a quota, waits in MPI that sleep under a quota).
SPIN = "horovod, Horovod's own wait and cycle"
# Benchmark policies launched with horovodrun --gloo instead of mpirun: Horovod's
# background thread waits for its peers in Gloo (sleeping) instead of Open MPI
# (polling), which a throttled rank pays out of its quota.
GLOO = {"horovod, horovodrun --gloo": "horovod", "dbs, horovodrun --gloo": "dbs"}
# Benchmark policies that are a dbs-train policy run with an environment of their own:
# what the quota-aware timing and the quiet wait each contribute.
POLICY_ENV = {
    SPIN: ("horovod", {"DBS_HVD_HOROVOD_WAIT": "spin", "HOROVOD_CYCLE_TIME": "1",
                       "DBS_HVD_MPI_YIELD": "spin"}),
    "dbs, Horovod's own wait and cycle": ("dbs", {"DBS_HVD_HOROVOD_WAIT": "spin",
                                                  "HOROVOD_CYCLE_TIME": "1",
                                                  "DBS_HVD_MPI_YIELD": "spin"}),
    "dbs, no quota floor": ("dbs", {"DBS_HVD_QUOTA_FLOOR": "off"}),
    "dbs, process CPU floor": ("dbs", {"DBS_HVD_QUOTA_FLOOR": "process"}),
}


@dataclass
class ExternalScenario:
    """Ranks under a hetero_ranks.py spec, and the policies compared on them."""

    name: str
    ranks: int
    spec: list[str]
    shares: list[float]  # cores per rank, for the nominal split
    policies: list[str]
    epochs: int = 2
    global_batch: int = 64
    repeats: int | None = None
    workload: list[str] = field(default_factory=lambda: list(WORKLOAD))

    def nominal_plan(self) -> list[int]:
        """The split of the global batch by nominal shares (largest remainder)."""
        total = sum(self.shares)
        raw = [self.global_batch * s / total for s in self.shares]
        plan = [int(r) for r in raw]
        for i in sorted(range(len(raw)), key=lambda i: plan[i] - raw[i])[:self.global_batch
                                                                        - sum(plan)]:
            plan[i] += 1
        return plan


def train_size(workload: list[str]) -> int:
    """Training samples in a workload's data set (every policy trains the same steps)."""
    from dbs_hvd.train import data

    dataset = workload[workload.index("--dataset") + 1]
    return len(data.load(dataset, flatten=False)[0])


def fixed(plan: list[int]) -> str:
    return "fixed " + ",".join(map(str, plan))


def shifted(plan: list[int], step: int, source: int = -1) -> list[int]:
    """Move ``step`` samples from rank ``source`` (the last) to the first (a fixed-plan sweep)."""
    out = list(plan)
    step = min(step, out[source] - 1)
    out[0] += step
    out[source] -= step
    return out


def scenarios(quick: bool) -> list[ExternalScenario]:
    three = ["horovod", "paper", "dbs"]
    if quick:
        return [ExternalScenario("external [1,0.25] 2 ranks, 10 ms period", 2,
                                 ["--share", "1,0.25", "--core", "0,1", "--period-ms", "10"],
                                 [1, 0.25], three, epochs=1, repeats=1)]
    out = []
    for shares in ([1, 0.25], [1, 0.5]):
        for period in (10, 100):
            s = ExternalScenario(
                f"external [{shares[0]},{shares[1]}] 2 ranks, {period} ms period", 2,
                ["--share", f"{shares[0]},{shares[1]}", "--core", "0,1",
                 "--period-ms", str(period)], shares, list(three))
            if shares[1] == 0.25:
                nominal = s.nominal_plan()
                s.policies += [fixed(nominal), fixed(shifted(nominal, 4)),
                               fixed(shifted(nominal, 8)), fixed(shifted(nominal, 12))]
                if period == 100:
                    s.policies += list(GLOO)
            out.append(s)
    shared = ExternalScenario("external [1,0.5,0.25] 3 ranks, the throttled two share a core", 3,
                              ["--share", "1,0.5,0.25", "--core", "0,1,1", "--period-ms", "100"],
                              [1, 0.5, 0.25], three + [SPIN, *GLOO], global_batch=63)
    # The sweep: the split by nominal shares, samples moved from the slowest rank to
    # the fastest, and a plan that takes from the middle rank too.
    nominal = shared.nominal_plan()
    shared.policies += [fixed(nominal), fixed(shifted(nominal, 3)), fixed(shifted(nominal, 6)),
                        fixed(shifted(shifted(nominal, 6), 6, source=1))]
    out.append(shared)
    # Runs long enough, and repeated often enough, to tell 2% apart: plain
    # Horovod's own run-to-run spread on 2 epochs is about that.
    out.append(ExternalScenario("external equal [1,1] 2 ranks", 2, ["--share", "1,1", "--core", "0,1"],
                                [1, 1], ["horovod", "dbs", "horovod again"], epochs=4, repeats=10))
    out.append(ExternalScenario("external rank 0 evaluates every 30 steps, [1,1] 2 ranks pinned", 2,
                                ["--core", "0,1"], [1, 1], ["horovod", "dbs", "fixed 32,32"],
                                workload=[*WORKLOAD, "--eval-every", "30"]))
    # A tiny step takes about one of Horovod's background cycles, so each epoch
    # lands on one side of a cycle or the other: the runs are long and repeated
    # so that the plan, not that chance, decides the ratio.
    out.append(ExternalScenario("external tiny MLP [1,1] 2 ranks pinned", 2, ["--core", "0,1"],
                                [1, 1], ["horovod", "dbs", "fixed 32,32"], epochs=60, repeats=5,
                                workload=list(TINY)))
    out.append(ExternalScenario("external tiny MLP 3 ranks, two share a core", 3,
                                ["--core", "0,1,1"], [1, 0.5, 0.5],
                                ["horovod", "dbs", "fixed 21,21,21", "fixed 31,16,16"],
                                epochs=60, repeats=5, global_batch=63, workload=list(TINY)))
    out.append(ExternalScenario(
        "external noisy neighbours p=0.3, 2 loops, 2 s segments, 2 ranks", 2,
        ["--core", "0,1", "--noise", "p=0.3,loops=2,segment=2,epochs=3,seed=4"], [1, 1], three))
    return out


def policy_flags(policy: str) -> list[str]:
    if policy.startswith("fixed "):
        return ["--policy", "static", "--plan", policy.split()[1]]
    if policy == "horovod again":
        return ["--policy", "horovod"]
    if policy in POLICY_ENV:
        return ["--policy", POLICY_ENV[policy][0]]
    if policy in GLOO:
        return ["--policy", GLOO[policy]]
    return ["--policy", policy]


def epoch_moves(epoch: dict) -> int:
    """Plan changes in one epoch record: inside it, and at its end."""
    plans = epoch.get("plans") or [epoch.get("batch_sizes")]
    after = epoch.get("next_batch_sizes")
    at_end = after is not None and plans[-1] is not None and list(after) != list(plans[-1])
    return len(plans) - 1 + int(at_end)


@dataclass
class Run:
    scenario: str
    policy: str
    repeat: int
    epochs: list[dict] = field(default_factory=list)
    ranks: list[dict] = field(default_factory=list)  # hetero_ranks.py reports
    error: str = ""

    @property
    def total_seconds(self) -> float:
        return sum(e["seconds"] for e in self.epochs)

    @property
    def moves_per_epoch(self) -> float:
        """Plan changes per epoch after the first (the first leaves the equal split).

        A change inside an epoch and one at its end (the plan the epoch hands
        on, ``next_batch_sizes``) both count.
        """
        later = self.epochs[1:] or self.epochs
        return statistics.mean(epoch_moves(e) for e in later)


def rank_command(scenario: ExternalScenario, tail: list[str], report: Path | None,
                 rank: int | None = None) -> list[str]:
    command = [sys.executable, str(TOOL), *scenario.spec]
    if rank is not None:
        command += ["--rank", str(rank)]
    if report is not None:
        command += ["--report", str(report)]
    return command + ["--", sys.executable, *tail]


def run_once(scenario: ExternalScenario, policy: str, repeat: int, workdir: Path,
             seed: int = 0) -> Run:
    """One dbs-train run of ``policy`` on ``scenario`` (``seed``: dbs-train's --seed)."""
    tag = f"{abs(hash((scenario.name, policy, repeat, seed)))}"
    log, report = workdir / f"{tag}.jsonl", workdir / tag
    tail = ["-m", "dbs_hvd.train.cli", *scenario.workload, *policy_flags(policy), "--epochs",
            str(scenario.epochs), "--global-batch", str(scenario.global_batch), "--seed", str(seed),
            "--log", str(log)]
    job = run_job(rank_command(scenario, tail, report), np=scenario.ranks, timeout=900,
                  env=POLICY_ENV[policy][1] if policy in POLICY_ENV else None,
                  launcher="horovodrun-gloo" if policy in GLOO else "mpirun", cwd=str(ROOT))
    run = Run(scenario.name, policy, repeat)
    if not job.ok:
        run.error = job.describe(tail_lines=15)
        return run
    run.epochs = read_jsonl(log)
    run.ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in range(scenario.ranks)]
    return run


def standalone_speeds(scenario: ExternalScenario) -> list[float]:
    """Each rank's samples per second alone, under its spec, at its nominal batch."""
    speeds = []
    for rank, batch in enumerate(scenario.nominal_plan()):
        tail = ["-m", "benchmarks.standalone_speed", *scenario.workload, "--batch", str(batch)]
        job = run_job(rank_command(scenario, tail, None, rank=rank), np=1, timeout=600,
                      cwd=str(ROOT))
        if not job.ok:
            raise RuntimeError(job.describe())
        speeds.append(float(re.search(r"SAMPLES_PER_SECOND ([0-9.]+)", job.output).group(1)))
    return speeds


def summarise(scenario: ExternalScenario, runs: list[Run], speeds: list[float]) -> dict:
    mine = [r for r in runs if r.scenario == scenario.name and not r.error]
    plain = [r for r in mine if r.policy == "horovod"]
    if not plain:  # nothing to compare with
        return {}
    base = statistics.median(r.total_seconds for r in plain)
    per_repeat = {r.repeat: r.total_seconds for r in plain}
    samples_per_epoch = scenario.global_batch * (train_size(scenario.workload) // scenario.global_batch)
    rows = {}
    for policy in scenario.policies:
        these = [r for r in mine if r.policy == policy]
        if not these:
            continue
        samples = len(these[0].epochs) * samples_per_epoch
        ideal = samples / sum(speeds)
        totals = [r.total_seconds for r in these]
        paired = [r.total_seconds / per_repeat[r.repeat] for r in these if r.repeat in per_repeat]
        rows[policy] = {
            "time_vs_horovod": statistics.median(totals) / base,
            "paired_vs_horovod": statistics.median(paired) if paired else None,
            "paired_range": [min(paired), max(paired)] if paired else None,
            "time_vs_ideal": statistics.median(totals) / ideal,
            "moves_per_epoch": statistics.median(r.moves_per_epoch for r in these),
            "cpu_seconds": [statistics.median(r.ranks[i]["cpu_seconds"] for r in these)
                            for i in range(scenario.ranks)],
            # of which outside the training loop's thread (Horovod's background thread, ...)
            "other_threads_cpu_seconds": [
                statistics.median(r.ranks[i].get("other_threads_cpu_seconds", 0.0) for r in these)
                for i in range(scenario.ranks)],
            "final_plan": these[-1].epochs[-1]["next_batch_sizes"],
            "final_accuracy": statistics.median(r.epochs[-1]["accuracy"] for r in these),
            "totals": totals,
        }
    fixed_rows = [row["time_vs_horovod"] for p, row in rows.items() if p.startswith("fixed ")]
    if fixed_rows:
        best = min(fixed_rows)
        for row in rows.values():
            row["time_vs_best_fixed"] = row["time_vs_horovod"] / best
    return rows


def cpu_cell(row: dict) -> str:
    """CPU seconds per rank, each with its other threads' part in brackets (where measured)."""
    others = row.get("other_threads_cpu_seconds")
    if others is None:
        return ", ".join(f"{c:.1f}" for c in row["cpu_seconds"])
    return ", ".join(f"{c:.1f} ({o:.1f})" for c, o in zip(row["cpu_seconds"], others))


def markdown(summary: dict, speeds: dict) -> str:
    lines = ["| scenario | policy | time vs plain Horovod | paired (lowest-highest) | vs best "
             "fixed plan | vs ideal | plan moves per epoch | CPU s per rank (other threads) | "
             "final plan | "
             "final accuracy |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in summary.items():
        for policy, row in rows.items():
            span = row["paired_range"]
            vs_fixed = row.get("time_vs_best_fixed")
            lines.append(
                f"| {name} | {policy} | {row['time_vs_horovod']:.3f} | "
                f"{row['paired_vs_horovod']:.3f} ({span[0]:.3f}-{span[1]:.3f}) | "
                f"{'n/a' if vs_fixed is None else f'{vs_fixed:.3f}'} | {row['time_vs_ideal']:.3f} | "
                f"{row['moves_per_epoch']:.1f} | {cpu_cell(row)}"
                f" | {row['final_plan']} | {100 * row['final_accuracy']:.1f}% |")
    lines.append("")
    lines.append("Standalone speeds (samples/s, each rank alone under its spec): " + "; ".join(
        f"{name}: {', '.join(f'{v:.0f}' for v in values)}" for name, values in speeds.items()))
    return "\n".join(lines) + "\n"


def run_all(scenario_list: list[ExternalScenario], repeats: int, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    speeds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in scenario_list:
            speeds[scenario.name] = standalone_speeds(scenario)
            print(f"{scenario.name}: standalone speeds {speeds[scenario.name]}", flush=True)
            for repeat in range(scenario.repeats or repeats):
                for policy in rotation(scenario.policies, repeat):
                    run = run_once(scenario, policy, repeat, Path(tmp))
                    status = "FAILED" if run.error else f"{run.total_seconds:.1f}s"
                    print(f"{scenario.name:60s} {policy:30s} repeat {repeat}: {status}", flush=True)
                    if run.error:
                        print(run.error, file=sys.stderr)
                    runs.append(run)
            summary = {s.name: summarise(s, runs, speeds[s.name]) for s in scenario_list
                       if s.name in speeds}
            table = markdown(summary, speeds)
            (out / "results.md").write_text(table)
            (out / "results.json").write_text(json.dumps({
                "summary": summary, "speeds": speeds, "runs": [r.__dict__ for r in runs],
                "scenarios": [s.__dict__ for s in scenario_list]}, indent=1))
    plot(runs, scenario_list, out / "external.png")  # hetero.plot reads the same fields
    print(table)
    return 1 if any(r.error for r in runs) else 0


def merge(parts: list[Path], out: Path) -> None:
    """Join the results.json of jobs that ran different scenarios into one table and plot.

    A scenario measured by several parts keeps the last part's rows.
    """
    summary: dict = {}
    speeds: dict = {}
    runs: list[Run] = []
    chosen: dict[str, ExternalScenario] = {}
    for part in parts:
        data = json.loads((part / "results.json").read_text())
        summary.update(data["summary"])
        speeds.update(data["speeds"])
        measured = set(data["summary"])
        runs = [r for r in runs if r.scenario not in measured]
        runs += [Run(**r) for r in data["runs"] if r["scenario"] in measured]
        chosen.update({s["name"]: ExternalScenario(**s) for s in data["scenarios"]
                       if s["name"] in measured})
    for name, rows in summary.items():  # a part may predate a change in how moves count
        for policy, row in rows.items():
            these = [r for r in runs if r.scenario == name and r.policy == policy and r.epochs]
            if these:
                row["moves_per_epoch"] = statistics.median(r.moves_per_epoch for r in these)
    order = [s.name for s in scenarios(quick=False)]
    rank = {name: order.index(name) if name in order else len(order) for name in summary}
    summary = {name: summary[name] for name in sorted(summary, key=rank.__getitem__)}
    speeds = {name: speeds[name] for name in summary if name in speeds}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown(summary, speeds))
    (out / "results.json").write_text(json.dumps({
        "summary": summary, "speeds": speeds, "runs": [r.__dict__ for r in runs],
        "scenarios": [s.__dict__ for s in chosen.values()]}, indent=1))
    plot(runs, list(chosen.values()), out / "external.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small scenario")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--only", help="run only scenarios whose name contains this text "
                        "(several texts separated by |: any of them)")
    parser.add_argument("--out", default="runs/external", help="output folder")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="DIR",
                        help="instead of running: join these jobs' results into --out")
    args = parser.parse_args(argv)
    if args.merge:
        merge(args.merge, Path(args.out))
        return 0
    wanted = args.only.split("|") if args.only else []
    chosen = [s for s in scenarios(args.quick) if not wanted or any(w in s.name for w in wanted)]
    return run_all(chosen, args.repeats or (1 if args.quick else 3), Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
