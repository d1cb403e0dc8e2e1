"""Per-rank compute time, kept apart from time blocked in the gradient allreduce.

The plan must be driven by how fast a rank computes, not by how long it waited
for slower ranks: a fast rank spends its spare time blocked in the allreduce,
and counting that time would make it look slow (invariant 5 of docs/design.md).
A step's compute time is its wall time minus the time spent inside
``optimizer.synchronize()``, the call that waits on Horovod's allreduce handles.
Data loading, forward, backward and the optimizer update all count as compute:
each of them is work the rank itself must do per sample.

On CUDA, kernels run asynchronously, so the host would see the backward's tail
as "waiting"; pass ``device_sync=torch.cuda.synchronize`` so the wait clock
only starts once the rank's own kernels are done.

Only the training step itself counts. A step starts at the first sign of
training after the previous step ended: the sampler handing out a batch (the
DataLoader asking for the next one, ``taken``), else the first other
activity (``zero_grad``, a forward pass that records gradients, the first
gradient weighting), else the previous step's end. It ends when
``optimizer.step()`` returns. Evaluation, checkpoint writing or logging
between ``step()`` and the next batch therefore do not count, so a rank that
evaluates alone does not look like a slow device. The earliest batch taken
is used (a step with several micro-batches starts at its first), and
taking a batch outranks ``zero_grad`` because scripts that call
``zero_grad()`` right after ``step()`` would otherwise start the next step
before their evaluation. Where DataLoader workers prefetch, the sampler is
asked for a batch when the loop takes an earlier one, which is still a sign
that the loop moved on; in an epoch's last few steps nothing more is asked
for and the other signs decide.

A step at a batch size the rank has not run before is also counted apart
(``new_size_*``) when the caller says so: on a GPU that step builds and caches
kernel plans for the new shapes (several times a settled step's time; see
docs/deployment/gpu.md), which says nothing about the rank's speed. WindowStats leaves such steps out
(plan.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Callable


@dataclass
class WindowTotals:
    """Sums over a window of steps on one rank; the ``new_size_*`` part of them was
    run at batch sizes new to the rank (a subset: the totals include it)."""

    steps: int = 0
    samples: float = 0  # in cost mode, cost in the plan's units (sampler.StepBatch.units)
    compute_seconds: float = 0.0
    wait_seconds: float = 0.0
    new_size_steps: int = 0
    new_size_samples: float = 0
    new_size_compute_seconds: float = 0.0
    new_size_wait_seconds: float = 0.0
    # The sum of each step's compute seconds squared: how much the steps vary
    # (plan.WindowStats.compute_spread), not only their mean.
    compute_squares: float = 0.0
    new_size_compute_squares: float = 0.0

    def add(self, batch_size: float, compute: float, wait: float, new_size: bool = False) -> None:
        self.steps += 1
        self.samples += batch_size
        self.compute_seconds += compute
        self.wait_seconds += wait
        self.compute_squares += compute * compute
        if new_size:
            self.new_size_steps += 1
            self.new_size_samples += batch_size
            self.new_size_compute_seconds += compute
            self.new_size_wait_seconds += wait
            self.new_size_compute_squares += compute * compute

    def since(self, earlier: WindowTotals) -> WindowTotals:
        """The totals added after ``earlier``, a copy of these totals taken before."""
        return WindowTotals(
            **{field.name: getattr(self, field.name) - getattr(earlier, field.name) for field in fields(self)}
        )


@dataclass(frozen=True)
class _Clocks:
    """Readings, or spans, of the wall clock and the process and work CPU clocks."""

    wall: float
    cpu: float  # the process's CPU time (all threads)
    work: float  # the training thread's CPU time (0 without a work clock)

    def until(self, end: _Clocks) -> _Clocks:
        """The span from these readings to ``end`` (CPU spans no less than 0)."""
        return _Clocks(end.wall - self.wall, max(end.cpu - self.cpu, 0.0), max(end.work - self.work, 0.0))

    def plus(self, other: _Clocks) -> _Clocks:
        return _Clocks(self.wall + other.wall, self.cpu + other.cpu, self.work + other.work)


_NO_TIME = _Clocks(0.0, 0.0, 0.0)


class StepTimer:
    """Splits each step's wall time into compute and allreduce wait.

    ``end_step`` closes a step. Its wall time starts at the earliest batch
    ``taken`` since the previous step ended, else at the first other
    ``activity``, else where the previous step (or ``mark_start``) ended;
    ``start_hint``, a moment before which the step cannot have started (such
    as the creation of the data loader's iterator), moves a fallback start
    later. See the module docstring for why.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.perf_counter,
        device_sync: Callable[[], None] | None = None,
        frozen_clock: Callable[[], float] | None = None,
        cpu_share: float | None = None,
        cpu_clock: Callable[[], float] = time.process_time,
        work_clock: Callable[[], float] | None = None,
    ) -> None:
        self._clock = clock
        self._device_sync = device_sync
        # Seconds this rank has been frozen by its own CPU quota (quota.py);
        # frozen time inside a wait is the rank's slowness, so it counts as compute.
        self._frozen_clock = frozen_clock
        # The cores of CPU quota this rank may use (None: no quota). A rank with
        # slack in its quota runs at full speed and looks fast; over a window it
        # can never use more than cpu_share CPU-seconds per second, so the CPU it
        # used over the share is a floor on the wall time its work needs.
        # With a work_clock (the training thread's own CPU time), the CPU the
        # process's other threads used is overhead taken from the share first,
        # and the work's floor is its CPU over what remains. CPU used while the
        # training thread waits (polling, the background thread waiting in its
        # negotiation) is the price of waiting, gone once the rank is the one
        # the others wait for, so it counts in neither.
        self._cpu_share = cpu_share
        self._cpu_clock = cpu_clock
        self._work_clock = work_clock
        self._cpu_mark = cpu_clock() if cpu_share else 0.0
        self._work_mark = work_clock() if cpu_share and work_clock else 0.0
        self._wall_mark = clock() if cpu_share else 0.0
        self._cpu_in_waits = 0.0
        self._work_in_waits = 0.0
        # The time between steps (evaluation, checkpoints, logging): not the
        # training's, so left out of the floor like the waits.
        self._between = _NO_TIME
        # The clocks where the last step ended, while no step has started since.
        self._gap_from: _Clocks | None = None
        self._step_start: float | None = None
        # Times of the signals since the last step ended, oldest first, with the
        # clocks read at each under a quota.
        self._taken: list[float] = []
        self._active: list[float] = []
        self._marks: dict[float, _Clocks] = {}
        self._wait_in_step = 0.0
        self.window = WindowTotals()
        self.totals = WindowTotals()  # every step closed, never reset

    def _clocks_at(self, wall: float) -> _Clocks:
        """The CPU clocks now, read under a quota (zeros without one), with ``wall``."""
        if not self._cpu_share:
            return _Clocks(wall, 0.0, 0.0)
        return _Clocks(wall, self._cpu_clock(), self._work_clock() if self._work_clock else 0.0)

    def _signal(self, times: list[float]) -> None:
        if len(times) < 2:  # a late-closed step's first and the next step's first
            now = self._clock()
            times.append(now)
            if self._cpu_share:
                self._marks[now] = self._clocks_at(now)

    def mark_start(self) -> None:
        """The next step's wall time starts no earlier than now.

        Under a quota the time since the last step ended (a rebalance, work
        between epochs) is left out of the floor, and so is the time from now
        to the next step's first signal.
        """
        now = self._clock()
        self._step_start = now
        self._taken, self._active, self._marks = [], [], {}
        self._wait_in_step = 0.0
        if not self._cpu_share:
            return
        clocks = self._clocks_at(now)
        if self._gap_from is not None:
            self._add_between(self._gap_from, clocks)
        self._gap_from = clocks

    def _add_between(self, begin: _Clocks, end: _Clocks) -> None:
        """Count the span from ``begin`` to ``end`` as time between steps."""
        if end.wall > begin.wall:
            self._between = self._between.plus(begin.until(end))

    def taken(self) -> None:
        """A batch was taken for training now (the first since the last step counts)."""
        self._signal(self._taken)

    def activity(self) -> None:
        """Training work began now (the first since the last step counts)."""
        self._signal(self._active)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Count the time inside the block as allreduce wait, not compute.

        The device is synchronised first, so this rank's own queued kernels
        finish before the wait clock starts. Time the rank spent frozen by its
        own CPU quota inside the block (``frozen_clock``) stays compute.
        """
        if self._device_sync is not None:
            self._device_sync()
        frozen = self._frozen_clock() if self._frozen_clock is not None else 0.0
        cpu = self._cpu_clock() if self._cpu_share else 0.0
        work = self._work_clock() if self._cpu_share and self._work_clock else 0.0
        started = self._clock()
        try:
            yield
        finally:
            waited = self._clock() - started
            if self._cpu_share:
                self._cpu_in_waits += self._cpu_clock() - cpu
                if self._work_clock is not None:
                    self._work_in_waits += self._work_clock() - work
            if self._frozen_clock is not None:
                waited -= min(max(self._frozen_clock() - frozen, 0.0), waited)
            self._wait_in_step += waited

    def end_step(
        self,
        batch_size: float | Sequence[float],
        start_hint: float | None = None,
        new_size: bool | Sequence[bool] = False,
        end: float | None = None,
    ) -> None:
        """Close a step of ``batch_size`` samples (``new_size``: the rank's first at that size).

        In cost mode ``batch_size`` is the batch's cost in the plan's units
        (``sampler.StepBatch.units``), so the window counts cost, not samples.

        A step of several micro-batches (gradient accumulation) gives one size
        per micro-batch: each counts as one step of its size, with an equal
        share of the step's time. ``end`` closes the step at an earlier moment
        than now (a step that ended without ``optimizer.step()``).
        """
        now = self._clock() if end is None else end
        taken = [t for t in self._taken if t <= now]
        active = [t for t in self._active if t <= now]
        start = taken[0] if taken else (active[0] if active else None)
        if start is None:
            start = self._step_start
            if start_hint is not None and (start is None or start_hint > start):
                start = start_hint
        if start is None:
            start = now
        if self._gap_from is not None and start in self._marks:
            # The time from the previous step's end to this one's start is not training.
            self._add_between(self._gap_from, self._marks[start])
        wall = max(now - start, 0.0)
        wait = min(self._wait_in_step, wall)
        compute = wall - wait
        sizes = [batch_size] if isinstance(batch_size, (int, float)) else list(batch_size)
        news = [new_size] * len(sizes) if isinstance(new_size, bool) else list(new_size)
        for size, new in zip(sizes, news):
            self.window.add(size, compute / len(sizes), wait / len(sizes), new)
            self.totals.add(size, compute / len(sizes), wait / len(sizes), new)
        self._step_start = now
        # Signals after a late ``end`` belong to the next step.
        self._taken = [t for t in self._taken if t > now]
        self._active = [t for t in self._active if t > now]
        self._marks = {t: m for t, m in self._marks.items() if t > now}
        self._gap_from = self._clocks_at(now) if self._cpu_share else None
        self._wait_in_step = 0.0

    def take_window(self) -> WindowTotals:
        """Return the totals since the last call and start a new window.

        Under a CPU quota (``cpu_share``) the window's compute is at least the
        CPU time the process used in it over its share: the wall time the work
        takes once the quota binds. CPU used inside ``waiting`` blocks is left
        out (a rank the others wait for does not wait itself), and so is CPU
        used between steps (evaluation, checkpoints: not the training's work).
        Raised to that floor, every step of the window counts as stretched
        alike, so the steps' squared compute scales with it.
        """
        window, self.window = self.window, WindowTotals()
        if self._cpu_share:
            now, wall = self._cpu_clock(), self._clock()
            work_now = self._work_clock() if self._work_clock is not None else 0.0
            between = self._between
            used = now - self._cpu_mark - self._cpu_in_waits - between.cpu
            self._cpu_mark = now
            elapsed, self._wall_mark = wall - self._wall_mark - between.wall, wall
            floor = max(used, 0.0) / self._cpu_share
            if self._work_clock is not None:
                work = work_now - self._work_mark - self._work_in_waits - between.work
                self._work_mark = work_now
                work = max(work, 0.0)
                overhead_rate = max(used - work, 0.0) / elapsed if elapsed > 0 else 0.0
                floor = work / max(self._cpu_share - overhead_rate, 0.1 * self._cpu_share)
            self._cpu_in_waits = self._work_in_waits = 0.0
            self._between = _NO_TIME
            if self._gap_from is not None:  # between steps: the rest of the gap is the next window's
                self._gap_from = _Clocks(wall, now, work_now)
            if window.steps and floor > window.compute_seconds:
                if window.compute_seconds > 0:  # every step stretched alike: the spread scales too
                    window.compute_squares *= (floor / window.compute_seconds) ** 2
                window.compute_seconds = floor
        return window
