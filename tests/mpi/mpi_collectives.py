"""Multi-rank: the launch harness and the collectives dbs_hvd relies on give right values."""
import pytest
import torch


def test_horovod_allreduce_sum_and_average(hvd):
    rank, size = hvd.rank(), hvd.size()
    value = torch.tensor([float(rank + 1), 2.0 * rank], dtype=torch.float64)
    total = hvd.allreduce(value, op=hvd.Sum, name="sum")
    mean = hvd.allreduce(value, op=hvd.Average, name="avg")
    expected_total = torch.tensor(
        [size * (size + 1) / 2, float(size * (size - 1))], dtype=torch.float64
    )
    torch.testing.assert_close(total, expected_total)
    torch.testing.assert_close(mean, expected_total / size)


def test_horovod_allgather_object_orders_by_rank(hvd):
    gathered = hvd.allgather_object({"rank": hvd.rank(), "square": hvd.rank() ** 2})
    assert gathered == [{"rank": r, "square": r * r} for r in range(hvd.size())]


def test_mpi4py_allgather_matches_horovod_ranks(hvd):
    if hvd.gloo_enabled():
        pytest.skip("under the Gloo controller mpi4py's COMM_WORLD is a singleton")
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    assert comm.Get_size() == hvd.size()
    assert comm.Get_rank() == hvd.rank()
    assert comm.allgather(("rank", comm.Get_rank())) == [("rank", r) for r in range(hvd.size())]
