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

import json
import os
import signal
import subprocess
import time

import pytest

from tests.multihost.cluster import DBS_TRAIN, ROOT, ec, emulated_cluster, epoch_reads, kill_job

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
            kill_job(proc)
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


# ---------------------------------------------------------------------------
# elastic: a host lost mid-epoch, the job goes on from the last commit on the others

ELASTIC_EPOCHS, COMMIT_EVERY, FAIL_EPOCH, FAIL_AFTER_STEP, GLOBAL_BATCH = 3, 5, 1, 7, 64


def read_records(directory):
    records = []
    for path in sorted(directory.glob("reads-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line being written right now
    return records


@pytest.mark.parametrize("fault", ["kill", "cut-sshd"])
def test_elastic_a_lost_host_the_run_finishes_on_the_others_reading_each_sample_once(
        tmp_path, fault):
    """kill: every process of the host killed (rsh agent). cut-sshd: the host's frames
    dropped, under real ssh with launch/ssh_keepalive first on PATH (skipped without
    DBS_HVD_SSHD_ROOT): the driver learns of the loss when that ssh session times out."""
    ssh = fault == "cut-sshd"
    with emulated_cluster(3, sshd=ssh) as cluster:
        lost = cluster.hosts[2]
        reads = tmp_path / "reads"
        options = tmp_path / "options.txt"
        options.write_text(f"--log\n{tmp_path / 'epochs.jsonl'}\n")
        out = tmp_path / "output.txt"
        with open(out, "w") as sink:
            proc = cluster.popen(cluster.hosts[0], [
                "horovodrun", "-np", "3", "--min-np", "2", "--max-np", "3",
                "--host-discovery-script", str(ROOT / "launch" / "discover_hosts.sh"),
                "--network-interfaces", "eth0", "--start-timeout", "60", "--elastic-timeout", "60",
                "--blacklist-cooldown-range", "200", "300",
                DBS_TRAIN, "--elastic", "--commit-every", str(COMMIT_EVERY),
                "--virtual-device", "0:2", "--epochs", str(ELASTIC_EPOCHS),
                "--global-batch", str(GLOBAL_BATCH), "--read-log", str(reads), f"@{options}"],
                env={"DBS_HVD_HOSTS": ",".join(f"{h}:1" for h in cluster.hosts),
                     **({"PATH": f"{ROOT / 'launch' / 'ssh_keepalive'}:{cluster.env()['PATH']}"}
                        if ssh else {})},
                stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not any(r["kind"] == "read" and r["epoch"] == FAIL_EPOCH
                          and r["step"] >= FAIL_AFTER_STEP for r in read_records(reads)):
                assert proc.poll() is None, out.read_text()[-3000:]
                assert time.monotonic() < deadline, out.read_text()[-3000:]
                time.sleep(0.05)
            if ssh:
                cluster.cut(lost, "drop")
            else:
                for pid in ec.namespace_pids(lost):  # the host dies: every process on it
                    os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            proc.wait(timeout=120)
            took = time.monotonic() - killed_at
        finally:
            kill_job(proc)
        output = out.read_text()
        assert proc.returncode == 0, output[-5000:]
        print(f"elastic: host {lost} lost ({fault}), the run finished on 2 hosts {took:.1f} s later")

        records = read_records(reads)
        read = [r for r in records if r["kind"] == "read"]
        commits = [r for r in records if r["kind"] == "commit"]
        final = max(commits, key=lambda c: (c["epoch"], c["step"]))
        assert (final["epoch"], final["step"], final["world"]) == (ELASTIC_EPOCHS, 0, 2), final
        assert {r["world"] for r in read if r["epoch"] == ELASTIC_EPOCHS - 1} == {2}
        for epoch, counts in epoch_reads(read, ELASTIC_EPOCHS, GLOBAL_BATCH):
            if epoch != FAIL_EPOCH:
                assert max(counts.values()) == 1, f"epoch {epoch} read samples twice"
                continue
            # Read twice: only what the world of 3 read after its last commit.
            resumed = min(r["step"] for r in read if r["epoch"] == epoch and r["world"] == 2)
            last_commit = max(c["step"] for c in commits if c["world"] == 3 and c["epoch"] == epoch)
            assert resumed == last_commit, (resumed, last_commit)
            twice = {i for i, n in counts.items() if n == 2}
            assert max(counts.values()) <= 2
            assert twice == {i for r in read if r["epoch"] == epoch and r["world"] == 3
                             and r["step"] >= resumed for i in r["indices"]}
        # The cut host's rank is stranded: it ends when its rendezvous with the
        # unreachable driver gives up.
        left = cluster.wait_no_processes(timeout=90 if ssh else 10)
        assert not left, f"processes left after the run: {left}"
        print(f"  and no process left on any host {time.monotonic() - killed_at:.1f} s after the loss")
