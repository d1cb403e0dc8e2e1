"""Heterogeneity emulation: make a rank behave like a slower device.

A slow device takes longer for the *same* work, so the emulated delay has to
grow with the batch, as real compute does. ``Slowdown(f)`` sleeps ``(f - 1)``
times the step's real compute; ``VirtualDevice(a, c)`` replaces the step's cost
by a known ``a + c * b`` seconds, steady enough that CPU noise cannot decide a
test of policy logic.

Which clock measures the step's real compute matters where ranks share
cores. Wall time (the default) also holds the time a rank waited for a core
while other ranks computed, and scaling that by ``f - 1`` multiplies
contention by the slowdown factor, which no slower device does, so the
emulated speeds depend on the plan, and runs of the same code can settle on
different plans. With ``cpu_time`` (``--slowdown-clock cpu``) the thread's
CPU time is scaled (``time.thread_time``: torch on one CPU thread runs
forward and backward on the calling thread), so waiting is not multiplied
and the plans settle alike from run to run. Wall time stays the default
until a benchmark separates the effect from the noise (docs/design.md,
"Measurements behind the defaults"). On CUDA, or with several torch
threads, the calling thread's CPU time is not the work, so it is refused
there.

The delay must happen *before* the backward pass: Horovod submits each
gradient to the allreduce from a hook during backward, so a rank that slept
after backward would already have joined the allreduce and would not slow
anybody down. The trainer therefore calls ``before_backward`` with the forward
time; the backward time is predicted from the measured backward/forward ratio.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from typing import Callable

import numpy as np


class SpeedChanges(ABC):
    """Extra slowdown over time, on top of a rank's base factor (1.0 = no change)."""

    @abstractmethod
    def factor(self, rank: int, epoch: int, global_step: int) -> float:
        """Multiplier of ``rank``'s step cost at this point of training."""


class NoChanges(SpeedChanges):
    """Steady devices: the factor is always 1."""

    def factor(self, rank: int, epoch: int, global_step: int) -> float:
        return 1.0


class Disturbances(SpeedChanges):
    """The DBS paper's protocol: each epoch, each undisturbed rank is slowed with
    probability ``probability`` by ``factor`` for 1..``max_epochs`` epochs.

    The schedule depends only on the seed, so every rank (and every policy in a
    benchmark) sees the same disturbances.
    """

    def __init__(
        self, world_size: int, probability: float, factor: float = 3.0, max_epochs: int = 3, seed: int = 0
    ) -> None:
        if not 0 <= probability <= 1 or factor < 1 or max_epochs < 1:
            raise ValueError("disturbances need 0 <= p <= 1, factor >= 1 and max_epochs >= 1")
        self.world_size, self.probability = world_size, probability
        self.slow_factor, self.max_epochs = factor, max_epochs
        self._rng = np.random.default_rng(seed)
        self._remaining = np.zeros(world_size, dtype=int)
        self._table: list[np.ndarray] = []  # per epoch: factor per rank

    def _extend_to(self, epoch: int) -> None:
        while len(self._table) <= epoch:
            draws = self._rng.random(self.world_size)
            lengths = self._rng.integers(1, self.max_epochs + 1, self.world_size)
            start = (self._remaining == 0) & (draws < self.probability)
            self._remaining = np.where(start, lengths, self._remaining)
            self._table.append(np.where(self._remaining > 0, self.slow_factor, 1.0))
            self._remaining = np.maximum(self._remaining - 1, 0)

    def factor(self, rank: int, epoch: int, global_step: int) -> float:
        self._extend_to(epoch)
        return float(self._table[epoch][rank])


class StepChange(SpeedChanges):
    """Rank ``rank`` becomes ``factor`` times slower from global step ``at_step`` on."""

    def __init__(self, rank: int, at_step: int, factor: float) -> None:
        if factor <= 0 or at_step < 0:
            raise ValueError("a step change needs factor > 0 and at_step >= 0")
        self.rank, self.at_step, self.slow_factor = rank, at_step, factor

    def factor(self, rank: int, epoch: int, global_step: int) -> float:
        return self.slow_factor if rank == self.rank and global_step >= self.at_step else 1.0


