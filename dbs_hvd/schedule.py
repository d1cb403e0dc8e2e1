"""When to rebalance: every K steps, stretched so rebalancing stays cheap.

A rebalance is two small collectives plus the plan decision on rank 0. Next
to a long compute-bound step that costs nothing worth counting, but where
steps are short (an allreduce-bound model, a fast GPU) a rebalance every few
steps can cost more than it ever wins back. So with a ``budget`` the interval
grows until the measured cost of a rebalance is at most ``budget`` of the
window's step time; ``min_steps`` stays the shortest interval, which bounds
the reaction time when steps are long. Longer windows also average more
steps, so a short-step model's noise does not move the plan either.

``min_seconds`` sets the shortest interval in wall time as well. What a late
answer to a speed change costs is time, not steps: the imbalance runs on
until the next rebalance, so rebalancing every T seconds bounds that loss by
T seconds of imbalance per change, however short the steps, and bounds
rebalancing's own overhead by cost / T. The budget alone is not enough where
steps are very short, because a rebalance also slows the step after it by
more than the time it measures on itself.

The budget prices only what rebalancing costs, not what waiting costs when
speeds change often. So where the windows show imbalances (a window whose
slowest rank's step is more than ``loss_threshold`` above the ranks' mean, as
when a disturbance starts), the interval is also kept at most
``sqrt(cost / (rate * loss))`` seconds: the length that minimises the
rebalancing cost per second (``cost / T``) plus the expected loss of
answering a change late (``rate * loss * T``: a change is answered only after
the window that shows it, up to a whole interval), with ``rate`` the
imbalanced windows per second over the last ``change_memory`` seconds and
``loss`` their mean excess. With no such windows (equal or settled ranks) the
budget alone decides. Without this bound, a budget that stretches the
interval to several steps leaves a disturbance that begins an epoch
unanswered for that many slow steps.

Once the plan has settled, the floor in seconds stretches too: after each
rebalance that kept the plan, with no imbalanced window within
``change_memory``, the floor doubles, up to ``settled_stretch`` times
``min_seconds``; a plan change or an imbalanced window brings it back at
once. Where ranks are equal or balanced, every rebalance costs its
collectives and wins nothing, and a short window is noisy enough on its own
to move the plan by a sample or two; a longer one costs less and averages
more. While an imbalanced window is remembered the floor stays at
``min_seconds``, so of a run of speed changes only the first, after a
settled stretch, is answered later, by at most the stretched floor.

The measurements behind these defaults are in docs/design.md ("The rebalance
schedule" and "Measurements behind the defaults").

This module is pure arithmetic (no torch, no MPI): rank 0 decides the
interval from the gathered measurements and broadcasts it with the plan, so
every rank rebalances at the same step.
"""

from __future__ import annotations

import collections
import math
import statistics
from dataclasses import dataclass


def rebalance_due(window_steps: int, interval: int | None, steps_left_in_epoch: int) -> bool:
    """Whether a rebalance is due after this step.

    Inside an epoch, a rebalance is due once the window holds ``interval``
    steps, unless that comes less than half an interval before the epoch
    ends: the window then runs on to the epoch's last step, so no remnant
    window of a few steps is left whose noise could move the plan. At the
    epoch's last step a rebalance is due unless the window is still shorter
    than half an interval: an epoch shorter than that (a small data set,
    steps short against the schedule's floor in seconds) carries its window
    into the next epoch, so that windows keep the length the schedule chose,
    and the cost of a rebalance stays within its budget however short the
    epochs. No window grows beyond one and a half intervals, which bounds the
    reaction time. Where steps are long enough that the interval stays at
    its minimum of a few steps, this changes nothing.

    Args:
        window_steps: steps run since the last rebalance, this one included.
        interval: the steps between rebalances; ``None`` means rebalancing
            at every epoch end and nowhere else.
        steps_left_in_epoch: the steps of the epoch still to run after this
            one (0 at the epoch's last step).

    Returns:
        True if the caller should rebalance after this step.

    Examples:
        >>> rebalance_due(window_steps=4, interval=4, steps_left_in_epoch=10)
        True
        >>> rebalance_due(window_steps=4, interval=4, steps_left_in_epoch=1)
        False
        >>> rebalance_due(window_steps=4, interval=None, steps_left_in_epoch=10)
        False
        >>> rebalance_due(window_steps=3, interval=None, steps_left_in_epoch=0)
        True
        >>> rebalance_due(window_steps=22, interval=146, steps_left_in_epoch=0)
        False
    """
    if steps_left_in_epoch <= 0:
        return interval is None or window_steps >= interval / 2
    if interval is None or window_steps < interval:
        return False
    return steps_left_in_epoch >= interval / 2


