"""launch/slurm.sbatch under a real Slurm on emulated hosts (launch/emulated_cluster.py --slurm).

Slurm from Debian's packages (slurmctld, slurmd, slurm-client, munge): munged
and slurmctld on the first host, one slurmd per host under its own NodeName.
The job is submitted with ``sbatch --wait`` from the first host, as from a
login node, and its ranks start on both hosts: by ``srun --mpi=pmix`` (the
script's default) or by mpirun inside the allocation (``LAUNCHER=mpirun``,
through launch/multi_host.sh and the cluster's rsh agent). The checks are the
other multi-host tests' checks. Needs root and Slurm (skipped otherwise).
"""
from __future__ import annotations

import pytest

from tests.multihost.cluster import ROOT, emulated_cluster
from tests.test_multihost import TRAIN, check_run

pytestmark = [pytest.mark.multihost, pytest.mark.mpi]


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_slurm_sbatch_runs_dbs_train_across_hosts(tmp_path, launcher):
    with emulated_cluster(2, slurm=True) as cluster:
        log, rebalances = tmp_path / "epochs.jsonl", tmp_path / "rebalances.jsonl"
        before = cluster.link_bytes(cluster.hosts[1])
        result = cluster.run(cluster.hosts[0], [
            "sbatch", "--wait", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
            "--gpus-per-node=0", f"--output={tmp_path}/job-%j.out",
            str(ROOT / "launch" / "slurm.sbatch"), *TRAIN, "--log", str(log),
            "--rebalance-log", str(rebalances)], timeout=150,
            env={"LAUNCHER": launcher, "OMPI_MCA_btl_tcp_if_include": "eth0"})
        job_output = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
        assert result.ok, result.describe() + "\n" + job_output
        assert f"2 node(s) x 1 rank(s), launcher {launcher}" in job_output, job_output
        assert "dbs-train: 2 ranks" in job_output, job_output
        check_run(log, rebalances, 2)
        assert cluster.link_bytes(cluster.hosts[1]) - before > 100_000  # the rank on host 2
        left = cluster.wait_no_processes()
        assert not left, f"processes left after the job: {left}"
