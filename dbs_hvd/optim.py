"""Gradients weighted by local batch size, on top of Horovod's DistributedOptimizer.

With local batch ``b_i`` out of a global batch ``B`` on ``N`` ranks, each
rank's gradient is the mean over its ``b_i`` samples. Multiplying it by
``N * b_i / B`` and averaging over ranks gives the mean over all ``B`` samples:
exactly the single-process update on the global batch, whatever the plan
(invariant 3). Horovod refuses per-rank prescale factors, so the weighting is
applied locally, just before each gradient enters the allreduce, and the
allreduce is Horovod's own ``op=hvd.Average``. Horovod's ring-allreduce and
tensor fusion are untouched.

The weight is ``N * b_i / B`` rather than the paper's ``b_i / B`` with a Sum so
that it is exactly 1 on every rank of an equal split: a step of the equal
split then skips the weighting altogether and takes plain Horovod's path.
That path is what DBS costs where there is nothing to balance (the skip's
measured effect is in docs/design.md, "Measurements behind the defaults").

The weighting is a Horovod *compressor* wrapping the user's own (fp16
compression still works): it is the hook Horovod calls on every gradient right
before the allreduce. Given the model (``model=``), the weight goes on the
model's output gradient instead, and the gradients arrive already weighted.
The batch size of the step comes from the sampler, in the order the batches
were handed out, which is the order a DataLoader delivers
them even when it prefetches.

The same wrapper also times each step (compute vs. waiting in ``synchronize``)
and triggers rebalancing every few steps and at epoch ends
(``RebalanceOptions``), so a user script needs no extra call.

What a Horovod script does keeps working:

* LR schedulers: ``step`` is a bound method, as torch's schedulers expect.
* Gradient accumulation (``backward_passes_per_step=k``): each backward pass
  is one micro-batch, one batch from the sampler, and its gradient is
  weighted by its own size as it is accumulated (per-parameter gradient
  hooks, or the output hook with ``model=``), so plans may move at any step
  and the update stays the single-process one on the same global batches.
  Rebalancing happens only at optimizer steps.
* The Horovod clipping and mixed-precision recipe (``synchronize()``, unscale,
  clip, ``with skip_synchronize(): scaler.step(optimizer)``): when
  ``torch.amp.GradScaler`` skips ``step()`` after an overflow (the overflow is
  in the allreduced gradients, so every rank skips alike), the step is closed
  at the next sign of training (``zero_grad``, a forward, a new
  ``synchronize``): its batches count as trained, its time ends where its
  ``synchronize`` ended, and a rebalance due there runs on every rank.
  ``step()`` after an explicit ``synchronize()`` skips the second allreduce
  on its own.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import socket
import time
import types
from collections.abc import Iterable, Sequence
from typing import Any, Callable

import torch

from .balancer import Rebalancer, RebalanceRecord
from .comm import DbsError, Exchange, LocalExchange, check_same_on_all_ranks, default_exchange
from .dropping import ZeroSamplePolicy
from .options import RebalanceOptions, ZeroSampleOptions, resolve_options
from .plan import PlanError, Policy
from .policies import make_policy
from .quota import min_window_seconds, own_quota
from .sampler import DynamicBatchSampler, StepBatch
from .schedule import rebalance_due
from .timing import StepTimer, WindowTotals
from .waiting import install_quiet_wait


class LocalBatchWeighting:
    """A Horovod compressor that scales each gradient by ``N * b_i / B`` before the allreduce."""

    def __init__(self, weight: Callable[[], float], inner: Any = None) -> None:
        import horovod.torch as hvd

        self._weight = weight
        self.inner = inner if inner is not None else hvd.Compression.none

    def compress(self, tensor: torch.Tensor):
        weight = self._weight()
        if weight != 1.0:  # an equal split: plain Horovod's gradients
            tensor.mul_(weight)
        return self.inner.compress(tensor)

    def decompress(self, tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        return self.inner.decompress(tensor, ctx)


class DynamicBatchState:
    """What the wrapper adds to Horovod's optimizer: step timing, weights, rebalancing.

    It is attached to the optimizer instance (``optimizer.dbs``) and its
    ``synchronize``/``step``/``zero_grad`` wrap the instance's own methods.
    Horovod's optimizer class calls ``super(self.__class__, self)``, so its
    class must not be subclassed or swapped; instance attributes (bound
    methods, so torch's LR schedulers can wrap ``step``) leave it untouched.
    """

    def __init__(
        self,
        sampler: DynamicBatchSampler,
        rebalancer: Rebalancer,
        timer: StepTimer,
        discount_new_sizes: bool = False,
    ) -> None:
        self.sampler = sampler
        self.rebalancer = rebalancer
        self.timer = timer
        # Mark each rank's first step at a batch size as new (timing.py): on a
        # GPU it builds kernel plans and is no measure of the rank's speed.
        self.discount_new_sizes = discount_new_sizes
        self._sizes_seen: set[int] = set()
        self._batch: StepBatch | None = None
        # Gradient accumulation: backward passes (micro-batches) per optimizer step.
        self.backward_passes_per_step = 1
        self._passes: dict[int, int] = {}  # per parameter: backward passes seen this step
        self._forwards = 0  # model=: forwards recording gradients this step
        self._synced_at: float | None = None  # synchronize() returned, no step() yet
        self._in_step = False
        self._param_hooks: list = []
        self.last_step: list[StepBatch] = []  # the batches of the last step closed
        # This rank's measured totals over the last epoch completed, whichever
        # rebalance windows it fell into (epoch summaries read them).
        self.last_epoch = WindowTotals()
        self._epoch_began = dataclasses.replace(timer.totals)
        # Set by dynamic_batch_state: the settings all ranks must share, the
        # policy as built (before any measurement), and whether an elastic
        # world is still to be adopted (ElasticState.sync) before rebalancing.
        self.settings: dict[str, Any] = {}
        self.fresh_policy: Policy | None = None
        self.awaiting_world = False
        sampler._on_take = timer.taken
        sampler._weighted = True

    def restart(self, exchange: Exchange, policy: Policy) -> None:
        """Continue in a new world after an elastic reset.

        Rank numbers now name other workers, so the policy starts afresh (its
        per-rank history described the old ranks), stats travel through the new
        world's exchange, and the step in flight, the partial timing window
        and this epoch's totals so far (``last_epoch``) of the interrupted world
        are dropped: the new world trains again from its last commit. The
        sampler is resized separately.
        """
        self.rebalancer.exchange = exchange
        self.rebalancer.policy = policy
        self.rebalancer.restart_schedule()  # joining workers start with the first interval
        self.awaiting_world = False
        self._batch = None
        self._passes.clear()
        self._forwards = 0
        self._synced_at = None
        self.timer.take_window()
        self.timer.mark_start()
        self._epoch_began = dataclasses.replace(self.timer.totals)

    @property
    def accumulating(self) -> bool:
        return self.backward_passes_per_step > 1

    def current_batch(self) -> StepBatch:
        """The batch this step trains on (taken from the sampler at first need)."""
        self.close_skipped_step()
        if self._batch is None:
            self._batch = self.sampler.pop_consumed()
            self.timer.activity()
        return self._batch

    def weight(self) -> float:
        """This step's gradient weight ``N * b_i / B`` (exactly 1 for an equal split);
        ``N * c_i / C`` in cost mode, the rank's share of the step's cost."""
        return self.weight_of(self.current_batch())

    def allreduce_weight(self) -> float:
        """The weight the compressor applies: 1 when micro-batches were weighted one by one."""
        return 1.0 if self.accumulating else self.weight()

    def weight_of(self, batch: StepBatch) -> float:
        if batch.cost is not None and batch.step_cost is not None:
            return self.sampler.world_size * batch.cost / batch.step_cost
        return batch.batch_size * self.sampler.world_size / self.sampler.global_batch

    def micro_batch_weight(self, index: int) -> float:
        """The weight of this optimizer step's micro-batch ``index`` (not yet consumed)."""
        self.close_skipped_step()
        self.timer.activity()
        batch = self.sampler.peek_consumed(index)
        if batch is None:
            raise RuntimeError(
                f"dbs_hvd: backward pass {index + 1} of this optimizer step has no batch "
                "from the DynamicBatchSampler waiting: with backward_passes_per_step, draw "
                "one batch from the sampler per backward pass and call optimizer.step() "
                "after at most backward_passes_per_step of them"
            )
        return self.weight_of(batch)

    def step_batches(self) -> list[StepBatch]:
        """The batches this optimizer step trained on, taken from the sampler."""
        if not self.accumulating:
            return [self.current_batch()]
        passes = max(max(self._passes.values(), default=0), self._forwards, 1)
        self._passes.clear()
        self._forwards = 0
        return [self.sampler.pop_consumed() for _ in range(passes)]

    def wrap_synchronize(self, synchronize: Callable[[], None]) -> Callable[[Any], None]:
        def timed_synchronize(optimizer: Any) -> None:
            if not self._in_step:
                self.close_skipped_step()
            with self.timer.waiting():
                synchronize()
            self._synced_at = self.timer._clock()

        return timed_synchronize

    def wrap_zero_grad(self, zero_grad: Callable[..., None]) -> Callable[..., None]:
        def zero_grad_and_note(optimizer: Any, *args: Any, **kwargs: Any) -> None:
            self.close_skipped_step()
            self.timer.activity()
            return zero_grad(*args, **kwargs)

        return zero_grad_and_note

    def close_skipped_step(self) -> None:
        """Close a step whose gradients were synchronized but whose ``step()`` was skipped.

        ``torch.amp.GradScaler`` skips ``optimizer.step()`` when the gradients
        hold an inf or NaN; they are the allreduced ones, so every rank skips
        the same step and reaches this call at the same point. The step's
        batches count as trained and its time ends where ``synchronize``
        returned.
        """
        if self._synced_at is None or self._in_step:
            return
        end, self._synced_at = self._synced_at, None
        self.finish_step(self.step_batches(), end=end)

    def is_last_of_epoch(self, batch: StepBatch) -> bool:
        return batch.step == self.sampler.steps_per_epoch - 1

    def finish_step(self, batches: StepBatch | Sequence[StepBatch], end: float | None = None) -> None:
        """Close the step's timing; rebalance every ``interval`` steps and at epoch ends.

        Every rank runs the same steps and holds the same interval (rank 0
        broadcasts it with the plan), so all reach each rebalance together. The
        steps since the last rebalance are the timer's open window; one that
        comes due just before the epoch ends runs on to it, and one still
        short at the epoch's end runs on into the next epoch
        (``rebalance_due``). The epoch's last step also closes this rank's
        totals for the epoch (``last_epoch``). With gradient accumulation,
        ``batches`` are the step's micro-batches.
        """
        batches = [batches] if isinstance(batches, StepBatch) else list(batches)
        self._batch = None
        self.last_step = batches
        news = []
        for batch in batches:
            # A probe (a rank with 0 samples, dropping.py) is timed as a step of its size.
            size = batch.batch_size or batch.probe
            # In cost mode the sample count changes from step to step with the
            # costs; a new count there says nothing about new kernels.
            new_size = self.discount_new_sizes and batch.cost is None and size not in self._sizes_seen
            if new_size:
                self._sizes_seen.add(size)
            news.append(new_size)
            self.sampler.mark_trained(batch)
        self.timer.end_step(
            [b.units(self.sampler.global_batch) or b.probe for b in batches],
            start_hint=self.sampler.iteration_started_at,
            new_size=news,
            end=end,
        )
        last = batches[-1]
        if any(self.is_last_of_epoch(b) for b in batches):
            steps_left = 0
            self.last_epoch = self.timer.totals.since(self._epoch_began)
            self._epoch_began = dataclasses.replace(self.timer.totals)
        else:
            steps_left = self.sampler.steps_per_epoch - 1 - last.step
        if rebalance_due(self.timer.window.steps, self.rebalancer.interval, steps_left):
            if self.awaiting_world:
                raise DbsError(
                    "dbs_hvd under elastic Horovod: run the training function under "
                    "hvd.elastic.run with a dbs_hvd.ElasticState(model, optimizer, sampler), "
                    "which checks the ranks' settings and adopts each world"
                )
            self.rebalancer.rebalance(last.step)

    def wrap_step(self, step: Callable[..., Any]) -> Callable[..., Any]:
        def dynamic_batch_step(optimizer: Any, closure: Callable[[], float] | None = None):
            # A synchronize() already made (_synced_at) belongs to this step.
            self._in_step = True
            try:
                batches = self.step_batches()
                if self._synced_at is not None and getattr(optimizer, "_should_synchronize", False):
                    # synchronize() already ran for this step: do not allreduce twice.
                    with optimizer.skip_synchronize():
                        result = step(closure)
                else:
                    result = step(closure)
            finally:
                self._in_step = False
            self._synced_at = None
            self.finish_step(batches)
            return result

        return dynamic_batch_step

    def weight_parameter_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """With gradient accumulation, weight each micro-batch's gradient as it arrives.

        A leaf's gradient hook sees one backward pass's gradient before it is
        added to ``.grad``; the ``j``-th pass of an optimizer step is the
        step's ``j``-th batch from the sampler. A pass of weight 1 is left as is.
        """
        for parameter in parameters:
            if not parameter.requires_grad:
                continue

            def scale(grad: torch.Tensor, key: int = id(parameter)) -> torch.Tensor | None:
                index = self._passes.get(key, 0)
                self._passes[key] = index + 1
                weight = self.micro_batch_weight(index)
                return None if weight == 1.0 else grad * weight

            self._param_hooks.append(parameter.register_hook(scale))

    def weight_model_output(self, model: torch.nn.Module) -> None:
        """Apply the weight to the gradient at ``model``'s output instead of to parameter grads.

        Needed for exactness with ``hvd.SyncBatchNorm``: its backward sums
        per-rank gradient statistics across ranks, and those sums are only the
        global-batch ones (times ``N``, which the Average allreduce divides
        out, as the backward is linear in the output gradient) if every rank's
        output gradient already carries its weight. A step whose weight is 1
        (an equal split) registers nothing. With gradient accumulation, the
        ``j``-th forward that records gradients in an optimizer step is
        weighted by the step's ``j``-th batch.
        """

        def register(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            tensors = [
                tensor
                for tensor in (
                    output.values()
                    if isinstance(output, dict)
                    else (output if isinstance(output, (tuple, list)) else (output,))
                )
                if isinstance(tensor, torch.Tensor) and tensor.requires_grad
            ]
            if not tensors:
                return  # evaluation (no_grad): not part of a training step
            if self.accumulating:
                index = self._forwards
                self._forwards += 1
                weight = self.micro_batch_weight(index)
            else:
                # The step's batch without consuming it: a forward outside a
                # training step must not take the next step's batch.
                self.close_skipped_step()
                self.timer.activity()
                batch = self._batch if self._batch is not None else self.sampler.peek_consumed()
                if batch is not None and self.weight_of(batch) == 1.0:
                    return
                weight = None  # read when the gradient arrives (the batch popped then)
            if weight == 1.0:
                return

            def scale(grad: torch.Tensor) -> torch.Tensor:
                return grad * (self.weight() if weight is None else weight)

            for tensor in tensors:
                tensor.register_hook(scale)

        self._output_hook = model.register_forward_hook(register)

    @property
    def last_rebalance(self) -> RebalanceRecord | None:
        history = self.rebalancer.history
        return history[-1] if history else None


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    sampler: DynamicBatchSampler,
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]] | None = None,
    policy: str | Policy = "dbs",
    rebalance: RebalanceOptions | None = None,
    compression: Any = None,
    exchange: Exchange | None = None,
    device_sync: Callable[[], None] | None = None,
    model: torch.nn.Module | None = None,
    discount_new_sizes: bool | None = None,
    batch_multiple: int = 1,
    zero_samples: ZeroSampleOptions | None = None,
    rebalance_every: int | None = None,
    rebalance_budget: float | None = None,
    rebalance_min_seconds: float | None = None,
    **horovod_kwargs: Any,
) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` for dynamic batch sizes; a drop-in for ``hvd.DistributedOptimizer``.

    Each rank's gradient is weighted by its share of the global batch before
    Horovod's allreduce, so every update equals one process's update on the
    whole global batch; each step is timed (compute apart from allreduce
    wait) and the plan is rebalanced on the schedule of ``rebalance``.

    Args:
        optimizer: the local optimizer, as for Horovod.
        sampler: the DynamicBatchSampler that feeds the training loop.
        named_parameters: as for Horovod (names make allreduce matching robust).
        policy: a Policy, or a registered name ("dbs", the default; "paper";
            "static").
        rebalance: when to rebalance (``RebalanceOptions``); default the
            recommended schedule (every 2 steps for "dbs", stretched to cost
            at most 2% and to at least 0.15 s apart).
        compression: a Horovod compressor applied after the weighting.
        exchange: how per-rank stats travel (default: mpi4py under MPI,
            Horovod's object collectives under Gloo).
        device_sync: called before timing the allreduce wait (use
            ``torch.cuda.synchronize`` on GPUs, see timing.py).
        model: the model. Give it when it uses ``hvd.SyncBatchNorm`` (the
            weight is then applied at the model's output, see
            ``weight_model_output``) or plain BatchNorm (the smallest local
            batch is then raised to 2: a batch of one sample cannot be
            normalised in training). Cheaper too where parameters outnumber
            outputs: one small tensor is scaled per step instead of every
            gradient.
        discount_new_sizes: leave each rank's first step at a batch size out
            of its measured speed (default: where the parameters are on a
            GPU, whose first step at a new size builds kernel plans).
        batch_multiple: keep every local batch a multiple of this many
            samples (grid.py; with ``policy`` given by name). On a GPU a
            multiple such as 8 leaves fewer new sizes to pay for.
        zero_samples: ``ZeroSampleOptions``: with ``enabled``, a straggler
            may get 0 samples while the step is predicted faster without it
            (dropping.py); off by default.
        rebalance_every: older form of ``rebalance``: exactly every K steps
            (no budget or time floor unless ``rebalance_budget`` and
            ``rebalance_min_seconds`` say so); not together with ``rebalance``.
        rebalance_budget: older form of ``RebalanceOptions(budget=...)``.
        rebalance_min_seconds: older form of ``RebalanceOptions(min_seconds=...)``.
        horovod_kwargs: passed to ``hvd.DistributedOptimizer``
            (``backward_passes_per_step``, ``gradient_predivide_factor``,
            ``groups``, ...); ``op`` is fixed to Average.

    Returns:
        Horovod's optimizer with ``step``, ``synchronize`` and ``zero_grad``
        wrapped; ``optimizer.dbs`` and ``optimizer.rebalancer`` expose the
        state.

    Raises:
        TypeError: for ``op=`` (the weighting needs Average).
        ValueError: for bad rebalance options or ``backward_passes_per_step``.
        PlanError: when the bounds (with the BatchNorm floor) fit no plan.
        DbsError: on every rank, when the ranks' settings differ (a
            collective check of global batch, seed, data set size, bounds,
            policy, rebalance options and, in cost mode, the costs).

    Example::

        sampler = dbs_hvd.DynamicBatchSampler(len(train_set), global_batch=256)
        loader = DataLoader(train_set, batch_sampler=sampler)
        optimizer = dbs_hvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), sampler,
            named_parameters=model.named_parameters())
    """
    import horovod.torch as hvd

    if "op" in horovod_kwargs:
        raise TypeError(
            "op= is fixed to hvd.Average: each rank's gradient is pre-weighted by "
            "N * b_i / B (its share of the global batch); leave op= out"
        )
    passes = horovod_kwargs.get("backward_passes_per_step", 1)
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"backward_passes_per_step= must be a positive integer, got {passes!r}")
    if model is not None:
        require_batch_norm_floor(model, sampler, policy)
    options = resolve_options(rebalance, rebalance_every, rebalance_budget, rebalance_min_seconds)
    discount = resolve_discount_new_sizes(discount_new_sizes, optimizer)
    state = dynamic_batch_state(
        sampler, policy, options, exchange, device_sync, discount, batch_multiple, zero_samples
    )
    state.backward_passes_per_step = passes
    if model is not None:
        state.weight_model_output(model)  # the gradients arrive weighted: nothing to scale
        compression = compression if compression is not None else hvd.Compression.none
    else:
        compression = LocalBatchWeighting(state.allreduce_weight, compression)
        if passes > 1:
            state.weight_parameter_gradients(p for group in optimizer.param_groups for p in group["params"])
    wrapped = hvd.DistributedOptimizer(
        optimizer,
        named_parameters=named_parameters,
        compression=compression,
        op=hvd.Average,
        **horovod_kwargs,
    )
    wrapped.dbs = state
    wrapped.rebalancer = state.rebalancer
    set_passes = wrapped.set_backward_passes_per_step

    def set_backward_passes_per_step(self: Any, passes: int) -> None:
        if (passes > 1) != state.accumulating:
            raise ValueError(
                "dbs_hvd: give backward_passes_per_step= to dbs_hvd.DistributedOptimizer "
                "when it is built; switching between 1 and more passes later is not supported"
            )
        set_passes(passes)
        state.backward_passes_per_step = passes

    bind(wrapped, "set_backward_passes_per_step", set_backward_passes_per_step)
    bind(wrapped, "synchronize", state.wrap_synchronize(wrapped.synchronize))
    bind(wrapped, "zero_grad", state.wrap_zero_grad(wrapped.zero_grad))
    bind(wrapped, "step", state.wrap_step(wrapped.step))
    return wrapped


def bind(optimizer: torch.optim.Optimizer, name: str, function: Callable[..., Any]) -> None:
    """Set ``function(optimizer, ...)`` as the instance's method ``name``.

    A bound method rather than a plain function: torch's LR schedulers wrap
    ``optimizer.step`` through its ``__func__`` to count the steps taken.
    """
    setattr(optimizer, name, types.MethodType(function, optimizer))


def has_plain_batch_norm(model: torch.nn.Module) -> bool:
    """Whether ``model`` has BatchNorm layers that normalise each rank's batch alone."""
    return any(
        isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        and "SyncBatchNorm" not in type(module).__name__
        for module in model.modules()
    )


def require_batch_norm_floor(
    model: torch.nn.Module, sampler: DynamicBatchSampler, policy: str | Policy
) -> None:
    """Raise the sampler's smallest local batch to 2 where ``model`` has plain BatchNorm.

    In training, BatchNorm over a batch of one sample fails ("Expected more
    than 1 value per channel"); a slow rank could otherwise be planned down
    to one sample.
    """
    if not has_plain_batch_norm(model) or sampler.bounds.min_batch >= 2:
        return
    floor = dataclasses.replace(sampler.bounds, min_batch=2)
    if sampler.global_batch < 2 * sampler.world_size:
        raise PlanError(
            f"the model has BatchNorm layers, which need at least 2 samples per rank, but "
            f"global_batch={sampler.global_batch} on {sampler.world_size} ranks leaves fewer: "
            f"pass global_batch= of at least {2 * sampler.world_size}, or use hvd.SyncBatchNorm"
        )
    if not isinstance(policy, str) and policy.bounds.min_batch < 2:
        raise PlanError(
            "the model has BatchNorm layers, which need at least 2 samples per rank: build "
            "the policy with Bounds(min_batch=2) (and the sampler with bounds=Bounds("
            "min_batch=2)), or use hvd.SyncBatchNorm"
        )
    floor.check(sampler.global_batch, sampler.world_size)
    for _, plan in sampler._schedule:
        if min(plan.batch_sizes) < 2:
            raise PlanError(
                f"the model has BatchNorm layers, which need at least 2 samples per rank, "
                f"but the sampler's plan {list(plan.batch_sizes)} gives a rank fewer: pass "
                "a plan= with at least 2 per rank"
            )
    sampler.bounds = floor


def resolve_discount_new_sizes(choice: bool | None, optimizer: torch.optim.Optimizer) -> bool:
    """``choice``, or by default whether any of the optimizer's parameters is on a GPU."""
    if choice is not None:
        return bool(choice)
    return any(parameter.is_cuda for group in optimizer.param_groups for parameter in group["params"])


def dynamic_batch_state(
    sampler: DynamicBatchSampler,
    policy: str | Policy,
    rebalance: RebalanceOptions | None,
    exchange: Exchange | None,
    device_sync: Callable[[], None] | None,
    discount_new_sizes: bool = False,
    batch_multiple: int = 1,
    zero_samples: ZeroSampleOptions | None = None,
) -> DynamicBatchState:
    """The timing, policy and rebalancing shared by the gradient and averaging modes.

    Collective: every rank checks that all ranks use the same global batch,
    seed, data set size, bounds, policy, rebalance options and sample costs; a mismatch is
    a DbsError on all ranks. Horovod's collectives are made to wait without
    spinning (``waiting.install_quiet_wait``; ``DBS_HVD_HOROVOD_WAIT=spin``
    keeps Horovod's own wait), so a rank waiting for a slower one does not
    spend its CPU, or its CPU quota, on the wait.
    """
    install_quiet_wait()
    rebalance = rebalance if rebalance is not None else RebalanceOptions()
    if isinstance(policy, str):
        policy = make_policy(policy, sampler.global_batch, sampler.bounds, batch_multiple=batch_multiple)
    elif batch_multiple != 1:
        raise ValueError(
            "batch_multiple= applies to a policy given by name; build a Policy "
            "object on the grid with make_policy(name, global_batch, bounds, "
            "batch_multiple=M)"
        )
    if zero_samples is not None and zero_samples.enabled:
        if sampler.costs is not None:
            raise ValueError(
                "zero_samples= is not available with costs= (cost mode): a rank's cost share "
                "cannot be 0; leave one of them out"
            )
        policy = ZeroSamplePolicy(policy, zero_samples)
        sampler.bounds = dataclasses.replace(sampler.bounds, allow_zero=True)
        sampler.probe = (zero_samples.probe_every, zero_samples.probe_samples)
    # Under elastic Horovod, set-up must run no collective (a joining worker
    # sets up while the others wait in the state broadcast): the settings are
    # checked, and a real exchange made, when ElasticState adopts the world.
    elastic = exchange is None and os.environ.get("HOROVOD_ELASTIC") == "1"
    exchange = LocalExchange() if elastic else (exchange or default_exchange())
    settings = {
        "global_batch": sampler.global_batch,
        "seed": sampler.seed,
        "dataset_size": sampler.dataset_size,
        "world_size": sampler.world_size,
        "min_batch": sampler.bounds.min_batch,
        "max_batch": sampler.bounds.max_batch,
        "rank_max": sampler.bounds.rank_max,
        "policy": policy.name,
        "batch_multiple": getattr(policy, "multiple", 1),
        "rebalance": rebalance.resolved(policy.name),
        "shuffle": sampler.shuffle,
        "zero_samples": dataclasses.asdict(zero_samples) if zero_samples is not None else None,
        "costs": sampler.costs.digest() if sampler.costs is not None else None,
    }
    if not elastic:
        check_same_on_all_ranks(exchange, settings)
    schedule = rebalance.schedule_for(policy.name)
    every = rebalance.interval_for(policy.name)
    # A rank under a CPU quota: frozen time inside a wait is its own slowness,
    # and windows shorter than a few quota periods see its bursts, not its speed.
    quota = own_quota()
    group = (socket.gethostname(), str(quota.stat_path)) if quota is not None else None
    quotas = exchange.allgather((min_window_seconds(quota), group))
    floor = max(window for window, _ in quotas)
    if schedule is not None and floor > schedule.min_seconds:
        schedule = dataclasses.replace(schedule, min_seconds=floor)
    # Ranks in one quota group share it.
    share = quota.share / sum(1 for _, other in quotas if other == group) if quota is not None else None
    floor_mode = os.environ.get("DBS_HVD_QUOTA_FLOOR", "work")
    timer = StepTimer(
        device_sync=device_sync,
        frozen_clock=quota.throttled_seconds if quota is not None else None,
        cpu_share=share if floor_mode != "off" else None,
        work_clock=time.thread_time if floor_mode == "work" else None,
    )
    # Room for two epochs of rebalances (epoch summaries read the last one), at least 4096.
    per_epoch = sampler.steps_per_epoch // (every or sampler.steps_per_epoch) + 1
    rebalancer = Rebalancer(
        sampler, policy, exchange, timer, history_limit=max(4096, 2 * per_epoch), schedule=schedule
    )
    state = DynamicBatchState(sampler, rebalancer, timer, discount_new_sizes)
    state.settings = settings
    state.fresh_policy = copy.deepcopy(policy)  # a new world's policy starts from this
    state.awaiting_world = elastic
    return state
