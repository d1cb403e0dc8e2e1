"""What-if planning: ``dbs-plan`` predicts the step time of other plans from a run's rebalance log.

``dbs-train --rebalance-log FILE`` writes one JSON line per rebalance: every
rank's measured window (samples, compute seconds, steps, time blocked in the
allreduce), the plan before and after, and, under the ``dbs`` policy, the
step-cost model the policy fitted (a step of ``b`` samples on rank i takes
``overhead_i + per_sample_i * b`` compute seconds). With that model, the
library's own (``DbsPolicy``), ``dbs-plan`` predicts the synchronous
step, as long as its slowest rank's compute, for:

* the current plan: the one the run held after the chosen rebalance;
* the best plan: equal predicted step times, rounded so that the longest
  predicted step is as short as integer sizes allow (``equalise_step_times``);
* the best plan without each of the slowest ranks: that rank given 0 samples;
* the equal split: plain Horovod's.

A rank pays for itself when the best plan with it is predicted to be faster
than the best plan without it. The model predicts compute only: every rank,
one given 0 samples included, still joins each allreduce, which the model does
not price; the window's measured figures are printed beside the predictions
so the difference can be seen.

Where the log holds no fitted model (the ``paper`` and ``static`` policies
record none), or with ``--refit``, the model is fitted again from the logged
windows by the same code the ``dbs`` policy uses (``DbsPolicy.observe``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dbs_hvd.grid import unit_bounds
from dbs_hvd.plan import Bounds, Plan, PlanError, WindowStats, equalise_step_times
from dbs_hvd.policies import DbsPolicy


class RebalanceLogError(ValueError):
    """A rebalance log that dbs-plan cannot read or plan from; the message says what to do."""


@dataclass(frozen=True)
class StepCostModel:
    """Predicted compute seconds per step: ``overhead[i] + per_sample[i] * b`` on rank i.

    A rank given 0 samples is predicted to compute nothing.

    Args:
        overhead: seconds per step, one per rank.
        per_sample: seconds per sample, one per rank.
        source: ``"policy"`` (the run's ``dbs`` policy fitted it) or
            ``"refit"`` (fitted here from the logged windows).

    Example:
        >>> model = StepCostModel(np.array([0.01, 0.0]), np.array([0.001, 0.004]), "refit")
        >>> round(model.step_seconds((48, 16)), 6), model.step_seconds((64, 0))
        (0.064, 0.074)
    """

    overhead: np.ndarray
    per_sample: np.ndarray
    source: str

    @property
    def world_size(self) -> int:
        """The number of ranks the model describes."""
        return len(self.per_sample)

    def rank_seconds(self, batch_sizes: Sequence[int]) -> np.ndarray:
        """Each rank's predicted compute seconds for one step of ``batch_sizes``."""
        sizes = np.asarray(batch_sizes, dtype=float)
        return np.where(sizes > 0, self.overhead + self.per_sample * sizes, 0.0)

    def step_seconds(self, batch_sizes: Sequence[int]) -> float:
        """The predicted synchronous step: the slowest rank's predicted compute."""
        return float(self.rank_seconds(batch_sizes).max())


@dataclass(frozen=True)
class Scenario:
    """One plan dbs-plan prices.

    Args:
        name: ``"current"``, ``"best"``, ``"without rank K"`` or ``"equal split"``.
        batch_sizes: the plan, one local batch per rank (empty when no plan
            meets the bounds).
        step_seconds: the predicted step (NaN when there is no plan).
        dropped_rank: the rank given 0 samples, if any.
        note: why there is no plan, when there is none.
    """

    name: str
    batch_sizes: tuple[int, ...]
    step_seconds: float
    dropped_rank: int | None = None
    note: str = ""


@dataclass(frozen=True)
class Measured:
    """What the ranks measured in the window the chosen rebalance closed.

    Args:
        batch_sizes: the plan in force during the window.
        compute_seconds: the slowest rank's compute per step.
        step_seconds: the synchronous step, compute and allreduce wait per
            step (``WindowStats.step_wall_seconds``), when the wait was logged.
    """

    batch_sizes: tuple[int, ...]
    compute_seconds: float
    step_seconds: float | None


@dataclass(frozen=True)
class WhatIf:
    """dbs-plan's answer for one rebalance of a log: the model, the priced plans, the window.

    Args:
        log: the rebalance log read.
        rebalance: the chosen rebalance, 1-based.
        rebalances: the number of rebalances in the log.
        epoch: the epoch of the chosen rebalance.
        step: the last step of the window it measured.
        global_batch: the global batch every plan splits.
        model: the step-cost model the predictions use.
        scenarios: the priced plans: current, best, one per dropped rank, equal split.
        measured: the chosen rebalance's window as measured.
    """

    log: str
    rebalance: int
    rebalances: int
    epoch: int
    step: int
    global_batch: int
    model: StepCostModel
    scenarios: tuple[Scenario, ...]
    measured: Measured
    notes: tuple[str, ...] = field(default_factory=tuple)

    def scenario(self, name: str) -> Scenario:
        """The scenario called ``name``.

        Raises:
            KeyError: if there is none of that name.
        """
        for scenario in self.scenarios:
            if scenario.name == name:
                return scenario
        raise KeyError(name)

    def verdicts(self) -> list[str]:
        """One sentence per dropped rank: whether it pays for itself, by the predicted step."""
        best = self.scenario("best").step_seconds
        lines = []
        for scenario in self.scenarios:
            if scenario.dropped_rank is None:
                continue
            rank = scenario.dropped_rank
            if not scenario.batch_sizes:
                lines.append(f"rank {rank}: no plan without it ({scenario.note})")
                continue
            change = scenario.step_seconds / best - 1.0
            move = f"({_ms(best)} -> {_ms(scenario.step_seconds)} per step)"
            if change < 0:
                lines.append(
                    f"rank {rank} does not pay for itself: without it the predicted step "
                    f"is {-100 * change:.1f}% shorter {move}"
                )
            else:
                lines.append(
                    f"rank {rank} pays for itself: without it the predicted step is "
                    f"{100 * change:.1f}% longer {move}"
                )
        return lines

    def report(self) -> str:
        """The human-readable report dbs-plan prints."""
        world = self.model.world_size
        source = {
            "policy": "as the run's dbs policy fitted it at this rebalance",
            "refit": "fitted here from the logged windows (the dbs policy's fit)",
        }[self.model.source]
        lines = [
            f"dbs-plan: {self.log}, rebalance {self.rebalance} of {self.rebalances} "
            f"(epoch {self.epoch}, step {self.step}): {world} ranks, global batch {self.global_batch}",
            f"step-cost model, {source}: compute per step = overhead + per-sample x batch",
            f"  {'rank':>4}  {'overhead':>10}  {'per sample':>10}",
        ]
        for rank in range(world):
            lines.append(
                f"  {rank:>4}  {_ms(self.model.overhead[rank]):>10}  {_ms(self.model.per_sample[rank]):>10}"
            )
        best = self.scenario("best").step_seconds
        width = max(len(str(list(s.batch_sizes))) for s in self.scenarios)
        lines += ["", f"  {'plan':<16}  {'batch sizes':<{width}}  {'predicted step':>14}  {'vs best':>7}"]
        for s in self.scenarios:
            if not s.batch_sizes:
                lines.append(f"  {s.name:<16}  {'-':<{width}}  {'-':>14}  {'-':>7}  {s.note}")
                continue
            sizes = str(list(s.batch_sizes))
            lines.append(
                f"  {s.name:<16}  {sizes:<{width}}  {_ms(s.step_seconds):>14}  {s.step_seconds / best:>7.3f}"
            )
        m = self.measured
        window = (
            f"\nmeasured in the window this rebalance closed, under {list(m.batch_sizes)}: "
            f"slowest rank's compute {_ms(m.compute_seconds)} per step (the model: "
            f"{_ms(self.model.step_seconds(m.batch_sizes))})"
        )
        if m.step_seconds is not None:
            window += f"; step with allreduce waits {_ms(m.step_seconds)}"
        lines += [window, *self.verdicts(), *self.notes]
        lines.append(
            "The model prices compute only: every rank, one given 0 samples included, "
            "still joins each allreduce."
        )
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """The answer in plain JSON types (``dbs-plan --json``); NaN becomes ``None``."""
        return {
            "log": self.log,
            "rebalance": self.rebalance,
            "rebalances": self.rebalances,
            "epoch": self.epoch,
            "step": self.step,
            "world_size": self.model.world_size,
            "global_batch": self.global_batch,
            "model": {
                "source": self.model.source,
                "overhead_seconds": [float(a) for a in self.model.overhead],
                "per_sample_seconds": [float(c) for c in self.model.per_sample],
            },
            "scenarios": [
                {
                    "name": s.name,
                    "batch_sizes": list(s.batch_sizes),
                    "step_seconds": None if math.isnan(s.step_seconds) else s.step_seconds,
                    "dropped_rank": s.dropped_rank,
                    "note": s.note,
                }
                for s in self.scenarios
            ],
            "measured": {
                "batch_sizes": list(self.measured.batch_sizes),
                "compute_seconds": self.measured.compute_seconds,
                "step_seconds": self.measured.step_seconds,
            },
            "verdicts": self.verdicts(),
            "notes": list(self.notes),
        }


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.2f} ms"


