"""One rebalance: measure, exchange, plan on rank 0, broadcast, apply.

This is the loop of docs/design.md in one place: timing -> comm (allgather) ->
plan (rank 0, then broadcast) -> sampler. It is triggered by the optimizer
wrapper at epoch ends and, optionally, every K steps (``schedule.rebalance_due``),
which all ranks reach at the same step because they run the same number of steps.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

from .comm import Exchange, decide_on_root
from .plan import Plan, Policy, WindowStats
from .sampler import DynamicBatchSampler
from .schedule import RebalanceSchedule
from .timing import StepTimer, WindowTotals


@dataclass
class RankWindow(WindowTotals):
    """One rank's window as the ranks exchange it: its totals and what the rebalance needs.

    The same record goes from the timer (``WindowTotals``) through the
    exchange to the policy (``WindowStats.from_windows``) and into the
    rebalance log (one flat JSON object per rank).
    """

    steps_generated: int = 0  # the sampler's steps handed out: the new plan starts after the most
    rebalance_seconds: float | None = None  # this rank's previous rebalance (None: none yet)


@dataclass
class RebalanceRecord:
    """What one rebalance saw and decided; kept for logs and plots."""

    epoch: int
    step: int  # the last step of the measured window
    ranks: list[RankWindow]  # each rank's window, in rank order
    plan_before: tuple[int, ...]
    plan_after: tuple[int, ...]
    start_step: int  # the step of ``epoch`` from which plan_after is used
    extra: dict = field(default_factory=dict)


class Rebalancer:
    """Owns the policy and applies its plans to the sampler, identically on every rank.

    ``history`` keeps the most recent ``history_limit`` rebalances (each holds
    every rank's window figures): enough for epoch summaries, bounded so that a
    run of millions of steps on many ranks does not grow without end.

    With ``record_policy``, each record's ``extra["policy"]`` holds, on rank
    0, the policy's ``diagnostics()`` for that decision (None on other ranks).

    ``schedule`` (when rebalancing inside epochs) sets the steps until the
    next rebalance, ``interval``; rank 0 updates it from every rank's measured
    cost of the previous rebalance and broadcasts it with the plan.
    """

    def __init__(
        self,
        sampler: DynamicBatchSampler,
        policy: Policy,
        exchange: Exchange,
        timer: StepTimer,
        history_limit: int = 4096,
        schedule: RebalanceSchedule | None = None,
    ) -> None:
        self.sampler = sampler
        self.policy = policy
        self.exchange = exchange
        self.timer = timer
        self.schedule = schedule
        self.interval: int | None = schedule.interval if schedule else None
        self._last_cost: float | None = None  # this rank's previous rebalance, seconds
        self.history: collections.deque[RebalanceRecord] = collections.deque(maxlen=history_limit)
        # Keep the policy's diagnostics in each record (rank 0; --rebalance-log).
        # Off by default: at thousands of ranks they are lists as long as the world.
        self.record_policy = False

    def rebalance(self, step: int) -> RebalanceRecord:
        """Exchange the window's stats and install the next plan on every rank."""
        began = time.perf_counter()
        window = RankWindow(
            **vars(self.timer.take_window()),
            steps_generated=self.sampler.steps_generated,
            rebalance_seconds=self._last_cost,
        )
        gathered: list[RankWindow] = self.exchange.allgather(window)
        current = self.sampler.plan
        diagnostics = None  # the policy's view, on rank 0 (where it decides)

        def decide() -> tuple[tuple[int, ...], int, int | None]:
            nonlocal diagnostics
            start = max(window.steps_generated for window in gathered)
            if all(window.steps == 0 for window in gathered):
                return current.batch_sizes, start, self.interval  # nothing measured: keep all
            stats = WindowStats.from_windows(gathered)
            sizes = self.policy.next_plan(stats, current).batch_sizes
            if self.record_policy:
                diagnostics = self.policy.diagnostics()
            return sizes, start, self._next_interval(gathered, stats, sizes != current.batch_sizes)

        sizes, start, self.interval = decide_on_root(self.exchange, decide)
        self.sampler.set_plan(Plan(sizes), start)
        record = RebalanceRecord(
            epoch=self.sampler.epoch,
            step=step,
            ranks=gathered,
            plan_before=current.batch_sizes,
            plan_after=tuple(sizes),
            start_step=start,
            extra={"interval": self.interval, "policy": diagnostics},
        )
        self.history.append(record)
        self.timer.mark_start()
        self._last_cost = time.perf_counter() - began
        return record

    def records_of_epoch(self, epoch: int) -> list[RebalanceRecord]:
        """The kept rebalances of ``epoch``, oldest first (epoch summaries, --rebalance-log)."""
        return [record for record in self.history if record.epoch == epoch]

    def restart_schedule(self) -> None:
        """Forget measured costs (after an elastic reset: every worker, old or new, agrees)."""
        if self.schedule is not None:
            self.schedule.reset()
            self.interval = self.schedule.interval
        self._last_cost = None

    def _next_interval(self, gathered: list[RankWindow], stats: WindowStats, moved: bool) -> int | None:
        """Rank 0: the schedule's next interval from the ranks' rebalance costs and step time.

        The rank that reached the previous rebalance last waited for nobody, so
        the smallest duration over ranks is the rebalance's own cost.
        """
        if self.schedule is None:
            return self.interval
        costs = [w.rebalance_seconds for w in gathered if w.rebalance_seconds is not None]
        cost = min(costs) if len(costs) == len(gathered) else None
        if not (stats.steps > 0).all():
            return self.schedule.update(cost, None)
        return self.schedule.update(
            cost, stats.step_wall_seconds(), int(stats.steps.max()), stats.imbalance(), moved
        )
