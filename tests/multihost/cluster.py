"""The emulated cluster (launch/emulated_cluster.py) as a context manager for tests.

Every test gets its own hosts (``dbst1``.. on 10.77.1.0/24, state in
/run/dbs_hvd_cluster_test, apart from a cluster a person may have up), and
``down`` runs on every exit path: also after a crash of an earlier run, since
``emulated_cluster`` cleans up what a state file left before it starts.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.harness import JobResult, rank_environment, run_argv

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = str(Path(sys.executable).parent)
DBS_TRAIN = str(Path(VENV_BIN) / "dbs-train")


def _load():
    spec = importlib.util.spec_from_file_location(
        "emulated_cluster", ROOT / "launch" / "emulated_cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.set_state_dir("/run/dbs_hvd_cluster_test")
    return module


ec = _load()


class Cluster:
    def __init__(self, state: dict):
        self.state = state
        self.hosts: list[str] = state["hosts"]
        self.addresses: dict[str, str] = state["addresses"]
        self.agent = str(Path(state["bin"]) / "ssh")

    def env(self, extra: dict | None = None) -> dict[str, str]:
        """The launching shell's environment: the agent is ``ssh`` on PATH (unless sshd runs)."""
        agent = "" if self.state.get("sshd") else f"{self.state['bin']}:"
        env = {"PATH": f"{agent}{VENV_BIN}:{os.environ.get('PATH', '')}"}
        if self.state.get("slurm"):
            env["SLURM_CONF"] = self.state["slurm"]["conf"]
        env.update(extra or {})
        return env

    def run(self, host: str, argv: Sequence[str], timeout: float,
            env: dict | None = None) -> JobResult:
        """argv on ``host`` (as from a login node), killed after ``timeout`` s."""
        return run_argv(ec.host_argv(host, list(argv)), timeout=timeout,
                        env=self.env(env), cwd=str(ROOT))

    def popen(self, host: str, argv: Sequence[str], env: dict | None = None,
              **kwargs) -> subprocess.Popen:
        return subprocess.Popen(ec.host_argv(host, list(argv)), env=rank_environment(self.env(env)),
                                cwd=str(ROOT), start_new_session=True, text=True, **kwargs)

    def link_bytes(self, host: str) -> int:
        """Bytes received plus sent on ``host``'s eth0 so far."""
        done = subprocess.run(["ip", "-n", host, "-s", "-j", "link", "show", "eth0"],
                              capture_output=True, text=True, check=True)
        stats = json.loads(done.stdout)[0]["stats64"]
        return stats["rx"]["bytes"] + stats["tx"]["bytes"]

    def processes(self) -> dict[str, list[str]]:
        """Processes left in the hosts' namespaces: {host: ['pid cmdline', ...]}.

        sshd is left out: its listener, and the session of a host whose link was
        cut, which lasts until TCP gives up on the connection (not ours to end).
        So are the Slurm daemons (munged, slurmctld and its script helper,
        slurmd); a job's slurmstepd is not.
        """
        left = {}
        for host in self.hosts:
            pids = ec.namespace_pids(host)
            lines = []
            for pid in pids:
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                except OSError:
                    continue
                if cmd.startswith(DAEMONS):
                    continue
                lines.append(f"{pid} {cmd.decode(errors='replace')[:200]}")
            if lines:
                left[host] = lines
        return left

    def wait_no_processes(self, timeout: float = 10.0) -> dict[str, list[str]]:
        deadline = time.monotonic() + timeout
        while True:
            left = self.processes()
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.25)

    def slow(self, host: str, rate: str | None, delay_ms: float = 0.0) -> None:
        ec.slow(host, rate, delay_ms)

    def cut(self, host: str, mode: str = "down") -> None:
        ec.cut(host, mode)

    def heal(self, host: str) -> None:
        ec.heal(host)


SSHD_ROOT = os.environ.get("DBS_HVD_SSHD_ROOT", "")
DAEMONS = (b"sshd", b"munged ", b"slurmctld ", b"slurmd ", b": slurmscriptd")


@contextlib.contextmanager
def emulated_cluster(n: int, decoy: bool = False, sshd: bool = False,
                     slurm: bool = False) -> Iterator[Cluster]:
    """n hosts; with ``sshd``, real ssh to each (DBS_HVD_SSHD_ROOT: openssh-server unpacked);
    with ``slurm``, slurmctld and a slurmd per host (skipped where Slurm is not installed)."""
    reason = ec.can_create_namespaces()
    if reason:
        pytest.skip(f"no emulated hosts here: {reason}")
    if slurm and ec.slurm_missing():
        pytest.skip(f"Slurm is not installed: {ec.slurm_missing()}")
    if sshd and not Path(SSHD_ROOT, "usr/sbin/sshd").exists():
        pytest.skip("real ssh needs DBS_HVD_SSHD_ROOT: a folder with openssh-server's .deb "
                    "unpacked (apt-get download openssh-server libwrap0; dpkg -x each DEB DIR)")
    ec.down(quiet=True)  # what a crashed earlier run left
    state = ec.up(n, prefix="dbst", subnet="10.77.1", decoy=decoy, sshd=SSHD_ROOT if sshd else None,
                  slurm=slurm)
    try:
        yield Cluster(state)
    finally:
        ec.down(quiet=True)


def epoch_reads(read: list[dict], epochs: int, global_batch: int) -> Iterator[tuple[int, Counter]]:
    """(epoch, how often each sample was read) for dbs-train's digits data, after checking
    that the reads of each epoch cover exactly its global batches' samples (--read-log)."""
    from dbs_hvd.sampler import DynamicBatchSampler
    from dbs_hvd.train import data

    train_set, _ = data.load("digits", flatten=True, seed=0)
    stream = DynamicBatchSampler(len(train_set), global_batch, rank=0, world_size=1, seed=0)
    steps = stream.steps_per_epoch
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        expected = set(stream.permutation()[:steps * global_batch].tolist())
        counts = Counter(i for r in read if r["epoch"] == epoch for i in r["indices"])
        assert set(counts) == expected, f"epoch {epoch}: samples missed or foreign"
        yield epoch, counts


def kill_job(proc: subprocess.Popen) -> None:
    """Kill a job from ``Cluster.popen`` (launcher and local ranks: its process group) if it runs."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
