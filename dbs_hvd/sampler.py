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
batch's size from ``pop_consumed`` in the order the batches were yielded.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from torch.utils.data import Sampler

from .plan import Bounds, Plan, PlanError


@dataclass(frozen=True)
class StepBatch:
    """One batch handed out: its step in the epoch and this rank's local batch size."""

    epoch: int
    step: int
    batch_size: int


class DynamicBatchSampler(Sampler[list]):
    """Yields this rank's sample indices for each step of an epoch, following the plan.

    Args:
        dataset_size: number of samples in the data set (``len(dataset)``).
        global_batch: samples per step over all ranks (``B``); fixed for the run.
        rank, world_size: this rank and the number of ranks; default to Horovod's.
        seed: seeds the per-epoch permutation; must be equal on every rank.
        shuffle: permute each epoch (``False`` reads the data in order).
        bounds: per-rank limits on the local batch size.
        plan: the initial plan; default the equal split.
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
    ) -> None:
        if rank is None or world_size is None:
            import horovod.torch as hvd

            rank = hvd.rank() if rank is None else rank
            world_size = hvd.size() if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise PlanError(f"rank {rank} is outside a world of {world_size}")
        bounds.check(global_batch, world_size)
        if dataset_size < global_batch:
            raise PlanError(
                f"the data set has {dataset_size} samples, fewer than the global batch "
                f"{global_batch}: not one step could run. Lower --global-batch to at most "
                f"{dataset_size} or use more data"
            )
        self.dataset_size = int(dataset_size)
        self.global_batch = int(global_batch)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.bounds = bounds
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
        return self.permutation()[step * self.global_batch:(step + 1) * self.global_batch]

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
        start = plan.offset(rank)
        return self.global_batch_indices(step)[start:start + plan.batch_sizes[rank]].tolist()

    # -- iteration -------------------------------------------------------------------

    def __iter__(self) -> Iterator[list]:
        # A new iteration discards batches an earlier iterator prefetched but
        # never delivered.
        self._yielded.clear()
        self.iteration_started_at = time.perf_counter()
        self._generated = self._start_step
        for step in range(self._start_step, self.steps_per_epoch):
            batch = self.indices(step)
            self._generated = step + 1
            self._yielded.append(StepBatch(self.epoch, step, len(batch)))
            yield batch

    @property
    def steps_generated(self) -> int:
        """Steps of this epoch already handed out; a new plan can start no earlier."""
        return self._generated

    def peek_consumed(self) -> StepBatch | None:
        """The batch ``pop_consumed`` would return next, left in place (None if none waits)."""
        return self._yielded[0] if self._yielded else None

    def pop_consumed(self) -> StepBatch:
        """The oldest batch handed out and not yet trained on (for gradient weighting)."""
        if not self._yielded:
            raise RuntimeError(
                "dbs_hvd: no batch from the DynamicBatchSampler is waiting for this "
                "optimizer step. Draw the training batches from the sampler (as the "
                "DataLoader's batch_sampler) and call optimizer.step() once per batch."
            )
        return self._yielded.popleft()

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch``: a new permutation, the newest plan from step 0."""
        if epoch != self.epoch:
            self._start_step = 0
        self.epoch = int(epoch)
        self._schedule = [(0, self.plan)]
        self._generated = self._start_step

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
        self.bounds.check(self.global_batch, world_size)
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
            raise PlanError(f"position {position} is outside an epoch of "
                            f"{self.steps_per_epoch} steps")
        self._restart(epoch, position, self.plan)

    def _restart(self, epoch: int, position: int, plan: Plan) -> None:
        """Read ``epoch`` from step ``position`` on with ``plan``; forget undelivered batches."""
        self.epoch = int(epoch)
        self._start_step = int(position)
        self._schedule = [(0, plan)]
        self._generated = self._start_step
        self._yielded.clear()

    def _check_plan(self, plan: Plan, world_size: int | None = None) -> None:
        world_size = self.world_size if world_size is None else world_size
        if plan.world_size != world_size:
            raise PlanError(f"plan for {plan.world_size} ranks in a world of {world_size}")
        plan.check(self.global_batch, self.bounds)

    # -- checkpoints -----------------------------------------------------------------

    def state_dict(self, position: int | None = None) -> dict[str, Any]:
        """Where the stream stands: epoch, the step to resume from, and the plan in force there."""
        position = self._start_step if position is None else int(position)
        return {
            "epoch": self.epoch,
            "position": position,
            "plan": list(self.plan_at(position).batch_sizes),
            "seed": self.seed,
            "dataset_size": self.dataset_size,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the stream; refuses a state from another data set, batch or seed."""
        for key in ("seed", "dataset_size", "global_batch"):
            if state[key] != getattr(self, key):
                raise PlanError(
                    f"sampler state has {key}={state[key]}, this run has {getattr(self, key)}: "
                    "resume with the configuration the state was saved with"
                )
        plan = Plan(tuple(state["plan"]))
        self._check_plan(plan)
        self._restart(state["epoch"], state["position"], plan)
