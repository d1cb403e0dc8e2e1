#!/usr/bin/env python3
"""Run one rank's command on a slower "device" made from outside: a CPU quota, a
pinned core, noisy neighbours.

Put it between the launcher and the command; every rank reads its own part of
the spec by its rank number (from mpirun, horovodrun, PMI or Slurm):

    mpirun -np 2 python launch/hetero_ranks.py --share 1,0.25 --core 0,1 \\
        --period-ms 100 -- dbs-train --model cnn ...
    horovodrun -np 2 -H localhost:2 python launch/hetero_ranks.py --share 1,0.5 -- dbs-train ...

Per rank (comma-separated lists, one entry per rank, or one entry for all):

* ``--share S``: the rank's CPU quota in cores (``0.25``: a quarter of one core,
  ``1`` or more: no quota). A CFS quota of ``S x period`` per ``--period-ms``
  (default 100 ms, the kernel's and Kubernetes' default: a rank at 0.25 then
  runs 25 ms and is frozen for 75 ms; 10 ms makes the same share steadier).
* ``--core C``: the core the rank is pinned to (``any``: not pinned).
* ``--noise p=P,loops=L,segment=S,epochs=E,seed=N``: noisy neighbours after the
  DBS paper's protocol, in time segments of S seconds: at each segment a rank
  not yet disturbed is disturbed with probability P, for a random 1..E
  segments, by L busy loops pinned to its core. ``--noise-ranks`` picks the
  ranks whose cores get them (default all; give one rank per shared core).

Cgroups: the cgroup v1 ``cpu`` controller or cgroup v2 with ``cpu`` enabled;
writing them needs root. Where they cannot be written, the tool stops with a
message: use dbs-train's in-framework emulation (``--slowdown``,
``--virtual-device``, ``--disturb``) there instead.

Cleanup: each rank's quota group and neighbour loops are owned by a keeper
process in a session of its own, which removes them when the rank's wrapper
exits for any reason, SIGKILL included (it watches a pipe the wrapper holds
open). The rank's command gets SIGKILL if its wrapper dies. Groups left by a
keeper that was itself killed are removed by the next run.

``--report DIR`` writes ``DIR/rank<R>.json`` per rank: share, period, core, wall
seconds, CPU seconds charged to the command (and how they split between its
main thread and its other threads, sampled every 0.25 s), throttled periods and
time, and the neighbour schedule.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

GROUP_PARENT = "dbs_hvd_hetero"
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")
FALLBACK = ("use dbs-train's in-framework emulation instead (--slowdown, --virtual-device, "
            "--disturb), which needs no privileges")
NOISE_LOOP = ["/bin/sh", "-c", "while :; do :; done"]


class SetupError(Exception):
    """The spec or the machine does not allow what was asked; the message says what to do."""


# ---------------------------------------------------------------------------
# The spec


@dataclass(frozen=True)
class Noise:
    """Noisy neighbours after the DBS paper's protocol, in time segments."""

    p: float
    loops: int = 2
    segment: float = 2.0
    epochs: int = 3
    seed: int = 0


@dataclass(frozen=True)
class RankSpec:
    """What one rank runs under."""

    rank: int
    share: float | None  # cores of quota; None: no quota
    period_ms: float
    core: int | None
    noise: Noise | None


