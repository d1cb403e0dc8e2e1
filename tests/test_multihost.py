"""dbs-train across emulated hosts: network namespaces on one machine (launch/emulated_cluster.py).

Each host has its own address on a bridge, its own /etc/hosts and hostname, and
is reached through an rsh agent with ssh's calling convention (``ssh`` first on
PATH), so mpirun, horovodrun --gloo and horovodrun --mpi start their remote
ranks as they would over ssh, and rank traffic crosses the emulated links.
The checks are the one-host tests' checks: every rank ran (on its own host,
traffic crossed each host's link), the plans are the same on every rank (one
plan chain in --rebalance-log, every rank's samples tile each epoch: the
sampler's accounting), exactly-once by sample index (--read-log, elastic run),
exit 0 and no process left on any host. Needs root (skipped otherwise).
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from tests.multihost.cluster import DBS_TRAIN, ROOT, ec, emulated_cluster

from dbs_hvd.train.metrics import read_jsonl

pytestmark = [pytest.mark.multihost, pytest.mark.mpi]

GLOBAL_BATCH, EPOCHS = 64, 2
TRAIN = ["--epochs", str(EPOCHS), "--global-batch", str(GLOBAL_BATCH), "--virtual-device", "0:1",
         "--stall-timeout", "60"]
MPIRUN_FLAGS = ["--bind-to", "none", "--tag-output",
                "--mca", "btl_tcp_if_include", "eth0", "--mca", "oob_tcp_if_include", "eth0",
                "-x", "PATH", "-x", "OMP_NUM_THREADS", "-x", "PYTHONUNBUFFERED"]


def launch_argv(launcher: str, hosts: str, np: int, agent: str) -> list[str]:
    if launcher == "mpirun":  # the agent given to Open MPI, as on a cluster without ssh
        return ["mpirun", "-np", str(np), "-H", hosts, "--mca", "plm_rsh_agent", agent,
                *MPIRUN_FLAGS]
    flag = {"horovodrun-gloo": "--gloo", "horovodrun-mpi": "--mpi"}[launcher]
    # horovodrun has no agent option: it finds the agent as `ssh` on PATH.
    return ["horovodrun", flag, "-np", str(np), "-H", hosts, "--network-interfaces", "eth0",
            "--start-timeout", "60"]


def test_the_emulated_hosts_are_hosts():
    with emulated_cluster(2) as cluster:
        h1, h2 = cluster.hosts
        remote = f"{cluster.agent} -o X=y {h2} -p 22 'hostname; echo $SSH_CONNECTION'"
        done = subprocess.run(ec.host_argv(h1, [
            "bash", "-c", f"hostname; getent hosts {h2}; {remote}"]),
            capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.split("\n")
        assert lines[0] == h1 and lines[1].split() == [cluster.addresses[h2], h2]
        assert lines[2] == h2 and h2 in lines[3]
        # The machine's own namespace has no address on the hosts' subnet.
        assert cluster.addresses[h1] not in subprocess.run(
            ["ip", "-o", "addr"], capture_output=True, text=True).stdout

        def transfer_seconds(size: int, timeout: float = 30.0) -> float:
            """Seconds from h2's connect to h1's reply after ``size`` bytes (raise on timeout)."""
            server = cluster.popen(h1, [sys.executable, "-c", (
                "import socket,sys;s=socket.socket();s.bind(('0.0.0.0',0));s.listen(1)\n"
                "print(s.getsockname()[1],flush=True);c=s.accept()[0]\n"
                "while c.recv(65536): pass\n"
                "c.sendall(b'k');c.close()\n")], stdout=subprocess.PIPE)
            try:
                port = int(server.stdout.readline())
                client = subprocess.run(ec.host_argv(h2, [sys.executable, "-c", (
                    "import socket,time;t=time.time()\n"
                    f"c=socket.create_connection(('{cluster.addresses[h1]}',{port}),timeout={timeout})\n"
                    f"c.sendall(b'x'*{size});c.shutdown(socket.SHUT_WR);c.recv(1)\n"
                    "print(time.time()-t)\n")]),
                    capture_output=True, text=True, timeout=timeout + 5)
                assert client.returncode == 0, client.stderr[-500:]
                return float(client.stdout)
            finally:
                server.kill()
                server.wait()

        assert transfer_seconds(1 << 20) < 1.0
        cluster.slow(h2, "8mbit")  # 1 MiB at 1 MB/s
        assert transfer_seconds(1 << 20) > 0.7
        cluster.heal(h2)
        cluster.slow(h2, None, delay_ms=100)  # a connect needs a round trip: >= 200 ms
        assert transfer_seconds(1000) > 0.2
        cluster.heal(h2)
        assert transfer_seconds(1000) < 0.2
        cluster.cut(h2, "drop")
        with pytest.raises(AssertionError):
            transfer_seconds(1000, timeout=2)
        cluster.heal(h2)
        assert transfer_seconds(1000) < 1.0
    assert not {cluster.hosts[0], cluster.hosts[1]} & set(
        subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())


def check_run(log: Path, rebalances: Path, world: int) -> None:
    """Every rank trained, on one plan chain, and together read each epoch's global batches."""
    records = read_jsonl(log)
    assert [r["epoch"] for r in records] == list(range(EPOCHS))
    steps = None
    for r in records:
        assert len(r["batch_sizes"]) == len(r["samples"]) == world
        assert sum(r["batch_sizes"]) == sum(r["next_batch_sizes"]) == GLOBAL_BATCH
        assert min(r["samples"]) > 0, r  # every rank trained
        steps = steps or sum(r["samples"]) // GLOBAL_BATCH
        assert sum(r["samples"]) == steps * GLOBAL_BATCH, r  # the epoch's batches, once
    chain = read_jsonl(rebalances)
    assert chain and all(len(c["plan_after"]) == world for c in chain)
    for before, after in zip(chain, chain[1:]):
        assert after["plan_before"] == before["plan_after"], (before, after)
    last = {c["epoch"]: c["plan_after"] for c in chain}
    assert [last[e] for e in range(EPOCHS)] == [r["next_batch_sizes"] for r in records]


