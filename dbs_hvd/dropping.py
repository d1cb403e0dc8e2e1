"""Ranks with zero samples: leaving a straggler out of the step while it pays to.

A rank much slower than the others still costs its fixed per-step time at a
batch of one sample, and a synchronous step waits for it. Where the step is
predicted shorter without it, ``ZeroSamplePolicy`` gives that rank 0 samples.
It still joins every allreduce, with a zero contribution (its weight
``N * 0 / B`` is 0), so every update is still the single-process update on
the global batch, now split among the other ranks. Every ``probe_every``
steps it computes a probe, a forward and backward on ``probe_samples``
samples of the step, weighted 0 and so never applied, only timed: the probe
keeps its cost model current, so the rank comes back when it speeds up.

The decision uses a per-rank step-cost model ``a_i + c_i * b`` fitted over
each rank's recent windows (``fit_step_costs``, the ``dbs`` policy's fit):
without a per-step overhead ``a_i`` a slow rank would always be better kept
with a small batch. The plan compared are the current set of ranks, each
set with one more rank left out, and each with one left-out rank back; the
fastest predicted one is taken where it beats the current step by more than
``gain``. While no rank is left out, the inner policy plans as usual; while
some are, the plan among the others equalises their predicted steps.

Pure numpy, like plan.py: no torch, no MPI.
"""

from __future__ import annotations

import collections
from dataclasses import replace
from typing import Any

import numpy as np

from .options import ZeroSampleOptions
from .plan import Bounds, Plan, PlanError, Policy, WindowStats, equalise_step_times
from .policies import fit_step_costs

HISTORY = 8  # windows kept per rank for the cost model
MIN_SPREAD = 0.25  # the relative spread of batch sizes a rank needs before its overhead is fitted
SURPRISE = 0.5  # a probe this far off its rank's model replaces the rank's history


def plan_among(
    overhead: np.ndarray, per_sample: np.ndarray, global_batch: int, bounds: Bounds, active: np.ndarray
) -> tuple[np.ndarray, float]:
    """The plan of equal predicted steps among the ``active`` ranks, 0 samples for the others.

    Args:
        overhead: each rank's predicted seconds per step at any batch.
        per_sample: each rank's predicted seconds per sample.
        global_batch: the sum of the sizes.
        bounds: the limits of the active ranks (per-rank caps are picked
            out for them).
        active: one bool per rank.

    Returns:
        The sizes (``int64``, 0 where inactive) and the predicted step: the
        longest predicted compute among the active ranks.

    Raises:
        PlanError: where the active ranks cannot hold the global batch
            within the bounds, or none is active.

    Examples:
        >>> sizes, step = plan_among(np.array([0.0, 0.0, 0.06]), np.full(3, 0.001), 64,
        ...                          Bounds(), np.array([True, True, False]))
        >>> sizes.tolist(), round(step, 3)
        ([32, 32, 0], 0.032)
    """
    active = np.asarray(active, dtype=bool)
    if not active.any():
        raise PlanError("a plan needs at least one rank with samples")
    caps = None if bounds.rank_max is None else tuple(np.asarray(bounds.rank_max)[active].tolist())
    inner = replace(bounds, rank_max=caps, allow_zero=False)
    inner.check(global_batch, int(active.sum()))
    sizes = np.zeros(len(active), dtype=np.int64)
    sizes[active] = equalise_step_times(overhead[active], per_sample[active], global_batch, inner)
    step = float(np.max(overhead[active] + per_sample[active] * sizes[active]))
    return sizes, step


