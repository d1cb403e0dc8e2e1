"""Exchanging small per-rank records, and deciding things once for all ranks.

Under ``mpirun`` (Horovod's MPI controller) the records go through mpi4py
collectives on COMM_WORLD, which wait without spinning where ranks share
cores (``MpiExchange``); under ``horovodrun --gloo`` mpi4py's COMM_WORLD is a
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
import pickle
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Callable, TypeVar

import numpy as np

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


WAIT_MODES = ("block", "poll")  # how MpiExchange waits
WAIT_VARIABLE = "DBS_HVD_EXCHANGE_WAIT"  # auto (default) or one of WAIT_MODES: see default_exchange


class MpiExchange(Exchange):
    """mpi4py collectives on COMM_WORLD; ``wait`` says how a rank that arrives first waits.

    ``"block"``: mpi4py's blocking pickled collectives, which spin while they
    wait. ``"poll"``: the pickled bytes move by non-blocking collectives
    (their sizes first, then the bytes), and the wait polls, sleeping between
    polls after a short spin. Spinning takes a core that a slower rank, or
    Horovod's background thread, may need; sleeping adds latency. So polling
    costs less where the host's ranks, with their Horovod threads, outnumber
    its cores, and blocking costs less where cores are free
    (``python -m benchmarks.exchange_cost`` measures both; docs/results.md,
    "What one rebalance's exchange costs"). ``default_exchange`` chooses
    accordingly (``waits_should_sleep``).

    Args:
        comm: an mpi4py communicator (default: ``MPI.COMM_WORLD``).
        wait: ``"block"`` or ``"poll"``; every rank must use the same mode,
            since the two run different collectives.

    Raises:
        ValueError: for any other ``wait``.

    Examples:
        Under ``mpirun -np 2``, with MPI initialised by mpi4py:

            exchange = MpiExchange(wait="poll")
            exchange.allgather({"rank": exchange.rank})  # [{"rank": 0}, {"rank": 1}]
    """

    spin_seconds = 5e-5  # poll without sleeping this long first: a quick collective pays no sleep
    poll_seconds = 2e-5  # then sleep this long between polls (the OS may round it up)

    def __init__(self, comm: Any = None, wait: str = "block") -> None:
        if wait not in WAIT_MODES:
            raise ValueError(f"wait must be 'block' or 'poll', got {wait!r}")
        from mpi4py import MPI

        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.wait = wait
        self._byte = MPI.BYTE
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    def _wait(self, request: Any) -> None:
        spin_until = time.perf_counter() + self.spin_seconds
        while not request.Test():
            if time.perf_counter() > spin_until:
                time.sleep(self.poll_seconds)

    def allgather(self, obj: Any) -> list:
        if self.wait == "block":
            return self.comm.allgather(obj)
        payload = np.frombuffer(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
        lengths = np.empty(self.size, dtype=np.int64)
        self._wait(self.comm.Iallgather(np.array([payload.size], dtype=np.int64), lengths))
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        gathered = np.empty(int(lengths.sum()), dtype=np.uint8)
        self._wait(self.comm.Iallgatherv(payload, [gathered, (lengths, offsets), self._byte]))
        return [
            pickle.loads(gathered[start : start + length].data) for start, length in zip(offsets, lengths)
        ]

    def broadcast(self, obj: Any, root: int = 0) -> Any:
        if self.wait == "block":
            return self.comm.bcast(obj, root=root)
        payload = (
            np.frombuffer(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
            if self.rank == root
            else None
        )
        length = np.array([payload.size if payload is not None else 0], dtype=np.int64)
        self._wait(self.comm.Ibcast(length, root=root))
        if payload is None:
            payload = np.empty(int(length[0]), dtype=np.uint8)
        self._wait(self.comm.Ibcast(payload, root=root))
        return obj if self.rank == root else pickle.loads(payload.data)


def agreed_wait(choices: list[tuple[str, bool]]) -> str:
    """The way every rank waits, from each rank's (``DBS_HVD_EXCHANGE_WAIT``, crowded host).

    Every rank gets the same list, so a bad value fails on every rank alike.

    Args:
        choices: per rank, the value of ``DBS_HVD_EXCHANGE_WAIT`` and
            whether its host is crowded (``waits_should_sleep``).

    Returns:
        ``"poll"`` if any rank asks for it or is crowded under ``"auto"``,
        else ``"block"``.

    Raises:
        ValueError: naming every rank with a value other than auto, block
            or poll.

    Examples:
        >>> agreed_wait([("auto", False), ("auto", True)])
        'poll'
        >>> agreed_wait([("auto", False), ("block", False)])
        'block'
    """
    bad = {
        rank: wanted
        for rank, (wanted, _) in enumerate(choices)
        if wanted != "auto" and wanted not in WAIT_MODES
    }
    if bad:
        raise ValueError(
            f"{WAIT_VARIABLE} must be auto, block or poll; got "
            + ", ".join(f"{wanted!r} on rank {rank}" for rank, wanted in bad.items())
        )
    polls = [wanted == "poll" or (wanted == "auto" and crowded) for wanted, crowded in choices]
    return "poll" if any(polls) else "block"


def waits_should_sleep(local_ranks: int) -> bool:
    """Whether this host's ranks, each with Horovod's background thread, outnumber its cores.

    Also true when this process is bound to a single core, which its two
    threads then share (``mpirun --bind-to core``).
    """
    host_cores = os.cpu_count() or 1
    try:
        own_cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        own_cores = host_cores
    return own_cores < 2 or 2 * local_ranks > host_cores


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

    Collective under mpi4py: the ranks agree on how to wait (``MpiExchange``),
    polling if any host's ranks outnumber its cores, because a blocking and a
    polling exchange run different collectives and must not be mixed.
    ``DBS_HVD_EXCHANGE_WAIT=block`` or ``poll`` overrides the guess (a
    container's CPU quota, for one, is not seen in its core count); if the
    ranks' choices differ, they poll.
    """
    import horovod.torch as hvd

    if hvd.size() == 1:
        return LocalExchange()
    if hvd.mpi_enabled() and not hvd.gloo_enabled() and _mpi_owned_by_process:
        exchange = MpiExchange()
        if exchange.size == hvd.size() and exchange.rank == hvd.rank():
            exchange.wait = agreed_wait(
                exchange.comm.allgather(
                    (os.environ.get(WAIT_VARIABLE, "auto"), waits_should_sleep(hvd.local_size()))
                )
            )
            return exchange
    return HorovodExchange()


