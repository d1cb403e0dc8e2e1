#!/usr/bin/env python3
"""The main job: plain Horovod, then DBS, on the same two ranks, one of them slow.

The slow rank is made slow from outside the framework where this machine
allows it: each rank pinned to its own core, the second under a CPU quota of a
quarter core (launch/hetero_ranks.py; needs root and a writable cgroup). Where
cgroups cannot be written, dbs-train's in-framework emulation slows the second
rank 4x instead, and the demo says so. Both runs train the same model on the
same seed and data; the demo ends with one line per run (training time, final
test accuracy) and the ratio of the two times.

    python launch/demo.py            # what `make demo` runs
    python launch/demo.py --epochs 6 --period-ms 10
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the repository root, for tests.harness
import hetero_ranks  # noqa: E402  (a script beside this one, not a package)

from tests.harness import rank_environment  # noqa: E402

WORKLOAD = ["--model", "cnn", "--dataset", "digits", "--image-size", "16", "--lr", "0.1",
            "--global-batch", "64", "--seed", "0"]


def cgroups_writable() -> str | None:
    """None where a CPU quota can be applied, else the reason it cannot."""
    if len(os.sched_getaffinity(0)) < 2:
        return "fewer than two cores to pin the ranks to"
    try:
        root, _ = hetero_ranks.find_cpu_controller()
    except hetero_ranks.SetupError as error:
        return str(error)
    if not os.access(root, os.W_OK):
        return f"{root} is not writable (run as root)"
    return None


def train(policy: str, args: argparse.Namespace, real: bool, log: Path) -> list[dict]:
    dbs_train = [sys.executable, "-m", "dbs_hvd.train.cli", *WORKLOAD, "--epochs", str(args.epochs),
                 "--policy", policy, "--log", str(log)]
    if real:
        cores = sorted(os.sched_getaffinity(0))[:2]
        rank = [sys.executable, str(HERE / "hetero_ranks.py"), "--share", f"1,{args.share}",
                "--core", ",".join(map(str, cores)), "--period-ms", str(args.period_ms), "--"]
    else:
        rank = []
        dbs_train += ["--slowdown", f"1,{1 / args.share:g}"]
    command = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", "2", *rank, *dbs_train]
    print(f"\n== {policy}: {' '.join(command)}", flush=True)
    log.unlink(missing_ok=True)
    subprocess.run(command, env=rank_environment(), check=True, timeout=args.timeout)
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--share", type=float, default=0.25,
                        help="the slow rank's CPU quota in cores (default 0.25)")
    parser.add_argument("--period-ms", type=int, default=100,
                        help="the CFS period of the quota (100: the kernel's and Kubernetes' default)")
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--timeout", type=float, default=600, help="per run, seconds")
    args = parser.parse_args(argv)
    if shutil.which("mpirun") is None:
        print("demo: mpirun not found; run `make install` first", file=sys.stderr)
        return 2
    why_not = cgroups_writable()
    real = why_not is None
    if real:
        print(f"demo: rank 1 runs under a CPU quota of {args.share} core "
              f"({args.period_ms} ms period), each rank on its own core")
    else:
        print(f"demo: cannot apply a CPU quota here ({why_not});\n"
              f"      using dbs-train's in-framework emulation (--slowdown 1,{1 / args.share:g}) "
              f"instead")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for policy in ("horovod", "dbs"):
        epochs = train(policy, args, real, args.out / f"demo-{policy}.jsonl")
        results[policy] = (sum(e["seconds"] for e in epochs), epochs[-1]["accuracy"],
                           epochs[-1]["next_batch_sizes"])
    how = "CPU quota" if real else "emulated slowdown"
    print(f"\n== two ranks, rank 1 at {args.share} of a core ({how}), {args.epochs} epochs")
    for policy, name in (("horovod", "plain Horovod"), ("dbs", "DBS          ")):
        seconds, accuracy, plan = results[policy]
        print(f"{name}: training {seconds:6.1f} s, final test accuracy {100 * accuracy:5.1f}%, "
              f"final plan {plan}")
    ratio = results["dbs"][0] / results["horovod"][0]
    print(f"DBS took {ratio:.2f} of plain Horovod's training time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
