"""Memory-capped ranks: a step that runs out of memory on one rank is trained again on all.

DBS gives the fastest rank the largest batch, and on a GPU that rank may not
have the memory for it. Without care an out-of-memory error on one rank ends
the job, or worse: the other ranks wait for its gradients until Horovod's
stall timeout. ``MemoryGuard`` runs each training step so that such a
failure costs one step's time instead:

1. The step's forward and backward run (the caller's ``attempt``); an
   out-of-memory error (``torch.OutOfMemoryError``, CUDA's included) is
   caught on the rank it happens on.
2. Every rank then completes the gradient allreduce, the failing rank with
   whatever gradients it has (missing ones are zeros): Horovod needs the same
   allreduces from every rank, and a rank that left them out would hang the
   others.
3. A small allgather of each rank's failed batch size (0: none) follows, on
   every rank, before any rank applies the update. Where all are 0 the
   update is applied; otherwise every rank abandons the step alike: no
   rank steps the optimizer, the gradients are cleared.
4. Each failing rank's cap drops below the size it failed at
   (``plan.cap_below``), the plan is fitted to the new caps (``fit_plan``,
   identical on every rank: it is computed from gathered figures), the
   policy plans within them from then on, and the step's global batch is
   handed out again under the fitted plan (``DynamicBatchSampler.retry_step``)
   and trained. No sample is lost or read twice, and the update is still the
   single-process one on the step's global batch.

Caps only fall, so repeated failures converge; a rank that fails at the
smallest batch allowed, or caps whose sum falls below the global batch, end
the run with a ``PlanError`` on every rank alike (all ranks hold the same
figures).

Testing without a GPU: ``DBS_HVD_INJECT_OOM="RANK:N[:PHASE],..."`` makes rank
``RANK`` raise ``torch.OutOfMemoryError`` in every training step whose local
batch is ``N`` samples or more; ``PHASE`` is ``forward`` (default: before the
model runs) or ``backward`` (in the middle of the backward pass, after some
gradients went into the allreduce). ``MemoryGuard`` installs it when given
the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from .options import MemoryOptions
from .plan import Bounds, PlanError, cap_below
from .sampler import StepBatch

INJECT_ENV = "DBS_HVD_INJECT_OOM"

BatchT = TypeVar("BatchT")
ResultT = TypeVar("ResultT")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure a smaller batch may avoid (CUDA's included)."""
    return isinstance(error, torch.OutOfMemoryError)


@dataclass(frozen=True)
class InjectedLimit:
    """One injected memory limit: ``rank`` fails at local batches of ``limit`` or more."""

    rank: int
    limit: int
    phase: str = "forward"


def parse_injection(text: str | None) -> list[InjectedLimit]:
    """Read ``DBS_HVD_INJECT_OOM``'s ``RANK:N[:PHASE]`` items, comma-separated.

    Args:
        text: the variable's value (None or empty: no injection).

    Returns:
        One limit per item.

    Raises:
        ValueError: naming the variable, for a malformed item.

    Examples:
        >>> parse_injection("1:30,2:8:backward")
        [InjectedLimit(rank=1, limit=30, phase='forward'), InjectedLimit(rank=2, limit=8, phase='backward')]
    """
    limits = []
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        parts = item.split(":")
        try:
            rank, limit = int(parts[0]), int(parts[1])
            phase = parts[2] if len(parts) > 2 else "forward"
        except (IndexError, ValueError):
            phase = ""
        if len(parts) > 3 or phase not in ("forward", "backward") or limit < 1 or rank < 0:
            raise ValueError(
                f"{INJECT_ENV} takes RANK:N[:forward|backward] items, comma-separated "
                f"(e.g. 1:30 or 1:30:backward), got {item!r}"
            )
        limits.append(InjectedLimit(rank, limit, phase))
    return limits


