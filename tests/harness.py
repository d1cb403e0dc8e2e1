"""Launch a command on several local ranks and report each rank's output.

Used by the multi-rank tests and the benchmarks. Why it exists:

* a multi-rank failure must never become a hang: every launch runs under a
  wall-clock timeout, and on timeout the whole process group (launcher and
  ranks) is killed;
* when one rank fails, the person reading the failure needs *that rank's*
  output, not 4 interleaved streams: output is tagged per rank by the launcher
  (Open MPI's ``--tag-output``, horovodrun's ``[rank]<stdout>:`` prefix) and
  split back here.

Horovod's own convention is followed: a multi-rank test file runs whole under
``mpirun -np N python -m pytest FILE``, so one launch runs many cases.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dbs_hvd.quiet_yield import library_path

_RANK_TAG = re.compile(r"\[(?:\d+,)?(\d+)\]<(?:stdout|stderr)>:?")


@dataclass
class JobResult:
    """What a multi-rank job did: exit status, wall time and per-rank output."""

    argv: list[str]
    returncode: int | None
    timed_out: bool
    seconds: float
    output: str
    rank_output: dict[int, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True if the job exited with status 0 before its timeout."""
        return not self.timed_out and self.returncode == 0

    def describe(self, tail_lines: int = 60) -> str:
        """A failure report: the command, how it ended, then each rank's output tail."""
        status = (
            f"TIMED OUT after {self.seconds:.0f} s (killed)"
            if self.timed_out
            else f"exit code {self.returncode} after {self.seconds:.1f} s"
        )
        parts = [f"command: {' '.join(self.argv)}", f"status: {status}"]
        for rank in sorted(self.rank_output):
            lines = self.rank_output[rank][-tail_lines:]
            parts.append(f"----- rank {rank} (last {len(lines)} lines) -----")
            parts.extend(lines)
        untagged = [line for line in self.output.splitlines() if not _RANK_TAG.search(line)]
        if untagged:
            parts.append("----- launcher (untagged output) -----")
            parts.extend(untagged[-tail_lines:])
        return "\n".join(parts)


def split_by_rank(output: str) -> dict[int, list[str]]:
    """Group launcher-tagged lines by rank; untagged lines are left out.

    Launchers tag each chunk a rank writes, and a chunk need not end a line:
    a tag can appear in the middle of a line, after another rank's unfinished
    text. Text before the first tag of a line continues the previous chunk.
    """
    by_rank: dict[int, list[str]] = defaultdict(list)
    last_rank: int | None = None
    for line in output.splitlines():
        tags = list(_RANK_TAG.finditer(line))
        if not tags:
            continue
        head = line[: tags[0].start()]
        if head and last_rank is not None and by_rank[last_rank]:
            by_rank[last_rank][-1] += head
        for tag, following in zip(tags, tags[1:] + [None]):
            rank = int(tag.group(1))
            end = following.start() if following else len(line)
            by_rank[rank].append(line[tag.end() : end])
            last_rank = rank
    return dict(by_rank)


def rank_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for local ranks: one torch thread each, root allowed, quiet MPI."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    # Running as root inside containers is the norm here; Open MPI refuses it otherwise.
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    # Containers often forbid the cross-memory-attach syscalls vader uses.
    env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    # Ranks waiting in MPI must yield the CPU: on a machine with fewer cores than
    # ranks (and threads), spinning waiters slow the ranks that still compute.
    env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    # and, under a CPU quota, sleep in those yields (dbs_hvd.quiet_yield), as the
    # project's launchers set up.
    library = library_path()
    if library is not None and str(library) not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(filter(None, [str(library), env.get("LD_PRELOAD")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def _tool(name: str) -> str:
    """Prefer the tool next to the running interpreter (the project's venv)."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.path.exists(beside) else (shutil.which(name) or name)


def launcher_argv(np: int, launcher: str = "mpirun") -> list[str]:
    """The launcher prefix for ``np`` local ranks, oversubscribed, output tagged by rank."""
    if launcher == "mpirun":
        return [
            _tool("mpirun"),
            "--oversubscribe",
            "--bind-to",
            "none",
            "--tag-output",
            "-np",
            str(np),
        ]
    if launcher in ("horovodrun", "horovodrun-gloo"):
        argv = [_tool("horovodrun"), "-np", str(np), "-H", f"localhost:{np}"]
        if launcher == "horovodrun-gloo":
            argv.append("--gloo")
        return argv
    raise ValueError(f"unknown launcher {launcher!r}: use mpirun, horovodrun or horovodrun-gloo")


def run_job(
    command: Sequence[str],
    np: int,
    launcher: str = "mpirun",
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> JobResult:
    """Run ``command`` on ``np`` local ranks; kill everything after ``timeout`` seconds.

    Args:
        command: the command every rank runs.
        np: the number of local ranks.
        launcher: ``"mpirun"``, ``"horovodrun"`` or ``"horovodrun-gloo"``.
        timeout: seconds before the launcher and all ranks are killed.
        env: variables added to ``rank_environment()``.
        cwd: the working directory of the launcher.

    Returns:
        The job's exit status, whether it timed out, and its output split by rank.

    Examples:
        A test that launches must be marked ``mpi`` (``make test-fast`` leaves it out)::

            result = run_job([sys.executable, "-m", "dbs_hvd.train.cli", "--epochs", "1"], np=2)
            assert result.ok, result.describe()
    """
    return run_argv(launcher_argv(np, launcher) + list(command), timeout, env, cwd)


def train_or_fail(np: int, *args: str, timeout: float = 240.0) -> JobResult:
    """Run ``dbs-train ARGS`` on ``np`` local ranks under mpirun; fail the calling test if it fails.

    Returns:
        The job's result (its output, split by rank).
    """
    import pytest

    result = run_job([sys.executable, "-m", "dbs_hvd.train.cli", *args], np=np, timeout=timeout)
    if not result.ok:
        pytest.fail(result.describe(), pytrace=False)
    return result


def mpmd_argv(*commands: Sequence[str]) -> list[str]:
    """One mpirun launching one rank per command (``mpirun ... A : -np 1 B``)."""
    argv = launcher_argv(1, "mpirun") + list(commands[0])
    for command in commands[1:]:
        argv += [":", "-np", "1", *command]
    return argv


def run_argv(
    argv: Sequence[str],
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> JobResult:
    """Run a full launcher command line under a timeout, output split by rank."""
    argv = list(argv)
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=rank_environment(env),
        cwd=cwd,
        start_new_session=True,  # so a timeout can kill launcher and ranks together
    )
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        output, _ = proc.communicate()
    return JobResult(
        argv=argv,
        returncode=proc.returncode,
        timed_out=timed_out,
        seconds=time.monotonic() - start,
        output=output,
        rank_output=split_by_rank(output),
    )


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def rank_pytest_command(test_file: str, *pytest_args: str) -> list[str]:
    """``python -m pytest`` for one multi-rank test file, stopping at the first failure.

    ``-x`` matters: after a failed assertion a rank must leave rather than walk
    into the next test's collective while its peers are still in the old one;
    its exit makes the launcher abort the job.
    """
    return [
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        "--color=no",
        test_file,
        *pytest_args,
    ]
