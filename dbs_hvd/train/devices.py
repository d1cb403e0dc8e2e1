"""Which device a rank trains on.

One GPU per local rank is the rule NCCL imposes: it refuses two ranks of one
communicator on the same GPU. Horovod built without NCCL stages GPU tensors
through host memory for its MPI/Gloo allreduce, and then several ranks can
share a GPU, which is how the CUDA path is exercised on a one-GPU machine (and
how a user packs small jobs onto few GPUs). The decision is made from the
host's rank count rather than the rank's own index, so every rank of a host
that cannot be served raises the same error instead of one rank failing alone.
"""

from __future__ import annotations

import torch


def gpu_for_local_rank(local_rank: int, local_size: int, gpu_count: int, may_share: bool) -> int:
    """The GPU index for ``local_rank`` of ``local_size`` ranks on a host with ``gpu_count`` GPUs.

    A GPU per rank when there are enough; otherwise round-robin sharing where
    ``may_share`` (Horovod's allreduce does not run on NCCL), else a ValueError.
    """
    if not 0 <= local_rank < local_size:
        raise ValueError(f"local rank {local_rank} is outside 0..{local_size - 1}")
    if gpu_count < 1:
        raise ValueError(
            "--device cuda was asked for, but torch sees no CUDA device here "
            "(CPU build of torch, or no GPU visible): use --device cpu"
        )
    if local_size <= gpu_count:
        return local_rank
    if not may_share:
        raise ValueError(
            f"{local_size} ranks on this host but {gpu_count} GPU(s) visible, and Horovod "
            "runs its GPU allreduce on NCCL, which needs a GPU of its own per rank: launch "
            f"at most {gpu_count} rank(s) per host, or use a Horovod built without "
            "HOROVOD_GPU_OPERATIONS=NCCL to let ranks share GPUs"
        )
    return local_rank % gpu_count


def resolve_device(name: str, local_rank: int = 0, local_size: int = 1) -> torch.device:
    """The torch device for this rank ("cpu", or "cuda": see :func:`gpu_for_local_rank`)."""
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise ValueError(f"--device must be cpu or cuda, got {name!r}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    may_share = True
    if count and local_size > count:
        import horovod.torch as hvd  # only asked where sharing is in question

        may_share = not hvd.nccl_built()
    index = gpu_for_local_rank(local_rank, local_size, count, may_share)
    torch.cuda.set_device(index)
    return torch.device("cuda", index)