def choose_ranks(
    overhead: np.ndarray,
    per_sample: np.ndarray,
    global_batch: int,
    bounds: Bounds,
    active: np.ndarray,
    current_step: float,
    gain: float,
    max_dropped: int | None = None,
) -> np.ndarray | None:
    """A better set of ranks with samples than ``active``, or None to keep it.

    Candidates: ``active`` with one more rank left out (never the last one,
    nor more than ``max_dropped`` left out), and ``active`` with one left-out
    rank back. The candidate of the shortest predicted step (``plan_among``)
    wins where that step is below ``current_step * (1 - gain)``.

    Args:
        overhead: each rank's predicted seconds per step.
        per_sample: each rank's predicted seconds per sample.
        global_batch: the global batch.
        bounds: the per-rank limits.
        active: one bool per rank: has samples now.
        current_step: the step the current set takes (measured, or
            predicted).
        gain: the fraction by which a change must shorten the step.
        max_dropped: the most ranks left out at once (default: all but one).

    Returns:
        The new set (one bool per rank), or None.

    Examples:
        A rank with 60 ms per step whatever its batch, against two that take
        0.5 ms per sample: left out, the step is 16 ms instead of 60 ms.

        >>> choose_ranks(np.array([0.0, 0.0, 0.06]), np.array([5e-4, 5e-4, 1e-3]), 64,
        ...              Bounds(), np.ones(3, bool), 0.061, 0.1).tolist()
        [True, True, False]
    """
    active = np.asarray(active, dtype=bool)
    n = len(active)
    limit = n - 1 if max_dropped is None else min(max_dropped, n - 1)
    candidates = []
    for rank in range(n):
        trial = active.copy()
        trial[rank] = not trial[rank]
        if not trial.any() or (~trial).sum() > limit:
            continue
        try:
            _, step = plan_among(overhead, per_sample, global_batch, bounds, trial)
        except PlanError:
            continue
        candidates.append((step, rank, trial))
    if not candidates:
        return None
    step, _, best = min(candidates, key=lambda c: (c[0], c[1]))
    return best if step < current_step * (1 - gain) else None


