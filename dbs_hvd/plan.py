"""Batch plans and the policies that produce them: pure numpy, no torch, no MPI.

A *plan* says how many samples of each global batch every rank processes. Its
batch sizes always sum to the global batch ``B``, so the learning rate and the
optimisation trajectory do not depend on the plan (see optim.py); only the
time each step takes does.

A *policy* turns what the ranks measured over the last window of steps
(samples processed and compute seconds, time blocked in allreduce excluded)
into the next plan. Keeping this module free of torch and MPI lets the policies
be unit-tested, property-tested and simulated at thousands of workers
(benchmarks/scale_sim.py) without launching anything.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from .timing import WindowTotals


class PlanError(ValueError):
    """A plan cannot be made from the given configuration or measurements."""


@dataclass(frozen=True, repr=False)
class Bounds:
    """Limits on the local batch size: one floor for all ranks, a cap for all and per rank.

    Args:
        min_batch: keeps a slow rank from falling to an empty batch (the
            paper's rule has no floor).
        max_batch: caps memory on every rank; ``None`` means no cap beyond
            the global batch itself.
        rank_max: one cap per rank, in rank order, for ranks whose memory
            differs (a card with less memory, or a cap learned from an
            out-of-memory failure, see ``with_cap``); ``None`` for no
            per-rank caps. Where both are given a rank's cap is the smaller.
        allow_zero: a plan may also give a rank 0 samples (a straggler
            left out of the step, dropping.py); otherwise every rank takes
            at least ``min_batch``.

    Examples:
        >>> Bounds(min_batch=4).upper(128)
        128
        >>> Bounds(max_batch=100, rank_max=(40, 120)).uppers(128, 2).tolist()
        [40, 100]
        >>> Bounds(max_batch=8).check(global_batch=64, world_size=4)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        dbs_hvd.plan.PlanError: max_batch 8 x 4 ranks = 32 is below the global batch 64: ...
    """

    min_batch: int = 1
    max_batch: int | None = None
    rank_max: tuple[int, ...] | None = None
    allow_zero: bool = False

    def __post_init__(self) -> None:
        if self.rank_max is not None:
            object.__setattr__(self, "rank_max", tuple(int(cap) for cap in self.rank_max))

    def __repr__(self) -> str:
        caps = "" if self.rank_max is None else f", rank_max={self.rank_max}"
        zero = ", allow_zero=True" if self.allow_zero else ""
        return f"Bounds(min_batch={self.min_batch}, max_batch={self.max_batch}{caps}{zero})"

    def upper(self, global_batch: int) -> int:
        """The largest local batch any rank may take: ``max_batch``, or the global batch if none.

        Per-rank caps (``rank_max``) are in ``uppers``.
        """
        return global_batch if self.max_batch is None else self.max_batch

    def uppers(self, global_batch: int, world_size: int) -> np.ndarray:
        """Each rank's largest local batch: ``upper`` tightened by ``rank_max`` (``int64``)."""
        upper = np.full(world_size, self.upper(global_batch), dtype=np.int64)
        if self.rank_max is None:
            return upper
        if len(self.rank_max) != world_size:
            raise PlanError(
                f"rank_max= gives {len(self.rank_max)} per-rank caps {self.rank_max} for "
                f"{world_size} ranks: give one cap per rank"
            )
        return np.minimum(upper, np.asarray(self.rank_max, dtype=np.int64))

    def with_cap(self, rank: int, cap: int, world_size: int) -> Bounds:
        """These bounds with ``rank``'s cap lowered to ``cap`` (never raised).

        Args:
            rank: the rank whose cap drops.
            cap: its new largest local batch.
            world_size: the number of ranks (the length of ``rank_max``).

        Returns:
            New bounds; the caps of the other ranks are unchanged.

        Example:
            >>> Bounds().with_cap(1, 30, world_size=3)
            Bounds(min_batch=1, max_batch=None, rank_max=(1073741824, 30, 1073741824))
        """
        caps = list(self.rank_max) if self.rank_max is not None else [NO_CAP] * world_size
        if len(caps) != world_size:
            raise PlanError(f"rank_max= gives {len(caps)} per-rank caps for {world_size} ranks")
        caps[rank] = min(caps[rank], int(cap))
        return replace(self, rank_max=tuple(caps))

    def check(self, global_batch: int, world_size: int) -> None:
        """Raise PlanError unless some plan for ``world_size`` ranks meets the bounds."""
        if not isinstance(global_batch, (int, np.integer)) or global_batch <= 0:
            raise PlanError(f"the global batch must be a positive integer, got {global_batch!r}")
        if world_size <= 0:
            raise PlanError(f"the world size must be positive, got {world_size}")
        if self.min_batch < 1:
            raise PlanError(
                f"min_batch must be at least 1, got {self.min_batch}: every rank must "
                "take part in every step (an empty batch would still have to join the allreduce)"
            )
        if global_batch < world_size:
            raise PlanError(
                f"global batch {global_batch} is smaller than the world size {world_size}: "
                "every rank needs at least one sample per step; raise global_batch= "
                f"to at least {world_size} or launch fewer ranks"
            )
        upper = self.upper(global_batch)
        if upper < self.min_batch:
            raise PlanError(f"max_batch {upper} is below min_batch {self.min_batch}")
        if self.min_batch * world_size > global_batch:
            raise PlanError(
                f"min_batch {self.min_batch} x {world_size} ranks = "
                f"{self.min_batch * world_size} exceeds the global batch {global_batch}: "
                f"lower min_batch to at most {global_batch // world_size}"
            )
        if upper * world_size < global_batch:
            raise PlanError(
                f"max_batch {upper} x {world_size} ranks = {upper * world_size} is below "
                f"the global batch {global_batch}: raise max_batch to at least "
                f"{math.ceil(global_batch / world_size)}"
            )
        if self.rank_max is not None:
            self._check_rank_caps(global_batch, world_size)

    def _check_rank_caps(self, global_batch: int, world_size: int) -> None:
        """PlanError where a per-rank cap is below the floor or the caps cannot hold the batch."""
        uppers = self.uppers(global_batch, world_size)
        low = [rank for rank, cap in enumerate(uppers) if cap < self.min_batch]
        if low:
            raise PlanError(
                f"rank_max= caps rank {low[0]} at {int(uppers[low[0]])} samples, below "
                f"min_batch {self.min_batch}: every rank must take at least min_batch samples"
            )
        if int(uppers.sum()) < global_batch:
            shown = tuple(int(cap) for cap in uppers)
            raise PlanError(
                f"the per-rank caps rank_max={shown} sum to {sum(shown)}, below the global "
                f"batch {global_batch}: the ranks cannot hold one global batch together; "
                f"raise the caps, pass global_batch= of at most {sum(shown)}, or add ranks"
            )


NO_CAP = 2**30  # a per-rank cap that caps nothing (every global batch is smaller)


@dataclass(frozen=True)
class Plan:
    """Local batch sizes, one per rank, in rank order; they sum to the global batch.

    Rank i reads the contiguous piece ``[offset(i), offset(i) + b_i)`` of
    every global batch and weights its gradient by ``weight(i)``.

    Args:
        batch_sizes: the local batch sizes (converted to ``int``).

    Raises:
        PlanError: for an empty plan or a negative size.

    Examples:
        >>> plan = Plan((48, 40, 40))
        >>> plan.global_batch, plan.offset(2), plan.weight(0)
        (128, 88, 1.125)
    """

    batch_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        sizes = tuple(int(b) for b in self.batch_sizes)
        if not sizes:
            raise PlanError("a plan needs at least one rank")
        if min(sizes) < 0:
            raise PlanError(f"negative batch size in plan {sizes}")
        object.__setattr__(self, "batch_sizes", sizes)

    @classmethod
    def equal(cls, global_batch: int, world_size: int, bounds: Bounds = Bounds()) -> Plan:
        """The static split plain Horovod uses (remainder to the lowest ranks)."""
        bounds.check(global_batch, world_size)
        return cls(tuple(apportion(np.ones(world_size), global_batch, bounds)))

    @property
    def global_batch(self) -> int:
        """The sum of the local batch sizes, B."""
        return sum(self.batch_sizes)

    @property
    def world_size(self) -> int:
        """The number of ranks the plan splits the batch over."""
        return len(self.batch_sizes)

    @property
    def shares(self) -> np.ndarray:
        """Each rank's fraction of the global batch (they sum to 1)."""
        return np.asarray(self.batch_sizes, dtype=float) / self.global_batch

    def offset(self, rank: int) -> int:
        """Where ``rank``'s piece starts inside each global batch."""
        return sum(self.batch_sizes[:rank])

    def weight(self, rank: int) -> float:
        """The gradient weight N * b_rank / B that makes an averaging allreduce the global mean.

        It is exactly 1 for every rank of an equal split (optim.py).
        """
        return self.batch_sizes[rank] * self.world_size / self.global_batch

    def check(self, global_batch: int, bounds: Bounds) -> None:
        """Raise PlanError unless this plan sums to ``global_batch`` within ``bounds``."""
        if self.global_batch != global_batch:
            raise PlanError(
                f"plan {self.batch_sizes} sums to {self.global_batch}, not the global batch {global_batch}"
            )
        uppers = bounds.uppers(global_batch, self.world_size)
        low = bounds.min_batch
        bad = [
            (rank, b)
            for rank, b in enumerate(self.batch_sizes)
            if not (low <= b <= uppers[rank] or (b == 0 and bounds.allow_zero))
        ]
        if bad:
            rank, size = bad[0]
            raise PlanError(
                f"plan {self.batch_sizes} gives rank {rank} {size} samples, outside "
                f"[{bounds.min_batch}, {int(uppers[rank])}]"
            )


@dataclass(frozen=True)
class WindowStats:
    """What every rank measured over one window of steps, gathered in rank order.

    ``compute_seconds`` excludes time blocked waiting for the gradient allreduce
    (timing.py): that time is an effect of imbalance, not a property of the rank
    (invariant 5).

    Args:
        samples: samples each rank processed in the window.
        compute_seconds: each rank's compute time in the window.
        steps: steps each rank ran in the window.
        wait_seconds: each rank's time blocked in the allreduce, when known.
        compute_squares: each rank's sum of its steps' compute seconds
            squared, when known (``compute_spread``).

    Examples:
        >>> stats = WindowStats(samples=np.array([64.0, 64.0]),
        ...                     compute_seconds=np.array([1.0, 4.0]),
        ...                     steps=np.array([2.0, 2.0]))
        >>> stats.speeds().tolist()
        [64.0, 16.0]
    """

    samples: np.ndarray
    compute_seconds: np.ndarray
    steps: np.ndarray
    wait_seconds: np.ndarray | None = None  # time blocked in the allreduce, when known
    compute_squares: np.ndarray | None = None  # sum of squared per-step compute, when known

    @classmethod
    def from_windows(cls, windows: Sequence[WindowTotals]) -> WindowStats:
        """Build from each rank's window totals (``StepTimer.take_window``), in rank order.

        A rank's steps at batch sizes new to it (the ``new_size_*`` totals,
        timing.py) are left out where it ran other steps in the window: on a
        GPU such a step builds kernel plans for the new shapes, and read as
        compute it makes the rank look slow right after every plan change.

        Args:
            windows: one ``WindowTotals`` (or subclass) per rank.

        Returns:
            The window's figures as arrays, one entry per rank.
        """
        settled = [_settled(window) for window in windows]
        return cls(
            samples=np.array([w.samples for w in settled], dtype=float),
            compute_seconds=np.array([w.compute_seconds for w in settled], dtype=float),
            steps=np.array([w.steps for w in settled], dtype=float),
            wait_seconds=np.array([w.wait_seconds for w in settled], dtype=float),
            compute_squares=np.array([w.compute_squares for w in settled], dtype=float),
        )

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]]) -> WindowStats:
        """Build from one mapping per rank, as the rebalance log holds them (``ranks``).

        Keys are ``WindowTotals``'s fields: samples, compute_seconds and steps,
        optionally wait_seconds and compute_squares (without one in every
        record, that field is None) and the ``new_size_*`` totals; other keys
        are ignored.

        Raises:
            KeyError: for a record without samples, compute_seconds or steps.
        """
        names = {f.name for f in fields(WindowTotals)}
        for record in records:
            missing = {"samples", "compute_seconds", "steps"} - set(record)
            if missing:
                raise KeyError(f"a window record needs {sorted(missing)}, got keys {sorted(record)}")
        windows = [WindowTotals(**{k: v for k, v in r.items() if k in names}) for r in records]
        stats = cls.from_windows(windows)
        if any("wait_seconds" not in record for record in records):
            stats = replace(stats, wait_seconds=None)
        if any("compute_squares" not in record for record in records):
            stats = replace(stats, compute_squares=None)
        return stats

    def compute_spread(self) -> np.ndarray | None:
        """Each rank's standard deviation of compute seconds from step to step.

        Steps are synchronous: each waits for the slowest rank *of that step*,
        so a rank whose steps vary (a CPU quota's bursts, a noisy neighbour)
        holds the others up more often than its mean says.

        Returns:
            Seconds, one entry per rank (``nan`` for a rank with fewer than two
            steps), or ``None`` when the squares are not known.
        """
        if self.compute_squares is None:
            return None
        steps = np.maximum(self.steps, 1.0)
        mean = self.compute_seconds / steps
        variance = (
            np.maximum(self.compute_squares / steps - mean * mean, 0.0) * steps / np.maximum(steps - 1, 1)
        )
        return np.where(self.steps >= 2, np.sqrt(variance), np.nan)

    def step_wall_seconds(self) -> float | None:
        """The measured synchronous step time: compute + wait per step, of the rank that began last.

        Steps end for all ranks together, when their allreduce does, so the
        ranks' compute + wait differ only in where each began: a window that
        opens an epoch holds, on the ranks that finished evaluating first, a
        wait in the first allreduce for the others, which can be a large part
        of a short window. The smallest sum is the time all ranks trained.

        Returns:
            Seconds per step, or ``None`` when the wait times are not known.
        """
        if self.wait_seconds is None:
            return None
        return float(np.min((self.compute_seconds + self.wait_seconds) / self.steps))

    def imbalance(self) -> float:
        """The slowest rank's compute per step over the ranks' mean, minus 1 (0: balanced).

        Every rank must have run a step in the window.
        """
        per_step = self.compute_seconds / self.steps
        return float(per_step.max() / per_step.mean() - 1.0)

    @property
    def world_size(self) -> int:
        """The number of ranks measured."""
        return len(self.samples)

    def validate(self) -> None:
        """Raise PlanError, naming the rank, for timings no plan can be made from."""
        for name, values in (("compute time", self.compute_seconds), ("sample count", self.samples)):
            bad = ~(np.isfinite(values) & (values > 0))
            if bad.any():
                rank = int(np.argmax(bad))
                raise PlanError(
                    f"rank {rank} reported {name} {float(values[rank])!r} for the last window; "
                    "it must be finite and positive. Check the rank's timer (steps "
                    "must run between rebalances) or any custom stats you pass in."
                )

    def speeds(self) -> np.ndarray:
        """Samples per compute second, per rank."""
        return self.samples / self.compute_seconds


