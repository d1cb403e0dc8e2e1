"""When to rebalance: every K steps, stretched so rebalancing stays cheap.

A rebalance is two small collectives plus the plan decision on rank 0: a few
milliseconds on a CPU cluster, more at thousands of ranks. Next to a 150 ms
compute-bound step that is noise, but where steps are short (an
allreduce-bound model, a fast GPU) a rebalance every 5 steps can cost more
than it could ever win back: measured on this project's 2-core machine, an
MLP with 7 ms steps ran 17% slower than plain Horovod with a rebalance every
5 steps. So with a ``budget`` the interval grows until the measured cost of a
rebalance is at most ``budget`` of the window's step time; ``min_steps`` is
still the shortest interval, which is what bounds the reaction time when
steps are long. Longer windows also average more steps, so a short-step
model's noise does not move the plan either.

``min_seconds`` sets the shortest interval in wall time as well. What a late
answer to a speed change can cost is time, not steps: the imbalance runs on
until the next rebalance, so rebalancing every T seconds bounds that loss by
T seconds of imbalance per change, however short the steps, and bounds
rebalancing's own overhead by cost / T. The budget alone is not enough where
steps are very short: measured on the same MLP (4-5 ms steps), a rebalance
that timed itself at 0.3-0.8 ms lengthened its step by 1.0-1.2 ms on average,
and with the interval the 2% budget gave, intra-epoch rebalancing cost 3-4%
over epoch-end rebalancing only (8 interleaved repeats).

The budget prices only what rebalancing costs, not what waiting costs
when speeds change often. So where the windows show imbalances (a window
whose slowest rank's step is more than ``loss_threshold`` above the ranks'
mean, as when a disturbance starts), the interval is also kept at most
``sqrt(cost / (rate * loss))`` seconds: the length that minimises the
rebalancing cost per second (``cost / T``) plus the expected loss of
answering a change late (``rate * loss * T``: a change is answered only
after the window that shows it, up to a whole interval), with ``rate`` the
imbalanced windows per second over the last ``change_memory`` seconds and
``loss`` their mean excess. With no such windows (equal or settled ranks)
the budget alone decides, as before. Measured on sleep-only devices under
the paper's disturbances (3 ranks sharing 2 cores, steps of 94-125 ms),
rebalances took 2-16 ms on the critical path and the budget stretched the
interval to 4-8 steps, so a disturbance that began an epoch ran that many
slow steps unanswered (once a whole epoch).

This module is pure arithmetic (no torch, no MPI): rank 0 decides the
interval from the gathered measurements and broadcasts it with the plan, so
every rank rebalances at the same step.
"""
from __future__ import annotations

import collections
import math
import statistics
from dataclasses import dataclass
from typing import Optional


def rebalance_due(window_steps: int, interval: Optional[int], steps_left_in_epoch: int) -> bool:
    """Whether a rebalance inside the epoch is due after this step.

    The epoch's last step always rebalances (the caller sees to that), so a
    window that comes due less than half an interval before the epoch ends
    runs on to the epoch end instead: one rebalance fewer, and no remnant
    window of a few steps whose noise could move the plan. No window grows
    beyond one and a half intervals, which bounds the reaction time.

    Measured on the allreduce-bound MLP (50 steps of about 6.6 ms per epoch,
    intervals of 19-52 steps, mostly 21-26, from the 0.15 s floor), in one
    job training both variants epoch by epoch in rotation (150 rounds, 2
    ranks): 1.93 rebalances per epoch instead of 2.55, the epoch 0.994 of
    the old rule's (median per round; 1.1% less time in total), 1.029 of
    plain Horovod's against 1.040, with plain Horovod against itself 0.990.
    Steps of 75 ms and more keep the interval of 2, where it changes nothing.

    ``steps_left_in_epoch`` counts the steps still to run after this one;
    ``interval`` None means rebalancing at epoch ends only.
    """
    if interval is None or window_steps < interval:
        return False
    return steps_left_in_epoch >= interval / 2


