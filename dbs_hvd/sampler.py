"""Which samples each rank reads at each step: the global-batch stream.

Each epoch has one permutation of the data set, seeded by ``(seed, epoch)`` and
identical on every rank. Read as a stream of global batches, global batch ``t``
is ``perm[t*B:(t+1)*B]``; rank ``i`` reads the contiguous piece
``[offset_i, offset_i + b_i)`` of it, where ``b_i`` comes from the plan in force
at step ``t``. Hence, whatever the plans:

* every rank runs ``len(dataset) // B`` steps per epoch (the blocking allreduce
  needs equal step counts), and the last ``len(dataset) % B`` samples of the
  permutation are dropped, a different set each epoch;
* the ranks together read each of the epoch's other samples exactly once, even
  when the plan changes in the middle of an epoch;
* the sequence of global batches does not depend on the plan, so DBS follows
  the same trajectory as one process with batch ``B``.

The sampler is a ``batch_sampler`` for torch's DataLoader (workers included).
Batches are generated ahead of their use when the DataLoader prefetches, so a
new plan takes effect at a step the sampler has not yet handed out
(``set_plan(plan, start_step)``); the gradient weighting learns each consumed
batch's size from ``pop_consumed`` in the order the batches were yielded, and
reports each trained batch back (``mark_trained``), so that ``state_dict``
records the steps trained on, not the steps a DataLoader prefetched.

In cost mode (``costs=SampleCosts(...)``, options.py) the global batches are
the same, and the plan splits each step's total cost instead of its count:
``costs.split_by_cost`` picks which of the step's samples each rank reads,
from the step's indices, their costs and the plan alone, so every rank makes
the same choice without communication and each sample is still read once.

An uneven plan is only correct with dbs_hvd's optimizer wrapper, which
weights each rank's gradient by its batch size: under Horovod with more than
one rank, a sampler no wrapper is attached to refuses to hand out a step of
an uneven plan (plain ``hvd.DistributedOptimizer`` would average unequal
batches with equal weights).
"""

from __future__ import annotations

import collections
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
from torch.utils.data import Sampler

from .comm import DbsError
from .costs import split_by_cost
from .options import SampleCosts
from .plan import Bounds, Plan, PlanError, fit_plan


@dataclass(frozen=True)
class StepBatch:
    """One batch handed out: its step in the epoch and this rank's local batch size.

    In cost mode ``cost`` is the batch's total cost and ``step_cost`` the
    cost of the whole global batch of the step; both are None otherwise.
    ``probe`` is the size of a probe handed out in place of an empty piece
    (a rank with 0 samples, dropping.py): trained with weight 0, only timed.
    """

    epoch: int
    step: int
    batch_size: int
    cost: float | None = None
    step_cost: float | None = None
    probe: int = 0

    def units(self, global_batch: int) -> float:
        """The batch in the plan's units (samples of ``global_batch``): what timing counts.

        The local batch size in count mode; ``B * cost / step_cost`` in cost mode.
        """
        if self.cost is None or self.step_cost is None:
            return self.batch_size
        return global_batch * self.cost / self.step_cost


