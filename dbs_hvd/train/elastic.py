"""Elastic dbs-train: ranks may die or join; training goes on from the last commit.

Launched by ``horovodrun --host-discovery-script`` (Gloo), the epoch loop runs
inside ``hvd.elastic.run``. A commit (every ``--commit-every`` steps and at
every epoch end) copies the model, the optimizer, the epoch, the step within
the epoch and the plan to host memory. When a rank dies, the survivors' next
collective fails; they restore the last commit, Horovod re-forms the world,
rank 0's state is broadcast to every worker (new ones included), and the loop
is entered again. When hosts are added, the ranks notice at a commit (the
state is already saved) and re-form the same way.

Why nothing is lost: the sampler's global-batch stream. Global batch ``t`` of
an epoch is fixed by ``(seed, epoch)``; the plan only decides how it is split
between ranks. The new world therefore reads global batches ``t, t+1, ...``
from the committed step ``t`` on, split for its own size: the epoch's samples
are all read, and only the steps between the last commit and the failure are
read twice (their updates were undone by the restore).

On entering the loop (``_adopt_world``) everything that holds a rank or a world
size is refreshed: the sampler (new rank, and a plan for the new size), the
stats exchange (Horovod's collectives are matched by name, and the names count
calls, so every rank starts a new counter), the policy (its per-rank history
described other devices: rank numbers now name other workers), the step timer,
and the device emulator. The committed plan is kept only when the new world is
made of the same workers in the same order; otherwise it starts from the equal
split and the policy adapts from the next window on. Horovod's optimizer is
created once: its gradient hooks survive resets, and restoring its state
clears any allreduce left in flight.

No collective may run outside the loop: a joining worker runs the set-up while
the others wait in the state broadcast, so a collective there would deadlock.
The set-up therefore builds the optimizer with a local exchange and checks the
ranks' settings inside the loop instead.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import horovod.torch as hvd
import torch
from torch import nn
from torch.utils.data import Dataset

from ..comm import LocalExchange, check_same_on_all_ranks, default_exchange
from ..elastic_state import worker_identity
from ..plan import Plan
from ..sampler import StepBatch
from .emulate import DeviceEmulator
from .metrics import EpochRecord, append_json_lines
from .trainer import (
    TrainConfig,
    _dbs_run,
    build_data_and_model,
    epoch_record,
    freeze_setup_objects,
    init_horovod,
    make_run_emulator,
    make_run_policy,
    train_epoch,
)


class ElasticState(hvd.elastic.TorchState):
    """What a commit saves and a reset restores: model, optimizer, epoch, step, plan.

    ``step`` is the next step of ``epoch`` to train; ``plan`` is the split in
    force there and ``ranks`` the (host, local rank) of each of its entries,
    so that a new world can tell whether the plan still describes it.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, plan: Sequence[int]) -> None:
        super().__init__(model=model, optimizer=optimizer, epoch=0, step=0, plan=list(plan), ranks=None)


