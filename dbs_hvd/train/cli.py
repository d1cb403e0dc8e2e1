"""Command-line entry points: dbs-train."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from ..comm import DbsError
from ..plan import PlanError
from ..policies import POLICIES
from .checkpoint import CheckpointError
from .metrics import EpochRecord
from .trainer import AUTO_ON_OFF, PLAN_FOR, TrainConfig, flag_names, parse_max_batch, train

# The errors every rank meets alike: dbs-train reports them in one line, no traceback.
USER_ERRORS = (DbsError, PlanError, CheckpointError, ValueError, FileNotFoundError)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _add_steps(group: Any, flag: str, default: int, metavar: str, text: str) -> None:
    """An option that counts steps (a positive integer)."""
    group.add_argument(flag, type=_positive_int, default=default, metavar=metavar, help=text)


def _max_batch(text: str) -> int | str:
    """--max-batch: one positive cap (an int), or a comma list of them, one per rank (kept as text)."""
    try:
        caps = parse_max_batch(text)
    except PlanError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return caps if isinstance(caps, int) else ",".join(map(str, caps))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action) or ""


def train_parser() -> argparse.ArgumentParser:
    """The parser of dbs-train's command line, its options in argument groups."""
    defaults = TrainConfig()
    p = argparse.ArgumentParser(
        prog="dbs-train",
        description="Dynamic Batch Size training on Horovod. Launch with "
        "`horovodrun -np N dbs-train ...` or `mpirun -np N dbs-train ...`.",
        epilog="@FILE reads options from FILE, one per line (for elastic runs, where "
        "horovodrun reads the whole command line).",
        formatter_class=_HelpFormatter,
        # @FILE reads options from FILE, one per line: horovodrun's own parser
        # sees through the command line in elastic mode (where "--" cannot be
        # used) and would take e.g. --log for its --log-level.
        fromfile_prefix_chars="@",
    )

    workload = p.add_argument_group("workload", "the model, the data and the device")
    workload.add_argument(
        "--model",
        choices=["mlp", "cnn", "cnn-flat"],
        default=defaults.model,
        help="an MLP, or a small CNN with a pooled head (cnn) or a linear head over the whole "
        "feature map (cnn-flat: learns faster)",
    )
    workload.add_argument(
        "--dataset",
        choices=["digits", "digits-shifted", "synthetic", "cifar10"],
        default=defaults.dataset,
        help="digits ships with scikit-learn (no download); digits-shifted places them at "
        "random on a noisy 24x24 canvas (5,752 train / 3,590 test samples: accuracy stable "
        "across seeds)",
    )
    workload.add_argument("--data-dir", help="CIFAR-10 python folder (cifar-10-batches-py)")
    workload.add_argument(
        "--samples", type=_positive_int, default=defaults.samples, help="size of the synthetic data set"
    )
    workload.add_argument(
        "--image-size",
        type=_positive_int,
        default=defaults.image_size,
        help="digits only: upsample the 8x8 images to this size (more work per sample)",
    )
    workload.add_argument("--hidden", type=_positive_int, default=defaults.hidden, help="MLP width")
    workload.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=defaults.device,
        help="cuda: one GPU per local rank (model, batches, NCCL allreduce "
        "when Horovod was built with it); more ranks than GPUs share "
        "them round-robin, which only a Horovod without NCCL allows",
    )

    training = p.add_argument_group("training")
    training.add_argument(
        "--global-batch",
        type=int,
        default=defaults.global_batch,
        help="samples per step over all ranks; fixed for the run",
    )
    training.add_argument("--epochs", type=_positive_int, default=defaults.epochs, help="epochs to train")
    training.add_argument("--lr", type=float, default=defaults.lr, help="learning rate (SGD)")
    training.add_argument("--momentum", type=float, default=defaults.momentum, help="SGD momentum")
    training.add_argument(
        "--lr-schedule",
        choices=["constant", "cosine"],
        default=defaults.lr_schedule,
        help="cosine: anneal --lr to 0 over the run's steps (a function of the step, so "
        "--resume continues it)",
    )
    training.add_argument(
        "--eval-every",
        type=int,
        default=defaults.eval_every,
        metavar="N",
        help="rank 0 also evaluates on the test set every N steps, between steps (logged as "
        "the epoch's evaluations; 0: only at epoch ends)",
    )
    training.add_argument(
        "--seed", type=int, default=defaults.seed, help="seeds the model, the data order and the emulation"
    )
    training.add_argument(
        "--threads", type=_positive_int, default=defaults.threads, help="torch threads per rank"
    )
    training.add_argument("--workers", type=int, default=defaults.workers, help="DataLoader workers")

    dbs = p.add_argument_group("DBS", "how the global batch is split between the ranks")
    dbs.add_argument(
        "--policy",
        choices=sorted(POLICIES) + ["horovod"],
        default=defaults.policy,
        help="dbs = fitted cost model, smoothing, deadband (ours); paper = share "
        "proportional to last window's speed; static = DBS machinery, equal "
        "split; horovod = plain hvd.DistributedOptimizer baseline",
    )
    dbs.add_argument(
        "--rebalance-every",
        type=_positive_int,
        default=None,
        metavar="K",
        help="also rebalance every K steps inside an epoch (default: 2 for dbs, "
        "epoch ends only for the others)",
    )
    dbs.add_argument(
        "--plan",
        metavar="B1,B2,...",
        help="the first plan, one local batch size per rank summing to the global "
        "batch (default: the equal split); --policy static keeps it for the run",
    )
    dbs.add_argument(
        "--min-batch", type=int, default=defaults.min_batch, help="smallest local batch of any rank"
    )
    dbs.add_argument(
        "--max-batch",
        type=_max_batch,
        default=None,
        metavar="C | C1,C2,...",
        help="largest local batch: one cap for every rank, or one per rank in rank order "
        "(ranks with less memory); --oom-recovery lowers a rank's cap where it runs out of "
        "memory (default: no cap)",
    )
    dbs.add_argument(
        "--zero-samples",
        action="store_true",
        help="let the policy give a straggler 0 samples while the step is predicted "
        "faster without it; it joins each allreduce with weight 0 and computes a timed "
        "probe every --probe-every steps, so it comes back when it speeds up",
    )
    _add_steps(
        dbs,
        "--probe-every",
        defaults.probe_every,
        "K",
        "--zero-samples: a rank with 0 samples probes its speed every K steps",
    )
    dbs.add_argument(
        "--batch-multiple",
        type=_positive_int,
        default=defaults.batch_multiple,
        metavar="M",
        help="keep every local batch a multiple of M samples (M must "
        "divide the global batch): fewer sizes to visit, each of which costs a GPU "
        "a one-off step that builds kernel plans, and moves under M samples stop "
        "(1: any size)",
    )
    dbs.add_argument(
        "--mode",
        choices=["gradient", "average"],
        default=defaults.mode,
        help="gradient: weighted gradient allreduce every step; average: local SGD "
        "with parameters averaged (weighted by samples) every "
        "--average-every steps",
    )
    _add_steps(
        dbs,
        "--average-every",
        defaults.average_every,
        "H",
        "--mode average: steps between parameter averagings",
    )

    advanced = p.add_argument_group(
        "advanced", "expert knobs of the rebalance schedule and the dbs policy; the defaults suit most runs"
    )
    advanced.add_argument(
        "--rebalance-budget",
        type=float,
        default=defaults.rebalance_budget,
        metavar="F",
        help="with --rebalance-every, rebalance less often where "
        "steps are short, so the measured cost of rebalancing stays within "
        "this fraction of the step time (0: exactly every K steps)",
    )
    advanced.add_argument(
        "--rebalance-min-seconds",
        type=float,
        default=defaults.rebalance_min_seconds,
        metavar="T",
        help="with --rebalance-every, keep at least T seconds of training "
        "between rebalances, so very short steps do not pay for rebalancing "
        "a few steps apart (0: no floor)",
    )
    advanced.add_argument(
        "--warmup-steps",
        type=int,
        default=defaults.warmup_steps,
        metavar="N",
        help="--policy dbs: during the first N steps of a process, move the "
        "plan only for a predicted gain of 15%%, so first-step slowness (lazy "
        "init, kernel selection) does not steer it (0: no warm-up)",
    )
    advanced.add_argument(
        "--max-deadband",
        type=float,
        default=defaults.max_deadband,
        metavar="F",
        help="--policy dbs: a new plan must be predicted to gain "
        "twice the measured noise, but never more than F (default: the policy's 0.03) "
        "nor less than 0.01",
    )
    advanced.add_argument(
        "--plan-for",
        choices=PLAN_FOR,
        default=defaults.plan_for,
        help="--policy dbs: plan for the expected slowest step, giving a rank whose "
        "compute varies from step to step less than its mean share (slowest), or "
        "equalise the ranks' mean steps alone (mean)",
    )
    advanced.add_argument(
        "--spread-steps",
        type=float,
        default=defaults.spread_steps,
        metavar="N",
        help="--policy dbs --plan-for slowest: count a rank's step-to-step spread "
        "once it is measured over N steps, weighted by age (default: the policy's 8)",
    )
    advanced.add_argument(
        "--discount-new-sizes",
        choices=AUTO_ON_OFF,
        default=defaults.discount_new_sizes,
        help="leave each rank's first step at a batch size out of its measured "
        "speed (auto: on with --device cuda, where that step builds "
        "kernel plans for the new shapes)",
    )

    emulation = p.add_argument_group(
        "emulation", "slower or changing devices, emulated on identical hardware"
    )
    emulation.add_argument("--slowdown", help="emulated per-rank slowdown factors, e.g. 1,1,1,4")
    emulation.add_argument(
        "--slowdown-clock",
        choices=["wall", "cpu"],
        default=defaults.slowdown_clock,
        help="what --slowdown scales: the step's wall time, or (one torch "
        "thread on CPU) its CPU time, which leaves out waiting for a core "
        "shared with other ranks",
    )
    emulation.add_argument(
        "--virtual-device",
        metavar="A:C[:F],...",
        help="emulated per-rank step cost A + C*batch, in ms, e.g. 0:1,0:3; "
        "F ms more at the first step of each batch size (a GPU's kernel "
        "plans for new shapes)",
    )
    emulation.add_argument(
        "--disturb",
        metavar="p=P,factor=F,epochs=E",
        help="the DBS paper's disturbances: each epoch each undisturbed rank "
        "is slowed F-fold with probability P for 1..E epochs (seeded by "
        "--seed)",
    )
    emulation.add_argument(
        "--step-change",
        metavar="RANK:STEP:FACTOR",
        help="rank RANK becomes FACTOR times slower from global step STEP on",
    )

    outputs = p.add_argument_group("outputs")
    outputs.add_argument("--log", metavar="FILE", help="write one JSON line per epoch here (rank 0)")
    outputs.add_argument(
        "--rebalance-log",
        metavar="FILE",
        help="rank 0 writes one JSON line per rebalance here: each rank's window "
        "(steps, samples, compute and wait seconds), the plan before and after, "
        "the next interval and what the policy saw (dbs: noise, band, fitted "
        "costs)",
    )
    outputs.add_argument("--progress", action="store_true", help="progress bar on rank 0")
    outputs.add_argument(
        "--timeline", metavar="FILE", help="write Horovod's timeline (chrome://tracing JSON) here"
    )

    reliability = p.add_argument_group(
        "reliability", "stalls, out-of-memory steps, checkpoints and elastic training"
    )
    reliability.add_argument(
        "--stall-timeout",
        type=float,
        default=defaults.stall_timeout,
        help="seconds a rank may lag behind in a collective before Horovod "
        "stops the job (a hung rank ends the run with an error instead "
        "of hanging it)",
    )
    reliability.add_argument(
        "--oom-recovery",
        choices=AUTO_ON_OFF,
        default=defaults.oom_recovery,
        help="where a rank runs out of memory in a step, every rank abandons the step, the "
        "rank's --max-batch cap drops below the batch it failed at and the step's global "
        "batch is trained again under the new plan (auto: on with --device cuda; costs one "
        "small collective per step)",
    )
    reliability.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="rank 0 saves a checkpoint here after every epoch "
        "(atomic write, the last --keep-checkpoints kept)",
    )
    reliability.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir"
    )
    reliability.add_argument(
        "--keep-checkpoints",
        type=_positive_int,
        default=defaults.keep_checkpoints,
        help="checkpoints kept in --checkpoint-dir",
    )
    reliability.add_argument(
        "--elastic",
        action="store_true",
        help="Horovod elastic mode: launch with horovodrun "
        "--host-discovery-script (Gloo); ranks may die or join, "
        "training resumes from the last commit with the plan "
        "recomputed for the new world",
    )
    reliability.add_argument(
        "--commit-every",
        type=_positive_int,
        default=defaults.commit_every,
        metavar="K",
        help="elastic: commit the training state every K steps "
        "and at every epoch end (a failure repeats at most K-1 steps)",
    )
    reliability.add_argument(
        "--read-log",
        metavar="DIR",
        help="elastic debugging: each process appends the sample indices "
        "it trains on (epoch, step, rank, world size) to its own "
        "JSON-lines file in DIR",
    )
    return p


