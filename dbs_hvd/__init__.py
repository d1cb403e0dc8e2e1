"""dbs_hvd: Dynamic Batch Size for synchronous data-parallel training on Horovod.

Each rank gets a local batch proportional to its measured speed while the
global batch stays fixed, and gradients are weighted by local batch size, so
every update equals one process's update on the whole global batch. A
Horovod script changes three lines:

* ``DynamicBatchSampler``: the DataLoader's ``batch_sampler``; which samples
  each rank reads at each step.
* ``DistributedOptimizer``: Horovod's optimizer with gradients weighted by
  local batch size, step timing and automatic rebalancing (or
  ``ModelAveragingOptimizer`` for local SGD with weighted averaging).
* ``sampler.set_epoch(epoch)`` at the start of every epoch.

``ElasticState`` keeps DBS's state across worker failures and joins under
``hvd.elastic.run``. ``MemoryGuard`` (with ``MemoryOptions``) trains a step
again under a lower cap where a rank runs out of memory; ``ZeroSampleOptions``
lets a straggler get 0 samples while the step is faster without it
(``ZeroSamplePolicy``). ``RebalanceOptions``
sets when plans move (the defaults are the recommended ones);
``make_policy``/``POLICIES`` name the policies ("dbs", "paper", "static");
``Plan`` and ``Bounds`` describe plans and their limits.
``DbsError`` is raised alike on every rank (mismatched settings, bad
measurements); ``PlanError`` for a configuration no plan can meet.

Importing dbs_hvd has three side effects, all before ``hvd.init()``, so
import dbs_hvd first. Under an MPI launcher (mpirun) it initialises MPI
through mpi4py (``claim_mpi``) so that MPI outlives Horovod's background
thread; outside MPI it does nothing. Under a CPU quota of less than one core
(a container's CPU limit, a cgroup) it sets ``HOROVOD_CYCLE_TIME`` for that
quota unless it is set already (``quota.configure_horovod_cycle``), and
where the launcher preloaded dbs_hvd's ``sched_yield`` it makes waits inside
MPI sleep instead of poll (``quiet_yield.configure``). The
torch-dependent names load on first use, so the pure policy code imports
without torch.
"""

from .comm import DbsError, claim_mpi, launched_by_mpi
from .dropping import ZeroSamplePolicy
from .grid import GridPolicy
from .options import MemoryOptions, RebalanceOptions, SampleCosts, ZeroSampleOptions
from .plan import Bounds, Plan, PlanError, Policy, WindowStats
from .policies import POLICIES, DbsPolicy, PaperPolicy, StaticPolicy, make_policy
from .quiet_yield import configure as configure_quiet_yield
from .quota import configure_horovod_cycle

_LAZY = {
    "DistributedOptimizer": "optim",
    "DynamicBatchSampler": "sampler",
    "ElasticState": "elastic_state",
    "MemoryGuard": "memory",
    "ModelAveragingOptimizer": "averaging",
}


def __getattr__(name: str):
    # The torch-dependent parts load on first use.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'dbs_hvd' has no attribute {name!r}")


__version__ = "0.1.0"

# Under mpirun, MPI must be initialised by mpi4py before hvd.init() so that it
# outlives Horovod's background thread (see comm.py): a no-op elsewhere.
claim_mpi()
# Under a CPU quota of less than a core, Horovod's background thread cycles more
# slowly (quota.configure_horovod_cycle): it is read at hvd.init(), so it is set
# here, unless HOROVOD_CYCLE_TIME is set already.
configure_horovod_cycle()
# Under a CPU quota of less than a core, waits inside MPI sleep where the launcher
# preloaded dbs_hvd's sched_yield (quiet_yield), and warn where it did not.
configure_quiet_yield(under_mpi=launched_by_mpi())

__all__ = [
    "Bounds",
    "DbsError",
    "DbsPolicy",
    "DistributedOptimizer",
    "DynamicBatchSampler",
    "ElasticState",
    "GridPolicy",
    "MemoryGuard",
    "MemoryOptions",
    "ModelAveragingOptimizer",
    "POLICIES",
    "Plan",
    "PlanError",
    "Policy",
    "PaperPolicy",
    "RebalanceOptions",
    "SampleCosts",
    "StaticPolicy",
    "WindowStats",
    "ZeroSampleOptions",
    "ZeroSamplePolicy",
    "make_policy",
]