class DeviceEmulator(ABC):
    """Decides how long this rank sleeps before each backward pass.

    ``clock`` is what the trainer times forward and backward with, for
    emulators that scale real compute (see the module notes).
    """

    def __init__(
        self,
        rank: int = 0,
        changes: SpeedChanges | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.rank = rank
        self.clock = clock
        self.changes = changes or NoChanges()
        self._sleep = sleep
        self.epoch = 0
        self.global_step = 0

    def at(self, epoch: int, global_step: int) -> None:
        """Tell the emulator where training is (for speed changes over time)."""
        self.epoch, self.global_step = epoch, global_step

    @property
    def change_factor(self) -> float:
        """The current speed change of this rank (1.0: none)."""
        return self.changes.factor(self.rank, self.epoch, self.global_step)

    @abstractmethod
    def delay(self, batch_size: int, forward_seconds: float) -> float:
        """Seconds to sleep for a step of ``batch_size`` samples."""

    def before_backward(self, batch_size: int, forward_seconds: float) -> None:
        """Sleep for this step's emulated extra cost; called between forward and backward."""
        seconds = self.delay(batch_size, forward_seconds)
        if seconds > 0:
            self._sleep(seconds)

    def after_backward(  # noqa: B027 (an optional hook: doing nothing is the default)
        self, forward_seconds: float, backward_seconds: float
    ) -> None:
        """Learn from the real backward time (used by emulators that scale real compute)."""


class Slowdown(DeviceEmulator):
    """A device ``factor`` times slower than this one: sleep (factor - 1) x real compute.

    Real compute of a step is forward + backward; backward is predicted as the
    running backward/forward ratio times this step's forward time. Speed
    changes multiply the factor.

    Args:
        factor: the slowdown, a finite number >= 1 (1: this device).
        rank: this rank, for the speed changes.
        changes: speed changes over time (default: none).
        sleep: how to wait (tests pass a recorder).
        clock: what the trainer times forward and backward with
            (``time.thread_time`` for ``--slowdown-clock cpu``).

    Raises:
        ValueError: for a factor below 1 or not finite.

    Examples:
        >>> slow = Slowdown(3.0)
        >>> slow.delay(batch_size=32, forward_seconds=0.01)  # 2 x (0.01 + 2 x 0.01)
        0.06
    """

    def __init__(
        self,
        factor: float = 1.0,
        rank: int = 0,
        changes: SpeedChanges | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        super().__init__(rank, changes, sleep, clock)
        if not math.isfinite(factor) or factor < 1:
            raise ValueError(f"a slowdown factor must be a finite number >= 1, got {factor}")
        self.factor = factor
        self.backward_ratio = 2.0  # typical until measured
        self._smoothing = 0.2

    def delay(self, batch_size: int, forward_seconds: float) -> float:
        real = forward_seconds * (1.0 + self.backward_ratio)
        return max(self.factor * self.change_factor - 1.0, 0.0) * real

    def after_backward(self, forward_seconds: float, backward_seconds: float) -> None:
        if forward_seconds > 0:
            ratio = backward_seconds / forward_seconds
            self.backward_ratio += self._smoothing * (ratio - self.backward_ratio)


class VirtualDevice(DeviceEmulator):
    """A device whose step costs exactly ``overhead + per_sample * batch_size`` seconds
    (times any speed change), plus ``new_size`` seconds at the first step of each
    batch size: a GPU's first step at a new size builds kernel plans for its
    shapes (docs/deployment/gpu.md).

    Args:
        overhead: seconds per step, whatever the batch.
        per_sample: seconds per sample.
        rank: this rank, for the speed changes.
        changes: speed changes over time (default: none).
        sleep: how to wait (tests pass a recorder).
        new_size: extra seconds at the first step of each batch size.

    Raises:
        ValueError: for a negative cost.

    Examples:
        >>> device = VirtualDevice(overhead=0.001, per_sample=0.0005, new_size=0.02)
        >>> round(device.delay(32, forward_seconds=0.0), 6)
        0.037
        >>> round(device.delay(32, forward_seconds=0.0), 6)
        0.017
    """

    def __init__(
        self,
        overhead: float,
        per_sample: float,
        rank: int = 0,
        changes: SpeedChanges | None = None,
        sleep: Callable[[float], None] = time.sleep,
        new_size: float = 0.0,
    ) -> None:
        super().__init__(rank, changes, sleep)
        if overhead < 0 or per_sample < 0 or new_size < 0:
            raise ValueError("virtual device costs must be non-negative")
        self.overhead = overhead
        self.per_sample = per_sample
        self.new_size = new_size
        self._sizes_seen: set[int] = set()

    def delay(self, batch_size: int, forward_seconds: float) -> float:
        """The step's cost; called once per step (the first at a size pays ``new_size``)."""
        first = batch_size not in self._sizes_seen
        self._sizes_seen.add(batch_size)
        cost = (self.overhead + self.per_sample * batch_size) * self.change_factor
        return cost + (self.new_size if first else 0.0)


def parse_factors(text: str, world_size: int) -> list[float]:
    """``"1,1,1,4"`` -> one factor per rank; a single value applies to every rank."""
    try:
        factors = [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--slowdown takes comma-separated numbers, got {text!r}") from None
    if len(factors) == 1:
        factors *= world_size
    if len(factors) != world_size:
        raise ValueError(
            f"--slowdown gives {len(factors)} factors for {world_size} ranks: give one per rank "
            "(or a single value for all)"
        )
    for rank, factor in enumerate(factors):
        if not math.isfinite(factor) or factor < 1:
            raise ValueError(f"--slowdown factor for rank {rank} is {factor}: factors must be >= 1")
    return factors


def parse_virtual_devices(text: str, world_size: int) -> list[tuple[float, float, float]]:
    """``"0:1,0:3"`` -> per rank (overhead, per-sample, new-size) costs, given in
    milliseconds; the third, optional (``"0:1:20"``), is paid once per new batch size."""
    devices = []
    for part in text.split(","):
        try:
            costs = [float(x) / 1000.0 for x in part.split(":")]
            if len(costs) not in (2, 3) or min(costs) < 0:
                raise ValueError
        except ValueError:
            raise ValueError(
                "--virtual-device takes OVERHEAD_MS:PER_SAMPLE_MS[:NEW_SIZE_MS] per rank, "
                f"each a number >= 0, got {part!r}"
            ) from None
        devices.append((costs[0], costs[1], costs[2] if len(costs) == 3 else 0.0))
    if len(devices) == 1:
        devices *= world_size
    if len(devices) != world_size:
        raise ValueError(f"--virtual-device gives {len(devices)} devices for {world_size} ranks")
    return devices


def parse_disturbances(text: str, world_size: int, seed: int) -> Disturbances:
    """``"p=0.2,factor=3,epochs=3"`` -> the paper's disturbance protocol, seeded by --seed."""
    options = {"p": 0.2, "factor": 3.0, "epochs": 3}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in options or not value:
            raise ValueError(f"--disturb takes p=P,factor=F,epochs=E; got {part!r}")
        options[key] = float(value)
    return Disturbances(world_size, options["p"], options["factor"], int(options["epochs"]), seed)


def parse_step_change(text: str, world_size: int) -> StepChange:
    """``"RANK:STEP:FACTOR"`` -> rank RANK becomes FACTOR times slower at global step STEP."""
    try:
        rank, step, factor = text.split(":")
        change = StepChange(int(rank), int(step), float(factor))
    except ValueError:
        raise ValueError(f"--step-change takes RANK:STEP:FACTOR, got {text!r}") from None
    if not 0 <= change.rank < world_size:
        raise ValueError(f"--step-change rank {change.rank} is outside a world of {world_size}")
    return change


def make_emulator(
    rank: int,
    world_size: int,
    slowdown: str | None = None,
    virtual_device: str | None = None,
    disturb: str | None = None,
    step_change: str | None = None,
    seed: int = 0,
    cpu_time: bool = False,
) -> DeviceEmulator:
    """The emulator for ``rank`` from the dbs-train flags.

    Args:
        rank: this rank.
        world_size: the number of ranks, which the per-rank lists must match.
        slowdown: ``--slowdown``, e.g. ``"1,1,1,4"``.
        virtual_device: ``--virtual-device``, e.g. ``"0:1,0:3"`` (milliseconds).
        disturb: ``--disturb``, e.g. ``"p=0.2,factor=3,epochs=3"``.
        step_change: ``--step-change``, e.g. ``"1:100:4"``.
        seed: seeds the disturbances, so every rank draws the same ones.
        cpu_time: scale the calling thread's CPU time instead of wall time
            (torch on one CPU thread only; see the module notes).

    Returns:
        A ``VirtualDevice`` or a ``Slowdown`` (factor 1 when neither flag is given).

    Raises:
        ValueError: for conflicting or malformed flags (the message names the flag).

    Examples:
        >>> make_emulator(rank=3, world_size=4, slowdown="1,1,1,4").factor
        4.0
    """
    if slowdown and virtual_device:
        raise ValueError("use either --slowdown or --virtual-device, not both")
    if disturb and step_change:
        raise ValueError("use either --disturb or --step-change, not both")
    changes: SpeedChanges | None = None
    if disturb:
        changes = parse_disturbances(disturb, world_size, seed)
    elif step_change:
        changes = parse_step_change(step_change, world_size)
    if virtual_device:
        overhead, per_sample, new_size = parse_virtual_devices(virtual_device, world_size)[rank]
        return VirtualDevice(overhead, per_sample, rank, changes, new_size=new_size)
    factor = parse_factors(slowdown, world_size)[rank] if slowdown else 1.0
    clock = time.thread_time if cpu_time else time.perf_counter
    return Slowdown(factor, rank, changes, clock=clock)