def _settled(window: WindowTotals) -> WindowTotals:
    """One rank's window totals without its steps at new batch sizes, where others remain."""
    if not window.new_size_steps or window.steps <= window.new_size_steps:
        return window
    compute = window.compute_seconds - window.new_size_compute_seconds
    if compute <= 0:  # a clock that went wrong: keep every step
        return window
    return WindowTotals(
        steps=window.steps - window.new_size_steps,
        samples=window.samples - window.new_size_samples,
        compute_seconds=compute,
        wait_seconds=window.wait_seconds - window.new_size_wait_seconds,
        compute_squares=max(window.compute_squares - window.new_size_compute_squares, 0.0),
    )


def apportion(weights: np.ndarray, global_batch: int, bounds: Bounds) -> np.ndarray:
    """Integer batch sizes proportional to ``weights``, summing to ``global_batch``, within bounds.

    Ranks whose proportional share falls outside the bounds are clamped and the
    rest is shared among the others in proportion (water-filling); then the
    real-valued sizes are rounded by largest remainder, so the sum is exact and
    a larger weight never gets a smaller batch.

    Args:
        weights: one positive, finite weight per rank (speeds, shares).
        global_batch: the sum of the sizes.
        bounds: the per-rank limits.

    Returns:
        Integer sizes (``int64``), one per rank.

    Raises:
        PlanError: for empty, non-finite or non-positive weights, or bounds
            no plan can meet.

    Examples:
        >>> apportion(np.array([1.0, 4.0]), 100, Bounds()).tolist()
        [20, 80]
        >>> apportion(np.array([1.0, 100.0]), 100, Bounds(min_batch=10)).tolist()
        [10, 90]
    """
    weights = np.asarray(weights, dtype=float)
    if weights.ndim != 1 or len(weights) == 0:
        raise PlanError("weights must be a non-empty 1-d array")
    if not np.all(np.isfinite(weights)) or np.any(weights <= 0):
        raise PlanError(f"weights must be finite and positive, got {weights.tolist()}")
    bounds.check(global_batch, len(weights))
    lower, upper = float(bounds.min_batch), bounds.uppers(global_batch, len(weights)).astype(float)
    scaled = weights / weights.max()
    targets = solve_clipped_linear(scaled, 0.0, lower, upper, global_batch)
    return round_to_total(targets, global_batch, bounds)


