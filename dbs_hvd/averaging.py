"""Model averaging (local SGD) with dynamic batch sizes: the DBS paper's other family.

Each rank takes optimizer steps on its own batches without any per-step
communication; every ``average_every`` steps (and at the end of each epoch)
the parameters are averaged over ranks, each rank weighted by the samples it
processed since the last average. With uneven batches a plain mean would give
a rank that saw 5 samples the same say as one that saw 42; the weighted mean
counts every sample once.

With ``average_every=1`` and plain SGD the result is exactly the gradient
method's update (the average of ``theta - lr * g_i`` weighted by ``b_i / B`` is
``theta - lr * sum_i (b_i / B) g_i``); larger intervals trade that exactness for
fewer allreduces. Momentum and other optimizer state stay local.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

import torch

from .comm import Exchange
from .optim import bind, dynamic_batch_state, resolve_discount_new_sizes
from .options import RebalanceOptions, resolve_options
from .plan import Policy
from .sampler import DynamicBatchSampler


class _Averager:
    """Weighted parameter averaging, timed as allreduce wait."""

    def __init__(
        self, parameters: list[tuple[str, torch.nn.Parameter]], global_batch: int, every: int
    ) -> None:
        self.parameters = parameters
        self.global_batch = global_batch
        self.every = every
        self.samples: float = 0
        self.steps = 0

    def add(self, batch_size: float) -> None:
        self.samples += batch_size
        self.steps += 1

    def due(self, last_of_epoch: bool) -> bool:
        return self.steps > 0 and (self.steps >= self.every or last_of_epoch)

    def average(self) -> None:
        import horovod.torch as hvd

        weight = self.samples / (self.global_batch * self.steps)
        handles = []
        with torch.no_grad():
            for name, parameter in self.parameters:
                parameter.mul_(weight)
                handles.append(
                    hvd.allreduce_async_(parameter.data, op=hvd.Sum, name=f"dbs_hvd.average.{name}")
                )
            for handle in handles:
                hvd.synchronize(handle)
        self.samples = 0
        self.steps = 0


def ModelAveragingOptimizer(
    optimizer: torch.optim.Optimizer,
    sampler: DynamicBatchSampler,
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    average_every: int = 8,
    policy: str | Policy = "dbs",
    rebalance: RebalanceOptions | None = None,
    exchange: Exchange | None = None,
    device_sync: Callable[[], None] | None = None,
    discount_new_sizes: bool | None = None,
    batch_multiple: int = 1,
    rebalance_every: int | None = None,
    rebalance_budget: float | None = None,
    rebalance_min_seconds: float | None = None,
) -> torch.optim.Optimizer:
    """Wrap a local optimizer for local SGD with sample-weighted model averaging.

    The same sampler, timing and rebalancing as ``dbs_hvd.DistributedOptimizer``
    (``policy``, ``rebalance``, ``exchange``, ``device_sync``,
    ``discount_new_sizes``, ``batch_multiple`` and the older
    ``rebalance_every``/``rebalance_budget``/``rebalance_min_seconds`` as
    there); the time spent in the averaging allreduce counts as wait, not
    compute.

    Args:
        optimizer: the local optimizer; its state (momentum) stays local.
        sampler: the DynamicBatchSampler that feeds the training loop.
        named_parameters: the parameters to average, with unique names.
        average_every: average the parameters every this many steps (and at
            the end of each epoch).

    Returns:
        ``optimizer`` itself, with ``step`` wrapped (a bound method, so LR
        schedulers work) and ``optimizer.dbs``/``optimizer.rebalancer`` set.

    Raises:
        ValueError: for an ``average_every`` below 1 or bad rebalance options.
        DbsError: on every rank, when the ranks' settings differ.

    Example::

        optimizer = dbs_hvd.ModelAveragingOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), sampler,
            model.named_parameters(), average_every=4)
    """
    if isinstance(average_every, bool) or not isinstance(average_every, int) or average_every < 1:
        raise ValueError(f"average_every= must be a positive number of steps, got {average_every!r}")
    options = resolve_options(rebalance, rebalance_every, rebalance_budget, rebalance_min_seconds)
    discount = resolve_discount_new_sizes(discount_new_sizes, optimizer)
    state = dynamic_batch_state(sampler, policy, options, exchange, device_sync, discount, batch_multiple)
    averager = _Averager(list(named_parameters), sampler.global_batch, average_every)
    local_step = optimizer.step

    def averaging_step(self: Any, closure: Callable[[], float] | None = None) -> Any:
        if sampler.iteration_started_at is None:
            # No batch drawn yet: this is set-up, such as Horovod's
            # broadcast_optimizer_state creating the optimizer's state with a
            # zero-gradient step. Nothing to weigh, time or average.
            return local_step(closure)
        batch = state.current_batch()
        result = local_step(closure)
        averager.add(batch.units(sampler.global_batch))
        if averager.due(state.is_last_of_epoch(batch)):
            with state.timer.waiting():
                averager.average()
        state.finish_step(batch)
        return result

    bind(optimizer, "step", averaging_step)
    bind(optimizer, "zero_grad", state.wrap_zero_grad(optimizer.zero_grad))
    optimizer.dbs = state  # type: ignore[attr-defined]
    optimizer.rebalancer = state.rebalancer  # type: ignore[attr-defined]
    return optimizer
