"""The policies, under the names dbs-train's ``--policy`` gives them, and their registry.

* ``StaticPolicy`` (``static``): never moves the plan.
* ``PaperPolicy`` (``paper``): the DBS paper's rule, shares in
  proportion to the last window's speeds.
* ``DbsPolicy`` (``dbs``, the default): below.

``make_policy`` builds one by name (``POLICIES``), on the grid of
``GridPolicy`` (grid.py) for ``batch_multiple`` > 1. dbs-train's fourth
choice, ``horovod``, is no policy: it trains with Horovod's own
DistributedSampler and optimizer and no DBS at all. The interface they share
(``Policy``) and the arithmetic (``apportion``, ``equalise_step_times``) are
in plan.py.

``DbsPolicy`` ("dbs", our default) differs from the paper's rule in these ways:

* **Smoothing.** Each rank's step times are kept over recent windows and
  weighted by age (exponential decay), so one noisy window does not move the plan.
* **A deadband.** A new plan is adopted only when it is predicted to shorten
  the step by more than twice the measured noise, within [1%, 3%]:
  measurement noise does not make batch sizes oscillate, and steady devices
  are not held on near-miss plans. ``max_deadband`` raises the ceiling; a
  wider ceiling did not do better where ranks share cores (docs/design.md),
  so 3% stays the default.
* **A trust region.** No rank's batch changes by more than a factor
  ``max_change`` (3) per rebalance. A wrong estimate (one noisy window, a fit from
  too little data) can cost a little speed, never a swing from 1 sample to
  the whole batch and back. A rank whose speed visibly changed (see below)
  is measured afresh and may move up to ``surprise_change`` (5) fold, and so
  may every rank at the first move from the starting plan: no estimate
  came before the first window's, and a region that allows less leaves a
  4x slower rank short of its share for several windows.
* **Fixed per-step costs, when they can be measured.** A step of ``b``
  samples is modelled as ``a_i + c_i * b``. The overhead ``a_i`` can only be
  told apart from the per-sample cost ``c_i`` when the rank's recent batch
  sizes differ enough (``min_spread``); until then ``a_i = 0`` and the policy
  splits by smoothed speed, like the paper's rule. Splitting by speed alone
  overshoots when small batches are slower per sample; equalising predicted
  step times does not. The sizes are rounded for the same goal: each sample
  left after flooring goes where the predicted step after it is shortest
  (``equalise_step_times`` in plan.py).
* **Steps that vary.** Each step waits for that step's slowest rank, so a
  rank whose compute varies from step to step (a CPU quota's bursts, a noisy
  neighbour) holds the others up more than its mean says. Each rank's spread
  from step to step is measured too, and a varying rank's mean is held below
  the others' (``slowest.slack``) where that shortens the *expected* slowest
  step: by more the dearer its samples are against the others'. Ranks of
  equal speed and spread stay equal.

* **A warm-up.** The first steps of a process are slow in ways that say
  nothing about the device: lazy initialisation, allocator growth, kernel
  selection for each new input shape. Between equal ranks those first steps
  differ by more than the deadband, and a policy that believed them would
  move to an unequal plan and hold it. So during the first ``warmup_steps``
  steps a change must be predicted to gain ``warmup_deadband`` (15%): a 4x
  slower rank is answered at once, warm-up jitter is not. If the plan never
  moved during warm-up, what it measured is only warm-up and is forgotten
  when it ends. If a large imbalance moved it, those windows are kept: they
  hold the spread of batch sizes the overhead fit needs (without them the
  plan stays near the speed split, which overshoots where small batches are
  slower per sample).

* **Checked changes.** The model assumes a rank's speed does not depend on
  the others' load; where ranks share cores that is false. So each change is
  judged by the *measured* step time (compute + wait per step) of the
  next window: a change that made the step slower by more than the deadband
  is reverted, and the plan is then held for a few windows unless a rank's
  speed really changes. An answer to a device change (a rank's window off
  the model by more than twice ``surprise``) is not judged so: the window
  that showed the change is its only baseline, and a speed change in the
  middle of it makes that baseline too fast.

And it reacts fast: a window whose step time departs from the prediction by
more than ``surprise`` replaces that rank's history at once (the old windows
describe a device that is gone),
and with rebalancing every K steps (dbs-train's default for this policy) a
disturbance is answered within the epoch instead of one epoch late.

The measurements behind these defaults are in docs/design.md ("The ``dbs``
policy" and "Measurements behind the defaults").
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np

from .grid import GridPolicy, unit_bounds
from .plan import (
    Bounds,
    Plan,
    PlanError,
    Policy,
    WindowStats,
    apportion,
    equalise_step_times,
)
from .slowest import expected_slowest, slack


class StaticPolicy(Policy):
    """Never changes the plan, whatever the measurements say.

    From the equal split this is plain Horovod's split with the DBS machinery
    around it; from a plan given at the start (``dbs-train --plan``) it keeps
    that plan, e.g. for devices whose relative speeds are known.
    """

    name = "static"

    def propose(self, stats: WindowStats, current: Plan) -> Plan:
        return current


class PaperPolicy(Policy):
    """The DBS paper's rule: each rank's share proportional to its speed in the last window.

    Speed is samples per compute second. With no smoothing the plan follows
    every fluctuation, and with the default window of one epoch it reacts one
    epoch late; the bounds are ours (the paper can drive a batch to 0).
    """

    name = "paper"

    def propose(self, stats: WindowStats, current: Plan) -> Plan:
        return Plan(tuple(apportion(stats.speeds(), self.global_batch, self.bounds)))


def fit_step_costs(
    batch: np.ndarray, seconds: np.ndarray, weights: np.ndarray, min_spread: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-rank weighted least squares ``seconds ~ a + c * batch``, vectorised over ranks.

    A rank gets an overhead only when the relative spread of its batch sizes
    is at least ``min_spread`` and the fit is physical (``a >= 0``, ``c > 0``,
    ``a`` below 0.9 of the mean step time); otherwise ``a = 0`` and ``c`` is
    the weighted seconds per sample, the fit through the origin.

    Args:
        batch: mean batch size per step, one row per window and one column
            per rank.
        seconds: compute seconds per step, shaped like ``batch``.
        weights: one non-negative weight per window (row).
        min_spread: the smallest relative standard deviation of a rank's
            batch sizes for which its overhead is fitted.

    Returns:
        ``(overhead, per_sample)``: seconds per step and seconds per sample,
        one entry per rank.

    Examples:
        >>> import numpy as np
        >>> batch = np.array([[10.0], [30.0]])
        >>> overhead, per_sample = fit_step_costs(batch, 0.002 + 0.001 * batch,
        ...                                       np.ones(2), min_spread=0.25)
        >>> [round(float(overhead[0]), 6), round(float(per_sample[0]), 6)]
        [0.002, 0.001]
    """
    w = (weights / weights.sum())[:, None]
    mean_b = (w * batch).sum(0)
    mean_t = (w * seconds).sum(0)
    var_b = (w * (batch - mean_b) ** 2).sum(0)
    cov = (w * (batch - mean_b) * (seconds - mean_t)).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(var_b > 0, cov / var_b, 0.0)
    overhead = mean_t - slope * mean_b
    spread_ok = np.sqrt(var_b) >= min_spread * mean_b
    physical = (slope > 0) & (overhead >= 0) & (overhead < 0.9 * mean_t)
    use_fit = spread_ok & physical
    through_origin = (w * batch * seconds).sum(0) / (w * batch * batch).sum(0)
    return np.where(use_fit, overhead, 0.0), np.where(use_fit, slope, through_origin)