@pytest.mark.parametrize("launcher,slots", [
    ("mpirun", (1, 1, 1)), ("horovodrun-gloo", (1, 1, 1)), ("horovodrun-mpi", (1, 2))])
def test_dbs_train_runs_across_hosts(tmp_path, launcher, slots):
    with emulated_cluster(len(slots)) as cluster:
        hosts = ",".join(f"{h}:{n}" for h, n in zip(cluster.hosts, slots))
        world = sum(slots)
        log, rebalances = tmp_path / "epochs.jsonl", tmp_path / "rebalances.jsonl"
        before = {h: cluster.link_bytes(h) for h in cluster.hosts}
        # horovodrun would take --log for its own --log-level: outputs go in an @file.
        options = tmp_path / "options.txt"
        options.write_text(f"--log\n{log}\n--rebalance-log\n{rebalances}\n")
        result = cluster.run(cluster.hosts[0], [
            *launch_argv(launcher, hosts, world, cluster.agent), DBS_TRAIN, *TRAIN,
            f"@{options}"], timeout=150)
        assert result.ok, result.describe()
        assert f"dbs-train: {world} ranks" in result.output
        check_run(log, rebalances, world)
        for host in cluster.hosts[1:]:  # the remote ranks' gradients crossed their links
            assert cluster.link_bytes(host) - before[host] > 100_000, host
        left = cluster.wait_no_processes()
        assert not left, f"processes left after the run: {left}"


