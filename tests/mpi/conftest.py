"""Fixtures for files that run whole under mpirun/horovodrun, one pytest per rank."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def hvd():
    import horovod.torch as hvd

    hvd.init()
    yield hvd
    hvd.shutdown()
