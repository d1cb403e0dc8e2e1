"""The pure parts of comm.py: when the MPI exchange sleeps while it waits."""
import pytest

from dbs_hvd import comm


@pytest.mark.parametrize("local_ranks, host_cores, own_cores, sleeps", [
    (2, 2, 2, True),     # this project's machine: 2 ranks and 2 Horovod threads on 2 cores
    (1, 2, 2, False),
    (2, 16, 16, False),  # the H200 host the exchange was measured on
    (8, 16, 16, False),
    (9, 16, 16, True),
    (2, 16, 1, True),    # mpirun --bind-to core: both threads on one core
])
def test_waits_sleep_where_ranks_and_their_threads_outnumber_the_cores(
        monkeypatch, local_ranks, host_cores, own_cores, sleeps):
    monkeypatch.setattr(comm.os, "cpu_count", lambda: host_cores)
    monkeypatch.setattr(comm.os, "sched_getaffinity", lambda pid: set(range(own_cores)),
                        raising=False)
    assert comm.waits_should_sleep(local_ranks) is sleeps


def test_an_unknown_way_to_wait_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="'block' or 'poll'"):
        comm.MpiExchange(wait="spin")


def test_the_ranks_agree_to_poll_if_any_asks_or_is_crowded_and_refuse_bad_values_alike():
    assert comm.agreed_wait([("auto", False), ("auto", False)]) == "block"
    assert comm.agreed_wait([("auto", False), ("auto", True)]) == "poll"
    assert comm.agreed_wait([("block", True), ("block", True)]) == "block"  # told to block
    assert comm.agreed_wait([("block", False), ("poll", False)]) == "poll"
    with pytest.raises(ValueError, match=r"auto, block or poll; got 'spin' on rank 1"):
        comm.agreed_wait([("auto", False), ("spin", False)])