def fit_plan(plan: Plan, bounds: Bounds) -> Plan:
    """``plan`` itself where it meets ``bounds``, else the split nearest to it that does.

    Used when a rank's cap drops (an out-of-memory failure, ``Bounds.with_cap``):
    the samples a capped rank can no longer take go to the others in
    proportion to their batches (``apportion`` with the current sizes as
    weights), so the plan stays as close to balanced as the caps allow.
    Pure and deterministic: every rank computes the same plan.

    Args:
        plan: the plan in force.
        bounds: the bounds the plan must now meet.

    Returns:
        A plan with the same global batch within ``bounds``.

    Raises:
        PlanError: if no plan of this global batch meets ``bounds``.

    Examples:
        >>> fit_plan(Plan((40, 20, 20)), Bounds(rank_max=(30, 80, 80))).batch_sizes
        (30, 25, 25)
    """
    global_batch, world = plan.global_batch, plan.world_size
    bounds.check(global_batch, world)
    sizes = np.asarray(plan.batch_sizes)
    if np.all((sizes >= bounds.min_batch) & (sizes <= bounds.uppers(global_batch, world))):
        return plan
    return Plan(tuple(apportion(np.maximum(sizes, 0.5).astype(float), global_batch, bounds)))


def cap_below(failed: int, min_batch: int, shrink: float) -> int:
    """The cap of a rank that failed at ``failed`` samples: below it, at least ``min_batch``.

    A failure at ``b`` samples says little about ``b - 1``: on a GPU the
    memory a step needs grows with the batch in steps of the allocator's
    blocks. So the cap drops by the fraction ``shrink`` of the failed size,
    and by at least one sample; a rank that fails at the floor itself gets
    a cap below the floor, which ``Bounds.check`` reports.

    Args:
        failed: the local batch the rank ran out of memory at.
        min_batch: the floor every rank keeps.
        shrink: the new cap's largest fraction of ``failed``, in (0, 1).

    Returns:
        The new cap (below ``failed``).

    Examples:
        >>> cap_below(40, 1, 0.9), cap_below(5, 1, 0.9), cap_below(10, 8, 0.5)
        (36, 4, 8)
    """
    return min(failed - 1, max(min_batch, math.floor(failed * shrink)))


