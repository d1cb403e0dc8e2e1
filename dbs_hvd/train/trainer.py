"""The dbs-train epoch loop: data, model, DBS sampler and optimizer, emulation, logs.

It is also the reference for using the library in a script: the training loop
below is a plain Horovod loop except for the sampler and the optimizer wrapper.
"""

from __future__ import annotations

import gc
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..averaging import ModelAveragingOptimizer
from ..comm import check_same_on_all_ranks, decide_on_root, default_exchange
from ..grid import GridPolicy
from ..memory import MemoryFailure, MemoryGuard
from ..optim import DistributedOptimizer, DynamicBatchState
from ..options import MemoryOptions, RebalanceOptions, ZeroSampleOptions
from ..plan import Bounds, Plan, PlanError, Policy
from ..policies import make_policy
from ..sampler import DynamicBatchSampler
from ..waiting import install_quiet_wait
from . import checkpoint, data, models
from .devices import gpu_for_local_rank, resolve_device
from .emulate import DeviceEmulator, make_emulator
from .metrics import EpochRecord, JsonLinesLog, balance_efficiency

#: --plan-for's choices: dbs plans for the expected slowest step, or equalises the mean steps.
PLAN_FOR = ("slowest", "mean")
#: The choices of --oom-recovery and --discount-new-sizes (auto: on with --device cuda).
AUTO_ON_OFF = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """Everything a run depends on; identical on every rank (checked at start)."""

    model: str = "mlp"
    dataset: str = "digits"
    data_dir: str | None = None
    samples: int = 4096  # synthetic data set size
    image_size: int = 8  # digits only: upsample to this size
    hidden: int = 128
    global_batch: int = 64
    epochs: int = 20
    lr: float = 0.05
    momentum: float = 0.9
    lr_schedule: str = "constant"  # or "cosine": annealed to 0 over the run's steps
    eval_every: int = 0  # rank 0 evaluates on the test set every N steps, between steps (0: never)
    policy: str = "dbs"
    mode: str = "gradient"  # or "average": local SGD, parameters averaged every average_every steps
    average_every: int = 8
    # The rebalance schedule, flat for the command line: RebalanceOptions (options.py).
    rebalance_every: int | None = None  # None: every 2 steps for dbs, epoch ends otherwise
    rebalance_budget: float = RebalanceOptions.budget  # interval stretched to cost <= this (0: exactly K)
    rebalance_min_seconds: float = RebalanceOptions.min_seconds  # and at least this apart
    warmup_steps: int = 10  # dbs: the first steps move the plan only for a large gain
    max_deadband: float | None = None  # dbs: the widest noise-following band (policies.py)
    plan_for: str = "slowest"  # dbs, one of PLAN_FOR: the expected slowest step, or the mean steps alone
    spread_steps: float | None = None  # dbs: the steps a rank's spread is measured over first
    discount_new_sizes: str = "auto"  # "on"/"off"; auto: on for --device cuda (optim.py)
    min_batch: int = 1
    max_batch: int | str | None = None  # one cap for all ranks, or "C1,C2,...": one per rank
    oom_recovery: str = "auto"  # "on"/"off"; auto: on for --device cuda (memory.py)
    zero_samples: bool = False  # a straggler may get 0 samples (dropping.py)
    probe_every: int = ZeroSampleOptions.probe_every  # --zero-samples: a left-out rank's probe interval
    batch_multiple: int = 1  # every local batch a multiple of this (grid.py); 1: any size
    plan: str | None = None  # "B1,B2,...": the first plan (with --policy static: kept for the run)
    slowdown: str | None = None
    slowdown_clock: str = "wall"  # or "cpu": scale the thread's CPU time (emulate.py)
    virtual_device: str | None = None
    disturb: str | None = None
    step_change: str | None = None
    seed: int = 0
    threads: int = 1
    workers: int = 0
    log: str | None = None
    rebalance_log: str | None = None  # rank 0: one JSON line per rebalance (window, plan, policy)
    progress: bool = False
    device: str = "cpu"  # "cuda": one GPU per local rank, NCCL when Horovod has it
    timeline: str | None = None  # Horovod timeline (chrome://tracing JSON), rank 0 writes it
    stall_timeout: float = 300.0  # seconds a rank may lag in a collective before the job stops
    checkpoint_dir: str | None = None
    resume: bool = False
    keep_checkpoints: int = 3
    elastic: bool = False  # Horovod elastic mode (horovodrun --host-discovery-script), see elastic.py
    commit_every: int = 10  # elastic: commit the state every K steps (and at every epoch end)
    read_log: str | None = None  # elastic debugging: each process logs the indices it trains on


