"""Waiting for Horovod's collectives without burning the CPU.

Horovod's ``synchronize(handle)`` waits for a collective in a loop of
``std::this_thread::yield()`` calls: a rank that waits for a slower one keeps
its core busy, mostly in the kernel (``sched_yield``). That costs nothing on a
dedicated core, but it is paid in full wherever the core is not the rank's
alone:

* under a CPU quota (a container's CPU limit, a Kubernetes limit, a cgroup),
  the spin is charged to the rank's quota, so the rank is throttled for CPU time
  it spent waiting, and its next compute is frozen;
* where ranks share cores, the spinning rank takes cycles from the rank it
  waits for.

:func:`install_quiet_wait` replaces the ``synchronize`` that Horovod's PyTorch
optimizer and collectives call with one that polls the handle, spinning only
for a few tens of microseconds and then sleeping in short, growing intervals
(at most ``max_sleep`` seconds), and calls Horovod's own ``synchronize`` once
the handle is done, so results, errors and handle bookkeeping are Horovod's.
The added latency is at most one sleep interval per wait. Under a CPU quota of
less than a core the sleeps grow longer (``quota.wait_max_sleep``), because
each wake-up is paid out of the quota.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from .quota import own_quota, wait_max_sleep

#: The environment variable that chooses the wait: ``quiet`` (default) or ``spin``
#: (Horovod's own busy wait, left untouched).
WAIT_ENV = "DBS_HVD_HOROVOD_WAIT"
WAIT_CHOICES = ("quiet", "spin")

_installed: dict[str, Any] = {}


def wait_until(
    done: Callable[[], bool],
    spin_seconds: float = 5e-5,
    first_sleep: float = 2e-5,
    max_sleep: float = 2e-4,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Return once ``done()`` is true: poll for ``spin_seconds``, then sleep between polls.

    The sleeps start at ``first_sleep`` seconds and double up to ``max_sleep``, so a
    short wait costs a few microseconds of latency and a long one about
    ``max_sleep`` at most, while the waiting thread stays off the CPU.

    Args:
        done: the condition, polled; it must become true.
        spin_seconds: how long to poll without sleeping first.
        first_sleep: the first sleep, in seconds.
        max_sleep: the longest sleep between two polls, in seconds.
        clock, sleep: injectable for tests.

    Returns:
        The number of sleeps taken.
    """
    if done():
        return 0
    deadline = clock() + spin_seconds
    while clock() < deadline:
        if done():
            return 0
    pause, sleeps = first_sleep, 0
    while not done():
        sleep(pause)
        sleeps += 1
        pause = min(pause * 2.0, max_sleep)
    return sleeps


def wait_mode(environ: dict | None = None) -> str:
    """The wait chosen by ``DBS_HVD_HOROVOD_WAIT`` (default ``quiet``).

    Raises:
        ValueError: for any other value, naming the variable and the choices.
    """
    value = (environ if environ is not None else os.environ).get(WAIT_ENV, "quiet").strip().lower()
    if value not in WAIT_CHOICES:
        raise ValueError(
            f"{WAIT_ENV}={value!r} is not one of {', '.join(WAIT_CHOICES)}: "
            f"use 'quiet' to wait without spinning or 'spin' for Horovod's own wait"
        )
    return value


def install_quiet_wait(mode: str | None = None) -> bool:
    """Make Horovod's PyTorch collectives wait without spinning (idempotent).

    Patches ``horovod.torch.mpi_ops.synchronize`` and the names that
    ``horovod.torch``, its ``optimizer`` and its ``functions`` imported from
    it, so that the gradient allreduce of ``hvd.DistributedOptimizer`` (and of
    dbs_hvd's optimizers built on it), ``hvd.allreduce``, ``hvd.broadcast``
    and the other blocking collectives poll and sleep instead of spinning.

    Args:
        mode: ``"quiet"`` or ``"spin"``; ``None`` reads ``DBS_HVD_HOROVOD_WAIT``.
            ``"spin"`` restores Horovod's own wait if it was replaced.

    Returns:
        True where the quiet wait is in place after the call.

    Raises:
        ValueError: for an unknown mode.

    Note:
        Every rank should make the same choice; the two waits give identical
        results and differ only in CPU use and latency, so a mismatch is harmless.

    Example::

        import dbs_hvd.waiting
        dbs_hvd.waiting.install_quiet_wait()   # before training starts
    """
    mode = wait_mode() if mode is None else mode
    if mode not in WAIT_CHOICES:
        raise ValueError(f"mode={mode!r} is not one of {', '.join(WAIT_CHOICES)}")
    import horovod.torch as hvd
    from horovod.torch import functions, mpi_ops, optimizer

    modules = (mpi_ops, optimizer, functions, hvd)  # each holds its own name for it
    if "synchronize" not in _installed:
        _installed["synchronize"] = mpi_ops.synchronize
    original = _installed["synchronize"]
    if mode == "spin":
        for module in modules:
            module.synchronize = original
        return False
    poll = mpi_ops.mpi_lib.horovod_torch_poll
    max_sleep = wait_max_sleep(own_quota())

    def quiet_synchronize(handle):
        # Horovod's own record of the handles in flight (hvd.init() replaces it).
        if handle in mpi_ops._handle_map:
            wait_until(lambda: poll(handle) != 0, max_sleep=max_sleep)
        return original(handle)

    quiet_synchronize.__doc__ = original.__doc__
    quiet_synchronize.__wrapped__ = original  # type: ignore[attr-defined]
    for module in modules:
        module.synchronize = quiet_synchronize
    return True