class _IndexedDataset(Dataset):
    """A data set whose batches also carry their sample indices (for --read-log)."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: Any) -> tuple:
        return (*self.base[index], torch.as_tensor(index))


class ElasticTrainer:
    """dbs-train's epoch loop, run under ``hvd.elastic.run``."""

    def __init__(self, config: TrainConfig) -> None:
        _check_supported(config)
        self.config = config
        init_horovod(config)
        self.train_set, self.test_set, self.device, self.model = build_data_and_model(
            config, hvd.local_rank(), hvd.local_size()
        )
        dataset = _IndexedDataset(self.train_set) if config.read_log else self.train_set
        # A local exchange for the set-up: no collective before the loop (see the module notes).
        self.run = _dbs_run(config, self.model, dataset, LocalExchange(), self.device)  # type: ignore[arg-type]
        self.dbs = self.run.state
        self.sampler = self.dbs.sampler
        self.state = ElasticState(self.model, self.run.optimizer, self.sampler.plan.batch_sizes)
        self.criterion = nn.CrossEntropyLoss()
        self.records: dict[int, EpochRecord] = {}
        self.identities: list = []
        self.emulator: DeviceEmulator | None = None
        self.reads = _ReadLog(config.read_log) if config.read_log else None
        # Whichever process is rank 0 when an epoch commits writes its rebalances.
        self.dbs.rebalancer.record_policy = bool(config.rebalance_log)
        self.world = 0

    # -- a new world ---------------------------------------------------------------

    def _adopt_world(self, state: ElasticState) -> None:
        """Refresh everything that holds a rank or a world size (collective: all ranks)."""
        config = self.config
        rank, world = hvd.rank(), hvd.size()
        exchange = default_exchange()
        # Joining workers were started by the launcher with the same command, but check.
        check_same_on_all_ranks(exchange, asdict(config))
        identities = [tuple(i) for i in exchange.allgather(worker_identity())]
        same_workers = state.ranks is not None and [tuple(i) for i in state.ranks] == identities
        policy = make_run_policy(config)
        # A new world starts from the policy's first plan (the equal split, on
        # the grid of --batch-multiple where one is set).
        plan = Plan(tuple(state.plan)) if same_workers else policy.initial_plan(world)
        self.sampler.resize(rank, world, plan)
        self.dbs.restart(exchange, policy)
        rebalancer = self.dbs.rebalancer
        # Windows of the epoch being resumed were measured by the old world.
        for _ in range(sum(r.epoch >= state.epoch for r in rebalancer.history)):
            rebalancer.history.pop()  # the newest records are the resumed epoch's
        self.emulator = make_run_emulator(config, rank, world)
        previous, self.world, self.identities = self.world, world, identities
        if rank == 0:
            if state.epoch == 0 and state.step == 0:  # a new run (nothing committed yet)
                for path in filter(None, (config.log, config.rebalance_log)):
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                    Path(path).write_text("")
            change = f" (this process was in a world of {previous})" if previous else ""
            print(
                f"dbs-train: elastic world of {world} ranks{change}: epoch {state.epoch} "
                f"from step {state.step}, plan {list(self.sampler.plan.batch_sizes)}"
                f"{'' if same_workers else ' (equal split: new world)'}",
                flush=True,
            )

    # -- the loop ------------------------------------------------------------------

    def loop(self, state: ElasticState) -> None:
        """The body given to ``hvd.elastic.run``: entered again after every reset."""
        self._adopt_world(state)
        freeze_setup_objects()  # again after a reset: the new world's objects
        if state.epoch == 0 and state.step == 0 and hvd.rank() == 0:
            train_size = len(self.train_set)
            print(
                f"dbs-train: elastic, {self.config.model} on {self.config.dataset} "
                f"({train_size} train / {len(self.test_set)} test), global batch "
                f"{self.config.global_batch}, policy {self.config.policy}, "
                f"{self.sampler.steps_per_epoch} steps/epoch, commit every "
                f"{self.config.commit_every} steps",
                flush=True,
            )
        while state.epoch < self.config.epochs:
            self._train_epoch(state)

    def _train_epoch(self, state: ElasticState) -> None:
        config, sampler, dbs = self.config, self.sampler, self.dbs
        assert self.emulator is not None, "_adopt_world makes the emulator"
        epoch, steps = state.epoch, sampler.steps_per_epoch
        sampler.seek(epoch, state.step)
        start_plan = sampler.plan
        current: list[StepBatch] = []

        def batches() -> Iterator[Sequence[torch.Tensor]]:
            for batch in self.run.loader:
                current[:] = [dbs.current_batch()]  # the sampler's record of this batch
                yield batch

        def after_step(batch: Sequence[torch.Tensor], loss: torch.Tensor) -> None:
            step = current[0]
            if self.reads is not None:
                self.reads.write(
                    kind="read",
                    epoch=step.epoch,
                    step=step.step,
                    rank=hvd.rank(),
                    world=hvd.size(),
                    indices=batch[2].tolist(),
                )
            state.step = step.step + 1
            if state.step % config.commit_every == 0 and state.step < steps:
                self._commit(state)

        # The epoch's loss covers the steps this world trained (after a reset, from the commit on).
        loss_sum, seconds, _ = train_epoch(
            self.model,
            self.criterion,
            self.run.optimizer,
            self.emulator,
            self.device,
            batches(),
            epoch,
            epoch * steps + state.step,
            after_step,
        )
        record = epoch_record(
            config,
            epoch,
            self.model,
            self.run,
            self.test_set,
            self.device,
            loss_sum,
            seconds,
            start_plan,
            hvd.size(),
            plain=False,
        )
        state.epoch, state.step = epoch + 1, 0
        # The record is written between save and the host check, so that an
        # epoch is reported once: a failure before the save redoes the epoch's
        # tail and reports it then; one after the save does not redo it.
        self._commit(state, record)

    def _commit(self, state: ElasticState, record: EpochRecord | None = None) -> None:
        state.plan = list(
            self.sampler.plan_at(state.step).batch_sizes if state.step else self.sampler.plan.batch_sizes
        )
        state.ranks = self.identities
        state.save()
        if self.reads is not None and hvd.rank() == 0:
            self.reads.write(
                kind="commit", epoch=state.epoch, step=state.step, world=hvd.size(), plan=state.plan
            )
        if record is not None:
            self.records[record.epoch] = record
            if hvd.rank() == 0:
                print(record.line(), flush=True)
                if self.config.log:
                    append_json_lines(self.config.log, [record])
                if self.config.rebalance_log:
                    # The epoch's rebalances by the world that finished it: a
                    # reset drops the old world's records of the resumed epoch.
                    append_json_lines(
                        self.config.rebalance_log,
                        self.dbs.rebalancer.records_of_epoch(record.epoch),
                    )
        state.check_host_updates()  # raises HostsUpdatedInterrupt when the world changes


class _ReadLog:
    """One JSON-lines file per process: what it trained on, for exactly-once checks."""

    def __init__(self, directory: str) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.path = Path(directory) / f"reads-{socket.gethostname()}-{os.getpid()}.jsonl"

    def write(self, **fields: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(fields) + "\n")


def _check_supported(config: TrainConfig) -> None:
    """Elastic mode covers the DBS gradient path; say so for the rest."""
    if config.policy == "horovod":
        raise ValueError(
            "--elastic runs the DBS optimizer: use --policy dbs, paper or static "
            "(the plain-Horovod baseline has no elastic mode here)"
        )
    if config.mode != "gradient":
        raise ValueError("--elastic supports --mode gradient only")
    if config.checkpoint_dir or config.resume:
        raise ValueError(
            "--elastic keeps its state in memory (commits): --checkpoint-dir and "
            "--resume are not supported with it yet"
        )
    if config.plan:
        raise ValueError(
            "--plan names one batch size per rank, and an elastic world changes "
            "size: leave --plan out with --elastic"
        )


def train_elastic(config: TrainConfig) -> list[EpochRecord]:
    """Run dbs-train elastically; returns the epoch records this process saw committed."""
    trainer = ElasticTrainer(config)
    hvd.elastic.run(trainer.loop)(trainer.state)
    return [trainer.records[e] for e in sorted(trainer.records)]


__all__ = ["ElasticState", "ElasticTrainer", "train_elastic", "worker_identity"]
