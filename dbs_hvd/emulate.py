"""Heterogeneity emulation: make a rank behave like a slower device.

A slow device takes longer for the *same* work, so the emulated delay has to
grow with the batch, as real compute does. ``Slowdown(f)`` sleeps ``(f - 1)``
times the step's real compute; ``VirtualDevice(a, c)`` replaces the step's cost
by a known ``a + c * b`` seconds, steady enough that CPU noise cannot decide a
test of policy logic.

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


class DeviceEmulator(ABC):
    """Decides how long this rank sleeps before each backward pass."""

    def __init__(self, sleep: Callable[[float], None] = time.sleep) -> None:
        self._sleep = sleep
        self.total_delay = 0.0

    @abstractmethod
    def delay(self, batch_size: int, forward_seconds: float) -> float:
        """Seconds to sleep for a step of ``batch_size`` samples."""

    def before_backward(self, batch_size: int, forward_seconds: float) -> None:
        seconds = self.delay(batch_size, forward_seconds)
        if seconds > 0:
            self.total_delay += seconds
            self._sleep(seconds)

    def after_backward(self, forward_seconds: float, backward_seconds: float) -> None:
        """Learn from the real backward time (used by emulators that scale real compute)."""


class NoEmulation(DeviceEmulator):
    def delay(self, batch_size: int, forward_seconds: float) -> float:
        return 0.0


class Slowdown(DeviceEmulator):
    """A device ``factor`` times slower than this one: sleep (factor - 1) x real compute.

    Real compute of a step is forward + backward; backward is predicted as the
    running backward/forward ratio times this step's forward time.
    """

    def __init__(self, factor: float, sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__(sleep)
        if not math.isfinite(factor) or factor < 1:
            raise ValueError(f"a slowdown factor must be a finite number >= 1, got {factor}")
        self.factor = factor
        self.backward_ratio = 2.0  # typical until measured
        self._smoothing = 0.2

    def delay(self, batch_size: int, forward_seconds: float) -> float:
        real = forward_seconds * (1.0 + self.backward_ratio)
        return (self.factor - 1.0) * real

    def after_backward(self, forward_seconds: float, backward_seconds: float) -> None:
        if forward_seconds > 0:
            ratio = backward_seconds / forward_seconds
            self.backward_ratio += self._smoothing * (ratio - self.backward_ratio)


class VirtualDevice(DeviceEmulator):
    """A device whose step costs exactly ``overhead + per_sample * batch_size`` seconds."""

    def __init__(self, overhead: float, per_sample: float,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__(sleep)
        if overhead < 0 or per_sample < 0:
            raise ValueError("virtual device costs must be non-negative")
        self.overhead = overhead
        self.per_sample = per_sample

    def delay(self, batch_size: int, forward_seconds: float) -> float:
        return self.overhead + self.per_sample * batch_size


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


def parse_virtual_devices(text: str, world_size: int) -> list[tuple[float, float]]:
    """``"0:1,0:3"`` -> per rank (overhead, per-sample) costs, given in milliseconds."""
    pairs = []
    for part in text.split(","):
        try:
            overhead, per_sample = (float(x) / 1000.0 for x in part.split(":"))
        except ValueError:
            raise ValueError(
                f"--virtual-device takes OVERHEAD_MS:PER_SAMPLE_MS per rank, got {part!r}"
            ) from None
        pairs.append((overhead, per_sample))
    if len(pairs) == 1:
        pairs *= world_size
    if len(pairs) != world_size:
        raise ValueError(f"--virtual-device gives {len(pairs)} devices for {world_size} ranks")
    return pairs


def make_emulator(rank: int, world_size: int, slowdown: str | None = None,
                  virtual_device: str | None = None) -> DeviceEmulator:
    if slowdown and virtual_device:
        raise ValueError("use either --slowdown or --virtual-device, not both")
    if virtual_device:
        overhead, per_sample = parse_virtual_devices(virtual_device, world_size)[rank]
        return VirtualDevice(overhead, per_sample)
    if slowdown:
        factor = parse_factors(slowdown, world_size)[rank]
        return Slowdown(factor) if factor > 1 else NoEmulation()
    return NoEmulation()


