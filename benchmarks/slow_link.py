"""A slow network link is not a slow device: plain Horovod and dbs across emulated hosts.

Two hosts of launch/emulated_cluster.py (network namespaces on one machine), one
rank per host ("1+1") or two ranks on the first and one on the second ("2+1").
The second host's link is left alone, rate-limited (tbf), or rate-limited and
delayed (the cluster's userspace delay line). Every rank is the same virtual
device (``--virtual-device 0:PER_SAMPLE_MS``: a known, equal cost per sample,
so the right plan is the equal split), training dbs-train's MLP on digits
under mpirun with the cluster's rsh agent, so every gradient allreduce crosses
the emulated links. Runs are interleaved: for each repeat, each layout, each
link, plain Horovod then dbs.

The main result is the plan: the share of the global batch the ranks on the
slowed host hold, against their equal share. Time spent waiting on the network
is waiting, not compute (dbs_hvd/timing.py), so it should not move the plan.
Epoch times are reported too; on a machine whose cores other jobs share they
are indicative only.

    python -m benchmarks.slow_link [--epochs 5] [--repeats 1] [--rate 20mbit]
        [--delay-ms 10] [--out benchmarks/results/slow_link]

Needs root (network namespaces), iproute2 and Open MPI. Writes results.json
(every run's epoch records) and results.md to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
LAYOUTS = {"1+1": (1, 1), "2+1": (2, 1)}
POLICIES = ("horovod", "dbs")


def load_cluster():
    """launch/emulated_cluster.py, with its state apart from other clusters'."""
    from launch import emulated_cluster

    emulated_cluster.set_state_dir("/run/dbs_hvd_cluster_bench")
    return emulated_cluster


def links(rate: str, delay_ms: float) -> list[tuple[str, str | None, float]]:
    """(label, tbf rate, delay in ms) of each link condition of the slowed host."""
    return [("normal", None, 0.0), (f"rate {rate}", rate, 0.0),
            (f"rate {rate} + {delay_ms:g} ms", rate, delay_ms)]


def train_argv(args: argparse.Namespace, policy: str, world: int, log: Path) -> list[str]:
    return [sys.executable, "-m", "dbs_hvd.train.cli", "--model", "mlp", "--hidden",
            str(args.hidden), "--dataset", "digits", "--epochs", str(args.epochs),
            "--global-batch", str(args.global_batch), "--policy", policy,
            "--virtual-device", ",".join([f"0:{args.per_sample_ms:g}"] * world),
            "--stall-timeout", "60", "--log", str(log)]