def test_elastic_across_hosts_reads_every_sample_once(tmp_path):
    """horovodrun --host-discovery-script over three hosts: --read-log accounts for every sample."""
    with emulated_cluster(3) as cluster:
        reads = tmp_path / "reads"
        options = tmp_path / "options.txt"  # no "--" in elastic mode: --log goes in an @file
        options.write_text(f"--log\n{tmp_path / 'epochs.jsonl'}\n"
                           f"--rebalance-log\n{tmp_path / 'rebalances.jsonl'}\n")
        result = cluster.run(cluster.hosts[0], [
            "horovodrun", "-np", "3", "--min-np", "2", "--max-np", "3",
            "--host-discovery-script", str(ROOT / "launch" / "discover_hosts.sh"),
            "--network-interfaces", "eth0",
            "--start-timeout", "60", "--elastic-timeout", "60",
            "--blacklist-cooldown-range", "200", "300",
            DBS_TRAIN, "--elastic", "--commit-every", "5", *TRAIN, "--read-log", str(reads),
            f"@{options}"], timeout=150,
            env={"DBS_HVD_HOSTS": ",".join(f"{h}:1" for h in cluster.hosts)})
        assert result.ok, result.describe()
        check_run(tmp_path / "epochs.jsonl", tmp_path / "rebalances.jsonl", 3)
        records = [json.loads(line) for path in sorted(reads.glob("reads-*.jsonl"))
                   for line in path.read_text().splitlines()]
        read = [r for r in records if r["kind"] == "read"]
        assert {r["world"] for r in read} == {3}
        from dbs_hvd.train import data
        from dbs_hvd.sampler import DynamicBatchSampler
        train_set, _ = data.load("digits", flatten=True, seed=0)
        stream = DynamicBatchSampler(len(train_set), GLOBAL_BATCH, rank=0, world_size=1, seed=0)
        pieces: dict[tuple, dict[int, list[int]]] = defaultdict(dict)
        for r in read:
            assert r["rank"] not in pieces[(r["epoch"], r["step"])]
            pieces[(r["epoch"], r["step"])][r["rank"]] = r["indices"]
        for epoch in range(EPOCHS):
            stream.set_epoch(epoch)
            for step in range(stream.steps_per_epoch):
                by_rank = pieces[(epoch, step)]
                assert sorted(by_rank) == [0, 1, 2], (epoch, step)
                joined = [i for rank in range(3) for i in by_rank[rank]]
                assert joined == stream.global_batch_indices(step).tolist(), (epoch, step)
            counts = Counter(i for r in read if r["epoch"] == epoch for i in r["indices"])
            assert max(counts.values()) == 1
        left = cluster.wait_no_processes()
        assert not left, f"processes left after the run: {left}"


# ---------------------------------------------------------------------------
# launch/multi_host.sh on hosts with a decoy interface (docker0, 172.17.0.1 on every host)


def test_without_an_interface_choice_a_decoy_interface_hangs_mpirun():
    """Why multi_host.sh picks the interface: Open MPI tries 172.17.0.1, which is each host itself."""
    with emulated_cluster(2, decoy=True) as cluster:
        result = cluster.run(cluster.hosts[0], [
            "mpirun", "-np", "2", "-H", ",".join(f"{h}:1" for h in cluster.hosts),
            "--bind-to", "none", sys.executable, "-c",
            "from mpi4py import MPI; print(MPI.COMM_WORLD.allreduce(1), flush=True)"], timeout=30)
        assert not result.ok, result.describe()
        assert "172.17.0.1" in result.output or result.timed_out, result.describe()


@pytest.mark.parametrize("launcher", ["mpirun", "gloo", "horovodrun"])
def test_multi_host_sh_picks_the_interface_on_hosts_with_a_decoy(tmp_path, launcher):
    with emulated_cluster(2, decoy=True) as cluster:
        log = tmp_path / "epochs.jsonl"
        argv = ["bash", str(ROOT / "launch" / "multi_host.sh"), "--launcher", launcher,
                "--hosts", f"{cluster.hosts[0]}:1,{cluster.hosts[1]}:2", "--",
                *TRAIN, "--log", str(log), "--rebalance-log", str(tmp_path / "rebalances.jsonl")]
        result = cluster.run(cluster.hosts[0], argv, timeout=150)
        assert result.ok, result.describe()
        assert f"network interface eth0 (this host's route to {cluster.hosts[1]}" in result.output
        check_run(log, tmp_path / "rebalances.jsonl", 3)
        left = cluster.wait_no_processes()
        assert not left, f"processes left after the run: {left}"