_RANK_KEYS = ("samples", "compute_seconds", "steps")


def read_rebalance_log(path: str | Path) -> list[dict]:
    """Every rebalance of a ``dbs-train --rebalance-log`` file, in order.

    Args:
        path: the JSON-lines file dbs-train wrote.

    Returns:
        One dict per rebalance (blank lines skipped).

    Raises:
        OSError: if the file cannot be read.
        RebalanceLogError: if a line is not JSON or not a rebalance record
            (the message names the line, and tells a ``--log`` file apart),
            or the file holds none.

    Example:
        >>> read_rebalance_log("no-such-file.jsonl")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: ...
    """
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise RebalanceLogError(
                    f"{path} line {number} is not JSON ({error.msg}): give the file "
                    "dbs-train --rebalance-log wrote"
                ) from None
            _check_record(record, path, number)
            records.append(record)
    if not records:
        raise RebalanceLogError(
            f"{path} holds no rebalance: run dbs-train with a DBS policy (not --policy "
            "horovod) and --rebalance-log FILE for at least one epoch"
        )
    return records


def _check_record(record: Any, path: str | Path, number: int) -> None:
    where = f"{path} line {number}"
    if isinstance(record, dict) and "next_batch_sizes" in record and "ranks" not in record:
        raise RebalanceLogError(
            f"{where} is an epoch record of dbs-train --log, not a rebalance: give the "
            "file of dbs-train --rebalance-log"
        )
    if not isinstance(record, dict) or not {"ranks", "plan_after", "plan_before"} <= record.keys():
        raise RebalanceLogError(
            f"{where} is not a rebalance record (it needs ranks, plan_before and "
            "plan_after): give the file of dbs-train --rebalance-log"
        )
    ranks, plan = record["ranks"], record["plan_after"]
    if not isinstance(plan, list) or not plan or not all(isinstance(b, int) and b >= 0 for b in plan):
        raise RebalanceLogError(f"{where}: plan_after must be a list of batch sizes, got {plan!r}")
    if not isinstance(ranks, list) or len(ranks) != len(plan):
        raise RebalanceLogError(
            f"{where}: ranks must hold one window per rank of the plan ({len(plan)}), got {ranks!r:.80}"
        )
    for rank, window in enumerate(ranks):
        if not isinstance(window, dict) or not all(
            isinstance(window.get(key), (int, float)) for key in _RANK_KEYS
        ):
            raise RebalanceLogError(
                f"{where}: rank {rank}'s window needs numbers samples, compute_seconds "
                f"and steps, got {window!r:.120}"
            )


