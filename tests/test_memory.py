"""Memory-capped ranks: per-rank caps, the cap after a failure, the retried step (memory.py)."""
import pytest

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("np", [2, 3])
def test_memory_guard_under_mpirun(run_mpi_file, np):
    run_mpi_file("mpi_memory.py", np=np, timeout=300)
