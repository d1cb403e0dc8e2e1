"""Policies beyond the paper's rule, and the registry dbs-train chooses from.

``CostModelPolicy`` ("dbs", our default) differs from the paper's rule in three ways:

* **A per-rank cost model.** A step of ``b`` samples on rank i is predicted to
  take ``a_i + c_i * b`` seconds, fitted by weighted least squares over recent
  windows. Fixed per-step costs (kernel launches, Python overhead, optimizer
  update) make small batches slower per sample, so splitting by speed alone
  overshoots; equalising *predicted step times* does not.
* **Smoothing with a deadband.** Older windows count less (exponential decay)
  rather than being forgotten, and a new plan is only adopted when it is
  predicted to shorten the step by more than ``deadband``: measurement noise
  does not make batch sizes oscillate.
* **Fast reaction to change.** When a rank's measured step time departs from
  its prediction by more than ``surprise``, its history is rescaled to the new
  level at once instead of being averaged in slowly. With rebalancing every K
  steps (``rebalance_every``) a disturbance is answered within K steps, not one
  epoch late.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .plan import (
    Bounds, Plan, PlanError, Policy, ProportionalPolicy, StaticPolicy, WindowStats,
    round_to_total, solve_monotone,
)


def fit_step_cost(batch: np.ndarray, seconds: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """Weighted least-squares ``seconds ~ a + c * batch`` with ``a >= 0`` and ``c > 0``.

    With fewer than two distinct batch sizes the overhead cannot be told apart
    from the per-sample cost, and the fit falls back to ``a = 0`` (the paper's
    proportional model) until the plan has moved.
    """
    w = weights / weights.sum()
    mean_b, mean_t = float(w @ batch), float(w @ seconds)
    var_b = float(w @ (batch - mean_b) ** 2)
    if var_b > 1e-9 * max(mean_b, 1.0) ** 2:
        c = float(w @ ((batch - mean_b) * (seconds - mean_t))) / var_b
        a = mean_t - c * mean_b
        if c > 0 and a >= 0:
            return a, c
    # Through the origin: a = 0.
    c = float(w @ (batch * seconds)) / float(w @ (batch * batch))
    return 0.0, c


class CostModelPolicy(Policy):
    """Equalise predicted step times under a fitted ``a_i + c_i * b`` model per rank."""

    name = "dbs"

    def __init__(self, global_batch: int, bounds: Bounds = Bounds(), decay: float = 0.5,
                 deadband: float = 0.03, surprise: float = 0.2, history: int = 6) -> None:
        super().__init__(global_batch, bounds)
        if not 0 < decay <= 1:
            raise PlanError(f"decay must be in (0, 1], got {decay}")
        if deadband < 0 or surprise <= 0 or history < 1:
            raise PlanError("deadband must be >= 0, surprise > 0 and history >= 1")
        self.decay, self.deadband, self.surprise, self.history = decay, deadband, surprise, history
        # Per rank: rows of (batch size, seconds per step), oldest first.
        self._observations: list[list[tuple[float, float]]] = []
        self.last_model: tuple[np.ndarray, np.ndarray] | None = None

    def _costs(self, rank: int) -> tuple[float, float]:
        rows = np.array(self._observations[rank])
        ages = np.arange(len(rows))[::-1]
        return fit_step_cost(rows[:, 0], rows[:, 1], self.decay ** ages)

    def observe(self, stats: WindowStats) -> tuple[np.ndarray, np.ndarray]:
        """Add the window to each rank's history and return the fitted (a, c) per rank."""
        if len(self._observations) != stats.world_size:
            self._observations = [[] for _ in range(stats.world_size)]
        batch = stats.samples / stats.steps
        seconds = stats.compute_seconds / stats.steps
        overheads, per_sample = np.zeros(stats.world_size), np.zeros(stats.world_size)
        for rank in range(stats.world_size):
            rows = self._observations[rank]
            if rows:
                a, c = self._costs(rank)
                predicted = a + c * batch[rank]
                if abs(seconds[rank] - predicted) > self.surprise * predicted:
                    # The rank changed speed: keep the shape of its cost curve,
                    # move it to the new level now.
                    scale = seconds[rank] / predicted
                    rows[:] = [(b, t * scale) for b, t in rows]
            rows.append((float(batch[rank]), float(seconds[rank])))
            del rows[:-self.history]
            overheads[rank], per_sample[rank] = self._costs(rank)
        self.last_model = (overheads, per_sample)
        return overheads, per_sample

    def propose(self, stats: WindowStats, current: Plan) -> Plan:
        overheads, per_sample = self.observe(stats)
        lower, upper = float(self.bounds.min_batch), float(self.bounds.upper(self.global_batch))
        targets = solve_monotone(
            lambda step_time: np.clip((step_time - overheads) / per_sample, lower, upper),
            self.global_batch,
        )
        proposal = Plan(tuple(round_to_total(targets, self.global_batch, self.bounds)))

        def predicted_step(plan: Plan) -> float:
            return float(np.max(overheads + per_sample * np.asarray(plan.batch_sizes)))

        if current.world_size == proposal.world_size and current.global_batch == self.global_batch:
            if predicted_step(proposal) * (1 + self.deadband) >= predicted_step(current):
                return current
        return proposal

    def state_dict(self) -> dict[str, Any]:
        return {"observations": [list(map(list, rows)) for rows in self._observations]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._observations = [[tuple(r) for r in rows] for rows in state.get("observations", [])]


POLICIES: dict[str, type[Policy]] = {
    StaticPolicy.name: StaticPolicy,
    ProportionalPolicy.name: ProportionalPolicy,
    CostModelPolicy.name: CostModelPolicy,
}


def make_policy(name: str, global_batch: int, bounds: Bounds = Bounds(), **options: Any) -> Policy:
    """Construct a registered policy by name; unknown names list the known ones."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise PlanError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None
    return cls(global_batch, bounds, **options)