def evaluate(
    model: nn.Module,
    dataset: TensorDataset,
    batch: int = 1024,
    device: torch.device = torch.device("cpu"),
    shares: Sequence[int] | None = None,
) -> float:
    """Accuracy of ``model`` on ``dataset``.

    Without ``shares`` this rank evaluates the whole set and joins no collective
    (what rank 0 does between steps for ``--eval-every``). With ``shares``, one
    weight per rank (the plan's batch sizes), each rank evaluates its own
    contiguous part of the set (``evaluation_parts``) and an allreduce sums the
    counts: every rank must call it. Splitting by the plan gives a slow rank a
    small part, so the evaluation ends on every rank at about the same time
    instead of the next epoch's first step waiting for the slowest rank to get
    through the whole set.

    Args:
        model: the model, put back in training mode afterwards.
        dataset: ``(inputs, labels)`` tensors.
        batch: samples per forward pass.
        device: where the forward passes run.
        shares: one non-negative weight per rank, or None for the whole set here.

    Returns:
        The fraction of the set classified correctly (the same on every rank
        when ``shares`` is given).
    """
    x_all, y_all = dataset.tensors
    start, stop = 0, len(y_all)
    if shares is not None:
        import horovod.torch as hvd

        start, stop = evaluation_parts(len(y_all), shares)[hvd.rank()]
    model.eval()
    correct = 0
    with torch.no_grad():
        for first in range(start, stop, batch):
            last = min(first + batch, stop)
            out = model(x_all[first:last].to(device))
            correct += int((out.argmax(1).cpu() == y_all[first:last]).sum())
    model.train()
    if shares is None:
        return correct / max(1, len(y_all))
    counts = hvd.allreduce(
        torch.tensor([correct, stop - start], dtype=torch.float64), op=hvd.Sum, name="dbs_hvd.evaluate"
    )
    return float(counts[0] / max(1.0, float(counts[1])))


