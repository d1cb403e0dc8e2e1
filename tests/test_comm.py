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
