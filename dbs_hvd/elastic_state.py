"""Elastic DBS in a user's script: a state object for ``hvd.elastic.run``.

Horovod's elastic mode (``horovodrun --host-discovery-script``) re-forms the
world when a worker dies or hosts change, and restores the state that the
script last committed. ``ElasticState`` is Horovod's ``TorchState`` (model,
optimizer and any other objects) plus what DBS adds: where the sampler stands
(epoch, steps trained, the plan in force there) and the policy. After a reset,
every worker (survivors and newcomers alike) takes rank 0's committed state,
checks that all workers run with the same settings, and adopts the new world:
the sampler's new rank and plan (the committed plan only when the world is
made of the same workers in the same order, else the policy's first plan),
a new stats exchange and a fresh policy (its per-rank history described other
workers). The sampler's global-batch stream does not depend on the world, so
the new world reads the rest of the epoch from the committed step on: no
sample is lost, and only the steps after the last commit are read again
(their updates were undone by the restore).

Set-up must run no collective, as Horovod's elastic mode asks: a joining
worker runs the set-up while the others wait in the state broadcast. So under
elastic Horovod, ``dbs_hvd.DistributedOptimizer`` postpones its check of the
ranks' settings to the state's first ``sync``, and refuses to rebalance if no
``ElasticState`` ever adopted a world.
"""

from __future__ import annotations

import copy
import os
import socket
from typing import Any

import horovod.torch as hvd
import torch
from horovod.common.exceptions import HostsUpdatedInterrupt

from .comm import check_same_on_all_ranks, default_exchange
from .plan import Plan
from .sampler import DynamicBatchSampler


def worker_identity() -> tuple[str, int]:
    """(host, local rank): how Horovod's driver names this worker's slot."""
    return os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname(), hvd.local_rank()


class ElasticState(hvd.elastic.TorchState):
    """Horovod's ``TorchState`` for a DBS script: model, optimizer, sampler position and plan.

    Args:
        model: the model (its parameters are saved, restored and broadcast).
        optimizer: the ``dbs_hvd.DistributedOptimizer`` (its state likewise).
        sampler: the optimizer's ``DynamicBatchSampler``.
        kwargs: other objects to keep, as for ``TorchState`` (e.g. ``best=0.0``).

    Attributes:
        epoch: the sampler's epoch: where a (re-entered) training function starts.

    A world change always synchronises the state (Horovod skips that when
    workers were only removed), because the ranks and the plan change.

    Example::

        sampler = dbs_hvd.DynamicBatchSampler(len(train_set), global_batch=256)
        loader = DataLoader(train_set, batch_sampler=sampler)
        optimizer = dbs_hvd.DistributedOptimizer(opt, sampler,
                                                 named_parameters=model.named_parameters())
        state = dbs_hvd.ElasticState(model, optimizer, sampler)

        @hvd.elastic.run
        def train(state):
            for epoch in range(state.epoch, epochs):
                sampler.set_epoch(epoch)  # a resumed epoch continues at its committed step
                for x, y in loader:
                    ...
                    optimizer.step()
                    if sampler.steps_trained % 10 == 0:
                        state.commit()
                state.commit()

        train(state)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        sampler: DynamicBatchSampler,
        **kwargs: Any,
    ) -> None:
        dbs = getattr(optimizer, "dbs", None)
        if dbs is None or dbs.sampler is not sampler:
            raise ValueError(
                "ElasticState(optimizer=...) takes the dbs_hvd.DistributedOptimizer built with this sampler"
            )
        self._dbs = dbs
        self._sampler = sampler
        self._dbs_saved = self._position()
        super().__init__(model=model, optimizer=optimizer, **kwargs)

    @property
    def epoch(self) -> int:
        return self._sampler.epoch

    @property
    def sampler(self) -> DynamicBatchSampler:
        return self._sampler

    def _position(self) -> dict[str, Any]:
        sampler = self._sampler
        position = sampler.steps_trained
        plan = sampler.plan if position >= sampler.steps_per_epoch else sampler.plan_at(position)
        return {
            "epoch": sampler.epoch,
            "position": position,
            "plan": list(plan.batch_sizes),
            "workers": getattr(self, "_workers", None),
        }

    def save(self) -> None:
        self._dbs_saved = self._position()
        super().save()

    def check_host_updates(self) -> None:
        try:
            super().check_host_updates()
        except HostsUpdatedInterrupt:
            # Always synchronise after a world change: ranks and plan change.
            raise HostsUpdatedInterrupt(False) from None

    def sync(self) -> None:
        """Take rank 0's committed state and adopt the current world (collective)."""
        super().sync()
        saved = hvd.broadcast_object(self._dbs_saved, root_rank=0, name="dbs_hvd.elastic.position")
        self._dbs_saved = saved
        state = self._dbs
        exchange = default_exchange()
        check_same_on_all_ranks(exchange, state.settings)
        workers = [tuple(w) for w in exchange.allgather(worker_identity())]
        same = saved["workers"] is not None and [tuple(w) for w in saved["workers"]] == workers
        policy = copy.deepcopy(state.fresh_policy)
        world = hvd.size()
        plan = Plan(tuple(saved["plan"])) if same else policy.initial_plan(world)
        self._sampler.resize(hvd.rank(), world, plan)
        self._sampler.seek(saved["epoch"], saved["position"])
        state.restart(exchange, policy)
        history = state.rebalancer.history
        while history and history[-1].epoch >= saved["epoch"]:
            history.pop()  # the resumed epoch's windows were measured by the old world
        self._workers = workers
        self._dbs_saved = self._position()
