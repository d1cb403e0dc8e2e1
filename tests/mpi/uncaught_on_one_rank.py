"""Not a pytest file: run by tests/test_failures.py under mpirun.

Rank 1 dies on an uncaught exception while rank 0 waits for it in an mpi4py
collective. Without dbs_hvd's excepthook rank 1 would wait in MPI_Finalize
for rank 0, and rank 0 for rank 1: a hang. With it, the job is aborted.
"""
import dbs_hvd  # noqa: F401  (claims MPI and installs the abort-on-uncaught hook)
import horovod.torch as hvd

from dbs_hvd.comm import default_exchange

hvd.init()
exchange = default_exchange()
if hvd.rank() == 1:
    raise RuntimeError("rank 1 fails on purpose (uncaught)")
exchange.allgather("never completed by rank 1")
