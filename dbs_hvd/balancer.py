"""One rebalance: measure, exchange, plan on rank 0, broadcast, apply.

This is the loop of DESIGN.md in one place: timing -> comm (allgather) ->
plan (rank 0, then broadcast) -> sampler. It is triggered by the optimizer
wrapper at the end of every epoch and, optionally, every K steps, which all
ranks reach at the same step because they run the same number of steps.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

from .comm import Exchange, decide_on_root
from .plan import Plan, Policy, WindowStats
from .sampler import DynamicBatchSampler
from .timing import StepTimer


@dataclass
class RebalanceRecord:
    """What one rebalance saw and decided; kept for logs and plots."""

    epoch: int
    step: int  # the last step of the measured window
    ranks: list[dict]  # each rank's window totals, in rank order
    plan_before: tuple[int, ...]
    plan_after: tuple[int, ...]
    start_step: int  # the step of ``epoch`` from which plan_after is used
    extra: dict = field(default_factory=dict)


class Rebalancer:
    """Owns the policy and applies its plans to the sampler, identically on every rank.

    ``history`` keeps the most recent ``history_limit`` rebalances (each holds
    every rank's window figures): enough for epoch summaries, bounded so that a
    run of millions of steps on many ranks does not grow without end.
    """

    def __init__(self, sampler: DynamicBatchSampler, policy: Policy, exchange: Exchange,
                 timer: StepTimer, history_limit: int = 4096) -> None:
        self.sampler = sampler
        self.policy = policy
        self.exchange = exchange
        self.timer = timer
        self.history: collections.deque[RebalanceRecord] = collections.deque(
            maxlen=history_limit)

    def rebalance(self, step: int) -> RebalanceRecord:
        """Exchange the window's stats and install the next plan on every rank."""
        window = self.timer.take_window().as_record()
        window["steps_generated"] = self.sampler.steps_generated
        gathered = self.exchange.allgather(window)
        current = self.sampler.plan

        def decide() -> tuple[tuple[int, ...], int]:
            start = max(record["steps_generated"] for record in gathered)
            if all(record["steps"] == 0 for record in gathered):
                return current.batch_sizes, start  # nothing measured: keep the plan
            stats = WindowStats.from_records(gathered)
            return self.policy.next_plan(stats, current).batch_sizes, start

        sizes, start = decide_on_root(self.exchange, decide)
        self.sampler.set_plan(Plan(sizes), start)
        record = RebalanceRecord(
            epoch=self.sampler.epoch, step=step, ranks=gathered,
            plan_before=current.batch_sizes, plan_after=tuple(sizes), start_step=start,
        )
        self.history.append(record)
        self.timer.mark_start()
        return record
