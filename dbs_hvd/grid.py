"""Batch sizes on a grid: every rank's batch a multiple of M samples.

Why: on a GPU the first step at a batch size a rank has not run before
builds kernel plans for the new shapes, a one-off cost several times a short
step (docs/deployment/gpu.md). A policy free to pick any size visits many
sizes while it converges and whenever noise nudges the plan, and pays that
cost at each. On a grid of M samples there are M times fewer sizes to visit,
and a move smaller than M samples rounds back to the current plan, so small
noise-driven moves stop altogether. Sizes that are multiples of 8 also suit
tensor cores. The price is resolution: a balance that falls between grid
points is approximated by the nearest one, which costs up to M / b of the
step on a rank of batch b; so M should be small against the smallest batch.

How: the policy plans in units of M samples. ``GridPolicy`` hands the inner
policy a problem whose global batch is B / M units, whose bounds are the
per-rank bounds in whole units, and whose stats count units instead of
samples (seconds unchanged, so per-unit costs are M times the per-sample
ones), then multiplies its plan by M. Every policy works unchanged on the
grid, with its history, deadband and rounding all in units. Pure numpy, like
plan.py.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from .plan import Bounds, Plan, PlanError, Policy, WindowStats, apportion


def unit_bounds(global_batch: int, multiple: int, bounds: Bounds) -> Bounds:
    """``bounds`` in whole units of ``multiple`` samples.

    The lower bound rounds up and the upper bound down, so every plan on the
    grid also meets the bounds in samples.

    Args:
        global_batch: the global batch in samples.
        multiple: the grid M, in samples.
        bounds: per-rank limits in samples.

    Returns:
        The limits in units of M samples.

    Raises:
        PlanError: if M is not a positive integer dividing ``global_batch``
            or exceeds ``max_batch`` (the message suggests divisors).

    Examples:
        >>> unit_bounds(128, 8, Bounds(min_batch=12, max_batch=60))
        Bounds(min_batch=2, max_batch=7)
    """
    if not isinstance(multiple, (int, np.integer)) or multiple < 1:
        raise PlanError(f"the batch multiple must be a positive integer, got {multiple!r}")
    if global_batch % multiple:
        divisors = [d for d in range(2, min(global_batch, 64) + 1) if global_batch % d == 0]
        raise PlanError(
            f"batch multiple {multiple} does not divide the global batch {global_batch}: "
            f"the local batches could not sum to it. Choose a multiple that divides it "
            f"(e.g. {', '.join(map(str, divisors[:6])) or '1'}) or a global batch that is a "
            f"multiple of {multiple}"
        )
    upper = bounds.upper(global_batch)
    if upper < multiple:
        raise PlanError(
            f"max_batch {upper} is below the batch multiple {multiple}: no rank "
            f"could take a batch on the grid; raise max_batch or lower the multiple"
        )
    return Bounds(
        max(1, math.ceil(bounds.min_batch / multiple)),
        None if bounds.max_batch is None else upper // multiple,
        None if bounds.rank_max is None else tuple(cap // multiple for cap in bounds.rank_max),
    )


class GridPolicy(Policy):
    """Runs ``inner`` in units of ``multiple`` samples, so every plan is on the grid.

    ``inner`` must have been built for ``global_batch // multiple`` units with
    ``unit_bounds(...)`` (``make_policy(..., batch_multiple=M)`` does this).
    A current plan off the grid (the sampler's first equal split, e.g. 43,43,42
    for 128 samples on 3 ranks with M=8) is snapped to the nearest grid plan
    before the inner policy sees it, so the first rebalance puts the plan on
    the grid.

    Args:
        inner: the policy that plans in units.
        multiple: the grid M, in samples.
        global_batch: the global batch in samples (a multiple of M).
        bounds: per-rank limits in samples.

    Raises:
        PlanError: if ``inner`` was not built for this grid.

    Examples:
        >>> from dbs_hvd.policies import PaperPolicy
        >>> units = unit_bounds(128, 8, Bounds())
        >>> policy = GridPolicy(PaperPolicy(16, units), 8, 128)
        >>> stats = WindowStats(np.array([43.0, 43.0, 42.0]), np.array([1.0, 1.0, 2.0]),
        ...                     np.array([1.0, 1.0, 1.0]))
        >>> policy.next_plan(stats, Plan((43, 43, 42))).batch_sizes
        (56, 48, 24)
    """

    def __init__(self, inner: Policy, multiple: int, global_batch: int, bounds: Bounds = Bounds()) -> None:
        super().__init__(global_batch, bounds)
        expected = unit_bounds(global_batch, multiple, bounds)
        if inner.global_batch * multiple != global_batch or inner.bounds != expected:
            raise PlanError(
                f"the inner policy plans {inner.global_batch} units within {inner.bounds}; on a "
                f"grid of {multiple} it needs {global_batch // multiple} units within {expected}"
            )
        self.inner = inner
        self.multiple = int(multiple)
        self.name = inner.name

    def set_bounds(self, bounds: Bounds) -> None:
        """New bounds in samples, and the inner policy's in units."""
        super().set_bounds(bounds)
        self.inner.set_bounds(unit_bounds(self.global_batch, self.multiple, bounds))

    def initial_plan(self, world_size: int) -> Plan:
        self._check_fits(world_size)
        return self._samples(self.inner.initial_plan(world_size))

    def _check_fits(self, world_size: int) -> None:
        """PlanError, in samples, where no plan on the grid fits ``world_size`` ranks.

        The inner policy would say so in units, which reads wrongly on the
        command line ("global batch 1 is smaller than the world size 2").
        """
        units, bounds = self.inner.global_batch, self.inner.bounds
        low, high = bounds.min_batch, bounds.upper(units)
        if low * world_size > units or high * world_size < units:
            raise PlanError(
                f"on a grid of {self.multiple} samples the global batch {self.global_batch} "
                f"makes {units} multiples for {world_size} ranks, and with every rank's batch "
                f"between {low * self.multiple} and {high * self.multiple} samples (the bounds "
                f"rounded to the grid) no plan fits: lower the batch multiple or raise the "
                f"global batch"
            )

    def on_grid(self, plan: Plan) -> bool:
        """True if every batch of ``plan`` is a multiple of the grid."""
        return not np.any(np.asarray(plan.batch_sizes) % self.multiple)

    def snap(self, plan: Plan) -> Plan:
        """``plan`` in units: itself where on the grid, else the nearest grid plan."""
        if self.on_grid(plan):
            return Plan(tuple((np.asarray(plan.batch_sizes) // self.multiple).tolist()))
        shares = np.maximum(np.asarray(plan.batch_sizes, dtype=float), 1e-9)
        return Plan(tuple(apportion(shares, self.inner.global_batch, self.inner.bounds)))

    def propose(self, stats: WindowStats, current: Plan) -> Plan:
        self._check_fits(current.world_size)
        in_units = replace(stats, samples=stats.samples / self.multiple)
        return self._samples(self.inner.next_plan(in_units, self.snap(current)))

    def _samples(self, plan: Plan) -> Plan:
        return Plan(tuple((np.asarray(plan.batch_sizes) * self.multiple).tolist()))

    def diagnostics(self) -> dict[str, Any]:
        """The inner policy's, with its per-unit costs given per sample."""
        found = dict(self.inner.diagnostics(), batch_multiple=self.multiple)
        if "per_sample_seconds" in found:
            found["per_sample_seconds"] = [c / self.multiple for c in found["per_sample_seconds"]]
        return found

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