def inject_out_of_memory(model: torch.nn.Module, limits: Sequence[InjectedLimit], rank: int) -> list[Any]:
    """Make ``model`` raise ``torch.OutOfMemoryError`` on ``rank`` at batches over its limit.

    Only training steps fail (gradients enabled, the model in training mode),
    so evaluation is untouched. In the ``backward`` phase the error is raised
    when the gradient reaches the output of the model's first layer with
    parameters, after the later layers' gradients went into the allreduce.

    Args:
        model: the model trained.
        limits: the injected limits (``parse_injection``).
        rank: this rank; only its own limits apply.

    Returns:
        The hook handles (``handle.remove()`` undoes the injection).
    """
    handles: list[Any] = []
    for limit in (item for item in limits if item.rank == rank):

        def too_big(batch: int, limit: InjectedLimit = limit) -> bool:
            return model.training and torch.is_grad_enabled() and batch >= limit.limit

        def fail(batch: int, limit: InjectedLimit = limit) -> None:
            raise torch.OutOfMemoryError(
                f"{INJECT_ENV}: rank {limit.rank} fails at local batches of {limit.limit} or "
                f"more, this one has {batch} ({limit.phase})"
            )

        if limit.phase == "forward":

            def before(module: torch.nn.Module, inputs: tuple, fail=fail, too_big=too_big) -> None:
                if inputs and isinstance(inputs[0], torch.Tensor) and too_big(len(inputs[0])):
                    fail(len(inputs[0]))

            handles.append(model.register_forward_pre_hook(before))
            continue
        first = next(m for m in model.modules() if next(m.parameters(recurse=False), None) is not None)

        def after(module: torch.nn.Module, inputs: tuple, output: Any, fail=fail, too_big=too_big) -> None:
            batch = len(output)
            if isinstance(output, torch.Tensor) and output.requires_grad and too_big(batch):
                output.register_hook(lambda grad: fail(batch))

        handles.append(first.register_forward_hook(after))
    return handles


@dataclass(frozen=True)
class MemoryFailure:
    """A step abandoned because ranks ran out of memory, and the caps it left."""

    epoch: int
    step: int
    failed: dict[int, int]  # rank -> the local batch it failed at
    caps: tuple[int, ...]  # every rank's cap afterwards
    plan: tuple[int, ...]  # the plan the step was trained again with


