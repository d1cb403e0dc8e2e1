"""Exchanging small per-rank records, and deciding things once for all ranks.

Under ``mpirun`` (Horovod's MPI controller) the records go through an mpi4py
collective on COMM_WORLD; under ``horovodrun --gloo`` mpi4py's COMM_WORLD is a
singleton, so they go through Horovod's own ``allgather_object`` instead.

Decisions (plans, checks) are made on rank 0 and broadcast, so every rank
holds the identical result (invariant 4). A decision that fails becomes the
same exception on every rank, so no rank is left waiting in a collective that
the failing rank will never join.

MPI must outlive Horovod. When Horovod initialises MPI itself, the end of its
background thread calls MPI_Finalize, and a shutdown on any rank ends that
thread on every rank. A rank that finishes first (the root of a broadcast
returns before the others have received) and exits would then finalize MPI
under another rank that is still inside an mpi4py collective, which hangs it.
So ``import dbs_hvd`` under an MPI launcher lets mpi4py initialise MPI before
Horovod does (``claim_mpi``): Horovod then leaves MPI alone and mpi4py
finalizes it at process exit. If Horovod got there first, the stats travel
through Horovod's own collectives instead, which a shutdown cannot cut short.
"""
from __future__ import annotations

import os
import sys
from abc import ABC, abstractmethod
from typing import Any, Callable, Mapping, TypeVar

T = TypeVar("T")


class DbsError(RuntimeError):
    """An error raised alike on every rank (bad configuration, bad measurements)."""


class Exchange(ABC):
    """Small-object collectives over all ranks of the job."""

    rank: int
    size: int

    @abstractmethod
    def allgather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""

    @abstractmethod
    def broadcast(self, obj: Any, root: int = 0) -> Any:
        """``root``'s ``obj`` on every rank."""


class MpiExchange(Exchange):
    """mpi4py collectives on COMM_WORLD (pickled objects; records are tiny)."""

    def __init__(self, comm: Any = None) -> None:
        if comm is None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def allgather(self, obj: Any) -> list:
        return self.comm.allgather(obj)

    def broadcast(self, obj: Any, root: int = 0) -> Any:
        return self.comm.bcast(obj, root=root)


class HorovodExchange(Exchange):
    """Horovod's object collectives: work under both MPI and Gloo controllers."""

    def __init__(self) -> None:
        import horovod.torch as hvd

        self._hvd = hvd
        self.rank = hvd.rank()
        self.size = hvd.size()
        self._calls = 0

    def _name(self, kind: str) -> str:
        # Horovod matches collectives across ranks by name; every rank makes
        # the same sequence of calls, so a counter gives matching names.
        self._calls += 1
        return f"dbs_hvd.{kind}.{self._calls}"

    def allgather(self, obj: Any) -> list:
        return self._hvd.allgather_object(obj, name=self._name("allgather"))

    def broadcast(self, obj: Any, root: int = 0) -> Any:
        return self._hvd.broadcast_object(obj, root_rank=root, name=self._name("broadcast"))


class LocalExchange(Exchange):
    """A world of one: for single-process runs and tests of the pure parts."""

    rank = 0
    size = 1

    def allgather(self, obj: Any) -> list:
        return [obj]

    def broadcast(self, obj: Any, root: int = 0) -> Any:
        return obj


_MPI_LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
_mpi_owned_by_process = False


def launched_by_mpi() -> bool:
    """True under mpirun (or horovodrun's MPI mode); False under Gloo or a plain start."""
    if os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR"):
        return False
    return any(name in os.environ for name in _MPI_LAUNCHER_VARIABLES)


def claim_mpi() -> bool:
    """Initialise MPI through mpi4py before Horovod does; True if MPI now outlives Horovod.

    Called on ``import dbs_hvd``. It does nothing outside an MPI launcher, when
    mpi4py is missing, or when Horovod is already initialised (MPI then
    belongs to Horovod and ``default_exchange`` avoids mpi4py).
    """
    global _mpi_owned_by_process
    if _mpi_owned_by_process:
        return True
    if not launched_by_mpi():
        return False
    horovod = sys.modules.get("horovod.torch")
    if horovod is not None and horovod.is_initialized():
        return False
    try:
        from mpi4py import MPI
    except ImportError:
        return False
    _mpi_owned_by_process = bool(MPI.Is_initialized())
    if _mpi_owned_by_process:
        sys.excepthook = abort_job_after(sys.excepthook)
    return _mpi_owned_by_process


def abort_job_after(print_exception: Callable[..., Any]) -> Callable[..., None]:
    """An excepthook that prints the error, then aborts the whole MPI job.

    With MPI owned by mpi4py, a rank leaving on an uncaught exception would
    wait in MPI_Finalize for peers that wait for it in a collective: a hang.
    Aborting ends every rank, and the launcher exits non-zero (what
    ``python -m mpi4py`` does too). Errors raised alike on every rank are
    still best caught by the script, as dbs-train does, for a clean exit.
    """

    def hook(kind: type, value: BaseException, traceback: Any) -> None:
        print_exception(kind, value, traceback)
        sys.stderr.flush()
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_size() > 1 and not MPI.Is_finalized():
            MPI.COMM_WORLD.Abort(1)

    return hook


def default_exchange() -> Exchange:
    """mpi4py under the MPI controller, Horovod's object collectives under Gloo.

    mpi4py is used only when MPI outlives Horovod (see the module notes):
    import dbs_hvd before ``hvd.init()``, as any import at the top of a script is.
    """
    import horovod.torch as hvd

    if hvd.size() == 1:
        return LocalExchange()
    if hvd.mpi_enabled() and not hvd.gloo_enabled() and _mpi_owned_by_process:
        exchange = MpiExchange()
        if exchange.size == hvd.size() and exchange.rank == hvd.rank():
            return exchange
    return HorovodExchange()


def decide_on_root(exchange: Exchange, decide: Callable[[], T]) -> T:
    """Run ``decide`` on rank 0 and give its result, or its error, to every rank."""
    outcome: tuple[str, Any] | None = None
    if exchange.rank == 0:
        try:
            outcome = ("ok", decide())
        except ValueError as error:  # PlanError and other input errors
            outcome = ("error", f"{type(error).__name__}: {error}")
    kind, value = exchange.broadcast(outcome, root=0)
    if kind == "error":
        raise DbsError(value)
    return value


def check_same_on_all_ranks(exchange: Exchange, settings: Mapping[str, Any]) -> None:
    """Raise DbsError on every rank if any setting differs between ranks.

    Ranks started with different global batch or seed would read overlapping
    samples and weight gradients wrongly without any visible failure; this
    turns that launch mistake into an immediate, named error.
    """
    gathered = exchange.allgather(dict(settings))
    differing = sorted(
        key for key in settings if any(g.get(key) != gathered[0].get(key) for g in gathered)
    )
    if differing:
        detail = "; ".join(
            f"{key}: " + ", ".join(f"rank {r}={g.get(key)!r}" for r, g in enumerate(gathered))
            for key in differing
        )
        raise DbsError(
            f"ranks were started with different settings ({detail}); every rank must "
            "use the same values: launch all ranks with the same command line"
        )
