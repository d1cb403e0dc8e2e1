"""Not a pytest file: a script run by tests/test_core_multirank.py under mpirun.

Rank 0 decides, broadcasts and exits at once; the other ranks only reach the
broadcast a second later. Rank 0's exit shuts Horovod down on every rank. If
Horovod owned MPI, its background thread would finalize MPI under the late
ranks before they received (a hang or an abort); dbs_hvd must survive this.

    mpirun -np 3 python exit_after_exchange.py [horovod-first]
"""
import sys
import time

if "horovod-first" in sys.argv:
    import horovod.torch as hvd

    hvd.init()
    import dbs_hvd  # noqa: F401  (too late to claim MPI: must fall back safely)
else:
    import dbs_hvd  # noqa: F401  (claims MPI for mpi4py before Horovod)
    import horovod.torch as hvd

    hvd.init()

from dbs_hvd.comm import decide_on_root, default_exchange

exchange = default_exchange()
if hvd.rank() != 0:
    time.sleep(1.5)
value = decide_on_root(exchange, lambda: {"plan": [5, 17, 42]})
assert value == {"plan": [5, 17, 42]}, value
print(f"rank {hvd.rank()} got the decision through {type(exchange).__name__}", flush=True)