def evaluation_parts(size: int, shares: Sequence[int]) -> list[tuple[int, int]]:
    """Cut ``range(size)`` into one contiguous ``(start, stop)`` part per rank, sized by ``shares``.

    Part boundaries are the rounded cumulative shares, so the parts cover the
    set exactly once and each differs from its exact proportion by less than one
    sample. Equal shares give equal parts.

    Raises:
        ValueError: for a negative share or shares that sum to 0.

    Example:
        >>> evaluation_parts(10, [3, 1])
        [(0, 8), (8, 10)]
    """
    if any(share < 0 for share in shares) or sum(shares) <= 0:
        raise ValueError(f"evaluation shares must be non-negative with a positive sum, got {list(shares)}")
    total = sum(shares)
    cuts = [0]
    running = 0
    for share in shares:
        running += share
        cuts.append((size * running + total // 2) // total)
    return list(zip(cuts[:-1], cuts[1:]))


def _epoch_summary(
    epoch: int,
    dbs: DynamicBatchState,
    start_plan: Plan,
    loss: float,
    accuracy: float,
    seconds: float,
    policy: str,
) -> EpochRecord:
    """The epoch's figures: every rank's measured totals (a collective) and the plans it ran.

    The totals are each rank's own (``DynamicBatchState.last_epoch``), not
    the rebalance windows': a window can run on from one epoch into the next.
    """
    sampler = dbs.sampler
    ranks = dbs.rebalancer.exchange.allgather(dbs.last_epoch)
    samples = np.array([totals.samples for totals in ranks], dtype=float)
    compute = np.array([totals.compute_seconds for totals in ranks])
    wait = np.array([totals.wait_seconds for totals in ranks])
    plans = [list(start_plan.batch_sizes)]
    for record in dbs.rebalancer.records_of_epoch(epoch):
        if record.start_step < sampler.steps_per_epoch and list(record.plan_after) != plans[-1]:
            plans.append(list(record.plan_after))
    return EpochRecord(
        epoch=epoch,
        loss=loss,
        accuracy=accuracy,
        seconds=seconds,
        batch_sizes=list(start_plan.batch_sizes),
        next_batch_sizes=list(sampler.plan.batch_sizes),
        compute_seconds=compute.round(4).tolist(),
        wait_seconds=wait.round(4).tolist(),
        samples=samples.astype(int).tolist(),
        efficiency=balance_efficiency(samples, compute, compute + wait),
        policy=policy,
        plans=plans,
    )


Batch = Sequence[torch.Tensor]
# Runs one step on a batch through a MemoryGuard: (batch, attempt) -> (batch trained, loss).
GuardedStep = Callable[[Batch, Callable[[Batch], torch.Tensor]], tuple[Batch, torch.Tensor]]


@dataclass
class Run:
    """The parts of a run that differ between DBS and the plain-Horovod baseline.

    ``dbs`` is the DBS optimizer's state (``optimizer.dbs``: sampler,
    rebalancer, timer); None for plain Horovod.
    """

    loader: DataLoader
    optimizer: torch.optim.Optimizer
    set_epoch: Callable[[int], None]
    steps_per_epoch: int
    dropped_per_epoch: int
    dbs: DynamicBatchState | None = None
    guarded: GuardedStep | None = None  # --oom-recovery: steps run through a MemoryGuard
    guard: MemoryGuard | None = None

    @property
    def state(self) -> DynamicBatchState:
        """The DBS state; raises ValueError for a plain-Horovod run, which has none."""
        if self.dbs is None:
            raise ValueError("a plain Horovod run has no DBS sampler or rebalancer")
        return self.dbs


def _dbs_policy_and_sampler(
    config: TrainConfig, dataset_size: int, rank: int | None = None, world_size: int | None = None
) -> tuple[Policy, DynamicBatchSampler]:
    """The run's policy and sampler (rank and world size default to Horovod's; no collective)."""
    if world_size is None:
        import horovod.torch as hvd

        world_size = hvd.size()
    try:
        policy = make_run_policy(config, world_size)
        sampler = DynamicBatchSampler(
            dataset_size,
            config.global_batch,
            rank=rank,
            world_size=world_size,
            seed=config.seed,
            bounds=run_bounds(config, world_size),
            plan=parse_plan(config.plan) if config.plan else None,
        )
    except PlanError as error:  # the library names its arguments; dbs-train, its flags
        raise PlanError(flag_names(str(error))) from None
    if isinstance(policy, GridPolicy) and not policy.on_grid(sampler.plan):
        if config.plan:
            raise PlanError(
                f"--plan {config.plan} is not on the grid of --batch-multiple "
                f"{config.batch_multiple}: give sizes that are multiples of it"
            )
        sampler.set_plan(policy.initial_plan(sampler.world_size), 0)  # nothing handed out yet
    return policy, sampler


def _dbs_run(
    config: TrainConfig, model: nn.Module, train_set: TensorDataset, exchange, device: torch.device
) -> Run:
    policy, sampler = _dbs_policy_and_sampler(config, len(train_set))
    # The sampler yields index lists; a TensorDataset indexes them in one go.
    loader = DataLoader(
        train_set,
        sampler=sampler,
        batch_size=None,
        num_workers=config.workers,
        pin_memory=device.type == "cuda",
    )
    local = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    # CUDA kernels run asynchronously: finish this rank's own work before
    # the allreduce wait is timed, or compute would be counted as waiting.
    device_sync = torch.cuda.synchronize if device.type == "cuda" else None
    shared = dict(
        policy=policy,
        rebalance=RebalanceOptions.from_config(asdict(config)),
        exchange=exchange,
        device_sync=device_sync,
        discount_new_sizes={"auto": None, "on": True, "off": False}[config.discount_new_sizes],
    )
    optimizer: torch.optim.Optimizer
    if config.mode == "average":
        optimizer = ModelAveragingOptimizer(
            local, sampler, model.named_parameters(), average_every=config.average_every, **shared
        )
    elif config.mode == "gradient":
        # model=: the b_i / B weight goes on the output's gradient (batch x classes)
        # instead of on every parameter's gradient: the same update (backward is
        # linear in it), without a pass over every parameter's gradient per step.
        zero = (
            ZeroSampleOptions(enabled=True, probe_every=config.probe_every) if config.zero_samples else None
        )
        optimizer = DistributedOptimizer(
            local,
            sampler,
            named_parameters=model.named_parameters(),
            model=model,
            zero_samples=zero,
            **shared,
        )
    else:
        raise ValueError(f"--mode must be gradient or average, got {config.mode!r}")
    dbs: DynamicBatchState = optimizer.dbs  # type: ignore[attr-defined]
    run = Run(loader, optimizer, sampler.set_epoch, sampler.steps_per_epoch, sampler.dropped_per_epoch, dbs)
    if oom_recovery(config):
        guard: MemoryGuard[Batch] = MemoryGuard(optimizer, MemoryOptions(), model=model)

        def guarded(batch: Batch, attempt: Callable[[Batch], torch.Tensor]) -> tuple[Batch, torch.Tensor]:
            return guard.step(batch, attempt, load=lambda indices: train_set[indices])

        run.guard, run.guarded = guard, guarded
    return run


def oom_recovery(config: TrainConfig) -> bool:
    """Whether steps run through a MemoryGuard: --oom-recovery on, or auto on a GPU."""
    return config.oom_recovery == "on" or (config.oom_recovery == "auto" and config.device == "cuda")


def run_bounds(config: TrainConfig, world_size: int | None) -> Bounds:
    """--min-batch and --max-batch as Bounds: one cap for all ranks, or one per rank.

    Raises:
        PlanError: for a list of caps whose length is not the world size (or
            with no world size, as in elastic runs).
    """
    caps = config.max_batch
    if caps is None or isinstance(caps, int):
        return Bounds(config.min_batch, caps)
    per_rank = parse_max_batch(caps)
    if isinstance(per_rank, int):
        return Bounds(config.min_batch, per_rank)
    if world_size is None or len(per_rank) != world_size:
        raise PlanError(
            f"--max-batch {caps} gives {len(per_rank)} per-rank caps for "
            f"{world_size or 'a changing number of'} ranks: give one cap per rank, or one cap for all"
        )
    return Bounds(config.min_batch, None, per_rank)


def parse_max_batch(text: str | int) -> int | tuple[int, ...]:
    """``--max-batch 64`` (one cap for every rank) or ``--max-batch 40,80,80`` (one per rank).

    Raises:
        PlanError: naming the flag, for anything but positive integers.
    """
    try:
        caps = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        caps = ()
    if not caps or min(caps) < 1:
        raise PlanError(
            f"--max-batch takes one positive cap for every rank (e.g. 64) or one per rank, "
            f"comma-separated (e.g. 40,80,80), got {text!r}"
        )
    return caps[0] if len(caps) == 1 and "," not in str(text) else caps


def scales_cpu_time(config: TrainConfig) -> bool:
    """--slowdown-clock cpu, where the calling thread's CPU time is the step's work (emulate.py)."""
    if config.slowdown_clock not in ("wall", "cpu"):
        raise ValueError(f"--slowdown-clock must be wall or cpu, got {config.slowdown_clock!r}")
    if config.slowdown_clock == "cpu" and (config.device != "cpu" or config.threads != 1):
        raise ValueError(
            "--slowdown-clock cpu needs --device cpu and --threads 1: only then is "
            "the calling thread's CPU time the step's work; use --slowdown-clock wall"
        )
    return config.slowdown_clock == "cpu"


def make_run_policy(config: TrainConfig, world_size: int | None = None) -> Policy:
    """The run's --policy, with dbs's own flags (--warmup-steps, --max-deadband, --plan-for, --spread-steps).

    ``world_size`` is needed for per-rank --max-batch caps (``run_bounds``).
    """
    options: dict[str, object] = {}
    if config.policy == "dbs":
        options["warmup_steps"] = config.warmup_steps
        if config.max_deadband is not None:
            options["max_deadband"] = config.max_deadband
        options["spread_aware"] = config.plan_for == "slowest"
        if config.spread_steps is not None:
            options["spread_steps"] = config.spread_steps
    return make_policy(
        config.policy,
        config.global_batch,
        run_bounds(config, world_size),
        batch_multiple=config.batch_multiple,
        **options,
    )


def _plain_horovod_run(
    config: TrainConfig, model: nn.Module, train_set: TensorDataset, world: int, rank: int
) -> Run:
    """The baseline as users run Horovod today: DistributedSampler, equal batches, Average."""
    import horovod.torch as hvd
    from torch.utils.data import BatchSampler, DistributedSampler

    _check_plain_horovod(config, world)
    local = config.global_batch // world
    sampler: DistributedSampler[int] = DistributedSampler(
        train_set, num_replicas=world, rank=rank, shuffle=True, seed=config.seed, drop_last=True
    )
    batches = BatchSampler(sampler, local, drop_last=True)
    loader = DataLoader(train_set, sampler=batches, batch_size=None, num_workers=config.workers)
    optimizer = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum),
        named_parameters=model.named_parameters(),
        op=hvd.Average,
    )
    return Run(
        loader, optimizer, sampler.set_epoch, len(batches), len(train_set) - len(batches) * local * world
    )