def _median(values: np.ndarray) -> float:
    """``np.median`` of a 1-d array, equal to it, without its generic machinery.

    Planning runs on rank 0 while every rank waits, and on a few ranks
    ``np.median``'s generic overhead is a noticeable part of a plan's time.
    """
    n, k = len(values), len(values) // 2
    if n % 2:
        return float(np.partition(values, k)[k])
    ordered = np.partition(values, (k - 1, k))
    return float((ordered[k - 1] + ordered[k]) / 2)


class DbsPolicy(Policy):
    """Equalise predicted step times, smoothed, with a deadband and a trust region.

    The ``dbs`` policy of dbs-train (module notes above, and docs/design.md).
    Every plan it returns sums to ``global_batch`` and respects ``bounds``.

    Args:
        global_batch: the global batch B the plans split.
        bounds: per-rank limits on the local batch.
        decay: the weight of a window relative to the next newer one, in (0, 1].
        deadband: the largest predicted gain a new plan must beat, and the
            slowdown past which a change is reverted.
        surprise: the relative misfit to the model past which a rank's
            history is replaced by its newest window.
        history: the windows kept per rank.
        max_change: the trust region, the largest factor by which a rank's
            batch may change in one rebalance.
        min_spread: the relative spread of batch sizes a rank needs before
            its per-step overhead is fitted.
        min_deadband: the floor of the adoption band (default: 1%, or
            ``deadband`` if that is smaller).
        max_deadband: the ceiling of the adoption band (default: ``deadband``).
        surprise_change: the trust region of a rank whose speed visibly
            changed, and of every rank on the first window of a history
            (default: 5, or ``max_change`` if that is larger).
        warmup_steps: the steps during which ``warmup_deadband`` applies.
        warmup_deadband: the predicted gain a change must beat during warm-up.
        spread_aware: plan for the expected slowest step, from each rank's
            spread of compute from step to step (``slowest.slack``); False
            equalises the mean steps alone.
        spread_steps: the steps, weighted by age, over which a rank's spread
            must be measured before it counts (``spread``).

    Raises:
        PlanError: for parameters out of range (each message names the
            parameter and the range).

    Examples:
        >>> import numpy as np
        >>> policy = DbsPolicy(global_batch=64)
        >>> stats = WindowStats(samples=np.array([320.0, 320.0]),
        ...                     compute_seconds=np.array([1.0, 4.0]),
        ...                     steps=np.array([10.0, 10.0]))
        >>> policy.next_plan(stats, Plan((32, 32))).batch_sizes
        (52, 12)
    """

    name = "dbs"

    # The learnt state, set by _forget() and the methods that learn.
    _batch: np.ndarray
    _seconds: np.ndarray
    _variance: np.ndarray
    _steps: np.ndarray
    _noise: float | None
    _trial: tuple[Plan, float] | None
    _misfit: np.ndarray
    _hold: int
    _model_is_current: bool

    def __init__(
        self,
        global_batch: int,
        bounds: Bounds = Bounds(),
        decay: float = 0.5,
        deadband: float = 0.03,
        surprise: float = 0.25,
        history: int = 6,
        max_change: float = 3.0,
        min_spread: float = 0.25,
        min_deadband: float | None = None,
        max_deadband: float | None = None,
        surprise_change: float | None = None,
        warmup_steps: int = 10,
        warmup_deadband: float = 0.15,
        spread_aware: bool = True,
        spread_steps: float = 8.0,
    ) -> None:
        super().__init__(global_batch, bounds)
        if not 0 < decay <= 1:
            raise PlanError(f"decay must be in (0, 1], got {decay}")
        # Defaults: the band follows the noise down to 1%; a visibly changed rank moves 5x.
        min_deadband = min(0.01, deadband) if min_deadband is None else min_deadband
        max_deadband = deadband if max_deadband is None else max_deadband
        surprise_change = max(5.0, max_change) if surprise_change is None else surprise_change
        if surprise_change < max_change:
            raise PlanError(f"surprise_change ({surprise_change}) must be at least max_change ({max_change})")
        if not 0 <= min_deadband <= deadband:
            raise PlanError(f"need 0 <= min_deadband <= deadband, got {min_deadband} and {deadband}")
        if max_deadband < deadband:
            raise PlanError(
                f"max_deadband (--max-deadband) is the ceiling of a band that "
                f"starts at the deadband {deadband}: give at least {deadband}, "
                f"got {max_deadband}"
            )
        if deadband < 0 or surprise <= 0 or history < 1 or max_change <= 1 or min_spread <= 0:
            raise PlanError(
                "need deadband >= 0, surprise > 0, history >= 1, max_change > 1 and min_spread > 0"
            )
        if warmup_steps < 0:
            raise PlanError(
                f"warmup_steps must be a number of steps >= 0, got {warmup_steps} "
                "(e.g. 10: the first 10 steps move the plan only for a 15% gain; "
                "0: no warm-up)"
            )
        if not spread_steps >= 0:
            raise PlanError(
                f"spread_steps (--spread-steps) must be a number of steps >= 0, got "
                f"{spread_steps} (e.g. 8: a rank's spread counts once measured over 8 "
                "age-weighted steps)"
            )
        if warmup_deadband < deadband:
            raise PlanError(f"warmup_deadband ({warmup_deadband}) must be at least the deadband ({deadband})")
        self.decay, self.deadband, self.surprise = decay, deadband, surprise
        self.history, self.max_change, self.min_spread = history, max_change, min_spread
        self.min_deadband, self.max_deadband = min_deadband, max_deadband
        self.surprise_change = surprise_change
        self.warmup_steps, self.warmup_deadband = warmup_steps, warmup_deadband
        self.spread_aware, self.spread_steps = spread_aware, spread_steps
        self._steps_seen = 0  # by this policy object: a resumed process warms up again
        self._moved_in_warmup = False
        self.last_model: tuple[np.ndarray, np.ndarray] | None = None
        self.hold_after_revert = 4  # windows without changes after a reverted one
        self._forget()

    def _age_weights(self, windows: int) -> np.ndarray:
        """The weight of each of ``windows`` windows, oldest first: ``decay`` per window of age."""
        return self.decay ** np.arange(windows)[::-1]

    def _fit(self) -> tuple[np.ndarray, np.ndarray]:
        return fit_step_costs(
            self._batch, self._seconds, self._age_weights(len(self._batch)), self.min_spread
        )

    def spread(self) -> np.ndarray:
        """Each rank's step-to-step standard deviation of compute, over the windows held.

        The windows' variances are averaged with the fit's age weights, each
        window counting by its steps. A spread measured over fewer than
        ``spread_steps`` such weighted steps is too uncertain to plan by
        (over many ranks, the few that look most varying by chance would be
        given slack they do not need), and so is one never measured (windows
        of single steps, stats without squares): such a rank counts as steady.
        """
        if not len(self._variance):
            return np.zeros(self._batch.shape[1] if self._batch.ndim == 2 else 0)
        measured = np.isfinite(self._variance)
        weights = self._age_weights(len(self._variance))[:, None] * measured * self._steps
        total = weights.sum(0)
        pooled = (weights * np.nan_to_num(self._variance)).sum(0) / np.where(total > 0, total, 1.0)
        return np.where(total >= self.spread_steps, np.sqrt(pooled), 0.0)

    def observe(self, stats: WindowStats) -> tuple[np.ndarray, np.ndarray]:
        """Add the window to the history and return the fitted (overhead, per-sample) per rank."""
        batch = stats.samples / stats.steps
        seconds = stats.compute_seconds / stats.steps
        spread = stats.compute_spread()
        variance = np.full(stats.world_size, np.nan) if spread is None else spread**2
        self._misfit = np.zeros(stats.world_size)
        if self._batch.shape[1:] != (stats.world_size,):
            self._batch = np.empty((0, stats.world_size))
            self._seconds = np.empty((0, stats.world_size))
            self._variance = np.empty((0, stats.world_size))
            self._steps = np.empty((0, stats.world_size))
        if len(self._batch):
            # The model the last window left, unless the history was replaced since.
            overhead, per_sample = (
                cast("tuple[np.ndarray, np.ndarray]", self.last_model)
                if self._model_is_current
                else self._fit()
            )
            predicted = overhead + per_sample * batch
            # A rank that changed speed forgets its older windows: they describe
            # another device. Its next windows, at the batch sizes the new plan
            # gives it, rebuild the fit (rescaling the old ones instead would
            # keep an outdated curve shape and hide the overhead for good).
            self._misfit = np.abs(seconds - predicted) / predicted
            self._explain_by_overhead(batch, seconds)
            changed = self._changed
            if (~changed).any():
                level = _median(self._misfit[~changed])
                self._noise = level if self._noise is None else 0.5 * (self._noise + level)
            self._batch[:, changed] = batch[changed]
            self._seconds[:, changed] = seconds[changed]
            # The window that showed a change of speed holds steps from before
            # and after it: its spread says nothing of the device's steps now.
            variance[changed] = np.nan
            self._variance[:, changed] = np.nan
            self._steps[:, changed] = stats.steps[changed]
        self._batch = np.vstack([self._batch, batch])[-self.history :]
        self._seconds = np.vstack([self._seconds, seconds])[-self.history :]
        self._variance = np.vstack([self._variance, variance])[-self.history :]
        self._steps = np.vstack([self._steps, stats.steps])[-self.history :]
        self.last_model = self._fit()
        self._model_is_current = True
        return self.last_model

    def _explain_by_overhead(self, batch: np.ndarray, seconds: np.ndarray) -> None:
        """Clear the surprise of ranks whose window a fixed per-step cost explains.

        A model without an overhead (too little spread of batch sizes so far)
        predicts that a rank given half the samples takes half the time; where
        much of its step is fixed, the next window misses that prediction by
        far, though nothing about the device changed. Read as a change, the
        rank's history would be replaced by that one window, and the overhead
        never fitted. So a surprised rank is refitted with the new window
        added: where that fit finds an overhead (physical, on enough spread)
        and predicts the window within ``surprise``, its misfit is the one to
        the refitted model. A change of speed seldom fits such a line: a rank
        that slowed at the same batch size, or took longer with fewer samples,
        gives no positive slope, and one that sped up with more samples none
        either.
        """
        surprised = np.flatnonzero(self._misfit > self.surprise)
        if not len(surprised):
            return
        overhead, per_sample = fit_step_costs(
            np.vstack([self._batch[:, surprised], batch[surprised]]),
            np.vstack([self._seconds[:, surprised], seconds[surprised]]),
            self._age_weights(len(self._batch) + 1),
            self.min_spread,
        )
        predicted = overhead + per_sample * batch[surprised]
        misfit = np.abs(seconds[surprised] - predicted) / predicted
        explained = (overhead > 0) & (misfit <= self.surprise)
        self._misfit[surprised[explained]] = misfit[explained]

    @property
    def _changed(self) -> np.ndarray:
        """Ranks whose last window missed the model by more than ``surprise``."""
        return self._misfit > self.surprise

    @property
    def _device_changed(self) -> np.ndarray:
        """Ranks that missed the model by more than twice ``surprise``: a device change.

        Misfits between ``surprise`` and twice it come and go with the load
        of ranks that share cores, so they do not count as one.
        """
        return self._misfit > 2.0 * self.surprise

    def set_bounds(self, bounds: Bounds) -> None:
        """New bounds; the last change is no longer judged (its plan may not meet them)."""
        super().set_bounds(bounds)
        self._trial = None

    def _change_did_not_pay(self, stats: WindowStats, current: Plan) -> Plan | None:
        """The plan before the last change, if that change made the measured step slower.

        The cost model assumes a rank's speed does not depend on the others'
        load. Where ranks share cores that is false, and a change the model
        predicts to help can make the real step slower; measuring the step
        before and after the change catches that.
        """
        wall = stats.step_wall_seconds()
        trial, self._trial = self._trial, None
        if wall is None or trial is None:
            return None
        before_plan, before_wall = trial
        if current == before_plan or wall <= before_wall * (1 + self.deadband):
            return None
        # A plan change that moved batches by a fraction ``moved`` can slow a
        # rank by about that much (more work, or more load on shared cores);
        # a rank that missed the model by far more than that was slowed by
        # something else (a disturbance starting at the same moment). Then the
        # step before the change describes other devices, and going back to its
        # plan would be wrong: plan afresh from the new measurements instead.
        before = np.asarray(before_plan.batch_sizes, float)
        moved = float(np.max(np.abs(np.asarray(current.batch_sizes) - before) / before))
        if np.any(self._misfit > self.surprise + 2 * moved):
            return None
        return before_plan

    @property
    def warming_up(self) -> bool:
        """True while every window seen so far ended within the first ``warmup_steps`` steps."""
        return self._steps_seen <= self.warmup_steps

    def _forget(self) -> None:
        """Start the learnt state afresh: windows, noise level, pending trial, hold."""
        # Rows of windows (oldest first), one column per rank: mean batch, seconds per step.
        self._batch = np.empty((0, 0))
        self._seconds = np.empty((0, 0))
        self._variance = np.empty((0, 0))  # each window's per-step variance of compute
        self._steps = np.empty((0, 0))  # each window's steps
        # Smoothed relative misfit of a window's step time to the model: the noise level.
        self._noise = None
        # The plan and measured step time before the last change, until judged.
        self._trial = None
        self._misfit = np.zeros(0)  # each rank's last window against the model, relative
        self._hold = 0
        self._model_is_current = False  # last_model was fitted to the windows held now

    def propose(self, stats: WindowStats, current: Plan) -> Plan:
        was_warming = self.warming_up
        self._steps_seen += int(stats.steps.max())
        if was_warming and not self.warming_up and not self._moved_in_warmup:
            self._forget()
        first = not len(self._batch)  # no window before this one to check it by
        overhead, per_sample = self.observe(stats)
        revert = self._change_did_not_pay(stats, current)
        if revert is not None:
            self._hold = self.hold_after_revert
            return revert
        if self._hold > 0 and not self._changed.any():
            self._hold -= 1
            return current
        sizes = np.asarray(current.batch_sizes, dtype=float)
        # The trust region guards against a bad estimate; a rank whose speed
        # visibly changed (its window missed the model by more than ``surprise``)
        # is measured afresh, and may move further in one go; so may every
        # rank on the first window of a history, the first estimate there is.
        reach = np.where(self._changed | first, self.surprise_change, self.max_change)
        lower = np.maximum(np.floor(sizes / reach), self.bounds.min_batch)
        upper = np.minimum(np.ceil(sizes * reach), self.bounds.uppers(self.global_batch, len(sizes)))
        # Equal predicted step times: b_i = (t - overhead_i) / per_sample_i.
        equal = Plan(
            tuple(equalise_step_times(overhead, per_sample, self.global_batch, self.bounds, lower, upper))
        )
        # Without spread_aware, every rank counts as steady: the step is the slowest mean.
        spread = self.spread() if self.spread_aware else np.zeros(len(sizes))

        predicted: dict[Plan, float] = {}  # each plan's expected step, integrated once

        def predicted_step(plan: Plan) -> float:
            if plan not in predicted:
                predicted[plan] = expected_slowest(
                    overhead + per_sample * np.asarray(plan.batch_sizes), spread
                )
            return predicted[plan]

        def gain(plan: Plan, than: Plan) -> float:
            """The predicted relative shortening of the step from ``than`` to ``plan``."""
            return predicted_step(than) / predicted_step(plan) - 1.0

        band = max(self.adoption_deadband(), self.warmup_deadband if self.warming_up else 0.0)
        # Each step waits for that step's slowest rank: where ranks' steps vary,
        # slack on the varying ranks shortens the expected step. Like any
        # change, it is taken only where it is predicted to gain more than the
        # band: ranks that vary alike gain little from it, and would otherwise
        # follow the noise of their spreads from window to window.
        proposal = equal
        if (spread > 0).any():
            slacked = Plan(
                tuple(
                    equalise_step_times(
                        overhead + slack(per_sample, spread),
                        per_sample,
                        self.global_batch,
                        self.bounds,
                        lower,
                        upper,
                    )
                )
            )
            if gain(slacked, equal) > band:
                proposal = slacked
        if gain(proposal, current) <= band:
            return current
        wall = stats.step_wall_seconds()
        # An answer to a device change is not checked: the window that showed
        # the change may have been partly measured before it, so its step time
        # is no baseline. Checked against it, the answer to a large step
        # change can look slower, be reverted to the equal split and held,
        # leaving the slowed rank on an equal share for an epoch. Smaller
        # surprises are still checked: where ranks share cores, misfits of
        # that size come and go with the others' load, and answering them
        # unchecked churns the plan.
        if wall is not None and not self._device_changed.any():
            self._trial = (current, wall)
        self._moved_in_warmup |= self.warming_up
        return proposal

    def adoption_deadband(self) -> float:
        """The predicted gain a new plan must beat: twice the measured noise, within bounds.

        A fixed band must be wide enough for the noisiest setting, and then
        holds near-miss plans where measurements are steady (the scale
        simulation shows the difference, docs/design.md). Below 1% it would
        start chasing the interference of ranks that share cores, which the
        misfit understates. Reverting a change that made the measured step
        slower keeps the full ``deadband``. ``min_deadband=deadband`` fixes
        the band; ``max_deadband`` above ``deadband`` lets it follow noisier
        windows up.

        Returns:
            The relative gain, ``deadband`` until the noise is measured.
        """
        if self._noise is None:
            return self.deadband
        return float(np.clip(2.0 * self._noise, self.min_deadband, self.max_deadband))

    def diagnostics(self) -> dict[str, Any]:
        """The measured noise, the band it set, the fit and each rank's misfit.

        Where a plan wanders (equal ranks on shared cores), these say why: a
        rank whose window missed the model by more than ``surprise`` was
        measured afresh, and a fitted overhead of 0 means the split followed
        seconds per sample (the fit needs a spread of batch sizes).
        """
        overhead, per_sample = self.last_model if self.last_model is not None else ((), ())
        return {
            "noise": None if self._noise is None else float(self._noise),
            "band": self.adoption_deadband(),
            "warming_up": self.warming_up,
            "hold": int(self._hold),
            "misfit": [float(m) for m in self._misfit],
            "overhead_seconds": [float(a) for a in overhead],
            "per_sample_seconds": [float(c) for c in per_sample],
            "spread_seconds": [float(s) for s in self.spread()],
        }

    def state_dict(self) -> dict[str, Any]:
        """The windows held (mean batch and seconds per step, per rank), for a checkpoint."""
        return {
            "batch": self._batch.tolist(),
            "seconds": self._seconds.tolist(),
            # nan (unmeasured) written as None: JSON has no nan
            "variance": [[None if np.isnan(v) else float(v) for v in row] for row in self._variance],
            "steps": self._steps.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._batch = np.array(state["batch"], dtype=float)
        self._seconds = np.array(state["seconds"], dtype=float)
        # A state saved without variances holds none: every rank counts as steady.
        variance = state.get("variance", np.full(self._batch.shape, np.nan).tolist())
        self._variance = np.array(variance, dtype=float).reshape(self._batch.shape)
        self._steps = np.array(state.get("steps", np.ones(self._batch.shape).tolist()), dtype=float).reshape(
            self._batch.shape
        )
        self._model_is_current = False


POLICIES: dict[str, type[Policy]] = {
    StaticPolicy.name: StaticPolicy,
    PaperPolicy.name: PaperPolicy,
    DbsPolicy.name: DbsPolicy,
}


def make_policy(
    name: str, global_batch: int, bounds: Bounds = Bounds(), batch_multiple: int = 1, **options: Any
) -> Policy:
    """Construct a registered policy by name.

    Args:
        name: a key of ``POLICIES``: ``"static"``, ``"paper"`` or ``"dbs"``.
        global_batch: the global batch B the plans split.
        bounds: per-rank limits on the local batch.
        batch_multiple: M > 1 keeps every batch a multiple of M samples
            (``GridPolicy``).
        **options: passed to the policy's constructor.

    Returns:
        The policy, wrapped in a ``GridPolicy`` when ``batch_multiple`` > 1.

    Raises:
        PlanError: for an unknown name (the message lists the known ones) or
            a ``batch_multiple`` that does not fit the batch and bounds.

    Examples:
        >>> make_policy("paper", 128).initial_plan(3).batch_sizes
        (43, 43, 42)
        >>> make_policy("dbs", 128, batch_multiple=8).initial_plan(3).batch_sizes
        (48, 40, 40)
    """
    try:
        cls = POLICIES[name]
    except KeyError:
        raise PlanError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None
    if batch_multiple == 1:
        return cls(global_batch, bounds, **options)
    units = unit_bounds(global_batch, batch_multiple, bounds)
    return GridPolicy(
        cls(global_batch // batch_multiple, units, **options), batch_multiple, global_batch, bounds
    )
