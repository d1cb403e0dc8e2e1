"""The multi-rank harness itself: collectives right on 2-4 ranks, failures reported."""
import pytest

from tests.harness import split_by_rank

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("np", [2, 3, 4])
def test_collectives_under_mpirun(run_mpi_file, np):
    run_mpi_file("mpi_collectives.py", np=np)


@pytest.mark.parametrize("launcher", ["horovodrun", "horovodrun-gloo"])
def test_collectives_under_horovodrun(run_mpi_file, launcher):
    run_mpi_file("mpi_collectives.py", np=2, launcher=launcher)


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
def test_one_failing_rank_fails_the_job_with_its_output(run_mpi_file, launcher):
    result = run_mpi_file("fail_case_one_rank.py", np=3, launcher=launcher, timeout=120,
                          expect_ok=False)
    assert not result.timed_out, result.describe()
    assert result.returncode != 0, result.describe()
    rank1 = "\n".join(result.rank_output.get(1, []))
    assert "rank 1 fails on purpose" in rank1, result.describe()


def test_split_by_rank_reads_both_launchers_tags():
    output = "\n".join([
        "[1,0]<stdout>:hello from 0",
        "[1,2]<stderr>:oops on 2",
        "[1]<stdout>:horovodrun rank 1",
        "launcher line",
        "[1,0]<stderr>:unfinished[1,1]<stderr>:whole line",
        "[1,0]<stderr>: finished",
    ])
    assert split_by_rank(output) == {
        0: ["hello from 0", "unfinished", " finished"],
        2: ["oops on 2"],
        1: ["horovodrun rank 1", "whole line"],
    }