def train_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """The TrainConfig that dbs-train's command line ``argv`` asks for.

    Args:
        argv: the command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The configuration ``train`` takes. Bad flags exit through argparse.
    """
    args = train_parser().parse_args(argv)
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def train_main(argv: Sequence[str] | None = None) -> int:
    """The ``dbs-train`` command: parse the command line and train.

    Errors that every rank meets alike (bad settings, a plan that cannot be
    made, a checkpoint that does not fit) end the run with one line on
    stderr instead of a traceback.

    Args:
        argv: the command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, or 2 after such an error.
    """
    config = train_config(argv)
    try:
        run_training(config)
    except USER_ERRORS as error:
        # Raised alike on every rank: each exits non-zero with the same message.
        # One write, so launchers that tag output per chunk keep the line whole.
        sys.stderr.write(error_line(error) + "\n")
        sys.stderr.flush()
        return 2
    return 0


def run_training(config: TrainConfig) -> list[EpochRecord]:
    """Train as ``config`` asks: elastically (``dbs_hvd.train.elastic``) or not (``dbs_hvd.train.trainer``).

    The choice is made here so that elastic.py, which builds on trainer.py,
    is not imported back by it.
    """
    if config.elastic:
        from .elastic import train_elastic  # imports Horovod: only for elastic runs

        return train_elastic(config)
    return train(config)


def error_line(error: BaseException) -> str:
    """The line dbs-train prints on stderr for one of ``USER_ERRORS`` (library names as flags)."""
    return f"dbs-train: error: {flag_names(str(error)) if isinstance(error, PlanError) else error}"


if __name__ == "__main__":
    sys.exit(train_main())