def per_rank(text: str, name: str, size: int | None) -> list[str]:
    """Split a comma list; one entry stands for every rank."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise SetupError(f"--{name} is empty")
    if size is not None and len(items) not in (1, size):
        raise SetupError(f"--{name} has {len(items)} entries but the other lists have {size}: "
                         f"give one entry per rank, or one for all")
    return items


def parse_noise(text: str) -> Noise:
    fields = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise SetupError(f"--noise {text!r}: expected key=value pairs, e.g. "
                             f"p=0.3,loops=2,segment=2,epochs=3,seed=4")
        fields[key.strip()] = value.strip()
    unknown = set(fields) - {"p", "loops", "segment", "epochs", "seed"}
    if unknown:
        raise SetupError(f"--noise: unknown keys {sorted(unknown)}; "
                         f"known: p, loops, segment, epochs, seed")
    try:
        noise = Noise(p=float(fields.get("p", "0.3")), loops=int(fields.get("loops", "2")),
                      segment=float(fields.get("segment", "2")),
                      epochs=int(fields.get("epochs", "3")), seed=int(fields.get("seed", "0")))
    except ValueError as error:
        raise SetupError(f"--noise {text!r}: {error}") from None
    if not 0 <= noise.p <= 1 or noise.loops < 1 or noise.segment <= 0 or noise.epochs < 1:
        raise SetupError(f"--noise {text!r}: need 0 <= p <= 1, loops >= 1, segment > 0, epochs >= 1")
    return noise


def rank_spec(args: argparse.Namespace, rank: int) -> RankSpec:
    """This rank's part of the command line."""
    lists = {name: getattr(args, name) for name in ("share", "core", "period_ms")}
    sizes = {len(per_rank(v, n, None)) for n, v in lists.items() if v}
    size = max(sizes) if sizes else None
    if size is not None and size > 1 and rank >= size:
        raise SetupError(f"rank {rank} has no entry: the lists name {size} ranks; "
                         f"launch {size} ranks or give one entry for all")

    def pick(name: str, default: str) -> str:
        value = lists[name]
        if not value:
            return default
        items = per_rank(value, name.replace("_", "-"), size)
        return items[0] if len(items) == 1 else items[rank]

    try:
        share = float(pick("share", "1"))
        period = float(pick("period_ms", "100"))
    except ValueError as error:
        raise SetupError(f"--share / --period-ms: {error}") from None
    if share <= 0:
        raise SetupError(f"--share {share} for rank {rank}: a share is a positive number of cores")
    if not 1 <= period <= 1000:
        raise SetupError(f"--period-ms {period}: the kernel accepts 1 to 1000 ms")
    if share * period < 1:
        raise SetupError(f"--share {share} with --period-ms {period} gives a quota under the "
                         f"kernel's minimum of 1 ms: raise the period")
    core_text = pick("core", "any")
    if core_text == "any":
        core = None
    else:
        try:
            core = int(core_text)
        except ValueError:
            raise SetupError(f"--core {core_text!r}: a core number or 'any'") from None
        if core not in os.sched_getaffinity(0):
            raise SetupError(f"--core {core} for rank {rank}: this process may run on cores "
                             f"{sorted(os.sched_getaffinity(0))} only")
    noise = None
    if args.noise:
        noisy = ({int(r) for r in per_rank(args.noise_ranks, "noise-ranks", None)}
                 if args.noise_ranks else None)
        if noisy is None or rank in noisy:
            noise = parse_noise(args.noise)
            if core is None:
                raise SetupError("--noise needs --core: neighbours are pinned to the rank's core")
    return RankSpec(rank, share if share < 1 else None, period, core, noise)


def launcher_rank(environ=os.environ) -> int:
    """The rank number from the launcher's environment."""
    for name in RANK_VARIABLES:
        if environ.get(name, "").strip().isdigit():
            return int(environ[name])
    raise SetupError(f"cannot tell this process's rank: none of {', '.join(RANK_VARIABLES)} "
                     f"is set. Start it under mpirun, horovodrun or srun, or give --rank")


def noise_schedule(noise: Noise, rank: int, horizon: float) -> list[tuple[float, float]]:
    """The (start, end) seconds of each disturbance of one rank, from its seed.

    Each segment that starts undisturbed begins a disturbance with probability
    ``p``, lasting a uniform 1..``epochs`` segments; the same seed and rank give
    the same schedule.
    """
    rng = random.Random(noise.seed * 1_000_003 + rank)
    spans, t = [], 0.0
    while t < horizon:
        if rng.random() < noise.p:
            length = rng.randint(1, noise.epochs) * noise.segment
            spans.append((t, t + length))
            t += length
        else:
            t += noise.segment
    return spans


# ---------------------------------------------------------------------------
# Cgroups