def _window(record: dict) -> WindowStats | None:
    """The record's window, if every rank ran steps in it and timed them."""
    stats = WindowStats.from_records(record["ranks"])
    if not (stats.steps > 0).all():
        return None
    try:
        stats.validate()
    except PlanError:
        return None
    return stats


def fit_cost_model(records: Sequence[dict], index: int = -1, refit: bool = False) -> StepCostModel:
    """The step-cost model at rebalance ``index`` of a log.

    The ``dbs`` policy logs the model it fitted (``extra.policy``); that one is
    used unless ``refit``. Otherwise the windows of the same world size up to
    that rebalance are fed, oldest first, to a fresh ``DbsPolicy``'s
    ``observe``: the fit the ``dbs`` policy makes (recent windows weighted
    more, an overhead only where the batch sizes varied enough).

    Args:
        records: the log's rebalances (``read_rebalance_log``).
        index: which rebalance, a Python index (-1: the last).
        refit: fit from the windows even where the log holds the policy's model.

    Returns:
        The model, one overhead and one per-sample cost per rank.

    Raises:
        RebalanceLogError: if no window of that world size had every rank
            timed, or the model is not usable (a cost that is not positive).

    Example:
        >>> window = {"samples": 320, "compute_seconds": 0.32, "steps": 10}
        >>> slow = {"samples": 320, "compute_seconds": 0.96, "steps": 10}
        >>> record = {"ranks": [window, slow], "plan_before": [32, 32], "plan_after": [48, 16]}
        >>> fit_cost_model([record]).per_sample.round(4).tolist()
        [0.001, 0.003]
    """
    record = records[index]
    world = len(record["plan_after"])
    seen = (record.get("extra") or {}).get("policy") or {}
    if not refit and len(seen.get("per_sample_seconds") or ()) == world:
        model = StepCostModel(
            np.asarray(seen["overhead_seconds"], dtype=float),
            np.asarray(seen["per_sample_seconds"], dtype=float),
            "policy",
        )
    else:
        end = index % len(records)
        start = end
        while start > 0 and len(records[start - 1]["plan_after"]) == world:
            start -= 1
        fitter = DbsPolicy(global_batch=sum(record["plan_after"]))
        fitted = None
        for earlier in records[start : end + 1]:
            stats = _window(earlier)
            if stats is not None:
                fitted = fitter.observe(stats)
        if fitted is None:
            raise RebalanceLogError(
                f"no window up to rebalance {end + 1} has every one of its {world} ranks "
                "timed: choose a later rebalance (--rebalance) or log a longer run"
            )
        model = StepCostModel(fitted[0], fitted[1], "refit")
    bad = ~(np.isfinite(model.per_sample) & (model.per_sample > 0)) | ~(
        np.isfinite(model.overhead) & (model.overhead >= 0)
    )
    if bad.any():
        rank = int(np.argmax(bad))
        raise RebalanceLogError(
            f"rank {rank}'s fitted cost is not usable (overhead {model.overhead[rank]!r} s, "
            f"per sample {model.per_sample[rank]!r} s): try --refit, or another --rebalance"
        )
    return model