def _check_plain_horovod(config: TrainConfig, world: int) -> None:
    """The baseline splits the global batch equally: it must divide by the world size."""
    if config.global_batch % world:
        raise PlanError(
            f"the plain Horovod baseline needs a global batch divisible by the {world} ranks, "
            f"got {config.global_batch}"
        )


def build_run(
    config: TrainConfig,
    model: nn.Module,
    train_set: TensorDataset,
    exchange,
    device: torch.device,
    world: int,
    rank: int,
) -> Run:
    """The loader, sampler and optimizer of ``config.policy``: plain Horovod for "horovod".

    Collective for the DBS policies (they check their settings on all ranks).
    """
    if config.policy == "horovod":
        return _plain_horovod_run(config, model, train_set, world, rank)
    return _dbs_run(config, model, train_set, exchange, device)


def parse_plan(text: str) -> Plan:
    """``--plan 100,28`` as a Plan; the sampler checks its size, sum and bounds."""
    try:
        return Plan(tuple(int(part) for part in text.split(",")))
    except ValueError:
        raise PlanError(
            f"--plan takes one local batch size per rank, comma-separated (e.g. 100,28), got {text!r}"
        ) from None


def flag_names(message: str) -> str:
    """A library error's argument names (``global_batch=``) as dbs-train's flags."""
    for argument, flag in (
        ("global_batch", "--global-batch"),
        ("min_batch", "--min-batch"),
        ("max_batch", "--max-batch"),
        ("rank_max", "--max-batch"),  # the per-rank caps
        ("plan", "--plan"),
    ):
        message = re.sub(rf"\b{argument}=(?=\d)", f"{flag} ", message)
        message = re.sub(rf"\b{argument}= ?", f"{flag} ", message)
    return message


