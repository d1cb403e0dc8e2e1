"""The CPU quota this process runs under, read from its own cgroup.

A rank in a container or a cgroup with a CPU limit (a Kubernetes CPU limit,
``docker run --cpus``, a cgroup's ``cpu.max``) runs until it has used its quota
for the current period, then is frozen until the next period begins. Two things
follow for timing a rank:

* A rank frozen by its own quota while it waits in a collective is slow, not
  waiting for others: its quota ran out on its own work. The time it spent
  throttled inside a wait belongs to its compute (``timing.StepTimer``'s
  ``frozen_clock``), or the policy would read a throttled rank as fast.
* Within one quota period a throttled rank runs at full speed and then stops,
  so a measurement window shorter than a few periods sees bursts rather than
  the rank's speed. :func:`min_window_seconds` gives the shortest window worth
  measuring.

Both cgroup v1 (``cpu.cfs_quota_us``, ``cpu.cfs_period_us``, ``throttled_time``
in ns) and v2 (``cpu.max``, ``throttled_usec``) are read; the nearest group on
the path from the process's own group to the root that sets a quota counts.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

#: Periods per measurement window below which a quota's bursts dominate.
PERIODS_PER_WINDOW = 3


@dataclass(frozen=True)
class CpuQuota:
    """A cgroup CPU limit: ``share`` cores per ``period`` seconds, and where to read its stats."""

    share: float
    period: float
    stat_path: Path
    version: int

    def throttled_seconds(self) -> float:
        """Seconds the group has been throttled so far (0.0 where the file cannot be read)."""
        try:
            text = self.stat_path.read_text()
        except OSError:
            return 0.0
        key = "throttled_time" if self.version == 1 else "throttled_usec"
        scale = 1e-9 if self.version == 1 else 1e-6
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value) * scale
        return 0.0


def _mounts(text: str) -> tuple[Path | None, Path | None]:
    v1 = v2 = None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        if parts[2] == "cgroup" and "cpu" in parts[3].split(","):
            v1 = Path(parts[1])
        elif parts[2] == "cgroup2" and v2 is None:
            v2 = Path(parts[1])
    return v1, v2


def _quota_at(group: Path, version: int) -> tuple[float, float] | None:
    try:
        if version == 1:
            quota = int((group / "cpu.cfs_quota_us").read_text())
            period = int((group / "cpu.cfs_period_us").read_text())
            if quota <= 0:
                return None
        else:
            quota_text, period_text = (group / "cpu.max").read_text().split()
            if quota_text == "max":
                return None
            quota, period = int(quota_text), int(period_text)
    except (OSError, ValueError):
        return None
    return quota / period, period / 1e6


def own_quota(cgroup_text: str | None = None, mounts_text: str | None = None) -> CpuQuota | None:
    """The CPU quota of this process's cgroup (or its nearest ancestor with one), or None.

    Args:
        cgroup_text: the text of ``/proc/self/cgroup`` (read when None).
        mounts_text: the text of ``/proc/mounts`` (read when None).

    Returns:
        The quota, or None where no group on the path sets one or nothing can be read.
    """
    try:
        if cgroup_text is None:
            cgroup_text = Path("/proc/self/cgroup").read_text()
        if mounts_text is None:
            mounts_text = Path("/proc/mounts").read_text()
    except OSError:
        return None
    v1_mount, v2_mount = _mounts(mounts_text)
    for line in cgroup_text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controllers and "cpu" in controllers.split(",") and v1_mount is not None:
            mount, version = v1_mount, 1
        elif hierarchy == "0" and not controllers and v2_mount is not None:
            mount, version = v2_mount, 2
        else:
            continue
        group = mount / path.lstrip("/")
        while True:
            found = _quota_at(group, version)
            if found is not None:
                return CpuQuota(found[0], found[1], group / "cpu.stat", version)
            if group == mount or mount not in group.parents:
                break
            group = group.parent
    return None


def min_window_seconds(quota: CpuQuota | None) -> float:
    """The shortest measurement window that averages over a quota's bursts (0 without one)."""
    return 0.0 if quota is None else PERIODS_PER_WINDOW * quota.period


