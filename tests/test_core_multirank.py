"""DBS core under real mpirun/horovodrun: equivalence, exactly-once, identical plans, errors."""
import pytest

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
