"""Not a test of the project: the harness self-test runs this to see a one-rank failure
reported as a failure (with that rank's output), not as a hang and not as a pass.
Rank 1 fails an assertion; the other ranks then wait in a collective that rank 1
never joins, which is exactly the situation that must not hang."""


def test_rank_one_fails(hvd):
    import torch

    assert hvd.rank() != 1, "rank 1 fails on purpose (harness self-test)"
    hvd.allreduce(torch.ones(1), name="never_completed_by_rank_1")
