"""A host that drops off the network ends the job: bounded, named, nothing left behind.

On emulated hosts (launch/emulated_cluster.py), dbs-train runs on three hosts
through launch/multi_host.sh; in epoch 1 one host's link is cut (``drop``: its
bridge port unplugged, every frame lost silently, links still up on both sides;
``down``: its interface down). Without elastic mode the job must end on every
surviving process within BOUND seconds of the cut (the documented bound is 60 s;
measured here 20-40 s), with a message naming the lost host, and leave no
process on any host, the cut one included. What ends it:

* mpirun (and horovodrun's MPI mode): Open MPI's lifeline keepalive, which
  multi_host.sh sets (10 s idle, 3 probes 5 s apart): "ORTE has lost
  communication with a remote daemon ... on node HOST"; the lost host's daemon
  loses its lifeline too and kills its ranks;
* horovodrun --gloo: Gloo's 30 s operation timeout on every rank.

multi_host.sh then names each host that does not answer a TCP connect. The
``-sshd`` cases use real ssh (an sshd per host) instead of the rsh agent, with
multi_host.sh's keepalives; they are skipped unless DBS_HVD_SSHD_ROOT names
a folder with openssh-server's .deb unpacked.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from multihost.cluster import ROOT, emulated_cluster

pytestmark = [pytest.mark.multihost, pytest.mark.mpi]

BOUND = 90  # seconds from the cut to the launcher's exit, asserted (documented: 60)


@pytest.mark.parametrize("launcher,mode,ssh", [
    ("mpirun", "drop", False), ("gloo", "down", False), ("horovodrun", "drop", False),
    ("mpirun", "drop", True), ("gloo", "drop", True)],
    ids=["mpirun-drop", "gloo-down", "horovodrun-drop", "mpirun-drop-sshd", "gloo-drop-sshd"])
def test_a_cut_host_ends_the_job_within_the_bound(tmp_path, launcher, mode, ssh):
    """ssh: real ssh to an sshd per host (skipped without DBS_HVD_SSHD_ROOT), else the agent."""
    with emulated_cluster(3, sshd=ssh) as cluster:
        lost = cluster.hosts[2]
        out = tmp_path / "output.txt"
        with open(out, "w") as sink:
            proc = cluster.popen(cluster.hosts[0], [
                "bash", str(ROOT / "launch" / "multi_host.sh"), "--launcher", launcher,
                "--hosts", ",".join(f"{h}:1" for h in cluster.hosts), "--",
                "--epochs", "200", "--virtual-device", "0:3", "--stall-timeout", "60"],
                stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while "epoch   1 " not in out.read_text():
                assert proc.poll() is None, out.read_text()[-3000:]
                assert time.monotonic() < deadline, "no epoch 1 in 120 s:\n" + out.read_text()[-3000:]
                time.sleep(0.2)
            cluster.cut(lost, mode)
            cut_at = time.monotonic()
            try:
                proc.wait(timeout=BOUND)
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running {BOUND} s after the cut:\n" + out.read_text()[-3000:])
            took = time.monotonic() - cut_at
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        output = out.read_text()
        print(f"{launcher}, cut by {mode}: the job ended {took:.1f} s after the cut")
        assert proc.returncode != 0, output[-3000:]
        assert f"host {lost} does not answer on the network" in output, output[-3000:]
        for host in cluster.hosts[:2]:
            assert f"host {host} does not answer" not in output, output[-3000:]
        # Over ssh, horovodrun ends when the lost host's ssh session times out
        # (keepalives); the other ranks, left by their ssh sessions, end at
        # Gloo's timeout, within the same bound of the cut.
        left = cluster.wait_no_processes(timeout=max(15.0, BOUND - took))
        assert not left, f"processes left {BOUND} s after the cut: {left}"
        print(f"  and no process left on any host {time.monotonic() - cut_at:.1f} s after the cut")
