"""DBS core under real mpirun/horovodrun: equivalence, exactly-once, identical plans, errors."""
import sys
from pathlib import Path

import pytest

from tests.harness import run_job

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("np", [2, 3, 4])
def test_core_under_mpirun(run_mpi_file, np):
    run_mpi_file("mpi_core.py", np=np, timeout=240)


def test_core_under_horovodrun_gloo(run_mpi_file):
    # Under Gloo the stats travel through Horovod's object collectives.
    run_mpi_file("mpi_core.py", np=3, launcher="horovodrun-gloo", timeout=240)


@pytest.mark.parametrize("np", [2, 3])
def test_model_averaging_under_mpirun(run_mpi_file, np):
    run_mpi_file("mpi_averaging.py", np=np, timeout=240)


@pytest.mark.parametrize("order, exchange", [("dbs-first", "MpiExchange"),
                                             ("horovod-first", "HorovodExchange")])
def test_a_rank_exiting_right_after_an_exchange_does_not_strand_the_others(order, exchange):
    script = str(Path(__file__).parent / "mpi" / "exit_after_exchange.py")
    result = run_job([sys.executable, script, order], np=3, timeout=90)
    assert result.ok, result.describe()
    for rank in range(3):
        assert (f"rank {rank} got the decision through {exchange}"
                in result.rank_output.get(rank, [])), result.describe()