def _plain_summary(
    epoch: int, world: int, global_batch: int, loss: float, accuracy: float, seconds: float
) -> EpochRecord:
    sizes = [global_batch // world] * world
    return EpochRecord(
        epoch=epoch,
        loss=loss,
        accuracy=accuracy,
        seconds=seconds,
        batch_sizes=sizes,
        next_batch_sizes=sizes,
        compute_seconds=[],
        wait_seconds=[],
        samples=[],
        efficiency=float("nan"),
        policy="horovod",
        plans=[sizes],
    )


def _checkpoint_payload(config: TrainConfig, epoch: int, model: nn.Module, run: Run, plain: bool) -> dict:
    payload = {
        "epoch": epoch,
        "config": asdict(config),
        "model": model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    if not plain:
        payload["sampler"] = run.state.sampler.state_dict()
        payload["policy"] = run.state.rebalancer.policy.state_dict()
    return payload


def _resume(config: TrainConfig, model: nn.Module, run: Run, exchange, plain: bool) -> int:
    """Load the newest checkpoint (read on rank 0, sent to all); return the next epoch."""
    if not config.checkpoint_dir:
        raise ValueError("--resume needs --checkpoint-dir (the folder of the run to continue)")
    directory = config.checkpoint_dir

    def read() -> dict:
        payload = checkpoint.load_latest(directory)
        checkpoint.check_config(payload["config"], asdict(config))
        return payload

    payload = decide_on_root(exchange, read)
    model.load_state_dict(payload["model"])
    run.optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["torch_rng"])
    if not plain:
        run.state.sampler.load_state_dict(payload["sampler"])
        run.state.rebalancer.policy.load_state_dict(payload["policy"])
    return int(payload["epoch"]) + 1


def configure_stall_shutdown(seconds: float) -> None:
    """Make a hung rank end the job instead of hanging it (unless the user set Horovod's own).

    Horovod's stall inspector notices a tensor that some ranks submitted and
    others did not; by default it only warns. With a shutdown time it stops
    Horovod, the waiting ranks fail with an error, and the launcher ends the job.
    """
    if seconds <= 0:
        raise ValueError(f"--stall-timeout must be positive, got {seconds}")
    os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(max(1, int(min(60, seconds / 2)))))
    os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(int(seconds)))


def init_horovod(config: TrainConfig) -> None:
    """Set what Horovod reads at init (stall shutdown, timeline), then ``hvd.init()``.

    Horovod's collectives are made to wait without spinning (dbs_hvd.waiting),
    unless ``DBS_HVD_HOROVOD_WAIT=spin`` asks for Horovod's own wait.
    """
    import horovod.torch as hvd

    install_quiet_wait()
    configure_stall_shutdown(config.stall_timeout)
    if config.timeline:
        # Read by Horovod at init; it records every collective (negotiation,
        # allreduce, fusion) for chrome://tracing or Perfetto.
        os.environ["HOROVOD_TIMELINE"] = str(config.timeline)
    hvd.init()


def load_data(config: TrainConfig) -> tuple[TensorDataset, TensorDataset]:
    """The run's training and test sets (``--dataset`` and the flags that shape it)."""
    return data.load(
        config.dataset,
        flatten=config.model == "mlp",
        seed=config.seed,
        samples=config.samples,
        data_dir=config.data_dir,
        image_size=config.image_size,
    )


def make_run_emulator(config: TrainConfig, rank: int, world: int) -> DeviceEmulator:
    """Rank ``rank``'s emulated device from the emulation flags (a no-op without them)."""
    return make_emulator(
        rank,
        world,
        config.slowdown,
        config.virtual_device,
        config.disturb,
        config.step_change,
        config.seed,
        scales_cpu_time(config),
    )