class CpuGroup:
    """A CPU-quota cgroup for one rank (v1 ``cpu`` controller or v2 ``cpu.max``)."""

    def __init__(self, path: Path, version: int) -> None:
        self.path = path
        self.version = version

    def set_quota(self, share: float, period_ms: float) -> None:
        period = int(period_ms * 1000)
        quota = max(int(share * period), 1000)
        if self.version == 1:
            (self.path / "cpu.cfs_period_us").write_text(str(period))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (self.path / "cpu.max").write_text(f"{quota} {period}")

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def stats(self) -> dict:
        """Throttling counters (periods, throttled periods, throttled seconds)."""
        try:
            fields = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines()
                          if len(line.split()) == 2)
        except OSError:
            return {}
        throttled = (int(fields.get("throttled_time", 0)) / 1e9 if self.version == 1
                     else int(fields.get("throttled_usec", 0)) / 1e6)
        return {"periods": int(fields.get("nr_periods", 0)),
                "throttled_periods": int(fields.get("nr_throttled", 0)),
                "throttled_seconds": throttled}

    def remove(self, timeout: float = 5.0) -> bool:
        """Kill whatever is left in the group and remove it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.path.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError:
                time.sleep(0.05)
        return False


def find_cpu_controller(mounts_text: str | None = None) -> tuple[Path, int]:
    """Where a CPU quota can be set: the v1 ``cpu`` hierarchy, else a v2 one with ``cpu``."""
    if mounts_text is None:
        mounts_text = Path("/proc/mounts").read_text()
    v2 = None
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        where, kind, options = Path(parts[1]), parts[2], parts[3].split(",")
        if kind == "cgroup" and "cpu" in options:
            return where, 1
        if kind == "cgroup2" and v2 is None:
            try:
                if "cpu" in (where / "cgroup.controllers").read_text().split():
                    v2 = where
            except OSError:
                pass
    if v2 is not None:
        return v2, 2
    raise SetupError("no cgroup hierarchy with a CPU controller is mounted (cgroup v1 'cpu' or "
                     "cgroup v2 with 'cpu' in cgroup.controllers); " + FALLBACK)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(parent: Path) -> int:
    """Remove groups whose keeper is gone (a keeper killed before it could clean up)."""
    removed = 0
    if not parent.is_dir():
        return 0
    for group in parent.iterdir():
        if not group.is_dir() or "-k" not in group.name:
            continue
        try:
            keeper = int(group.name.rsplit("-k", 1)[1])
        except ValueError:
            continue
        if not _pid_alive(keeper):
            version = 2 if (group / "cpu.max").exists() else 1
            removed += CpuGroup(group, version).remove(timeout=2.0)
    return removed


def make_group(root: Path, version: int, name: str) -> CpuGroup:
    parent = root / GROUP_PARENT
    try:
        parent.mkdir(exist_ok=True)
        if version == 2:
            for level in (root, parent):
                control = level / "cgroup.subtree_control"
                if "cpu" not in control.read_text().split():
                    control.write_text("+cpu")
        sweep_stale(parent)
        path = parent / name
        path.mkdir()
    except OSError as error:
        raise SetupError(f"cannot create a CPU-quota cgroup under {root} ({error.strerror}): "
                         f"this needs root and a writable cgroup mount; " + FALLBACK) from None
    return CpuGroup(path, version)


# ---------------------------------------------------------------------------
# Processes

def _die_with_parent() -> None:
    """In a child: get SIGKILL when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _pin(core: int | None) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})


def start_loops(count: int, core: int) -> list[subprocess.Popen]:
    def setup() -> None:
        _die_with_parent()
        _pin(core)

    return [subprocess.Popen(NOISE_LOOP, preexec_fn=setup, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(count)]


def stop_loops(loops: list[subprocess.Popen]) -> None:
    for loop in loops:
        loop.kill()
    for loop in loops:
        loop.wait()


def keeper(read_fd: int, spec: RankSpec, group: CpuGroup | None, started: float) -> None:
    """The keeper's life: run the neighbour schedule until the wrapper's pipe closes,
    then remove the loops and the group. Never returns."""
    os.setsid()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    spans = noise_schedule(spec.noise, spec.rank, 24 * 3600.0) if spec.noise else []
    loops: list[subprocess.Popen] = []
    index, active_until = 0, None
    try:
        while True:
            now = time.monotonic() - started
            if active_until is not None and now >= active_until:
                stop_loops(loops)
                loops, active_until = [], None
            if active_until is None and index < len(spans) and now >= spans[index][0]:
                assert spec.noise is not None and spec.core is not None
                loops = start_loops(spec.noise.loops, spec.core)
                active_until = spans[index][1]
                index += 1
            events = [t for t in ([active_until] if active_until is not None else [])
                      + ([spans[index][0]] if index < len(spans) else [])]
            timeout = max(min(events) - now, 0.0) if events else None
            ready, _, _ = select.select([read_fd], [], [], timeout)
            if ready and not os.read(read_fd, 4096):
                break  # the wrapper is gone
    finally:
        stop_loops(loops)
        if group is not None:
            group.remove()
        os._exit(0)


def run(spec: RankSpec, command: list[str], report_dir: Path | None,
        cgroup_root: str = "auto") -> int:
    """Run ``command`` under ``spec``; return its exit status."""
    group = None
    if spec.share is not None:
        if cgroup_root == "auto":
            root, version = find_cpu_controller()
        else:
            root = Path(cgroup_root)
            version = 2 if (root / "cgroup.controllers").exists() else 1
    read_fd, write_fd = os.pipe()
    keeper_pid = os.fork()
    if keeper_pid == 0:  # pragma: no cover - the keeper, a separate process
        os.close(write_fd)
        kept = None
        if spec.share is not None:
            try:  # the group is named after the keeper, which owns it
                kept = make_group(root, version, f"r{spec.rank}-k{os.getpid()}")
                kept.set_quota(spec.share, spec.period_ms)
            except (SetupError, OSError) as error:
                sys.stderr.write(f"hetero_ranks: {error}\n")
                if kept is not None:
                    kept.remove()
                os._exit(3)
        keeper(read_fd, spec, kept, time.monotonic())
    os.close(read_fd)
    if spec.share is not None:
        group = CpuGroup(root / GROUP_PARENT / f"r{spec.rank}-k{keeper_pid}", version)
        if not _wait_for(lambda: (group.path / "cgroup.procs").exists()
                         and _quota_set(group), keeper_pid):
            raise SetupError(f"could not set up the CPU-quota group {group.path}: "
                             f"this needs root and a writable cgroup mount; " + FALLBACK)

    def setup() -> None:
        _die_with_parent()
        if group is not None:
            group.add(os.getpid())
        _pin(spec.core)

    started = time.monotonic()
    child = subprocess.Popen(command, preexec_fn=setup, pass_fds=())

    def forward(signum, _frame):
        child.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    threads = ThreadSampler(child.pid)
    if report_dir is not None:
        threads.start()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    if report_dir is not None:
        report = {"rank": spec.rank, "share": spec.share, "period_ms": spec.period_ms,
                  "core": spec.core, "wall_seconds": wall,
                  "cpu_seconds": usage.ru_utime + usage.ru_stime,
                  "user_seconds": usage.ru_utime, "system_seconds": usage.ru_stime,
                  "returncode": child.returncode, **threads.split(),
                  "noise": asdict(spec.noise) if spec.noise else None,
                  "noise_spans": noise_schedule(spec.noise, spec.rank, wall) if spec.noise else [],
                  **(group.stats() if group is not None else {})}
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / f"rank{spec.rank}.json").write_text(json.dumps(report))
    os.close(write_fd)  # the keeper cleans up
    os.waitpid(keeper_pid, 0)
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


