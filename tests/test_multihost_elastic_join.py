"""Elastic across emulated hosts: a host that appears in the discovery output joins.

horovodrun's driver reads launch/discover_hosts.sh (through DBS_HVD_HOSTS_FILE,
a file the test edits) every second. A host added to the file gets a worker,
the running ranks stop at their next commit (HostsUpdatedInterrupt), and the
job goes on in a world that includes it, with a plan for that world. A host
taken out of the file and put back (a host that comes back) leaves and
rejoins the same way. The checks: the commits (rank 0's --read-log records)
show the worlds in that order, each with a plan of its size that splits the
global batch; every sample of every epoch is read, and exactly once where the
world only grew (a join interrupts at a commit, so nothing is redone).
Needs root (skipped otherwise).
"""
from __future__ import annotations

import subprocess
import time

import pytest

from tests.multihost.cluster import DBS_TRAIN, ROOT, emulated_cluster, epoch_reads, kill_job
from tests.test_multihost_faults import read_records

pytestmark = [pytest.mark.multihost, pytest.mark.mpi]

COMMIT_EVERY, GLOBAL_BATCH = 5, 64


def start(cluster, tmp_path, hosts_file, epochs):
    reads = tmp_path / "reads"
    out = tmp_path / "output.txt"
    options = tmp_path / "options.txt"
    options.write_text(f"--log\n{tmp_path / 'epochs.jsonl'}\n")
    with open(out, "w") as sink:
        proc = cluster.popen(cluster.hosts[0], [
            "horovodrun", "-np", "2", "--min-np", "2", "--max-np", "3",
            "--host-discovery-script", str(ROOT / "launch" / "discover_hosts.sh"),
            "--network-interfaces", "eth0", "--start-timeout", "60", "--elastic-timeout", "60",
            DBS_TRAIN, "--elastic", "--commit-every", str(COMMIT_EVERY),
            "--virtual-device", "0:3", "--epochs", str(epochs),
            "--global-batch", str(GLOBAL_BATCH), "--read-log", str(reads), f"@{options}"],
            env={"DBS_HVD_HOSTS_FILE": str(hosts_file)},
            stdout=sink, stderr=subprocess.STDOUT)
    return proc, reads, out


def commits(reads):
    """Every world's rank 0 writes its commits to its own file: in training order."""
    return sorted((r for r in read_records(reads) if r["kind"] == "commit"),
                  key=lambda c: (c["epoch"], c["step"]))


def worlds(reads) -> list[int]:
    """The sizes of the worlds that committed, in order."""
    sizes = [c["world"] for c in commits(reads)]
    return [w for i, w in enumerate(sizes) if i == 0 or sizes[i - 1] != w]


def wait_for(proc, out, ready, what, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"ended before {what}:\n" + out.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {what} in {timeout:g} s:\n" + out.read_text()[-3000:]
        time.sleep(0.1)


def check_accounting(reads, epochs: int, strict: bool) -> None:
    """Every epoch's samples are read: once if ``strict``, else twice only next to a world change.

    A host that leaves can end its worker before the others reach a commit:
    they then redo the steps since the last commit in the new world.
    """
    records = read_records(reads)
    read = [r for r in records if r["kind"] == "read"]
    done = commits(reads)
    changes = {c["epoch"] for i, c in enumerate(done) if i and done[i - 1]["world"] != c["world"]}
    for c in done:
        assert len(c["plan"]) == c["world"] and sum(c["plan"]) == GLOBAL_BATCH, c
    for epoch, counts in epoch_reads(read, epochs, GLOBAL_BATCH):
        if strict or not ({epoch, epoch + 1} & changes):
            assert max(counts.values()) == 1, f"epoch {epoch} read samples twice"


def finish(proc, out, cluster):
    try:
        proc.wait(timeout=180)
    finally:
        kill_job(proc)
    output = out.read_text()
    assert proc.returncode == 0, output[-5000:]
    left = cluster.wait_no_processes()
    assert not left, f"processes left after the run: {left}"
    return output


def test_elastic_a_new_host_in_the_discovery_output_joins_with_a_new_plan(tmp_path):
    with emulated_cluster(3) as cluster:
        hosts_file = tmp_path / "hosts"
        hosts_file.write_text("".join(f"{h}:1\n" for h in cluster.hosts[:2]))
        epochs = 6
        proc, reads, out = start(cluster, tmp_path, hosts_file, epochs)
        try:
            wait_for(proc, out, lambda: any(c["world"] == 2 and (c["epoch"], c["step"]) >= (0, 10)
                                            for c in commits(reads)), "commit at step 10 on 2 hosts")
            hosts_file.write_text(hosts_file.read_text() + f"{cluster.hosts[2]}:1\n")
            joined_at = time.monotonic()
            wait_for(proc, out, lambda: any(c["world"] == 3 for c in commits(reads)),
                     "commit by a world of 3")
            print(f"elastic: {cluster.hosts[2]} joined, first commit of 3 ranks "
                  f"{time.monotonic() - joined_at:.1f} s after it appeared")
        finally:
            finish(proc, out, cluster)
        check_accounting(reads, epochs, strict=True)
        assert worlds(reads) == [2, 3]
        final = commits(reads)[-1]
        assert (final["epoch"], final["step"], final["world"]) == (epochs, 0, 3), final
        hosts_read = {p.name.split("-")[1] for p in reads.glob("reads-*.jsonl")}
        assert hosts_read == set(cluster.hosts), hosts_read


def test_elastic_a_host_that_leaves_the_discovery_output_and_comes_back_rejoins(tmp_path):
    with emulated_cluster(3) as cluster:
        hosts_file = tmp_path / "hosts"
        all_hosts = "".join(f"{h}:1\n" for h in cluster.hosts)
        hosts_file.write_text(all_hosts)
        epochs = 10
        proc, reads, out = start(cluster, tmp_path, hosts_file, epochs)
        try:
            wait_for(proc, out, lambda: any(c["world"] == 3 and (c["epoch"], c["step"]) >= (0, 10)
                                            for c in commits(reads)), "commit at step 10 on 3 hosts")
            hosts_file.write_text("".join(f"{h}:1\n" for h in cluster.hosts[:2]))
            wait_for(proc, out, lambda: worlds(reads) == [3, 2], "commit by a world of 2")
            hosts_file.write_text(all_hosts)
            back_at = time.monotonic()
            wait_for(proc, out, lambda: worlds(reads) == [3, 2, 3], "commit by a world of 3 again")
            print(f"elastic: {cluster.hosts[2]} came back, first commit of 3 ranks "
                  f"{time.monotonic() - back_at:.1f} s after it reappeared")
        finally:
            finish(proc, out, cluster)
        check_accounting(reads, epochs, strict=False)
        assert worlds(reads) == [3, 2, 3]
        final = commits(reads)[-1]
        assert (final["epoch"], final["step"], final["world"]) == (epochs, 0, 3), final
