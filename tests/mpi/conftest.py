"""Fixtures for files that run whole under mpirun/horovodrun, one pytest per rank."""
from __future__ import annotations

import pytest

import dbs_hvd  # noqa: F401  (under mpirun: MPI initialised by mpi4py, before Horovod)


@pytest.fixture(scope="session")
def hvd():
    import horovod.torch as hvd

    hvd.init()
    yield hvd
    hvd.shutdown()