class ThreadSampler(threading.Thread):
    """Samples the CPU seconds of each thread of a process until it exits.

    ``main`` is the process's first thread (the training loop of a Python
    rank), ``others`` the sum over its other threads as last seen (Horovod's
    background thread, MPI's and Gloo's helpers, data-loading threads): where
    a throttled rank's quota goes. Threads that end between two samples lose
    their last interval, so ``others`` is a lower bound.
    """

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.last: dict[int, float] = {}
        self.done = threading.Event()

    def sample(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return
        for tid in tids:
            try:
                with open(f"/proc/{self.pid}/task/{tid}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            self.last[int(tid)] = (int(fields[11]) + int(fields[12])) / tick

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.sample()

    def split(self) -> dict:
        self.done.set()
        main = self.last.get(self.pid, 0.0)
        return {"main_thread_cpu_seconds": main,
                "other_threads_cpu_seconds": sum(self.last.values()) - main}


def _quota_set(group: CpuGroup) -> bool:
    """Whether the keeper has written the group's quota (it writes the period first)."""
    try:
        if group.version == 1:
            return int((group.path / "cpu.cfs_quota_us").read_text()) > 0
        return not (group.path / "cpu.max").read_text().startswith("max")
    except (OSError, ValueError):
        return False


def _wait_for(condition, keeper_pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        done, _ = os.waitpid(keeper_pid, os.WNOHANG)
        if done:
            return False
        time.sleep(0.01)
    return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hetero_ranks.py", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: mpirun -np 2 python launch/hetero_ranks.py --share 1,0.25 --core 0,1 "
               "-- dbs-train --model cnn")
    parser.add_argument("--share", help="CPU quota per rank, in cores (1: no quota), e.g. 1,0.25")
    parser.add_argument("--period-ms", help="CFS period per rank in ms (default 100)")
    parser.add_argument("--core", help="core per rank, or 'any' (default: not pinned)")
    parser.add_argument("--noise", metavar="p=P,loops=L,segment=S,epochs=E,seed=N",
                        help="noisy neighbours on the rank's core (needs --core)")
    parser.add_argument("--noise-ranks", help="ranks whose cores get neighbours (default all)")
    parser.add_argument("--rank", type=int, help="this process's rank (default: from the launcher)")
    parser.add_argument("--report", type=Path, help="write DIR/rank<R>.json with CPU and "
                        "throttling figures")
    parser.add_argument("--cgroup-root", default="auto",
                        help="cgroup mount with the CPU controller (default: found in /proc/mounts)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the rank's command")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if not command:
            raise SetupError("no command: put it after --, e.g. -- dbs-train --model cnn")
        rank = args.rank if args.rank is not None else launcher_rank()
        spec = rank_spec(args, rank)
        return run(spec, command, args.report, args.cgroup_root)
    except SetupError as error:
        print(f"hetero_ranks: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