def build_data_and_model(
    config: TrainConfig, local_rank: int, local_size: int = 1
) -> tuple[TensorDataset, TensorDataset, torch.device, nn.Module]:
    """Threads and seed, the data set, this rank's device and the model on it (no collective)."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    train_set, test_set = load_data(config)
    device = resolve_device(config.device, local_rank, local_size)
    model = models.build(config.model, train_set.tensors[0].shape[1:], hidden=config.hidden)
    model.to(device)
    return train_set, test_set, device, model


def freeze_setup_objects() -> None:
    """Leave the objects built before training out of Python's garbage-collection passes.

    A process with torch and Horovod loaded holds a few hundred thousand
    objects, and a full collection walks all of them, which can take longer
    than a training step. When set-up allocates many objects (loading the
    digits data set does), one comes due early in training, and a pause on
    one rank reads as a slower device, so the plan moves away from the
    balance and back; plain Horovod just waits for it. Set-up's objects
    (modules, data, imported libraries) live as long as training, so they
    are frozen once (``gc.freeze``, after a collection so no garbage is
    frozen) and collections during training walk only what training
    allocates.
    """
    gc.collect()
    gc.freeze()


def train_step(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    emulator: DeviceEmulator,
    device: torch.device,
    x: torch.Tensor,
    y: torch.Tensor,
    epoch: int,
    global_step: int,
    apply: bool = True,
) -> torch.Tensor:
    """One training step (emulated device delays included); returns the local mean loss.

    With ``apply`` False the step stops after the backward pass: a MemoryGuard
    completes it (memory.py). An empty batch (a rank given 0 samples,
    dropping.py) computes nothing and joins the allreduce with zero gradients.
    """
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    emulator.at(epoch, global_step)
    optimizer.zero_grad()
    if len(y) == 0:
        if apply:
            optimizer.step()
        return torch.zeros(())
    clock = emulator.clock  # wall time, or the thread's CPU time (--slowdown-clock, emulate.py)
    forward_start = clock()
    loss = criterion(model(x), y)
    if device.type == "cuda":
        torch.cuda.synchronize()  # the emulator scales real compute time
    forward = clock() - forward_start
    emulator.before_backward(len(y), forward)
    backward_start = clock()
    loss.backward()
    emulator.after_backward(forward, clock() - backward_start)
    if apply:
        optimizer.step()
    return loss


class EpochLoop(NamedTuple):
    """What one pass of ``train_epoch`` trained.

    ``loss_sum`` is float64 ``[sum of loss * samples, samples]`` over this
    rank's batches (``epoch_record`` sums it over the ranks), ``seconds`` the
    loop's wall time and ``steps`` the batches trained.
    """

    loss_sum: torch.Tensor
    seconds: float
    steps: int


def train_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    emulator: DeviceEmulator,
    device: torch.device,
    batches: Iterable[Sequence[torch.Tensor]],
    epoch: int,
    global_step: int,
    on_step: Callable[[Sequence[torch.Tensor], torch.Tensor], None] | None = None,
    guarded: GuardedStep | None = None,
    trained_samples: Callable[[], int] | None = None,
) -> EpochLoop:
    """Train on every batch of ``batches``: the epoch loop of dbs-train, elastic runs and benchmarks.

    Args:
        model, criterion, optimizer, emulator, device: as ``train_step`` takes them.
        batches: the epoch's batches, each ``(x, y, ...)`` (a DataLoader, or
            an iterable that wraps one).
        epoch: the epoch (the emulator's schedule reads it).
        global_step: the run's step number of the first batch.
        on_step: called after each step with the batch and its local mean loss.
        guarded: runs each step through a MemoryGuard (``Run.guarded``);
            the batch trained may then be a retried step's, not the loader's.
        trained_samples: the samples this rank trained in the step just run,
            for the loss sums (default: the batch's length); a probe of a
            rank with 0 samples (dropping.py) trains none.

    Returns:
        The loop's ``EpochLoop``: loss sums, wall time and steps trained.
    """
    loss_sum = torch.zeros(2, dtype=torch.float64)
    started = time.perf_counter()
    steps = 0
    for batch in batches:
        step = global_step + steps
        if guarded is None:
            loss = train_step(model, criterion, optimizer, emulator, device, batch[0], batch[1], epoch, step)
        else:

            def attempt(tried: Batch, at: int = step) -> torch.Tensor:
                x, y = tried[0], tried[1]
                return train_step(model, criterion, optimizer, emulator, device, x, y, epoch, at, apply=False)

            batch, loss = guarded(batch, attempt)
        samples = len(batch[1]) if trained_samples is None else trained_samples()
        steps += 1
        if samples:
            loss_sum += torch.tensor([loss.item() * samples, samples], dtype=torch.float64)
        if on_step is not None:
            on_step(batch, loss)
    return EpochLoop(loss_sum, time.perf_counter() - started, steps)


def lr_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, first_step: int, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The run's learning-rate schedule (``--lr-schedule``), stepped after every optimizer step.

    A function of the global step only, so a resumed run continues the schedule
    where its checkpoint left it: ``cosine`` anneals ``--lr`` to 0 over
    ``total_steps`` (half a cosine wave); ``constant`` returns None.
    """
    if config.lr_schedule == "constant":
        return None
    for group in optimizer.param_groups:
        group["initial_lr"] = config.lr  # the base, whatever lr a resumed state carries

    def factor(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(first_step + step, total_steps) / total_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_record(
    config: TrainConfig,
    epoch: int,
    model: nn.Module,
    run: Run,
    test_set: TensorDataset,
    device: torch.device,
    loss_sum: torch.Tensor,
    seconds: float,
    start_plan: Plan | None,
    world: int,
    plain: bool,
) -> EpochRecord:
    """Close an epoch: the global mean loss and the test accuracy (collectives), the summary."""
    import horovod.torch as hvd

    totals = hvd.allreduce(loss_sum, op=hvd.Sum, name="dbs_hvd.epoch_loss")
    loss = float(totals[0] / totals[1])
    shares = [1] * world if plain or start_plan is None else run.state.sampler.plan.batch_sizes
    accuracy = evaluate(model, test_set, device=device, shares=list(shares))
    if plain or start_plan is None:
        return _plain_summary(epoch, world, config.global_batch, loss, accuracy, seconds)
    return _epoch_summary(epoch, run.state, start_plan, loss, accuracy, seconds, config.policy)


def memory_failure_line(failure: MemoryFailure) -> str:
    """The line rank 0 prints when ranks ran out of memory and the step was trained again."""
    ranks = ", ".join(f"rank {rank} at {size} samples" for rank, size in sorted(failure.failed.items()))
    caps = ", ".join(f"rank {rank} now {failure.caps[rank]}" for rank in sorted(failure.failed))
    return (
        f"dbs-train: out of memory on {ranks} (epoch {failure.epoch}, step {failure.step}); "
        f"caps lowered ({caps}), step trained again with plan {list(failure.plan)}"
    )


def check_flags(config: TrainConfig) -> None:
    """Raise for flags that contradict each other; needs no world, no data, no Horovod.

    Raises:
        ValueError: naming the dbs-train flags, as dbs-train reports it.
    """
    if config.eval_every < 0:
        raise ValueError(f"--eval-every must be 0 (off) or a number of steps, got {config.eval_every}")
    if config.elastic and (config.lr_schedule != "constant" or config.eval_every):
        raise ValueError(
            "--lr-schedule and --eval-every are not available with --elastic: drop them, or "
            "run without --elastic"
        )
    if config.read_log:
        raise ValueError(
            "--read-log records elastic runs: add --elastic (and launch with "
            "horovodrun --host-discovery-script)"
        )
    if config.plan and config.policy == "horovod":
        raise ValueError(
            "--plan needs a DBS policy (plain Horovod splits the batch equally); "
            "use --policy static to keep a plan fixed"
        )
    if config.rebalance_log and config.policy == "horovod":
        raise ValueError(
            "--rebalance-log records DBS rebalances, and plain Horovod has none: "
            "use --policy dbs, paper or static"
        )
    if config.resume and not config.checkpoint_dir:
        raise ValueError("--resume needs --checkpoint-dir (the folder of the run to continue)")
    for flag, value, choices in (
        ("--plan-for", config.plan_for, PLAN_FOR),
        ("--oom-recovery", config.oom_recovery, AUTO_ON_OFF),
        ("--discount-new-sizes", config.discount_new_sizes, AUTO_ON_OFF),
    ):
        if value not in choices:
            named = f"{', '.join(choices[:-1])} or {choices[-1]}"
            raise ValueError(f"{flag} must be {named}, got {value!r}")
    if config.oom_recovery == "on" and (config.policy == "horovod" or config.mode != "gradient"):
        raise ValueError(
            "--oom-recovery on needs a DBS policy and --mode gradient: it lowers a rank's "
            "cap and trains the step again, which plain Horovod and --mode average cannot"
        )
    if config.elastic and (config.oom_recovery == "on" or "," in str(config.max_batch)):
        raise ValueError(
            "--oom-recovery on and per-rank --max-batch caps are not available with --elastic "
            "(the ranks change): give one --max-batch for all ranks, or run without --elastic"
        )
    if config.max_batch is not None:
        parse_max_batch(config.max_batch)
    if config.zero_samples and (config.policy == "horovod" or config.mode != "gradient" or config.elastic):
        raise ValueError(
            "--zero-samples needs a DBS policy and --mode gradient, without --elastic: a rank "
            "given 0 samples joins the weighted gradient allreduce with weight 0"
        )
    ZeroSampleOptions(probe_every=config.probe_every)


def validate(config: TrainConfig, world_size: int, dataset_size: int | None = None) -> None:
    """Raise the error a run of ``world_size`` ranks meets with these settings, in one process.

    Runs, in ``train``'s order, every check of the settings that needs no
    Horovod and no MPI: the flags against each other, the emulation, the data
    set and device (only where ``dataset_size`` is None), the policy, the
    first plan and the rebalance schedule. Each rank of a run meets the same
    error, so ``train`` calls this on every rank before the collectives that
    use the settings. Not covered: ranks started with different settings and
    checkpoints (both need the run), and ``--stall-timeout`` (checked as
    Horovod starts).

    Args:
        config: the run's settings (``cli.train_config`` parses dbs-train's).
        world_size: the number of ranks.
        dataset_size: the training set's size; None loads the data set to
            find it and checks that ``--device`` is available, as a run does.

    Raises:
        ValueError: for settings that contradict each other or a malformed
            emulation flag; the message is the one dbs-train prints.
        PlanError: for a global batch, bounds or first plan that no plan of
            ``world_size`` ranks can meet.
        FileNotFoundError: for a CIFAR-10 folder without its batch files.
    """
    check_flags(config)
    make_run_emulator(config, 0, world_size)
    if dataset_size is None:
        train_set, _ = load_data(config)
        dataset_size = len(train_set)
        if config.device == "cuda":  # as resolve_device, without selecting the GPU
            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            gpu_for_local_rank(0, 1, gpus, may_share=True)
    if config.policy == "horovod":
        _check_plain_horovod(config, world_size)
    else:
        _dbs_policy_and_sampler(config, dataset_size, rank=0, world_size=world_size)
        RebalanceOptions.from_config(asdict(config))


def train(config: TrainConfig) -> list[EpochRecord]:
    """Run DBS (or the plain-Horovod baseline) on all ranks; returns the epoch records.

    Elastic runs (``config.elastic``) go to ``dbs_hvd.train.elastic.train_elastic``
    instead (``cli.run_training`` chooses); given one, this raises ValueError.
    """
    import horovod.torch as hvd
    from tqdm import tqdm

    if config.elastic:  # dbs-train runs elastic mode from cli.py: elastic.py imports this module
        raise ValueError("--elastic runs in dbs_hvd.train.elastic.train_elastic, not trainer.train")
    check_flags(config)

    init_horovod(config)
    rank, world = hvd.rank(), hvd.size()
    exchange = default_exchange()
    # First collective of the run: ranks launched with different settings fail
    # here, together, before any of them could diverge into other collectives.
    check_same_on_all_ranks(exchange, asdict(config))
    emulator = make_run_emulator(config, rank, world)
    train_set, test_set, device, model = build_data_and_model(config, hvd.local_rank(), hvd.local_size())
    # Every check of the settings for this world and data set, before any collective they feed.
    validate(config, world, len(train_set))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    plain = config.policy == "horovod"
    run = build_run(config, model, train_set, exchange, device, world, rank)
    hvd.broadcast_optimizer_state(run.optimizer, root_rank=0)
    first_epoch = _resume(config, model, run, exchange, plain) if config.resume else 0
    criterion = nn.CrossEntropyLoss()
    log = JsonLinesLog(config.log) if (config.log and rank == 0) else None
    rebalance_log = None
    if config.rebalance_log and rank == 0:
        rebalance_log = JsonLinesLog(config.rebalance_log)
        run.state.rebalancer.record_policy = True
    if rank == 0:
        emulation = ", ".join(
            filter(
                None,
                [
                    config.slowdown,
                    config.virtual_device,
                    config.disturb and f"disturb {config.disturb}",
                    config.step_change and f"step change {config.step_change}",
                ],
            )
        )
        print(
            f"dbs-train: {world} ranks, {config.model} on {config.dataset} "
            f"({len(train_set)} train / {len(test_set)} test), global batch "
            f"{config.global_batch}, policy {config.policy}, "
            f"{run.steps_per_epoch} steps/epoch, {run.dropped_per_epoch} samples "
            f"dropped/epoch, emulation: {emulation or 'none'}",
            flush=True,
        )

    records: list[EpochRecord] = []
    global_step = first_epoch * run.steps_per_epoch
    schedule = lr_scheduler(run.optimizer, config, global_step, config.epochs * run.steps_per_epoch)
    evaluations: list[list[float]] = []  # [global step, accuracy] of --eval-every, this epoch
    done = [global_step]  # steps trained so far in the run
    failures_told = [0]  # --oom-recovery: the guard's failures printed so far
    freeze_setup_objects()
    try:
        if rank == 0 and first_epoch:
            print(f"dbs-train: resumed from {config.checkpoint_dir} at epoch {first_epoch}", flush=True)
        for epoch in range(first_epoch, config.epochs):
            run.set_epoch(epoch)
            start_plan = None if plain else run.state.sampler.plan
            batches = tqdm(
                run.loader, disable=not (config.progress and rank == 0), desc=f"epoch {epoch}", leave=False
            )

            def after_step(batch: Sequence[torch.Tensor], loss: torch.Tensor, bar: tqdm = batches) -> None:
                done[0] += 1
                if run.guard is not None and len(run.guard.failures) > failures_told[0]:
                    for failure in run.guard.failures[failures_told[0] :]:
                        if rank == 0:
                            print(memory_failure_line(failure), flush=True)
                    failures_told[0] = len(run.guard.failures)
                if not (plain or bar.disable):  # the plan on the progress bar, when it is shown
                    bar.set_postfix(batch=list(run.state.sampler.plan.batch_sizes), refresh=False)
                if schedule is not None:
                    schedule.step()
                if config.eval_every and rank == 0 and done[0] % config.eval_every == 0:
                    # Between steps, so not in rank 0's measured compute; the other
                    # ranks wait for it in the next step's allreduce.
                    evaluations.append([done[0], evaluate(model, test_set, device=device)])

            loss_sum, seconds, steps = train_epoch(
                model,
                criterion,
                run.optimizer,
                emulator,
                device,
                batches,
                epoch,
                global_step,
                after_step,
                run.guarded,
                None if plain else lambda: sum(b.batch_size for b in run.state.last_step),
            )
            global_step += steps
            record = epoch_record(
                config, epoch, model, run, test_set, device, loss_sum, seconds, start_plan, world, plain
            )
            record.evaluations = list(evaluations)
            evaluations.clear()
            records.append(record)
            if rank == 0:
                print(record.line(), flush=True)
                if log:
                    log.write(record)
                if rebalance_log:
                    for rebalance in run.state.rebalancer.records_of_epoch(epoch):
                        rebalance_log.write(rebalance)
                if config.checkpoint_dir:
                    checkpoint.save(
                        config.checkpoint_dir,
                        epoch,
                        _checkpoint_payload(config, epoch, model, run, plain),
                        keep=config.keep_checkpoints,
                    )
    finally:
        for opened in (log, rebalance_log):
            if opened:
                opened.close()
    return records


__all__ = ["TrainConfig", "train", "validate", "check_flags", "evaluate", "evaluation_parts", "PlanError"]
