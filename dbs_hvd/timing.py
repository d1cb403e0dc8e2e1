"""Per-rank compute time, kept apart from time blocked in the gradient allreduce.

The plan must be driven by how fast a rank computes, not by how long it waited
for slower ranks: a fast rank spends its spare time blocked in the allreduce,
and counting that time would make it look slow (invariant 5 of DESIGN.md).
A step's compute time is its wall time minus the time spent inside
``optimizer.synchronize()``, the call that waits on Horovod's allreduce handles.
Data loading, forward, backward and the optimizer update all count as compute:
each of them is work the rank itself must do per sample.

On CUDA, kernels run asynchronously, so the host would see the backward's tail
as "waiting"; pass ``device_sync=torch.cuda.synchronize`` so the wait clock
only starts once the rank's own kernels are done.

A step at a batch size the rank has not run before is also counted apart
(``new_size_*``) when the caller says so: on a GPU that step builds and caches
kernel plans for the new shapes (on an H200, 13-35 ms more than the same step
once the size was seen, where such steps take 2-4 ms; docs/gpu_check.md),
which says nothing about the rank's speed. WindowStats leaves such steps out
(plan.py).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional


@dataclass
class WindowTotals:
    """Sums over a window of steps on one rank; the ``new_size_*`` part of them was
    run at batch sizes new to the rank (a subset: the totals include it)."""

    steps: int = 0
    samples: int = 0
    compute_seconds: float = 0.0
    wait_seconds: float = 0.0
    new_size_steps: int = 0
    new_size_samples: int = 0
    new_size_compute_seconds: float = 0.0
    new_size_wait_seconds: float = 0.0

    def add(self, batch_size: int, compute: float, wait: float, new_size: bool = False) -> None:
        self.steps += 1
        self.samples += batch_size
        self.compute_seconds += compute
        self.wait_seconds += wait
        if new_size:
            self.new_size_steps += 1
            self.new_size_samples += batch_size
            self.new_size_compute_seconds += compute
            self.new_size_wait_seconds += wait

    def as_record(self) -> dict:
        return asdict(self)


class StepTimer:
    """Splits each step's wall time into compute and allreduce wait.

    ``end_step`` closes a step: its wall time runs from the end of the previous
    step (or from ``mark_start``, or from a later ``start_hint`` such as the
    moment the data loader's iterator was created, so that evaluation between
    epochs is not charged to the first step).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 device_sync: Optional[Callable[[], None]] = None) -> None:
        self._clock = clock
        self._device_sync = device_sync
        self._step_start: float | None = None
        self._wait_in_step = 0.0
        self.window = WindowTotals()

    def mark_start(self) -> None:
        """The next step's wall time starts now."""
        self._step_start = self._clock()
        self._wait_in_step = 0.0

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Count the time inside the block as allreduce wait, not compute.

        The device is synchronised first, so this rank's own queued kernels
        finish before the wait clock starts.
        """
        if self._device_sync is not None:
            self._device_sync()
        started = self._clock()
        try:
            yield
        finally:
            self._wait_in_step += self._clock() - started

    def end_step(self, batch_size: int, start_hint: float | None = None,
                 new_size: bool = False) -> None:
        """Close a step of ``batch_size`` samples (``new_size``: the rank's first at that size)."""
        now = self._clock()
        start = self._step_start
        if start_hint is not None and (start is None or start_hint > start):
            start = start_hint
        if start is None:
            start = now
        wall = max(now - start, 0.0)
        wait = min(self._wait_in_step, wall)
        compute = wall - wait
        self.window.add(batch_size, compute, wait, new_size)
        self._step_start = now
        self._wait_in_step = 0.0

    def take_window(self) -> WindowTotals:
        """Return the totals since the last call and start a new window."""
        window, self.window = self.window, WindowTotals()
        return window
