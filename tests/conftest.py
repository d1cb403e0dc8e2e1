"""Shared fixtures for the single-process tests (the multi-rank files live in tests/mpi)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import JobResult, rank_pytest_command, run_job

MPI_TESTS = Path(__file__).parent / "mpi"
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))


LAUNCHERS = {"mpirun", "mpiexec", "orterun", "horovodrun"}


@pytest.fixture(autouse=True)
def _launching_tests_are_marked_mpi(request, monkeypatch):
    """A test that starts a launcher must be marked ``mpi``, so ``make test-fast``
    (``-m "not mpi"``) stays single-process and fast."""
    if request.node.get_closest_marker("mpi") is not None:
        return
    popen_init = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        first = args if isinstance(args, (str, bytes)) else (list(args) or [""])[0]
        if Path(str(first).split()[0] if first else "").name in LAUNCHERS:
            raise AssertionError(
                f"{request.node.nodeid} starts {first!r} but is not marked "
                "@pytest.mark.mpi: mark it, so make test-fast leaves it out")
        popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)


@pytest.fixture
def run_mpi_file():
    """Run one file of tests/mpi under a launcher and fail with per-rank output if it fails."""

    def run(name: str, np: int, launcher: str = "mpirun", timeout: float = 180.0,
            env: dict | None = None, expect_ok: bool = True) -> JobResult:
        result = run_job(rank_pytest_command(str(MPI_TESTS / name)), np=np, launcher=launcher,
                         timeout=timeout, env=env)
        if expect_ok and not result.ok:
            pytest.fail(result.describe(), pytrace=False)
        return result

    return run