class DynamicBatchSampler(Sampler[list]):
    """Yields this rank's sample indices for each step of an epoch, following the plan.

    Use it as the DataLoader's ``batch_sampler`` and wrap the optimizer with
    ``dbs_hvd.DistributedOptimizer(optimizer, sampler, ...)``; call
    ``set_epoch(epoch)`` at the start of every epoch, as with torch's
    ``DistributedSampler``. A pass over the sampler without ``set_epoch``
    after a complete pass moves to the next epoch with a warning (once), so
    the learned plan is kept and each epoch is shuffled anew.

    Args:
        dataset_size: number of samples in the data set (``len(dataset)``).
        global_batch: samples per step over all ranks (``B``); fixed for the run.
        rank: this rank; defaults to Horovod's.
        world_size: the number of ranks; defaults to Horovod's.
        seed: seeds the per-epoch permutation; must be equal on every rank.
        shuffle: permute each epoch (``False`` reads the data in order).
        bounds: per-rank limits on the local batch size. With plain
            ``nn.BatchNorm`` layers, a batch of one sample fails in training:
            give ``Bounds(min_batch=2)`` (the optimizer wrapper raises the
            floor itself when it is given ``model=``).
        plan: the initial plan; default the equal split.
        costs: cost mode for variable-length samples (``SampleCosts``): the
            plan splits each step's total cost in proportion to the ranks'
            shares. Default None: the plan splits the count.

    Raises:
        PlanError: for a global batch smaller than the world size or than the
            data set, a rank outside the world, or bounds no plan can meet.
        ValueError: for ``costs`` that are not a ``SampleCosts`` or whose
            length is not ``dataset_size``.

    Example::

        sampler = dbs_hvd.DynamicBatchSampler(len(train_set), global_batch=256)
        loader = DataLoader(train_set, batch_sampler=sampler)
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            for x, y in loader:
                ...
    """

    def __init__(
        self,
        dataset_size: int,
        global_batch: int,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        bounds: Bounds = Bounds(),
        plan: Plan | None = None,
        costs: SampleCosts | None = None,
    ) -> None:
        if costs is not None:
            if not isinstance(costs, SampleCosts):
                raise ValueError(
                    f"costs= takes a dbs_hvd.SampleCosts (one cost per sample), got {type(costs).__name__}"
                )
            if len(costs) != dataset_size:
                raise ValueError(
                    f"costs= has {len(costs)} costs but the data set has dataset_size={dataset_size} "
                    "samples: give one cost per sample, in data set order"
                )
        if rank is None or world_size is None:
            import horovod.torch as hvd

            rank = hvd.rank() if rank is None else rank
            world_size = hvd.size() if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise PlanError(f"rank {rank} is outside a world of {world_size}")
        _check_fits(global_batch, world_size, bounds)
        if dataset_size < global_batch:
            raise PlanError(
                f"the data set has {dataset_size} samples, fewer than the global batch "
                f"(global_batch={global_batch}): not one step could run. Pass global_batch= "
                f"of at most "
                f"{dataset_size} or use more data"
            )
        self.dataset_size = int(dataset_size)
        self.global_batch = int(global_batch)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.bounds = bounds
        self.costs = costs
        self._split_cache: tuple[tuple[int, int, tuple[int, ...]], list[np.ndarray]] | None = None
        self.epoch = 0
        initial = plan or Plan.equal(global_batch, world_size, bounds)
        self._check_plan(initial)
        # (start_step, plan) pairs in step order; the first starts at step 0.
        self._schedule: list[tuple[int, Plan]] = [(0, initial)]
        self._start_step = 0
        self._generated = 0
        self._perm_cache: tuple[int, np.ndarray] | None = None
        self._yielded: collections.deque[StepBatch] = collections.deque()
        self.iteration_started_at: float | None = None
        self._trained = 0  # steps of this epoch trained on (reported by the optimizer)
        self._pass_complete = False  # every step of this epoch was handed out
        self._warned_set_epoch = False
        # Set by dbs_hvd's optimizer wrappers: called when a batch is taken.
        self._on_take: Callable[[], None] | None = None
        self._weighted = False  # a wrapper weights gradients by local batch size
        # (every, samples): a rank with 0 samples gets a probe of the first samples
        # of every ``every``-th step's global batch (dropping.py); None: no probes.
        self.probe: tuple[int, int] | None = None

    # -- the epoch's layout --------------------------------------------------------

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_size // self.global_batch

    @property
    def dropped_per_epoch(self) -> int:
        """Samples left out of each epoch (the tail of the permutation)."""
        return self.dataset_size % self.global_batch

    def __len__(self) -> int:
        return self.steps_per_epoch - self._start_step

    def permutation(self) -> np.ndarray:
        """This epoch's order of the data set, the same on every rank."""
        if self._perm_cache is None or self._perm_cache[0] != self.epoch:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.dataset_size)
            else:
                perm = np.arange(self.dataset_size)
            self._perm_cache = (self.epoch, perm)
        return self._perm_cache[1]

    def global_batch_indices(self, step: int) -> np.ndarray:
        """The indices of global batch ``step``: all ranks' pieces together."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside an epoch of {self.steps_per_epoch} steps")
        return self.permutation()[step * self.global_batch : (step + 1) * self.global_batch]

    def plan_at(self, step: int) -> Plan:
        """The plan in force at ``step`` of the current epoch."""
        current = self._schedule[0][1]
        for start, plan in self._schedule:
            if start > step:
                break
            current = plan
        return current

    @property
    def plan(self) -> Plan:
        """The newest plan (in force from its start step on)."""
        return self._schedule[-1][1]

    def indices(self, step: int, rank: int | None = None) -> list[int]:
        """The indices ``rank`` (default: this rank) reads at ``step``."""
        rank = self.rank if rank is None else rank
        plan = self.plan_at(step)
        if self.costs is not None:
            return self._cost_split(step, plan)[rank].tolist()
        start = plan.offset(rank)
        return self.global_batch_indices(step)[start : start + plan.batch_sizes[rank]].tolist()

    def _cost_split(self, step: int, plan: Plan) -> list[np.ndarray]:
        """Cost mode: every rank's indices at ``step`` under ``plan`` (the last split is kept)."""
        assert self.costs is not None
        key = (self.epoch, step, plan.batch_sizes)
        if self._split_cache is None or self._split_cache[0] != key:
            batch = self.global_batch_indices(step)
            positions = split_by_cost(
                self.costs.costs[batch], plan.batch_sizes, self.bounds.min_batch, self.costs.order
            )
            self._split_cache = (key, [batch[p] for p in positions])
        return self._split_cache[1]

    def step_cost(self, step: int) -> float:
        """The total cost of global batch ``step`` (cost mode), or its sample count."""
        if self.costs is None:
            return float(self.global_batch)
        return float(self.costs.costs[self.global_batch_indices(step)].sum())

    def step_batch(self, step: int, indices: list[int]) -> StepBatch:
        """The record of this rank's batch ``indices`` at ``step`` (with its cost in cost mode)."""
        if self.costs is None:
            return StepBatch(self.epoch, step, len(indices))
        cost = float(self.costs.costs[indices].sum())
        return StepBatch(self.epoch, step, len(indices), cost, self.step_cost(step))

    # -- iteration -------------------------------------------------------------------

    def __iter__(self) -> Iterator[list]:
        if self._pass_complete:
            self._next_epoch_without_set_epoch()
        # A new iteration discards batches an earlier iterator prefetched but
        # never delivered.
        self._yielded.clear()
        self.iteration_started_at = time.perf_counter()
        self._generated = self._start_step
        return self._batches()

    def _batches(self) -> Iterator[list]:
        for step in range(self._start_step, self.steps_per_epoch):
            # Resumed by the DataLoader asking for a batch: the training loop moved on.
            if self._on_take is not None:
                self._on_take()
            if not self._weighted:
                self._refuse_unweighted(self.plan_at(step))
            batch = self.indices(step)
            probe = 0
            if not batch and self.probe is not None and step % self.probe[0] == 0:
                batch = self.global_batch_indices(step)[: self.probe[1]].tolist()
                probe = len(batch)
            self._generated = step + 1
            self._yielded.append(
                replace(self.step_batch(step, []), probe=probe) if probe else self.step_batch(step, batch)
            )
            yield batch
        self._pass_complete = True

    def _next_epoch_without_set_epoch(self) -> None:
        """A new pass after a complete one, without ``set_epoch``: move on to the next epoch."""
        if not self._warned_set_epoch:
            self._warned_set_epoch = True
            warnings.warn(
                f"DynamicBatchSampler: a new pass began after epoch {self.epoch} ended without "
                f"sampler.set_epoch(epoch); continuing with epoch {self.epoch + 1} and the "
                "newest plan. Call sampler.set_epoch(epoch) at the start of every epoch",
                stacklevel=3,
            )
        self.set_epoch(self.epoch + 1)

    def _refuse_unweighted(self, plan: Plan) -> None:
        """Refuse unequal weights under multi-rank Horovod when no wrapper applies them.

        Any plan in cost mode: the ranks' costs differ even when their counts agree.
        """
        if (self.costs is None and len(set(plan.batch_sizes)) <= 1) or _horovod_size() <= 1:
            return
        what = "batches of different costs" if self.costs is not None else "different batch sizes"
        raise DbsError(
            f"the plan {list(plan.batch_sizes)} gives the ranks {what}, but no "
            "dbs_hvd optimizer weights their gradients: hvd.DistributedOptimizer would average "
            "unequal batches with equal weights. Wrap the optimizer with "
            "dbs_hvd.DistributedOptimizer(optimizer, sampler, ...) (or "
            "dbs_hvd.ModelAveragingOptimizer) before iterating, or, for plain Horovod, use "
            "a global_batch divisible by the world size and the equal plan"
        )

    @property
    def steps_generated(self) -> int:
        """Steps of this epoch already handed out; a new plan can start no earlier."""
        return self._generated

    def peek_consumed(self, index: int = 0) -> StepBatch | None:
        """The batch ``pop_consumed`` would return ``index`` calls from now, left in place
        (None if none waits there)."""
        return self._yielded[index] if index < len(self._yielded) else None

    def pop_consumed(self) -> StepBatch:
        """The oldest batch handed out and not yet trained on (for gradient weighting)."""
        if not self._yielded:
            raise RuntimeError(
                "dbs_hvd: no batch from the DynamicBatchSampler is waiting for this "
                "optimizer step. Draw the training batches from the sampler (as the "
                "DataLoader's batch_sampler) and call optimizer.step() once per batch."
            )
        return self._yielded.popleft()

    def mark_trained(self, batch: StepBatch) -> None:
        """An optimizer step trained on ``batch`` (called by dbs_hvd's optimizer wrappers)."""
        if batch.epoch == self.epoch:
            self._trained = max(self._trained, batch.step + 1)

    @property
    def steps_trained(self) -> int:
        """Steps of the current epoch trained on, counted from its start."""
        return self._trained

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch``: a new permutation, the newest plan from step 0.

        Calling it again with the current epoch, before that epoch's pass is
        complete, keeps the position, so a run resumed mid-epoch
        (``load_state_dict``) continues where it stopped.

        Args:
            epoch: the epoch number; it seeds the permutation with ``seed``,
                so every rank must pass the same one.
        """
        if epoch != self.epoch or self._pass_complete:
            self._start_step = 0
            self._trained = 0
        self.epoch = int(epoch)
        self._schedule = [(0, self.plan)]
        self._generated = self._start_step
        self._pass_complete = False

    def set_plan(self, plan: Plan, start_step: int | None = None) -> None:
        """Use ``plan`` from ``start_step`` of this epoch on (default: the next step not handed out).

        A step already handed out keeps its plan: changing it would read some
        samples twice and others never.
        """
        self._check_plan(plan)
        start = self._generated if start_step is None else int(start_step)
        if start < self._generated:
            raise PlanError(
                f"cannot start a plan at step {start}: steps up to {self._generated - 1} "
                "were already handed out"
            )
        self._schedule = [(s, p) for s, p in self._schedule if s < start] + [(start, plan)]

    def retry_step(self, batch: StepBatch, bounds: Bounds, keep_until: int | None = None) -> list[int]:
        """Hand out ``batch``'s step again within new ``bounds``; return this rank's indices for it.

        After a step is abandoned on every rank (a rank ran out of memory,
        memory.py), its global batch is trained again under the plan in force
        there, fitted to the lowered caps (``fit_plan``): the same samples,
        split anew, so none is lost or read twice. Steps after it that some
        rank already handed out (prefetched), those before ``keep_until``,
        keep their plans, since a rank may be reading them; the plans from
        ``keep_until`` on are fitted too. The retried batch goes back to the
        front of the batches waiting for the optimizer, with its new size,
        for the gradient weighting. Every rank calls this with the same
        arguments, so the plans stay identical.

        Args:
            batch: the abandoned step's batch (``pop_consumed`` returned it).
            bounds: the bounds from now on (a rank's cap lowered).
            keep_until: the first step no rank has handed out (the largest
                ``steps_generated`` over the ranks); default this rank's.

        Returns:
            The sample indices this rank reads for the step.

        Raises:
            PlanError: for bounds no plan meets, or a step of another epoch
                or not handed out.
        """
        step = batch.step
        keep_until = self._generated if keep_until is None else max(int(keep_until), step + 1)
        if batch.epoch != self.epoch or not self._start_step <= step < self._generated:
            raise PlanError(
                f"cannot retry step {step} of epoch {batch.epoch}: steps {self._start_step} to "
                f"{self._generated - 1} of epoch {self.epoch} were handed out"
            )
        entries = [(start, plan) for start, plan in self._schedule if start < step]
        entries.append((step, fit_plan(self.plan_at(step), bounds)))
        entries += [(later, self.plan_at(later)) for later in range(step + 1, keep_until)]
        entries.append((keep_until, fit_plan(self.plan_at(keep_until), bounds)))
        entries += [(start, fit_plan(plan, bounds)) for start, plan in self._schedule if start > keep_until]
        self.bounds = bounds
        self._schedule = entries
        indices = self.indices(step)
        self._yielded.appendleft(self.step_batch(step, indices))
        return indices

    # -- elastic worlds ---------------------------------------------------------------

    def resize(self, rank: int, world_size: int, plan: Plan | None = None) -> None:
        """Follow a new world after an elastic reset: this rank's new identity and a new plan.

        The stream itself (epoch, permutation, position) is untouched: global
        batch ``t`` depends only on ``(seed, epoch)``, so the new world reads the
        rest of the epoch from where the old one stopped and only the split of
        each global batch changes. ``plan`` defaults to the equal split. Batches
        handed out to the old world but not trained on are forgotten.
        """
        if not 0 <= rank < world_size:
            raise PlanError(f"rank {rank} is outside a world of {world_size}")
        if self.bounds.rank_max is not None and len(self.bounds.rank_max) != world_size:
            # Per-rank caps name the old world's ranks: the new world starts without them.
            self.bounds = replace(self.bounds, rank_max=None)
        _check_fits(self.global_batch, world_size, self.bounds)
        plan = plan or Plan.equal(self.global_batch, world_size, self.bounds)
        self._check_plan(plan, world_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self._restart(self.epoch, self._start_step, plan)

    def seek(self, epoch: int, position: int) -> None:
        """Continue at step ``position`` of ``epoch`` with the newest plan (an elastic restart).

        Unlike ``set_epoch``, the epoch may be resumed mid-way: the steps before
        ``position`` were trained on by the world that committed them.
        """
        if not 0 <= position <= self.steps_per_epoch:
            raise PlanError(f"position {position} is outside an epoch of {self.steps_per_epoch} steps")
        self._restart(epoch, position, self.plan)

    def _restart(self, epoch: int, position: int, plan: Plan) -> None:
        """Read ``epoch`` from step ``position`` on with ``plan``; forget undelivered batches."""
        self.epoch = int(epoch)
        self._start_step = int(position)
        self._trained = self._start_step
        self._schedule = [(0, plan)]
        self._generated = self._start_step
        self._pass_complete = False
        self._yielded.clear()

    def _check_plan(self, plan: Plan, world_size: int | None = None) -> None:
        world_size = self.world_size if world_size is None else world_size
        if plan.world_size != world_size:
            raise PlanError(f"plan for {plan.world_size} ranks in a world of {world_size}")
        plan.check(self.global_batch, self.bounds)

    # -- checkpoints -----------------------------------------------------------------

    def state_dict(self, position: int | None = None) -> dict[str, Any]:
        """Where the stream stands: epoch, the step to resume from, and the plan in force there.

        Args:
            position: the step to resume from; default the steps of this epoch
                trained on so far (optimizer steps through dbs_hvd's wrapper,
                not batches a DataLoader prefetched), or, with no wrapper, the
                step this pass started at.

        Returns:
            A dict of plain values for ``load_state_dict`` (and ``torch.save``).
        """
        position = self._trained if position is None else int(position)
        return {
            "epoch": self.epoch,
            "position": position,
            "plan": list(self.plan_at(position).batch_sizes),
            "seed": self.seed,
            "dataset_size": self.dataset_size,
            "global_batch": self.global_batch,
            "costs": self.costs.digest() if self.costs is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the stream where ``state_dict`` left it.

        Args:
            state: what ``state_dict`` returned. The next pass starts at its
                position; a ``set_epoch`` call for the same epoch keeps it.

        Raises:
            PlanError: for a state from another data set, global batch, seed or
                costs, or whose plan does not fit this world and these bounds.

        Example::

            sampler.load_state_dict(checkpoint["sampler"])
            for epoch in range(checkpoint["sampler"]["epoch"], epochs):
                sampler.set_epoch(epoch)  # the saved epoch continues at its saved step
                ...
        """
        mine = self.state_dict(0)
        for key in ("seed", "dataset_size", "global_batch", "costs"):
            if state.get(key) != mine[key]:
                raise PlanError(
                    f"sampler state has {key}={state.get(key)}, this run has {mine[key]}: "
                    "resume with the configuration the state was saved with"
                )
        plan = Plan(tuple(state["plan"]))
        self._check_plan(plan)
        self._restart(state["epoch"], state["position"], plan)


def _horovod_size() -> int:
    """The number of Horovod ranks, or 1 where Horovod is not running."""
    try:
        import horovod.torch as hvd

        return hvd.size() if hvd.is_initialized() else 1
    except (ImportError, ValueError):
        return 1


def _check_fits(global_batch: int, world_size: int, bounds: Bounds) -> None:
    """Raise PlanError unless some plan of ``global_batch`` for ``world_size`` ranks meets ``bounds``."""
    if isinstance(global_batch, int) and not isinstance(global_batch, bool) and 0 < global_batch < world_size:
        raise PlanError(
            f"global_batch={global_batch} is smaller than the world size {world_size}: "
            f"every rank needs at least one sample per step; pass global_batch= of at "
            f"least {world_size} or launch fewer ranks"
        )
    bounds.check(global_batch, world_size)
