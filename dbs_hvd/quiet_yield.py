"""Waits inside MPI that sleep instead of spinning, for ranks under a CPU quota.

Horovod's background thread negotiates with every other rank once per cycle
and carries the allreduce, both in Open MPI collectives, and Open MPI waits for
a late peer by polling. With ``mpi_yield_when_idle`` it calls ``sched_yield``
between idle polls, but that returns at once when nothing else in the rank's
group wants the core, so the poll keeps running. Under a CPU quota (a
container's CPU limit, a cgroup) that wait is paid out of the quota: the rank
is frozen later for CPU it spent waiting. Where two throttled ranks share a
core it is worse: each spends its quota polling while the other is frozen,
and the job makes progress only while both happen to be runnable, which can
stall it for minutes.

The package ships a small shared library (``_quiet_yield``, built by ``pip
install``) whose ``sched_yield`` sleeps for a few tens of microseconds instead,
once told to. It works only if loaded before Open MPI, with ``LD_PRELOAD``,
which the launcher sets for every rank::

    mpirun -x LD_PRELOAD=$(python -m dbs_hvd.preload) -x OMPI_MCA_mpi_yield_when_idle=1 ...

Preloaded, it changes nothing until :func:`configure` (run by ``import
dbs_hvd``) turns the sleep on, by default only on a rank whose quota is less
than one core: a rank with cores of its own loses only latency by sleeping.
``DBS_HVD_MPI_YIELD`` chooses otherwise: ``auto`` (the default), ``sleep``
(always) or ``spin`` (never). Gloo waits in blocking receives and needs none
of this.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from .quota import CpuQuota, own_quota

#: The environment variable that chooses when waits in MPI sleep.
MODE_ENV = "DBS_HVD_MPI_YIELD"
MODES = ("auto", "sleep", "spin")
#: How long one yield sleeps, in seconds: a few polls per hundred microseconds
#: keep a waiting thread's CPU small while adding little to a collective's latency.
YIELD_SLEEP = 5e-5

_SETTER = "dbs_hvd_set_yield_sleep_ns"
_GETTER = "dbs_hvd_yield_sleep_ns"


def library_path() -> Path | None:
    """The shared library to preload, or None where it was not built."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_quiet_yield{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _loaded(symbol: str):
    """The preloaded library's function ``symbol``, or None where it is not loaded in this process."""
    try:
        return getattr(ctypes.CDLL(None), symbol)
    except (AttributeError, OSError):
        return None


def is_preloaded() -> bool:
    """Whether this process runs with the library preloaded (``LD_PRELOAD``)."""
    return _loaded(_SETTER) is not None


def mode(environ: Mapping[str, str] | None = None) -> str:
    """The chosen mode from ``DBS_HVD_MPI_YIELD`` (``auto`` when unset).

    Raises:
        ValueError: the variable names no mode; the message names it and the choices.
    """
    environ = os.environ if environ is None else environ
    value = environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(
            f"{MODE_ENV}={environ[MODE_ENV]!r} is not one of {', '.join(MODES)}; "
            f"unset it for the default (auto: sleep under a CPU quota of less "
            f"than one core)"
        )
    return value


def wants_sleep(chosen: str, quota: CpuQuota | None) -> bool:
    """Whether waits should sleep under ``chosen`` mode for a rank under ``quota``."""
    if chosen == "auto":
        return quota is not None and quota.share < 1
    return chosen == "sleep"


def configure(environ: Mapping[str, str] | None = None, under_mpi: bool = False) -> float | None:
    """Turn the preloaded ``sched_yield``'s sleep on where this rank's waits should sleep.

    ``import dbs_hvd`` calls it. Without the preloaded library it changes
    nothing (Open MPI then polls as it does anywhere), and warns where the rank
    runs under MPI and its waits should sleep.

    Args:
        environ: the environment to read ``DBS_HVD_MPI_YIELD`` from (default
            ``os.environ``).
        under_mpi: whether an MPI launcher started this process (for the warning).

    Returns:
        The sleep per yield in seconds where it was turned on, else None.

    Raises:
        ValueError: ``DBS_HVD_MPI_YIELD`` names no mode.
    """
    chosen = mode(environ)
    if not wants_sleep(chosen, own_quota() if chosen == "auto" else None):
        return None
    setter = _loaded(_SETTER)
    if setter is None:
        if under_mpi:
            warnings.warn(
                "this rank runs under a CPU quota of less than one core, and Open MPI's "
                "waits will spend it polling; launch the ranks with "
                "-x LD_PRELOAD=$(python -m dbs_hvd.preload) -x OMPI_MCA_mpi_yield_when_idle=1 "
                "(see dbs_hvd.quiet_yield), "
                f"or set {MODE_ENV}=spin to silence this",
                RuntimeWarning,
                stacklevel=2,
            )
        return None
    setter.argtypes = [ctypes.c_long]
    setter(int(YIELD_SLEEP * 1e9))
    return YIELD_SLEEP


def sleep_seconds() -> float | None:
    """The preloaded library's current sleep per yield (0.0: off), or None where not loaded."""
    getter = _loaded(_GETTER)
    if getter is None:
        return None
    getter.restype = ctypes.c_long
    return getter() / 1e9