@dataclass
class RebalanceSchedule:
    """The number of steps between rebalances.

    Args:
        min_steps: the shortest interval (``rebalance_every``).
        budget: the largest fraction of training time rebalancing may take;
            ``None``: no cost-based stretching.
        cost_window: the cost of a rebalance is the median of the last
            this many measurements. One slow rebalance (a descheduled rank,
            an MPI collective held up by Horovod's background thread) must
            not stretch the interval: on sleep-only devices (3 ranks, 2
            cores, 94-280 ms steps) single rebalances took 10-20 ms among
            ones of 1-4 ms, and a running average (weight 0.5 on the newest)
            stretched the 2-step interval to 3-5 steps after each; the
            median, side by side on the disturbance scenario, took 15.64-
            15.87 s against 16.37-16.42 s (3 interleaved repeats; over
            every run of it then, 15.64-16.51 s in 5 runs against
            15.73-16.50 s in 11: rarer late answers, not none). On the
            CNN's disturbances (2 cores shared) 7 repeats could not tell
            them apart (paired ratios 0.45-0.69 against 0.50-0.71).
        min_seconds: the shortest interval in wall time (0: none); with
            neither this nor a budget, the interval stays at ``min_steps``.
        loss_threshold: a window whose slowest step exceeds the ranks' mean
            by more than this fraction counts as a speed change (module
            docstring); the default 0.25 leaves out the 10-20% that ranks
            sharing cores show from window to window.
        change_memory: the seconds of training over which changes are counted.
    """

    min_steps: int
    budget: float | None = None
    cost_window: int = 5
    min_seconds: float = 0.0
    loss_threshold: float = 0.25
    change_memory: float = 20.0

    def __post_init__(self) -> None:
        if self.min_steps < 1:
            raise ValueError(f"rebalance_every must be a positive number of steps, "
                             f"got {self.min_steps}")
        if self.budget is not None and not (0 < self.budget < 1):
            raise ValueError(f"rebalance_budget must be a fraction in (0, 1), got {self.budget} "
                             "(e.g. 0.02: rebalancing may take 2% of the training time)")
        if self.cost_window < 1:
            raise ValueError(f"cost_window must be a positive number of rebalances, "
                             f"got {self.cost_window}")
        if not (math.isfinite(self.min_seconds) and self.min_seconds >= 0):
            raise ValueError(f"rebalance_min_seconds must be a number of seconds >= 0, got "
                             f"{self.min_seconds} (e.g. 0.15: rebalance at most every 0.15 s; "
                             "0: no floor in wall time)")
        self.reset()

    def reset(self) -> None:
        """Back to ``min_steps``, with no cost or change measured yet."""
        self.interval = self.min_steps
        self._costs: collections.deque[float] = collections.deque(maxlen=self.cost_window)
        self._elapsed = 0.0  # seconds of training seen through update()
        self._changes: collections.deque[tuple[float, float]] = collections.deque()  # (end, loss)

    @property
    def cost(self) -> float | None:
        """The cost of a rebalance the interval is sized by (None until measured)."""
        return statistics.median(self._costs) if self._costs else None

    def update(self, rebalance_seconds: float | None, step_seconds: float | None,
               window_steps: int = 0, imbalance: float | None = None) -> int:
        """Record the last rebalance's cost and the window's step time; return the next interval.

        ``rebalance_seconds`` should be the cost on the critical path: the
        smallest duration over ranks (the rank that arrived last did not wait
        for the others, so its duration is the rebalance itself).
        ``window_steps`` and ``imbalance`` (the window's slowest compute per
        step over the ranks' mean, minus 1) feed the change rate.
        """
        if self.budget is None and not self.min_seconds:
            return self.interval
        if rebalance_seconds is not None and math.isfinite(rebalance_seconds) \
                and rebalance_seconds >= 0:
            self._costs.append(rebalance_seconds)
        if step_seconds is None or not step_seconds > 0 or not math.isfinite(step_seconds):
            return self.interval
        self._record_window(step_seconds * max(window_steps, 0), imbalance)
        floor = max(self.min_steps, math.ceil(self.min_seconds / step_seconds))
        cost = self.cost
        if self.budget is None or cost is None:
            self.interval = floor
            return self.interval
        by_budget = math.ceil(cost / (self.budget * step_seconds))
        by_changes = self.change_bound(cost)
        if by_changes is not None:
            by_budget = min(by_budget, math.ceil(by_changes / step_seconds))
        self.interval = max(floor, by_budget)
        return self.interval

    def _record_window(self, seconds: float, imbalance: float | None) -> None:
        if not math.isfinite(seconds):
            return
        self._elapsed += seconds
        if imbalance is not None and math.isfinite(imbalance) \
                and imbalance > self.loss_threshold:
            self._changes.append((self._elapsed, imbalance))
        while self._changes and self._changes[0][0] < self._elapsed - self.change_memory:
            self._changes.popleft()

    def change_bound(self, cost: float) -> float | None:
        """The interval in seconds that balances ``cost`` against late answers (None: no changes)."""
        if not self._changes or self._elapsed <= 0:
            return None
        span = min(self._elapsed, self.change_memory)
        rate = len(self._changes) / span
        loss = statistics.fmean(loss for _, loss in self._changes)
        return math.sqrt(cost / (rate * loss))