class ZeroSamplePolicy(Policy):
    """Wraps a policy so that a straggler may get 0 samples while the step is faster without it.

    The module notes above give the rule. The wrapped policy plans whenever
    every rank has samples; this one decides who has samples and plans among
    them otherwise. Windows in which a rank with 0 samples ran no probe carry
    its last measured figures forward (a rank with no samples and no probe
    measured nothing).

    Args:
        inner: the policy that plans while every rank has samples.
        options: ``ZeroSampleOptions`` (probe size, gain, most ranks left out).

    Example:
        >>> from dbs_hvd.policies import PaperPolicy
        >>> policy = ZeroSamplePolicy(PaperPolicy(64), ZeroSampleOptions(enabled=True))
        >>> policy.bounds.allow_zero, policy.name
        (True, 'paper')
    """

    def __init__(self, inner: Policy, options: ZeroSampleOptions) -> None:
        super().__init__(inner.global_batch, replace(inner.bounds, allow_zero=True))
        self.inner = inner
        self.options = options
        self.name = inner.name
        self._history: dict[int, collections.deque[tuple[float, float]]] = {}
        self._last: dict[int, tuple[float, float, float]] = {}  # rank -> samples, compute, steps
        self._diagnostics: dict[str, Any] = {}
        self._pending: tuple[tuple[bool, ...], int] | None = None  # a change, and its wins in a row
        self._filled: set[int] = set()  # ranks whose window this rebalance carried forward

    def set_bounds(self, bounds: Bounds) -> None:
        super().set_bounds(replace(bounds, allow_zero=True))
        self.inner.set_bounds(replace(bounds, allow_zero=False))

    def initial_plan(self, world_size: int) -> Plan:
        return self.inner.initial_plan(world_size)

    def next_plan(self, stats: WindowStats, current: Plan) -> Plan:
        """As ``Policy.next_plan``, with a window of no samples filled from the rank's last one."""
        samples, compute, steps = stats.samples.copy(), stats.compute_seconds.copy(), stats.steps.copy()
        self._filled = set()
        for rank in range(len(samples)):
            if samples[rank] > 0 and compute[rank] > 0:
                self._last[rank] = (samples[rank], compute[rank], steps[rank])
            elif rank in self._last and current.batch_sizes[rank] == 0:
                samples[rank], compute[rank], steps[rank] = self._last[rank]
                self._filled.add(rank)  # measured nothing new: kept out of its history
        return super().next_plan(
            replace(stats, samples=samples, compute_seconds=compute, steps=steps), current
        )

    def propose(self, stats: WindowStats, current: Plan) -> Plan:
        sizes = np.asarray(current.batch_sizes)
        active = sizes > 0
        self._observe(stats, active)
        overhead, per_sample = self._costs(len(sizes))
        # The step the ranks with samples took: the longest compute per step among them.
        measured = float(np.max((stats.compute_seconds / stats.steps)[active]))
        chosen = choose_ranks(
            overhead,
            per_sample,
            self.global_batch,
            self.inner.bounds,
            active,
            measured,
            self.options.gain,
            self.options.max_dropped,
        )
        chosen = self._confirmed(chosen)
        self._diagnostics = {
            "zero_sample_overhead_seconds": overhead.tolist(),
            "zero_sample_per_sample_seconds": per_sample.tolist(),
            "zero_sample_choice": None if chosen is None else chosen.tolist(),
        }
        if chosen is None:
            if active.all():
                return self.inner.next_plan(stats, current)
            chosen = active
        planned, _ = plan_among(overhead, per_sample, self.global_batch, self.inner.bounds, chosen)
        if chosen.all():
            # Every rank is back: the inner policy's last change is no longer its to judge.
            self.inner.set_bounds(self.inner.bounds)
        return Plan(tuple(planned.tolist()))

    def _confirmed(self, chosen: np.ndarray | None) -> np.ndarray | None:
        """``chosen`` once it has won ``confirm`` rebalances in a row, else None (keep the set)."""
        if chosen is None:
            self._pending = None
            return None
        key = tuple(bool(b) for b in chosen)
        wins = self._pending[1] + 1 if self._pending is not None and self._pending[0] == key else 1
        if wins >= self.options.confirm:
            self._pending = None
            return chosen
        self._pending = (key, wins)
        return None

    def _observe(self, stats: WindowStats, active: np.ndarray) -> None:
        """Add each rank's window to its history: steps with samples, or its probes."""
        probe = self.options.probe_samples
        for rank in range(stats.world_size):
            if rank in self._filled and self._history.get(rank):
                continue
            samples, compute, steps = stats.samples[rank], stats.compute_seconds[rank], stats.steps[rank]
            if active[rank]:
                point = (samples / steps, compute / steps)
            else:  # only the probes carried samples; the other steps cost next to nothing
                probes = samples / probe
                point = (float(probe), compute / probes)
            history = self._history.setdefault(rank, collections.deque(maxlen=HISTORY))
            if history and history[-1] == point:  # a window carried forward adds nothing
                continue
            if history and not active[rank]:
                # A probe far off the model: the device changed; its old windows describe another.
                a, c = self._fit(history)
                if abs(point[1] - (a + c * point[0])) > SURPRISE * (a + c * point[0]):
                    history.clear()
            history.append(point)

    def _costs(self, world_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Each rank's fitted ``(overhead, per_sample)`` over its history."""
        overhead, per_sample = np.zeros(world_size), np.zeros(world_size)
        for rank in range(world_size):
            overhead[rank], per_sample[rank] = self._fit(self._history[rank])
        return overhead, per_sample

    @staticmethod
    def _fit(history: collections.deque[tuple[float, float]]) -> tuple[float, float]:
        """``(overhead, per_sample)`` of one rank's windows (``fit_step_costs``)."""
        points = np.asarray(history, dtype=float)
        a, c = fit_step_costs(points[:, :1], points[:, 1:], np.ones(len(points)), MIN_SPREAD)
        return float(a[0]), float(c[0])

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict(),
            "history": {str(rank): list(points) for rank, points in self._history.items()},
            "last": {str(rank): list(last) for rank, last in self._last.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state.get("inner", {}))
        self._history = {
            int(rank): collections.deque((tuple(p) for p in points), maxlen=HISTORY)
            for rank, points in state.get("history", {}).items()
        }
        self._last = {int(rank): tuple(last) for rank, last in state.get("last", {}).items()}

    def diagnostics(self) -> dict[str, Any]:
        return dict(self.inner.diagnostics(), **self._diagnostics)