@dataclass
class RebalanceSchedule:
    """The number of steps between rebalances, decided on rank 0.

    Rank 0 calls ``update`` after each rebalance with the cost the ranks
    measured and the window's step time, and broadcasts the interval it
    returns with the plan.

    Args:
        min_steps: the shortest interval (``rebalance_every``).
        budget: the largest fraction of training time rebalancing may take;
            ``None``: no cost-based stretching.
        cost_window: the cost of a rebalance is the median of the last
            this many measurements. A median, so one slow rebalance (a
            descheduled rank, an MPI collective held up by Horovod's
            background thread) does not stretch the interval for several
            steps, as a running average does.
        min_seconds: the shortest interval in wall time (0: none); with
            neither this nor a budget, the interval stays at ``min_steps``.
        loss_threshold: a window whose slowest step exceeds the ranks' mean
            by more than this fraction counts as a speed change (module
            docstring); the default 0.25 sits above the window-to-window
            variation of ranks that share cores, so that variation does not
            count as a change.
        change_memory: the seconds of training over which changes are counted.
        settled_stretch: the largest factor by which the floor in seconds
            stretches while the plan stays settled (module docstring); 1
            keeps it at ``min_seconds``.

    Raises:
        ValueError: for a non-positive ``min_steps`` or ``cost_window``, a
            ``budget`` outside (0, 1), or a negative or non-finite
            ``min_seconds``.

    Examples:
        >>> schedule = RebalanceSchedule(min_steps=2, budget=0.02)
        >>> schedule.update(rebalance_seconds=0.004, step_seconds=0.01, window_steps=2)
        20
        >>> schedule.cost
        0.004
    """

    min_steps: int
    budget: float | None = None
    cost_window: int = 5
    min_seconds: float = 0.0
    loss_threshold: float = 0.25
    change_memory: float = 20.0
    settled_stretch: float = 4.0

    def __post_init__(self) -> None:
        if self.min_steps < 1:
            raise ValueError(f"rebalance_every must be a positive number of steps, got {self.min_steps}")
        if self.budget is not None and not (0 < self.budget < 1):
            raise ValueError(
                f"rebalance_budget must be a fraction in (0, 1), got {self.budget} "
                "(e.g. 0.02: rebalancing may take 2% of the training time)"
            )
        if not (math.isfinite(self.settled_stretch) and self.settled_stretch >= 1):
            raise ValueError(
                f"settled_stretch must be a factor >= 1, got {self.settled_stretch} "
                "(e.g. 4: a settled plan is checked at most every 4 x min_seconds; 1: never stretched)"
            )
        if self.cost_window < 1:
            raise ValueError(f"cost_window must be a positive number of rebalances, got {self.cost_window}")
        if not (math.isfinite(self.min_seconds) and self.min_seconds >= 0):
            raise ValueError(
                f"rebalance_min_seconds must be a number of seconds >= 0, got "
                f"{self.min_seconds} (e.g. 0.15: rebalance at most every 0.15 s; "
                "0: no floor in wall time)"
            )
        self.reset()

    def reset(self) -> None:
        """Back to ``min_steps``, with no cost or change measured yet."""
        self.interval = self.min_steps
        self._costs: collections.deque[float] = collections.deque(maxlen=self.cost_window)
        self._elapsed = 0.0  # seconds of training seen through update()
        self._changes: collections.deque[tuple[float, float]] = collections.deque()  # (end, loss)
        self.stretch = 1.0  # the floor in seconds over min_seconds: > 1 while the plan is settled

    @property
    def cost(self) -> float | None:
        """The cost of a rebalance the interval is sized by (None until measured)."""
        return statistics.median(self._costs) if self._costs else None

    def update(
        self,
        rebalance_seconds: float | None,
        step_seconds: float | None,
        window_steps: int = 0,
        imbalance: float | None = None,
        moved: bool = True,
    ) -> int:
        """Record the last rebalance's cost and the window's step time; return the next interval.

        Args:
            rebalance_seconds: the cost on the critical path: the smallest
                duration over ranks (the rank that arrived last did not wait
                for the others, so its duration is the rebalance itself);
                ``None`` when not every rank measured one.
            step_seconds: the window's synchronous step time; ``None`` or a
                non-positive value leaves the interval as it is.
            window_steps: the steps of the window, for the training time
                over which changes are counted.
            imbalance: the window's slowest compute per step over the ranks'
                mean, minus 1; it feeds the change rate.
            moved: whether the rebalance changed the plan; the floor in
                seconds stretches only after rebalances that did not.

        Returns:
            The steps until the next rebalance, at least ``min_steps``.
        """
        if self.budget is None and not self.min_seconds:
            return self.interval
        if rebalance_seconds is not None and math.isfinite(rebalance_seconds) and rebalance_seconds >= 0:
            self._costs.append(rebalance_seconds)
        if step_seconds is None or not step_seconds > 0 or not math.isfinite(step_seconds):
            return self.interval
        self._record_window(step_seconds * max(window_steps, 0), imbalance)
        if moved or self._changes:
            self.stretch = 1.0
        else:
            self.stretch = min(2.0 * self.stretch, self.settled_stretch)
        floor = max(self.min_steps, math.ceil(self.stretch * self.min_seconds / step_seconds))
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
        if imbalance is not None and math.isfinite(imbalance) and imbalance > self.loss_threshold:
            self._changes.append((self._elapsed, imbalance))
        while self._changes and self._changes[0][0] < self._elapsed - self.change_memory:
            self._changes.popleft()

    def change_bound(self, cost: float) -> float | None:
        """The interval in seconds that balances ``cost`` against late answers.

        Args:
            cost: the seconds one rebalance costs.

        Returns:
            ``sqrt(cost / (rate * loss))``, or ``None`` when no speed change
            was seen within ``change_memory`` seconds.
        """
        if not self._changes or self._elapsed <= 0:
            return None
        span = min(self._elapsed, self.change_memory)
        rate = len(self._changes) / span
        loss = statistics.fmean(loss for _, loss in self._changes)
        return math.sqrt(cost / (rate * loss))