class MemoryGuard(Generic[BatchT]):
    """Runs training steps so that an out-of-memory error on a rank retries the step on all.

    The module notes above give the protocol. Use it in place of the
    optimizer's ``step()``: ``attempt`` runs ``zero_grad``, the forward and
    the backward, ``load`` turns sample indices into a batch (for the retried
    step), and ``step`` returns the batch actually trained on.

    Args:
        optimizer: a ``dbs_hvd.DistributedOptimizer`` (gradient mode, one
            backward pass per step).
        options: ``MemoryOptions`` (default ``MemoryOptions()``: recover,
            caps drop to 0.9 of the failed size).
        model: the model; with it, ``DBS_HVD_INJECT_OOM`` is installed.

    Raises:
        ValueError: for an optimizer without DBS, with gradient
            accumulation, or a malformed ``DBS_HVD_INJECT_OOM``.

    Example::

        guard = dbs_hvd.MemoryGuard(optimizer, model=model)

        def attempt(batch):
            optimizer.zero_grad()
            loss = loss_fn(model(batch[0]), batch[1])
            loss.backward()
            return loss

        for batch in loader:
            batch, loss = guard.step(batch, attempt, load=lambda idx: dataset[idx])
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        options: MemoryOptions | None = None,
        model: torch.nn.Module | None = None,
    ) -> None:
        state = getattr(optimizer, "dbs", None)
        if state is None or not hasattr(optimizer, "skip_synchronize"):
            raise ValueError(
                "MemoryGuard needs a dbs_hvd.DistributedOptimizer (the gradient mode): it "
                "completes the allreduce itself before any rank applies the update"
            )
        if state.accumulating:
            raise ValueError("MemoryGuard supports one backward pass per step (backward_passes_per_step=1)")
        self.optimizer = optimizer
        self.state = state
        self.options = options if options is not None else MemoryOptions()
        self.failures: list[MemoryFailure] = []
        self._hooks: list[Any] = []
        limits = parse_injection(os.environ.get(INJECT_ENV))
        if model is not None and limits:
            self._hooks = inject_out_of_memory(model, limits, state.sampler.rank)

    def step(
        self,
        batch: BatchT,
        attempt: Callable[[BatchT], ResultT],
        load: Callable[[list[int]], BatchT],
    ) -> tuple[BatchT, ResultT]:
        """Train one step on every rank; retry it under lower caps where a rank ran out of memory.

        Collective: every rank calls it once per step.

        Args:
            batch: the step's batch as the loader gave it.
            attempt: runs ``optimizer.zero_grad()``, the forward and the
                backward on a batch (not ``optimizer.step()``); its result
                (say the loss) is returned.
            load: the batch of the given sample indices (e.g. ``lambda
                idx: dataset[idx]``), for the step trained again.

        Returns:
            The batch trained on (``batch``, or the retried step's) and what
            ``attempt`` returned for it.

        Raises:
            PlanError: on every rank, where the lowered caps leave no plan
                (the message names the rank and the size it failed at).
        """
        while True:
            failed = False
            result: Any = None
            try:
                result = attempt(batch)
            except torch.OutOfMemoryError:
                if not self.options.recover:
                    raise
                failed = True
                _release_cached_memory()
            current = self.state.current_batch()
            self.optimizer.synchronize()  # type: ignore[attr-defined]
            sampler = self.state.sampler
            with self.state.timer.waiting():
                gathered = self.state.rebalancer.exchange.allgather(
                    (current.batch_size if failed else 0, sampler.steps_generated)
                )
            if not any(size for size, _ in gathered):
                with self.optimizer.skip_synchronize():
                    self.optimizer.step()
                return batch, result
            result = None
            batch = load(self._abandon(current, gathered))

    def _abandon(self, current: StepBatch, gathered: list[tuple[int, int]]) -> list[int]:
        """Drop the step on this rank, lower the failing ranks' caps, and hand the step out again."""
        state, sampler = self.state, self.state.sampler
        state._batch = None
        state._synced_at = None
        # Horovod's flag that synchronize() ran: the retried step must allreduce anew.
        self.optimizer._synchronized = False  # type: ignore[attr-defined]
        for group in self.optimizer.param_groups:
            for parameter in group["params"]:
                parameter.grad = None
        failed = {rank: size for rank, (size, _) in enumerate(gathered) if size}
        world, global_batch = sampler.world_size, sampler.global_batch
        bounds = lowered_bounds(sampler.bounds, failed, world, global_batch, self.options)
        state.rebalancer.policy.set_bounds(bounds)
        indices = sampler.retry_step(current, bounds, max(generated for _, generated in gathered))
        state.timer.mark_start()  # the abandoned attempt is no measure of any rank's speed
        self.failures.append(
            MemoryFailure(
                epoch=current.epoch,
                step=current.step,
                failed=failed,
                caps=tuple(int(cap) for cap in bounds.uppers(sampler.global_batch, sampler.world_size)),
                plan=sampler.plan_at(current.step).batch_sizes,
            )
        )
        return indices

    def remove(self) -> None:
        """Remove the injected failures (``DBS_HVD_INJECT_OOM``) from the model."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def lowered_bounds(
    bounds: Bounds, failed: dict[int, int], world_size: int, global_batch: int, options: MemoryOptions
) -> Bounds:
    """``bounds`` with each failing rank's cap below the batch it failed at.

    Pure: every rank computes it from the same gathered figures.

    Args:
        bounds: the bounds in force.
        failed: rank -> the local batch it ran out of memory at.
        world_size: the number of ranks.
        global_batch: the global batch the caps must hold together.
        options: ``MemoryOptions`` (``shrink``).

    Returns:
        The new bounds.

    Raises:
        PlanError: naming the failing ranks, where the new caps leave no plan.

    Examples:
        >>> lowered_bounds(Bounds(), {1: 40}, 3, 96, MemoryOptions(shrink=0.5)).rank_max[1]
        20
    """
    new = bounds
    for rank, size in sorted(failed.items()):
        new = new.with_cap(rank, cap_below(size, bounds.min_batch, options.shrink), world_size)
    try:
        new.check(global_batch, world_size)
    except PlanError as error:
        what = ", ".join(f"rank {rank} at {size} samples" for rank, size in sorted(failed.items()))
        raise PlanError(f"out of memory on {what}; with its cap lowered below that: {error}") from None
    return new


def _release_cached_memory() -> None:
    """Hand the failed step's cached blocks back, so the retried step starts with free memory."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