def best_plan(
    model: StepCostModel,
    global_batch: int,
    bounds: Bounds = Bounds(),
    multiple: int = 1,
    without: int | None = None,
) -> tuple[int, ...]:
    """The plan with the shortest predicted step, optionally giving rank ``without`` 0 samples.

    The other ranks' sizes equalise their predicted steps and are rounded
    min-max (``equalise_step_times``), within ``bounds``; with ``multiple``
    M > 1 every size is a multiple of M (as ``dbs-train --batch-multiple``).

    Args:
        model: the step-cost model.
        global_batch: the global batch the plan splits.
        bounds: the per-rank limits of the ranks that take samples.
        multiple: the grid of batch sizes, in samples.
        without: a rank to give 0 samples, or ``None``.

    Returns:
        One local batch per rank of the model.

    Raises:
        PlanError: if no plan meets the bounds (the message says which).

    Example:
        >>> model = StepCostModel(np.zeros(2), np.array([0.001, 0.003]), "refit")
        >>> best_plan(model, 64), best_plan(model, 64, without=1)
        ((48, 16), (64, 0))
    """
    world = model.world_size
    ranks = np.array([r for r in range(world) if r != without])
    if len(ranks) == 0:
        raise PlanError("a plan needs at least one rank that takes samples")
    overhead, per_sample = model.overhead[ranks], model.per_sample[ranks]
    if multiple > 1:
        units = unit_bounds(global_batch, multiple, bounds)
        units.check(global_batch // multiple, len(ranks))
        sizes = multiple * equalise_step_times(
            overhead, per_sample * multiple, global_batch // multiple, units
        )
    else:
        bounds.check(global_batch, len(ranks))
        sizes = equalise_step_times(overhead, per_sample, global_batch, bounds)
    plan = np.zeros(world, dtype=np.int64)
    plan[ranks] = sizes
    return tuple(int(b) for b in plan)


def slowest_ranks(model: StepCostModel, global_batch: int, count: int) -> list[int]:
    """The ``count`` ranks with the longest predicted step at an equal share, slowest first.

    Example:
        >>> model = StepCostModel(np.array([0.0, 0.05, 0.0]), np.array([0.001, 0.001, 0.002]), "refit")
        >>> slowest_ranks(model, 60, 2)
        [1, 2]
    """
    at_equal = model.overhead + model.per_sample * global_batch / model.world_size
    return [int(r) for r in np.argsort(-at_equal, kind="stable")[:count]]


def what_if(
    records: Sequence[dict],
    index: int = -1,
    bounds: Bounds = Bounds(),
    multiple: int | None = None,
    drop: int = 3,
    refit: bool = False,
    log: str = "",
) -> WhatIf:
    """Price the current, best, without-a-slow-rank and equal plans at one rebalance of a log.

    Args:
        records: the log's rebalances (``read_rebalance_log``).
        index: which rebalance, a Python index (-1: the last).
        bounds: the per-rank limits the run used (dbs-train's --min-batch,
            --max-batch); ranks given 0 samples are outside them.
        multiple: the grid of batch sizes (dbs-train's --batch-multiple);
            ``None`` takes it from the log, else 1.
        drop: how many of the slowest ranks to try without (0: none).
        refit: fit the model from the windows even where the log holds one.
        log: the log's name, for the report.

    Returns:
        The answer: model, priced plans, the measured window.

    Raises:
        RebalanceLogError: for a log no model can be fitted from.
        PlanError: if the bounds admit no plan with every rank.

    Example:
        >>> window = {"samples": 320, "compute_seconds": 0.32, "steps": 10}
        >>> slow = {"samples": 320, "compute_seconds": 0.96, "steps": 10}
        >>> record = {"ranks": [window, slow], "plan_before": [32, 32], "plan_after": [48, 16]}
        >>> answer = what_if([record], drop=1)
        >>> [(s.name, s.batch_sizes) for s in answer.scenarios]  # doctest: +NORMALIZE_WHITESPACE
        [('current', (48, 16)), ('best', (48, 16)), ('without rank 1', (64, 0)),
         ('equal split', (32, 32))]
        >>> print(answer.verdicts()[0])
        rank 1 pays for itself: without it the predicted step is 33.3% longer (48.00 ms -> 64.00 ms per step)
    """
    record = records[index]
    model = fit_cost_model(records, index, refit)
    current = tuple(int(b) for b in record["plan_after"])
    global_batch = sum(current)
    world = len(current)
    seen = (record.get("extra") or {}).get("policy") or {}
    notes: list[str] = []
    if multiple is None:
        multiple = int(seen.get("batch_multiple", 1))
        if multiple > 1:
            notes.append(f"plans on a grid of {multiple} samples, as the run's --batch-multiple")
    best = best_plan(model, global_batch, bounds, multiple)
    scenarios = [
        Scenario("current", current, model.step_seconds(current)),
        Scenario("best", best, model.step_seconds(best)),
    ]
    if world > 1:
        for rank in slowest_ranks(model, global_batch, min(drop, world)):
            name = f"without rank {rank}"
            try:
                plan = best_plan(model, global_batch, bounds, multiple, without=rank)
            except PlanError as error:
                scenarios.append(Scenario(name, (), math.nan, rank, str(error)))
                continue
            scenarios.append(Scenario(name, plan, model.step_seconds(plan), rank))
    equal = Plan.equal(global_batch, world).batch_sizes
    scenarios.append(Scenario("equal split", equal, model.step_seconds(equal)))
    stats = WindowStats.from_records(record["ranks"])
    with np.errstate(divide="ignore", invalid="ignore"):
        per_step = np.where(stats.steps > 0, stats.compute_seconds / stats.steps, 0.0)
    wall = stats.step_wall_seconds() if (stats.steps > 0).all() else None
    measured = Measured(
        tuple(int(b) for b in record["plan_before"]),
        float(per_step.max()),
        None if wall is None or not math.isfinite(wall) else wall,
    )
    if not (model.overhead > 0).any():
        notes.append(
            "no rank's fixed cost per step could be told apart from its cost per sample "
            "(the batch sizes varied too little): the model scales each step with the batch "
            "alone, which flatters a slow rank with a large fixed cost"
        )
    return WhatIf(
        log=log,
        rebalance=index % len(records) + 1,
        rebalances=len(records),
        epoch=int(record.get("epoch", 0)),
        step=int(record.get("step", 0)),
        global_batch=global_batch,
        model=model,
        scenarios=tuple(scenarios),
        measured=measured,
        notes=tuple(notes),
    )


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def plan_parser() -> argparse.ArgumentParser:
    """The parser of dbs-plan's command line."""
    p = argparse.ArgumentParser(
        prog="dbs-plan",
        description="Predict the step time of the current plan, the best plan, the best "
        "plan without each of the slowest ranks and the equal split, from a dbs-train "
        "--rebalance-log, with the step-cost model of the dbs policy.",
    )
    p.add_argument("log", help="the file dbs-train --rebalance-log wrote (JSON lines)")
    p.add_argument(
        "--rebalance",
        type=int,
        default=-1,
        metavar="N",
        help="which rebalance of the log: 1 is the first, -1 the last (default: -1)",
    )
    p.add_argument(
        "--drop",
        type=_non_negative,
        default=3,
        metavar="K",
        help="try the plan without each of the K slowest ranks (default: 3; 0: none)",
    )
    p.add_argument("--min-batch", type=_positive, default=1, help="the run's --min-batch (default: 1)")
    p.add_argument("--max-batch", type=_positive, default=None, help="the run's --max-batch")
    p.add_argument(
        "--batch-multiple",
        type=_positive,
        default=None,
        metavar="M",
        help="the run's --batch-multiple (default: as logged by the dbs policy, else 1)",
    )
    p.add_argument(
        "--refit",
        action="store_true",
        help="fit the model from the logged windows even where the dbs policy logged its own",
    )
    p.add_argument("--json", action="store_true", help="print the answer as one JSON object")
    return p


def plan_main(argv: Sequence[str] | None = None) -> int:
    """The ``dbs-plan`` command: what-if planning from a run's rebalance log.

    Args:
        argv: the command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, or 2 when the log cannot be read or planned from
        (one line on stderr, ``dbs-plan: error: ...``, says what to do).
    """
    args = plan_parser().parse_args(argv)
    try:
        records = read_rebalance_log(args.log)
        count = len(records)
        if args.rebalance == 0 or not -count <= args.rebalance <= count:
            raise RebalanceLogError(
                f"--rebalance {args.rebalance}: {args.log} holds {count} rebalance(s); give "
                f"1 to {count}, or -1 for the last"
            )
        index = args.rebalance - 1 if args.rebalance > 0 else args.rebalance
        bounds = Bounds(min_batch=args.min_batch, max_batch=args.max_batch)
        answer = what_if(records, index, bounds, args.batch_multiple, args.drop, args.refit, args.log)
    except (OSError, ValueError) as error:  # RebalanceLogError and PlanError are ValueErrors
        sys.stderr.write(f"dbs-plan: error: {_flags(error)}\n")
        return 2
    print(json.dumps(answer.as_dict()) if args.json else answer.report())
    return 0


def _flags(error: BaseException) -> str:
    """The error's message, naming dbs-plan's flags for the library's bound names."""
    text = str(error) if not isinstance(error, OSError) else f"cannot read {error.filename}: {error.strerror}"
    for name, flag in (("min_batch", "--min-batch"), ("max_batch", "--max-batch")):
        text = text.replace(name, flag)
    return text


if __name__ == "__main__":
    sys.exit(plan_main())
