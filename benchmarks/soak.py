"""Soak run: many short dbs-train epochs with seeded disturbances, watched from outside.

What a long job must not do, checked on a short one with many epochs: grow in
memory, produce a plan that breaks the invariants, or stall. The ranks run the
real ``dbs-train`` under mpirun; this driver samples each rank's resident
memory (psutil) while the run goes, and reads rank 0's JSON-lines log for the
epochs done and the plans used. Memory growth is measured from the end of a
warm-up (the first ``warmup`` fraction of the epochs: imports, allocator pools
and MPI buffers settle there) to the end of the run.

    .venv/bin/python -m benchmarks.soak              # 200 epochs on 2 ranks (about a minute)
    .venv/bin/python -m benchmarks.soak --epochs 1000 --np 3

Writes soak.json to --out (default runs/soak) and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from dbs_hvd.train.metrics import read_jsonl
from tests.harness import launcher_argv, rank_environment

GLOBAL_BATCH = 128


def soak_command(epochs: int, log: Path, seed: int) -> list[str]:
    """dbs-train on the bundled digits: 11 short steps per epoch, disturbances on."""
    return [
        sys.executable, "-m", "dbs_hvd.train.cli", "--model", "mlp", "--dataset", "digits",
        "--global-batch", str(GLOBAL_BATCH), "--epochs", str(epochs), "--lr", "0.05",
        # Steps of a known cost (0.5 ms + 0.02 ms per sample) that the disturbances
        # slow 3-fold for 1-3 epochs at a time, so the plan keeps moving.
        "--virtual-device", "0.5:0.02", "--disturb", "p=0.2,factor=3,epochs=3",
        "--seed", str(seed), "--log", str(log), "--stall-timeout", "60",
    ]


@dataclass
class SoakResult:
    epochs_asked: int
    epochs_logged: int
    returncode: int | None
    timed_out: bool
    seconds: float
    rss_mb: dict[int, list[tuple[int, float]]] = field(default_factory=dict)  # pid -> (epoch, MB)
    plan_violations: list[str] = field(default_factory=list)
    distinct_plans: int = 0  # how much rebalancing the run exercised
    output_tail: str = ""

    def rss_after_warmup(self, warmup: float) -> dict[int, list[float]]:
        """Per rank process: the RSS samples (MB) from the end of the warm-up on."""
        start_epoch = int(self.epochs_asked * warmup)
        return {pid: [mb for epoch, mb in samples if epoch >= start_epoch]
                for pid, samples in self.rss_mb.items()}

    def growth(self, warmup: float) -> dict[int, float]:
        """Per rank process: RSS at the end over RSS right after the warm-up, minus 1."""
        return {pid: max(after[-3:]) / after[0] - 1.0
                for pid, after in self.rss_after_warmup(warmup).items() if len(after) >= 2}


def _rank_processes(launcher: psutil.Process) -> list[psutil.Process]:
    try:
        children = launcher.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if "dbs_hvd.train.cli" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def _epochs_logged(log: Path) -> int:
    try:
        return sum(1 for line in log.read_text().splitlines() if line.strip())
    except FileNotFoundError:
        return 0


def check_plans(records: list[dict], global_batch: int, world: int) -> list[str]:
    """Every plan of every epoch: one size per rank, each at least 1, summing to B."""
    problems = []
    for record in records:
        for plan in record["plans"] + [record["next_batch_sizes"]]:
            if len(plan) != world or sum(plan) != global_batch or min(plan) < 1:
                problems.append(f"epoch {record['epoch']}: plan {plan}")
    return problems


def run_soak(epochs: int = 200, np: int = 2, seed: int = 3, timeout: float = 600.0,
             sample_every: float = 0.2, workdir: str | None = None) -> SoakResult:
    """Run the soak and watch it; the whole process group is killed at ``timeout``."""
    folder = Path(workdir or tempfile.mkdtemp(prefix="dbs-soak-"))
    log = folder / "soak.jsonl"
    argv = launcher_argv(np) + soak_command(epochs, log, seed)
    output_file = folder / "output.txt"
    rss: dict[int, list[tuple[int, float]]] = {}
    timed_out = False
    started = time.monotonic()
    with open(output_file, "w") as sink:  # a file, not a pipe: a full pipe would stall the run
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT,
                                env=rank_environment(), start_new_session=True)
        launcher = psutil.Process(proc.pid)
        while proc.poll() is None:
            if time.monotonic() - started > timeout:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            epoch = _epochs_logged(log)
            for rank_proc in _rank_processes(launcher):
                try:
                    mb = rank_proc.memory_info().rss / 2**20
                except psutil.Error:
                    continue
                rss.setdefault(rank_proc.pid, []).append((epoch, mb))
            time.sleep(sample_every)
    records = read_jsonl(log) if log.exists() else []
    return SoakResult(
        epochs_asked=epochs, epochs_logged=len(records), returncode=proc.returncode,
        timed_out=timed_out, seconds=time.monotonic() - started, rss_mb=rss,
        plan_violations=check_plans(records, GLOBAL_BATCH, np),
        distinct_plans=len({tuple(plan) for record in records for plan in record["plans"]}),
        output_tail=output_file.read_text()[-3000:],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--np", type=int, default=2)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=0.1,
                        help="fraction of the epochs before memory growth is measured")
    parser.add_argument("--out", default="runs/soak")
    args = parser.parse_args(argv)
    result = run_soak(args.epochs, args.np, args.seed)
    growth = result.growth(args.warmup)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {**asdict(result), "growth": growth, "warmup": args.warmup}
    (out / "soak.json").write_text(json.dumps(summary, indent=1))
    print(f"soak: {result.epochs_logged}/{result.epochs_asked} epochs on {args.np} ranks in "
          f"{result.seconds:.0f} s, exit {result.returncode}"
          f"{' (TIMED OUT)' if result.timed_out else ''}")
    after_warmup = result.rss_after_warmup(args.warmup)
    for pid, value in growth.items():
        print(f"  rank process {pid}: RSS {after_warmup[pid][0]:.1f} MB after warm-up, "
              f"growth {100 * value:+.2f}%")
    print(f"  distinct plans used: {result.distinct_plans}; plans breaking an invariant: "
          f"{len(result.plan_violations)}")
    ok = (result.returncode == 0 and not result.timed_out and not result.plan_violations
          and result.epochs_logged == args.epochs and growth
          and all(value < 0.05 for value in growth.values()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