#: Horovod's background cycle under a quota of S cores with a period of P: every
#: CYCLE_MS_PER_SHARE / S milliseconds, at most P / CYCLES_PER_PERIOD, within
#: [MIN_CYCLE_MS, MAX_CYCLE_MS].
CYCLE_MS_PER_SHARE = 0.5
CYCLES_PER_PERIOD = 2
MIN_CYCLE_MS = 2.0
MAX_CYCLE_MS = 20.0


def horovod_cycle_ms(quota: CpuQuota | None) -> float | None:
    """The background cycle time for a rank under ``quota``, or None to keep Horovod's.

    Horovod's background thread runs a negotiation with every other rank once per
    cycle (``HOROVOD_CYCLE_TIME``, 1 ms by default), and each one costs CPU time,
    more while it waits for a late rank. Under a quota that cost comes out of the
    rank's share, and at a fraction of a core it can take a visible part of it.
    Longer cycles cost fewer negotiations per second, but every negotiation
    waits for the slowest-cycling rank, so each allreduce starts on that rank's
    grid of cycles: the cycle adds up to one cycle of latency to every step of
    every rank. A throttled rank therefore cycles a little more slowly the
    smaller its share, a few milliseconds at a quarter core, at most half the
    quota period, and never faster than ``MIN_CYCLE_MS``: at a fraction of a
    core, Horovod's 1 ms cycle costs more of the share than it saves.

    Args:
        quota: this rank's quota (:func:`own_quota`), or None.

    Returns:
        Milliseconds, or None where there is no quota of less than one core.
    """
    if quota is None or quota.share >= 1:
        return None
    cycle = min(CYCLE_MS_PER_SHARE / quota.share, 1000.0 * quota.period / CYCLES_PER_PERIOD)
    return min(max(cycle, MIN_CYCLE_MS), MAX_CYCLE_MS)


def configure_horovod_cycle(environ: MutableMapping[str, str] | None = None) -> float | None:
    """Set ``HOROVOD_CYCLE_TIME`` for this rank's quota unless the user set it.

    Horovod reads the variable in ``hvd.init()``, so this runs before it
    (``import dbs_hvd`` calls it). Each rank sets its own: a rank without a
    quota keeps Horovod's short cycle, so in each negotiation it is the
    throttled rank that arrives last and the others that wait for it, on cores
    whose time is not rationed.

    Returns:
        The cycle set, in milliseconds, or None where nothing was set.
    """
    environ = os.environ if environ is None else environ
    if "HOROVOD_CYCLE_TIME" in environ:
        return None
    cycle = horovod_cycle_ms(own_quota())
    if cycle is not None:
        environ["HOROVOD_CYCLE_TIME"] = f"{cycle:g}"
    return cycle


#: The quiet wait's longest sleep between two polls of a collective, in seconds, on
#: a whole core; under a quota of S cores WAIT_SLEEP_PER_SHARE / S, at most MAX_WAIT_SLEEP.
WAIT_SLEEP_PER_SHARE = 2e-4
MAX_WAIT_SLEEP = 1e-3


def wait_max_sleep(quota: CpuQuota | None) -> float:
    """The longest sleep between two polls of a waiting rank (``waiting.wait_until``).

    Every poll wakes the waiting thread, and under a quota each wake-up is paid
    out of the rank's share; at a fraction of a core, polling as often as on a
    whole core takes a visible part of it. Longer sleeps cost at most one sleep
    of latency at the end of each wait.

    Args:
        quota: this rank's quota (:func:`own_quota`), or None.

    Returns:
        Seconds: ``WAIT_SLEEP_PER_SHARE`` without a quota of less than one core,
        else that over the share, at most ``MAX_WAIT_SLEEP``.
    """
    if quota is None or quota.share >= 1:
        return WAIT_SLEEP_PER_SHARE
    return min(WAIT_SLEEP_PER_SHARE / quota.share, MAX_WAIT_SLEEP)