def decide_on_root(exchange: Exchange, decide: Callable[[], T]) -> T:
    """Run ``decide`` on rank 0 and give its result, or its error, to every rank.

    Args:
        exchange: the collectives of the job.
        decide: called on rank 0 only.

    Returns:
        What ``decide`` returned, on every rank (invariant 4).

    Raises:
        DbsError: on every rank, if ``decide`` raised a ValueError (such as
            PlanError) on rank 0; its message is kept.

    Examples:
        >>> decide_on_root(LocalExchange(), lambda: (48, 40, 40))
        (48, 40, 40)
    """
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

    Args:
        exchange: the collectives of the job.
        settings: the settings to compare, by name (picklable values).

    Raises:
        DbsError: naming each differing setting and every rank's value.

    Examples:
        >>> check_same_on_all_ranks(LocalExchange(), {"global_batch": 128, "seed": 0})
    """
    gathered = exchange.allgather(dict(settings))
    differing = sorted(key for key in settings if any(g.get(key) != gathered[0].get(key) for g in gathered))
    if differing:
        detail = "; ".join(
            f"{key}: " + ", ".join(f"rank {r}={g.get(key)!r}" for r, g in enumerate(gathered))
            for key in differing
        )
        raise DbsError(
            f"ranks were started with different settings ({detail}); every rank must "
            "use the same values: launch all ranks with the same command line"
        )
