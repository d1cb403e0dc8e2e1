"""When DBS rebalances: one options object shared by the library and dbs-train.

The defaults are the recommended settings: the ``dbs`` policy rebalances
every 2 steps inside each epoch, the interval stretched so that rebalancing
costs at most 2% of the step time and never comes less than 0.15 s of
training after the previous one (schedule.py explains both stretches). The
other policies (``paper``, ``static``) rebalance at epoch ends only, as the
DBS paper does. ``dbs_hvd.DistributedOptimizer``,
``dbs_hvd.ModelAveragingOptimizer`` and dbs-train all take their settings
from a ``RebalanceOptions``, so a script with no tuning arguments runs the
same schedule as dbs-train's defaults.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .costs import ORDERS, check_costs
from .schedule import RebalanceSchedule

AUTO = "auto"

# dbs-train's names for the fields (its TrainConfig and checkpoints keep them flat).
CONFIG_KEYS = {
    "every": "rebalance_every",
    "budget": "rebalance_budget",
    "min_seconds": "rebalance_min_seconds",
}


@dataclass(frozen=True)
class RebalanceOptions:
    """How often DBS measures the ranks and moves the plan.

    Args:
        every: rebalance every this many steps inside an epoch, and at the
            epoch's last step once the window holds half an interval (a
            shorter one runs on into the next epoch, ``schedule.rebalance_due``).
            ``"auto"`` (default): 2 for the ``dbs`` policy, epoch ends only for
            the others. ``None``: every epoch end and nowhere else.
        budget: stretch the interval so that the measured cost of a rebalance
            stays within this fraction of the step time (default 0.02); 0
            keeps exactly ``every`` steps.
        min_seconds: keep at least this much training time between
            rebalances (default 0.15 s); 0 for no floor.

    Raises:
        ValueError: for an ``every`` below 1, a ``budget`` outside [0, 1) or a
            negative ``min_seconds``.

    Example::

        optimizer = dbs_hvd.DistributedOptimizer(
            opt, sampler, named_parameters=model.named_parameters(),
            rebalance=dbs_hvd.RebalanceOptions(every=5, budget=0))
    """

    every: int | str | None = AUTO
    budget: float = 0.02
    min_seconds: float = 0.15

    def __post_init__(self) -> None:
        if (
            self.every != AUTO
            and self.every is not None
            and (isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1)
        ):
            raise ValueError(
                f"RebalanceOptions(every=...) must be a positive number of steps, "
                f"None (epoch ends only) or 'auto', got {self.every!r}"
            )
        if not (isinstance(self.budget, (int, float)) and 0 <= self.budget < 1):
            raise ValueError(
                f"RebalanceOptions(budget=...) must be a fraction of the step time "
                f"in [0, 1) (0: exactly every steps), got {self.budget!r}"
            )
        if not (
            isinstance(self.min_seconds, (int, float))
            and self.min_seconds >= 0
            and math.isfinite(self.min_seconds)
        ):
            raise ValueError(
                f"RebalanceOptions(min_seconds=...) must be a number of seconds "
                f">= 0, got {self.min_seconds!r}"
            )

    def interval_for(self, policy_name: str) -> int | None:
        """The steps between rebalances for ``policy_name`` (None: epoch ends only)."""
        if isinstance(self.every, str):  # AUTO, the only string __post_init__ lets through
            return DEFAULT_EVERY if policy_name == "dbs" else None
        return self.every

    def schedule_for(self, policy_name: str) -> RebalanceSchedule | None:
        """The schedule of rebalances inside epochs, or None for epoch ends only."""
        every = self.interval_for(policy_name)
        if every is None:
            return None
        return RebalanceSchedule(every, self.budget or None, min_seconds=self.min_seconds)

    def resolved(self, policy_name: str) -> dict[str, Any]:
        """The settings in force for ``policy_name`` (compared across ranks)."""
        return {
            "every": self.interval_for(policy_name),
            "budget": self.budget,
            "min_seconds": self.min_seconds,
        }

    def as_config(self) -> dict[str, Any]:
        """The fields under dbs-train's names (``rebalance_every`` etc.)."""
        return {CONFIG_KEYS[key]: value for key, value in asdict(self).items()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RebalanceOptions:
        """Read dbs-train's flat fields; a field absent (an older checkpoint) takes its default.

        dbs-train's ``rebalance_every`` None means the policy's default ("auto").
        """
        defaults = cls()
        every = config.get("rebalance_every")
        try:
            return cls(
                every=AUTO if every is None else every,
                budget=config.get("rebalance_budget", defaults.budget) or 0.0,
                min_seconds=config.get("rebalance_min_seconds", defaults.min_seconds),
            )
        except ValueError as error:  # name dbs-train's settings, not this class's arguments
            message = str(error)
            for field, key in CONFIG_KEYS.items():
                flag = "--" + key.replace("_", "-")
                marker = f"RebalanceOptions({field}=...)"
                if marker in message:
                    message = message.replace(marker, key) + f" (dbs-train's {flag})"
            raise ValueError(message) from None


DEFAULT_EVERY = 2  # the dbs policy's interval: the best of those the hetero benchmarks compared


def resolve_options(
    rebalance: RebalanceOptions | None, every: int | None, budget: float | None, min_seconds: float | None
) -> RebalanceOptions:
    """The options from ``rebalance=`` or from the older separate keywords, never both.

    The separate keywords (``rebalance_every``, ``rebalance_budget``,
    ``rebalance_min_seconds``) keep their meaning for existing scripts: given
    alone, ``rebalance_every=K`` rebalances exactly every K steps (no budget,
    no time floor), and leaving ``rebalance_every`` out means epoch ends only.
    With none of them and no ``rebalance=``, the recommended defaults apply.
    """
    legacy = every is not None or budget is not None or min_seconds is not None
    if rebalance is not None:
        if legacy:
            raise ValueError(
                "give rebalance=RebalanceOptions(...) or the separate "
                "rebalance_every=, rebalance_budget=, rebalance_min_seconds= "
                "keywords, not both"
            )
        if not isinstance(rebalance, RebalanceOptions):
            raise TypeError(f"rebalance= takes a dbs_hvd.RebalanceOptions, got {type(rebalance).__name__}")
        return rebalance
    if not legacy:
        return RebalanceOptions()
    return RebalanceOptions(every=every, budget=budget or 0.0, min_seconds=min_seconds or 0.0)


@dataclass(frozen=True)
class MemoryOptions:
    """What DBS does when a rank runs out of memory during a step (memory.py).

    Args:
        recover: abandon the step on every rank, lower the failing rank's
            cap and train the step's global batch again (default). ``False``
            lets the error end the run, as without DBS.
        shrink: a failing rank's new cap is at most this fraction of the
            batch it failed at, and at least one sample below it
            (``plan.cap_below``); in (0, 1).

    Raises:
        ValueError: for a ``shrink`` outside (0, 1).

    Example::

        guard = dbs_hvd.MemoryGuard(optimizer, dbs_hvd.MemoryOptions(shrink=0.75))
    """

    recover: bool = True
    shrink: float = 0.9

    def __post_init__(self) -> None:
        if not (isinstance(self.shrink, (int, float)) and 0 < self.shrink < 1):
            raise ValueError(f"MemoryOptions(shrink=...) must be a fraction in (0, 1), got {self.shrink!r}")


@dataclass(frozen=True)
class ZeroSampleOptions:
    """Whether a straggler may get 0 samples, and how it keeps being measured (dropping.py).

    Args:
        enabled: let the policy give a rank 0 samples where the step is
            predicted faster without it (off by default). Such a rank still
            joins every allreduce, with a zero contribution.
        probe_every: a rank with 0 samples computes a probe every this many
            steps: a forward and backward on ``probe_samples`` samples of the
            step, weighted 0 (never applied), only timed, so that it can
            come back when it speeds up.
        probe_samples: the samples of a probe.
        gain: a rank is left out, or brought back, only where the predicted
            step is shorter by more than this fraction.
        max_dropped: at most this many ranks at 0 samples at once (default:
            all but one).
        confirm: a rank is left out or brought back only when that change
            wins this many rebalances in a row, so one noisy window (a
            pause on a shared machine) does not move a whole rank.

    Raises:
        ValueError: for a ``probe_every``, ``probe_samples`` or ``confirm`` below 1, a
            ``gain`` outside [0, 1), or a ``max_dropped`` below 1.

    Example::

        optimizer = dbs_hvd.DistributedOptimizer(
            opt, sampler, named_parameters=model.named_parameters(),
            zero_samples=dbs_hvd.ZeroSampleOptions(enabled=True, probe_every=8))
    """

    enabled: bool = False
    probe_every: int = 8
    probe_samples: int = 2
    gain: float = 0.2
    max_dropped: int | None = None
    confirm: int = 2

    def __post_init__(self) -> None:
        for name in ("probe_every", "probe_samples", "confirm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ZeroSampleOptions({name}=...) must be a positive integer, got {value!r}")
        if not (isinstance(self.gain, (int, float)) and 0 <= self.gain < 1):
            raise ValueError(f"ZeroSampleOptions(gain=...) must be a fraction in [0, 1), got {self.gain!r}")
        if self.max_dropped is not None and (not isinstance(self.max_dropped, int) or self.max_dropped < 1):
            raise ValueError(
                "ZeroSampleOptions(max_dropped=...) must be a positive integer or None, "
                f"got {self.max_dropped!r}"
            )


@dataclass(frozen=True, eq=False)
class SampleCosts:
    """Cost mode for variable-length samples: split each step's cost, not its count.

    Given to ``DynamicBatchSampler(costs=...)``. Each step's global batch is
    still the same ``B`` samples of the epoch's permutation; the plan's shares
    are shares of the step's total cost, and ``costs.split_by_cost`` decides
    which of the step's samples each rank reads (deterministically, the same
    on every rank). A rank's gradient weight is its share of the step's cost
    (``N * c_i / C``), and its timing counts its cost in the plan's units
    (``B * c_i / C``), so the policy learns seconds per unit of cost.

    For the update to be the one-process update, the cost of a sample must be
    the number of terms it adds to the loss (for a language model, its
    target tokens) and each rank's loss the mean over its batch's terms
    (their sum divided by the batch's total cost).

    Args:
        costs: one positive, finite cost per sample of the data set, in data
            set order (for example each sequence's token count). Integer
            costs make every sum exact.
        order: ``"sorted"`` (default) hands out each step's samples in order
            of increasing cost, so each rank's samples have similar lengths
            and little padding; ``"stream"`` keeps the permutation's order.

    Raises:
        ValueError: for costs that are not a non-empty 1-D sequence of finite
            positive numbers, or an unknown ``order``.

    Example::

        lengths = [len(text) - 1 for text in samples]  # target tokens per sample
        sampler = dbs_hvd.DynamicBatchSampler(
            len(samples), global_batch=64, costs=dbs_hvd.SampleCosts(lengths))
    """

    costs: Any
    order: str = "sorted"

    def __post_init__(self) -> None:
        object.__setattr__(self, "costs", check_costs(self.costs, "SampleCosts(costs=...)"))
        if self.order not in ORDERS:
            raise ValueError(f"SampleCosts(order=...) must be one of {ORDERS}, got {self.order!r}")

    def __len__(self) -> int:
        return len(self.costs)

    def digest(self) -> str:
        """A short fingerprint of the costs and order, compared across ranks."""
        import hashlib

        return hashlib.sha256(self.costs.tobytes() + self.order.encode()).hexdigest()[:16]
