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
That path is what DBS costs where there is nothing to balance. The
output-gradient hook below measured 50-100 us of CPU time on a 2.2 ms MLP
step (one process); on the allreduce-bound MLP benchmark (2 ranks, 150
epoch rounds in one job) ``static`` took 1.019 of plain Horovod's epoch
time with the skip and 1.026 without it.

The weighting is a Horovod *compressor* wrapping the user's own (fp16
compression still works): it is the hook Horovod calls on every gradient right
before the allreduce. Given the model (``model=``), the weight goes on the
model's output gradient instead, and the gradients arrive already weighted. The batch size of the step comes from the sampler, in the
order the batches were handed out, which is the order a DataLoader delivers
them even when it prefetches.

The same wrapper also times each step (compute vs. waiting in ``synchronize``)
and triggers rebalancing at the end of every epoch and, if asked, every K
steps, so a user script needs no extra call.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import torch

from .balancer import RebalanceRecord, Rebalancer
from .comm import Exchange, check_same_on_all_ranks, default_exchange
from .plan import Policy
from .policies import make_policy
from .sampler import DynamicBatchSampler, StepBatch
from .schedule import RebalanceSchedule, rebalance_due
from .timing import StepTimer


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
    ``synchronize``/``step`` wrap the instance's own methods. Horovod's optimizer
    class calls ``super(self.__class__, self)``, so its class must not be
    subclassed or swapped; instance attributes leave it untouched.
    """

    def __init__(self, sampler: DynamicBatchSampler, rebalancer: Rebalancer,
                 timer: StepTimer, discount_new_sizes: bool = False) -> None:
        self.sampler = sampler
        self.rebalancer = rebalancer
        self.timer = timer
        # Mark each rank's first step at a batch size as new (timing.py): on a
        # GPU it builds kernel plans and is no measure of the rank's speed.
        self.discount_new_sizes = discount_new_sizes
        self._sizes_seen: set[int] = set()
        self._batch: StepBatch | None = None

    def restart(self, exchange: Exchange, policy: Policy) -> None:
        """Continue in a new world after an elastic reset.

        Rank numbers now name other workers, so the policy starts afresh (its
        per-rank history described the old ranks), stats travel through the new
        world's exchange, and the step in flight and the partial timing window
        of the interrupted world are dropped. The sampler is resized separately.
        """
        self.rebalancer.exchange = exchange
        self.rebalancer.policy = policy
        self.rebalancer.restart_schedule()  # joining workers start with the first interval
        self._batch = None
        self.timer.take_window()
        self.timer.mark_start()

    def current_batch(self) -> StepBatch:
        """The batch this step trains on (taken from the sampler at first need)."""
        if self._batch is None:
            self._batch = self.sampler.pop_consumed()
        return self._batch

    def weight(self) -> float:
        """This step's gradient weight ``N * b_i / B`` (exactly 1 for an equal split)."""
        return self.weight_of(self.current_batch())

    def weight_of(self, batch: StepBatch) -> float:
        return batch.batch_size * self.sampler.world_size / self.sampler.global_batch

    def wrap_synchronize(self, synchronize: Callable[[], None]) -> Callable[[], None]:
        def timed_synchronize() -> None:
            with self.timer.waiting():
                synchronize()

        return timed_synchronize

    def is_last_of_epoch(self, batch: StepBatch) -> bool:
        return batch.step == self.sampler.steps_per_epoch - 1

    def finish_step(self, batch: StepBatch) -> None:
        """Close the step's timing; rebalance at epoch ends and every ``interval`` steps.

        Every rank runs the same steps and holds the same interval (rank 0
        broadcasts it with the plan), so all reach each rebalance together. The
        steps since the last rebalance are the timer's open window; one that
        comes due just before the epoch ends runs on to it (``rebalance_due``).
        """
        self._batch = None
        new_size = self.discount_new_sizes and batch.batch_size not in self._sizes_seen
        if new_size:
            self._sizes_seen.add(batch.batch_size)
        self.timer.end_step(batch.batch_size, start_hint=self.sampler.iteration_started_at,
                            new_size=new_size)
        steps_left = self.sampler.steps_per_epoch - 1 - batch.step
        if steps_left == 0 or rebalance_due(
                self.timer.window.steps, self.rebalancer.interval, steps_left):
            self.rebalancer.rebalance(batch.step)

    def wrap_step(self, step: Callable[..., Any]) -> Callable[..., Any]:
        def dynamic_batch_step(closure: Optional[Callable[[], float]] = None):
            batch = self.current_batch()
            result = step(closure)
            self.finish_step(batch)
            return result

        return dynamic_batch_step

    def weight_model_output(self, model: torch.nn.Module) -> None:
        """Apply the weight to the gradient at ``model``'s output instead of to parameter grads.

        Needed for exactness with ``hvd.SyncBatchNorm``: its backward sums
        per-rank gradient statistics across ranks, and those sums are only the
        global-batch ones (times ``N``, which the Average allreduce divides
        out, as the backward is linear in the output gradient) if every rank's
        output gradient already carries its weight. A step whose weight is 1
        (an equal split) registers nothing.
        """

        def scale(grad: torch.Tensor) -> torch.Tensor:
            return grad * self.weight()

        def register(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            # The step's batch without consuming it: a forward outside a
            # training step must not take the next step's batch.
            batch = self._batch if self._batch is not None else self.sampler.peek_consumed()
            if batch is not None and self.weight_of(batch) == 1.0:
                return
            tensors = output.values() if isinstance(output, dict) else (
                output if isinstance(output, (tuple, list)) else (output,))
            for tensor in tensors:
                if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                    tensor.register_hook(scale)

        self._output_hook = model.register_forward_hook(register)

    @property
    def last_rebalance(self) -> RebalanceRecord | None:
        history = self.rebalancer.history
        return history[-1] if history else None


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    sampler: DynamicBatchSampler,
    named_parameters: Optional[Iterable[tuple[str, torch.nn.Parameter]]] = None,
    policy: Union[str, Policy] = "dbs",
    rebalance_every: Optional[int] = None,
    rebalance_budget: Optional[float] = None,
    rebalance_min_seconds: float = 0.0,
    compression: Any = None,
    exchange: Optional[Exchange] = None,
    device_sync: Optional[Callable[[], None]] = None,
    model: Optional[torch.nn.Module] = None,
    discount_new_sizes: Optional[bool] = None,
    batch_multiple: int = 1,
    **horovod_kwargs: Any,
) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` for dynamic batch sizes; a drop-in for ``hvd.DistributedOptimizer``.

    Args:
        optimizer: the local optimizer, as for Horovod.
        sampler: the DynamicBatchSampler that feeds the training loop.
        named_parameters: as for Horovod (names make allreduce matching robust).
        policy: a Policy, or a registered name ("dbs", our default; "paper"; "static").
        rebalance_every: also rebalance every K steps inside an epoch (default:
            only at the end of each epoch).
        rebalance_budget: with ``rebalance_every``, stretch the interval so the
            measured cost of a rebalance stays within this fraction of the
            step time (0.02 is dbs-train's default; short steps then rebalance
            less often, see schedule.py). Default: exactly every K steps.
        rebalance_min_seconds: with ``rebalance_every``, also keep at least this
            much wall time between rebalances (dbs-train's default: 0.15 s).
        compression: a Horovod compressor applied after the weighting.
        exchange: how per-rank stats travel (default: mpi4py under MPI,
            Horovod's object collectives under Gloo).
        device_sync: called before timing the allreduce wait (use
            ``torch.cuda.synchronize`` on GPUs, see timing.py).
        model: give the model when it uses ``hvd.SyncBatchNorm``: the weight is
            then applied at the model's output (see ``weight_model_output``).
            Cheaper too where parameters outnumber outputs: one small tensor
            is scaled per step instead of every gradient.
        discount_new_sizes: leave each rank's first step at a batch size out
            of its measured speed (default: where the parameters are on a
            GPU, whose first step at a new size builds kernel plans).
        batch_multiple: keep every local batch a multiple of this many
            samples (grid.py; with ``policy`` given by name). On a GPU a
            multiple such as 8 leaves fewer new sizes to pay for.
        horovod_kwargs: passed to ``hvd.DistributedOptimizer`` (``op`` is fixed to Average).

    Every rank checks, collectively, that all ranks use the same global batch,
    seed, data set size, bounds and policy; a mismatch is a DbsError on all ranks.
    """
    import horovod.torch as hvd

    if "op" in horovod_kwargs:
        raise TypeError("op is fixed to hvd.Average: each rank's gradient is pre-weighted by "
                        "N * b_i / B (its share of the global batch)")
    state = dynamic_batch_state(sampler, policy, rebalance_every, exchange, device_sync,
                                rebalance_budget, rebalance_min_seconds,
                                discount_new_sizes=resolve_discount_new_sizes(
                                    discount_new_sizes, optimizer),
                                batch_multiple=batch_multiple)
    if model is not None:
        state.weight_model_output(model)  # the gradients arrive weighted: nothing to scale
        compression = compression if compression is not None else hvd.Compression.none
    else:
        compression = LocalBatchWeighting(state.weight, compression)
    wrapped = hvd.DistributedOptimizer(
        optimizer, named_parameters=named_parameters, compression=compression, op=hvd.Average,
        **horovod_kwargs,
    )
    wrapped.dbs = state
    wrapped.rebalancer = state.rebalancer
    wrapped.synchronize = state.wrap_synchronize(wrapped.synchronize)
    wrapped.step = state.wrap_step(wrapped.step)
    return wrapped


def resolve_discount_new_sizes(choice: Optional[bool], optimizer: torch.optim.Optimizer) -> bool:
    """``choice``, or by default whether any of the optimizer's parameters is on a GPU."""
    if choice is not None:
        return bool(choice)
    return any(parameter.is_cuda for group in optimizer.param_groups
               for parameter in group["params"])


def dynamic_batch_state(sampler: DynamicBatchSampler, policy: Union[str, Policy],
                        rebalance_every: Optional[int], exchange: Optional[Exchange],
                        device_sync: Optional[Callable[[], None]],
                        rebalance_budget: Optional[float] = None,
                        rebalance_min_seconds: float = 0.0,
                        discount_new_sizes: bool = False,
                        batch_multiple: int = 1) -> DynamicBatchState:
    """The timing, policy and rebalancing shared by the gradient and averaging modes.

    Collective: every rank checks that all ranks use the same global batch,
    seed, data set size, bounds and policy; a mismatch is a DbsError on all ranks.
    """
    schedule = None if rebalance_every is None else RebalanceSchedule(
        rebalance_every, rebalance_budget, min_seconds=rebalance_min_seconds)
    if isinstance(policy, str):
        policy = make_policy(policy, sampler.global_batch, sampler.bounds,
                             batch_multiple=batch_multiple)
    elif batch_multiple != 1:
        raise ValueError("batch_multiple applies to a policy given by name; build a Policy "
                         "object on the grid with make_policy(name, global_batch, bounds, "
                         "batch_multiple=M)")
    exchange = exchange or default_exchange()
    check_same_on_all_ranks(exchange, {
        "global_batch": sampler.global_batch,
        "seed": sampler.seed,
        "dataset_size": sampler.dataset_size,
        "world_size": sampler.world_size,
        "min_batch": sampler.bounds.min_batch,
        "max_batch": sampler.bounds.max_batch,
        "policy": policy.name,
        "batch_multiple": getattr(policy, "multiple", 1),
        "rebalance_every": rebalance_every,
        "rebalance_budget": rebalance_budget,
        "rebalance_min_seconds": rebalance_min_seconds,
        "shuffle": sampler.shuffle,
    })
    timer = StepTimer(device_sync=device_sync)
    # Room for two epochs of rebalances (epoch summaries read the last one), at least 4096.
    per_epoch = sampler.steps_per_epoch // (rebalance_every or sampler.steps_per_epoch) + 1
    rebalancer = Rebalancer(sampler, policy, exchange, timer,
                            history_limit=max(4096, 2 * per_epoch), schedule=schedule)
    return DynamicBatchState(sampler, rebalancer, timer, discount_new_sizes)