def run_once(ec, state: dict, slots: tuple[int, ...], policy: str,
             args: argparse.Namespace, log: Path) -> dict:
    """One mpirun of dbs-train launched from the first host; its epoch records and bytes."""
    hosts = state["hosts"]
    world = sum(slots)
    agent = str(Path(state["bin"]) / "ssh")
    argv = ["mpirun", "--allow-run-as-root", "-np", str(world),
            "-H", ",".join(f"{h}:{n}" for h, n in zip(hosts, slots)),
            "--mca", "plm_rsh_agent", agent, "--bind-to", "none",
            "--mca", "btl_tcp_if_include", "eth0", "--mca", "oob_tcp_if_include", "eth0",
            "-x", "PATH", "-x", "PYTHONPATH", "-x", "PYTHONUNBUFFERED",
            *train_argv(args, policy, world, log)]
    env = {**os.environ, "PATH": f"{state['bin']}:{VENV_BIN}:{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    slowed = hosts[-1]
    before = _link_bytes(slowed)
    log.unlink(missing_ok=True)
    started = time.monotonic()
    proc = subprocess.Popen(ec.host_argv(hosts[0], argv), env=env, cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=args.run_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    wall = time.monotonic() - started
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return {"policy": policy, "returncode": proc.returncode, "wall_seconds": wall,
            "slowed_host_bytes": _link_bytes(slowed) - before, "records": records,
            "output_tail": output[-2000:] if proc.returncode else ""}


def _link_bytes(host: str) -> int:
    done = subprocess.run(["ip", "-n", host, "-s", "-j", "link", "show", "eth0"],
                          capture_output=True, text=True, check=True)
    stats = json.loads(done.stdout)[0]["stats64"]
    return stats["rx"]["bytes"] + stats["tx"]["bytes"]


def column_means(rows: list[list[float]]) -> list[float]:
    return [round(statistics.fmean(col), 3) for col in zip(*rows)] if rows else []


def summarize(run: dict, slots: tuple[int, ...], global_batch: int) -> dict:
    """The slowed host's share of the batch and the times, over the epochs after the first."""
    records = run["records"][1:] or run["records"]
    world = sum(slots)
    slow_ranks = list(range(world - slots[-1], world))
    equal = global_batch * slots[-1] / world
    plans = [p for r in records for p in (r.get("plans") or [r["batch_sizes"]])]
    plans += [r["next_batch_sizes"] for r in records]
    slow = [sum(p[i] for i in slow_ranks) for p in plans] or [0]
    # Compute per sample, slowed host over the other: above 1 if network time counted as compute.
    timed = bool(records) and bool(records[0].get("compute_seconds"))
    per_sample = [sum(r["compute_seconds"][i] for r in records)
                  / max(sum(r["samples"][i] for r in records), 1) for i in range(world)] if timed else []
    ratio = (statistics.fmean(per_sample[i] for i in slow_ranks)
             / statistics.fmean(per_sample[i] for i in range(world) if i not in slow_ranks)
             if per_sample and all(per_sample) else None)
    return {
        "epochs": len(run["records"]),
        "epoch_seconds_median": round(statistics.median(r["seconds"] for r in records), 3)
        if records else None,
        "final_plan": run["records"][-1]["next_batch_sizes"] if run["records"] else None,
        "slow_host_equal_batch": equal,
        "slow_host_batch_mean": round(statistics.fmean(slow), 2),
        "slow_host_batch_min": min(slow),
        "slow_host_share_of_equal": round(statistics.fmean(slow) / equal, 3),
        "max_deviation_from_equal": max(
            (abs(b - global_batch / world) for p in plans for b in p), default=0),
        "slow_host_compute_per_sample_ratio": round(ratio, 3) if ratio else None,
        "compute_seconds": column_means([r["compute_seconds"] for r in records]),
        "wait_seconds": column_means([r["wait_seconds"] for r in records]),
        "slowed_host_mbytes": round(run["slowed_host_bytes"] / 1e6, 1),
    }


def markdown(runs: list[dict], args: argparse.Namespace, started: str) -> str:
    lines = [
        "# A slow link is not a slow device",
        "",
        f"`python -m benchmarks.slow_link --epochs {args.epochs} --repeats {args.repeats} "
        f"--rate {args.rate} --delay-ms {args.delay_ms:g}` ({started}).",
        "",
        f"Two emulated hosts (launch/emulated_cluster.py), mpirun with the rsh agent; every "
        f"rank the same virtual device (0 ms + {args.per_sample_ms:g} ms per sample, so the "
        f"equal split is right); MLP hidden {args.hidden} on digits, global batch "
        f"{args.global_batch}, {args.epochs} epochs. The second host's link is normal, "
        "rate-limited (tbf, both directions), or rate-limited and delayed (userspace delay line). "
        "Columns over the epochs after the first: the slowed host's batch (every plan used and "
        "chosen; mean, min) against its equal share, the largest distance of any rank's batch from "
        "the equal split, the slowed host's ranks' compute per sample over the other host's "
        "(above 1 if waiting on the network were counted as compute), per-rank compute and "
        "allreduce wait per epoch (s), epoch time (median).",
        "",
        "Times were taken on a machine with 2 cores shared with other jobs: indicative only. "
        "The plan shares are the result.",
        "",
        "| layout | link | policy | repeat | slowed host batch (equal) | mean | min | max dev | "
        "compute per sample, slowed/other | compute s | wait s | epoch s | MB on slowed link | rc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        s = run["summary"]
        lines.append(
            f"| {run['layout']} | {run['link']} | {run['policy']} | {run['repeat']} | "
            f"{s['slow_host_equal_batch']:g} | {s['slow_host_batch_mean']} | "
            f"{s['slow_host_batch_min']} | {s['max_deviation_from_equal']:g} | "
            f"{s['slow_host_compute_per_sample_ratio'] or ''} | "
            f"{' '.join(f'{v:.2f}' for v in s['compute_seconds'])} | "
            f"{' '.join(f'{v:.2f}' for v in s['wait_seconds'])} | "
            f"{s['epoch_seconds_median']} | {s['slowed_host_mbytes']} | {run['returncode']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--global-batch", type=int, default=60,
                        help="a multiple of 2 and 3: plain Horovod splits it equally")
    parser.add_argument("--hidden", type=int, default=256, help="MLP width (its gradient crosses the link)")
    parser.add_argument("--per-sample-ms", type=float, default=1.0)
    parser.add_argument("--rate", default="20mbit", help="tbf rate of the slowed link")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="delay of the slowed link")
    parser.add_argument("--layouts", default="1+1,2+1", help=f"of {', '.join(LAYOUTS)}")
    parser.add_argument("--run-timeout", type=float, default=300.0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "slow_link"))
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite results.md from --out's results.json, running nothing")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        saved = json.loads((out / "results.json").read_text())
        for run in saved["runs"]:
            run["summary"] = summarize(run, LAYOUTS[run["layout"]], saved["args"]["global_batch"])
        (out / "results.json").write_text(json.dumps(saved, indent=1))
        (out / "results.md").write_text(
            markdown(saved["runs"], argparse.Namespace(**saved["args"]), saved["started"]))
        return 0
    layouts = args.layouts.split(",")
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown:
        parser.error(f"--layouts: unknown {', '.join(unknown)} (known: {', '.join(LAYOUTS)})")
    ec = load_cluster()
    reason = ec.can_create_namespaces()
    if reason:
        print(f"slow_link: no emulated hosts here: {reason}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs: list[dict] = []
    ec.down(quiet=True)
    try:
        for repeat in range(args.repeats):
            for layout in layouts:
                slots = LAYOUTS[layout]
                state = ec.up(2, prefix="dbsb", subnet="10.77.2")
                try:
                    for label, rate, delay_ms in links(args.rate, args.delay_ms):
                        ec.heal(state["hosts"][-1])
                        if rate or delay_ms:
                            ec.slow(state["hosts"][-1], rate, delay_ms)
                        for policy in POLICIES:
                            run = run_once(ec, state, slots, policy, args, out / "epochs.jsonl")
                            run.update(layout=layout, link=label, repeat=repeat,
                                       summary=summarize(run, slots, args.global_batch))
                            runs.append(run)
                            s = run["summary"]
                            print(f"{layout} {label:24s} {policy:8s} rc {run['returncode']} "
                                  f"slowed host batch {s['slow_host_batch_mean']} "
                                  f"(equal {s['slow_host_equal_batch']:g}, min "
                                  f"{s['slow_host_batch_min']}) plan {s['final_plan']} "
                                  f"epoch {s['epoch_seconds_median']} s", flush=True)
                            (out / "results.json").write_text(json.dumps(
                                {"args": vars(args), "started": started, "runs": runs}, indent=1))
                finally:
                    ec.down(quiet=True)
    finally:
        ec.down(quiet=True)
        (out / "epochs.jsonl").unlink(missing_ok=True)
    (out / "results.md").write_text(markdown(runs, args, started))
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
