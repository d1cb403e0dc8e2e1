"""dbs_hvd: Dynamic Batch Size for synchronous data-parallel training on Horovod.

The public API, for a Horovod script:

* ``DynamicBatchSampler``: which samples each rank reads at each step.
* ``DistributedOptimizer``: Horovod's optimizer with gradients weighted by local
  batch size, step timing and automatic rebalancing.
* ``Plan``, ``Bounds`` and the policies (``make_policy``) for custom setups.
"""
from .comm import DbsError, claim_mpi
from .grid import GridPolicy
from .plan import Bounds, Plan, PlanError, Policy, ProportionalPolicy, StaticPolicy, WindowStats
from .policies import POLICIES, CostModelPolicy, make_policy


def __getattr__(name: str):
    # The torch-dependent parts load on first use, so the pure policy code
    # (plan, policies, the scale simulator) imports without torch.
    if name == "DistributedOptimizer":
        from .optim import DistributedOptimizer

        return DistributedOptimizer
    if name == "DynamicBatchSampler":
        from .sampler import DynamicBatchSampler

        return DynamicBatchSampler
    raise AttributeError(f"module 'dbs_hvd' has no attribute {name!r}")

__version__ = "0.1.0"

# Under mpirun, MPI must be initialised by mpi4py before hvd.init() so that it
# outlives Horovod's background thread (see comm.py): a no-op elsewhere.
claim_mpi()

__all__ = [
    "Bounds", "CostModelPolicy", "DbsError", "DistributedOptimizer", "DynamicBatchSampler",
    "GridPolicy", "POLICIES", "Plan", "PlanError", "Policy", "ProportionalPolicy", "StaticPolicy",
    "WindowStats", "make_policy",
]