def solve_clipped_linear(
    slope: np.ndarray | float,
    offset: np.ndarray | float,
    lower: np.ndarray | float,
    upper: np.ndarray | float,
    total: float,
) -> np.ndarray:
    """Real sizes ``clip(slope * level + offset, lower, upper)`` summing to ``total``.

    Every water-filling family here has this form: proportional shares
    (``offset`` 0) and equal predicted step times (``level`` the step time,
    ``slope`` 1 / per-sample cost, ``offset`` -overhead / per-sample cost).
    Their sum is piecewise linear and non-decreasing in ``level``, with a kink
    where a rank meets a bound, so the level is found exactly: a binary search
    over the sorted kinks for the segment that crosses ``total``, then one
    linear interpolation. That is about log2(2n) sums instead of the ~60 a
    float bisection takes, which matters because planning runs on rank 0 while
    every other rank waits for the plan.
    """
    slope, offset, lower, upper = np.broadcast_arrays(
        *(np.asarray(v, dtype=float) for v in (slope, offset, lower, upper))
    )
    if np.any(slope <= 0) or np.any(lower > upper):
        raise PlanError("solve_clipped_linear needs positive slopes and lower <= upper")
    if not lower.sum() <= total <= upper.sum():
        raise PlanError("cannot reach the global batch within the bounds")

    def sizes_at(level: float) -> np.ndarray:
        return np.clip(slope * level + offset, lower, upper)

    kinks = np.unique(np.concatenate([(lower - offset) / slope, (upper - offset) / slope]))
    # The sum at kinks[0] is sum(lower) <= total and at kinks[-1] sum(upper) >= total:
    # keep kinks[lo] at or below the total and kinks[hi] at or above it.
    # Each sum is computed once: the search keeps the sums it found at lo and hi.
    lo, hi = 0, len(kinks) - 1
    low_sum: float | None = None
    high_sum: float | None = None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        mid_sum = sizes_at(kinks[mid]).sum()
        if mid_sum <= total:
            lo, low_sum = mid, mid_sum
        else:
            hi, high_sum = mid, mid_sum
    if low_sum is None:
        low_sum = sizes_at(kinks[lo]).sum()
    if high_sum is None:
        high_sum = sizes_at(kinks[hi]).sum()
    if high_sum <= low_sum:  # a flat segment: every rank is at a bound already
        return sizes_at(kinks[hi] if high_sum >= total else kinks[lo])
    fraction = (total - low_sum) / (high_sum - low_sum)
    return sizes_at(kinks[lo] + fraction * (kinks[hi] - kinks[lo]))


def round_to_total(
    targets: np.ndarray,
    global_batch: int,
    bounds: Bounds,
    lower: np.ndarray | None = None,
    upper: np.ndarray | None = None,
    step_cost: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Round real sizes to integers summing to ``global_batch``, within bounds.

    ``lower``/``upper`` optionally tighten the bounds per rank (integer arrays
    whose sums bracket ``global_batch``), as a policy's trust region does.

    The sizes are floored, then the units still missing are handed out. By
    default they go by largest remainder: the split closest to proportional.
    Given the predicted step time of each rank, ``step_cost = (overhead,
    per_sample)`` with a step of ``b`` samples taking ``overhead + per_sample *
    b``, each unit goes where the step after it is shortest (min-max
    rounding), which is what a synchronous step, as long as its slowest rank,
    asks for. Largest remainder gives a unit to a slow rank with remainder 0.6
    before a fast one with 0.5 whose step grows less; with a few tens of
    samples per rank that makes the slowest predicted step measurably longer
    than needed (docs/design.md, "Measurements behind the defaults").

    Args:
        targets: real-valued sizes, one per rank.
        global_batch: the sum the integer sizes must reach.
        bounds: the per-rank limits.
        lower: optional per-rank lower bounds, tighter than ``bounds``.
        upper: optional per-rank upper bounds, tighter than ``bounds``.
        step_cost: optional ``(overhead, per_sample)`` per rank, for
            min-max rounding.

    Returns:
        Integer sizes (``int64``) summing to ``global_batch``.

    Raises:
        PlanError: if the bounds leave no way to reach ``global_batch``.

    Examples:
        >>> round_to_total(np.array([10.6, 10.5, 10.9]), 32, Bounds()).tolist()
        [11, 10, 11]
    """
    n = len(targets)
    low = np.full(n, bounds.min_batch) if lower is None else np.maximum(lower, bounds.min_batch)
    high = (
        bounds.uppers(global_batch, n) if upper is None else np.minimum(upper, bounds.uppers(global_batch, n))
    )
    sizes = np.clip(np.floor(targets), low, high).astype(np.int64)
    deficit = int(global_batch - sizes.sum())
    if step_cost is not None:
        deficit = _min_max_units(sizes, deficit, low, high, *step_cost)
    else:
        remainders = targets - sizes
        # Stable sort: among equal remainders, lower ranks go first (deterministic).
        if deficit > 0:
            for rank in np.argsort(-remainders, kind="stable"):
                if deficit == 0:
                    break
                if sizes[rank] < high[rank]:
                    sizes[rank] += 1
                    deficit -= 1
        elif deficit < 0:
            for rank in np.argsort(remainders, kind="stable"):
                if deficit == 0:
                    break
                if sizes[rank] > low[rank]:
                    sizes[rank] -= 1
                    deficit += 1
    if deficit != 0:  # only reachable with bounds check() would have rejected
        raise PlanError(f"cannot round {targets.tolist()} to {global_batch} within bounds")
    return sizes


def equalise_step_times(
    overhead: np.ndarray,
    per_sample: np.ndarray,
    global_batch: int,
    bounds: Bounds,
    lower: np.ndarray | None = None,
    upper: np.ndarray | None = None,
) -> np.ndarray:
    """Integer sizes summing to ``global_batch`` whose predicted steps are as equal as can be.

    A step of ``b`` samples on rank i is predicted to take ``overhead[i] +
    per_sample[i] * b``. The real-valued sizes that give every rank the same
    predicted step are found exactly (``solve_clipped_linear``), then rounded
    min-max, so the longest predicted step, the one a synchronous step waits
    for, is as short as integer sizes allow. ``lower``/``upper`` tighten the
    bounds per rank (a trust region).
    """
    low = np.full(len(per_sample), float(bounds.min_batch)) if lower is None else lower
    high = bounds.uppers(global_batch, len(per_sample)).astype(float) if upper is None else upper
    targets = solve_clipped_linear(1.0 / per_sample, -overhead / per_sample, low, high, global_batch)
    return round_to_total(
        targets,
        global_batch,
        bounds,
        np.asarray(low, dtype=np.int64),
        np.asarray(high, dtype=np.int64),
        step_cost=(overhead, per_sample),
    )


def _min_max_units(
    sizes: np.ndarray,
    deficit: int,
    low: np.ndarray,
    high: np.ndarray,
    overhead: np.ndarray,
    per_sample: np.ndarray,
) -> int:
    """Add (or take away) ``deficit`` units in place so the longest predicted step is shortest.

    Adding: the optimum holds the ``deficit`` cheapest units, a rank's units
    getting dearer one by one. Each pass commits what ``_sure_units`` picks.
    Taking away is the same with costs negated: the dearest held units go
    first. Returns what could not be placed (0 unless the bounds leave no
    room). Ties go to lower ranks (stable sorts).
    """

    def step(batch: np.ndarray) -> np.ndarray:
        return overhead + per_sample * batch

    while deficit > 0:
        chosen = _sure_units(
            np.where(sizes + 1 <= high, step(sizes + 1), np.inf),
            np.where(sizes + 2 <= high, step(sizes + 2), np.inf),
            deficit,
        )
        if len(chosen) == 0:
            break
        sizes[chosen] += 1
        deficit -= len(chosen)
    while deficit < 0:
        chosen = _sure_units(
            np.where(sizes - 1 >= low, -step(sizes), np.inf),
            np.where(sizes - 2 >= low, -step(sizes - 1), np.inf),
            -deficit,
        )
        if len(chosen) == 0:
            break
        sizes[chosen] -= 1
        deficit += len(chosen)
    return deficit


def _sure_units(next_cost: np.ndarray, after_cost: np.ndarray, count: int) -> np.ndarray:
    """Ranks whose next unit belongs to the ``count`` cheapest units overall (one pass).

    ``next_cost``/``after_cost``: each rank's next unit and the one after it
    (``inf`` where the bounds forbid it). Among the ``count`` cheapest next
    units, those no dearer than any rank's unit after next are sure to be in
    the optimum: no unit left out can undercut them. At least the cheapest
    one is, so every pass makes progress; usually one pass does it all.
    """
    order = np.argsort(next_cost, kind="stable")[:count]
    order = order[np.isfinite(next_cost[order])]
    sure = order[next_cost[order] <= after_cost.min()]
    return sure if len(sure) else order[:1]


class Policy(ABC):
    """Turns the last window's measurements into the next plan.

    Policies may keep state across windows (smoothing, fitted cost models); that
    state travels in checkpoints through ``state_dict``/``load_state_dict``.
    Implementations must be deterministic: given the same stats and state,
    every rank would compute the same plan (rank 0 computes it and broadcasts
    it anyway, see comm.py). A subclass implements ``propose``; callers use
    ``next_plan``, which validates what goes in and comes out (invariant 1).

    Args:
        global_batch: the global batch B every plan sums to.
        bounds: per-rank limits on the local batch.

    Examples:
        >>> class Fixed(Policy):
        ...     name = "fixed"
        ...     def propose(self, stats, current):
        ...         return Plan((40, 24))
        >>> stats = WindowStats(np.array([32.0, 32.0]), np.array([1.0, 2.0]), np.array([1.0, 1.0]))
        >>> Fixed(64).next_plan(stats, Plan((32, 32))).batch_sizes
        (40, 24)
    """

    name: str = "policy"

    def __init__(self, global_batch: int, bounds: Bounds = Bounds()):
        self.global_batch = global_batch
        self.bounds = bounds

    def set_bounds(self, bounds: Bounds) -> None:
        """Plan within ``bounds`` from now on (a rank's cap dropped after running out of memory).

        Every rank calls it with the same bounds at the same step, so the
        policies on all ranks stay alike.
        """
        self.bounds = bounds

    def initial_plan(self, world_size: int) -> Plan:
        """The plan before anything is measured: the equal split."""
        return Plan.equal(self.global_batch, world_size, self.bounds)

    def next_plan(self, stats: WindowStats, current: Plan) -> Plan:
        """Validate the inputs, ask the policy, and check what it returns.

        Args:
            stats: every rank's measurements over the last window.
            current: the plan in force during that window.

        Returns:
            The next plan, summing to ``global_batch`` within ``bounds``.

        Raises:
            PlanError: for stats of another world size, timings no plan can
                be made from, or a plan that breaks invariant 1.
        """
        if stats.world_size != current.world_size:
            raise PlanError(f"stats from {stats.world_size} ranks for a plan of {current.world_size}")
        stats.validate()
        plan = self.propose(stats, current)
        plan.check(self.global_batch, self.bounds)
        return plan

    @abstractmethod
    def propose(self, stats: WindowStats, current: Plan) -> Plan:
        """The next plan; ``stats`` are valid and match ``current``'s world size."""

    def state_dict(self) -> dict[str, Any]:
        """What the policy has learnt, in plain types, for a checkpoint (none by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        del state

    def diagnostics(self) -> dict[str, Any]:
        """What the last decision rested on, for ``--rebalance-log`` (plain JSON types).

        Read on rank 0 right after ``next_plan``, where the decision was made.
        """
        return {}
