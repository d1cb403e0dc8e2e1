"""Failure without elastic: a crashed or hung rank ends the job non-zero within a bound."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.harness import launcher_argv, rank_environment, run_job

pytestmark = pytest.mark.mpi
DBS_TRAIN = [sys.executable, "-m", "dbs_hvd.train.cli"]


def test_a_hung_rank_stops_the_job_within_the_stall_timeout(tmp_path):
    # Rank 1 becomes 100000x slower at step 3: effectively hung in its step.
    argv = launcher_argv(2) + DBS_TRAIN + [
        "--virtual-device", "0:1", "--step-change", "1:3:100000", "--epochs", "3",
        "--stall-timeout", "3", "--checkpoint-dir", str(tmp_path)]
    start = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180,
                          env=rank_environment())
    elapsed = time.monotonic() - start
    assert done.returncode != 0, done.stdout[-3000:]
    assert elapsed < 120, f"took {elapsed:.0f} s"
    assert "stall" in (done.stdout + done.stderr).lower(), done.stdout[-3000:]


def test_a_killed_rank_ends_the_job_non_zero_and_the_last_checkpoint_stays(tmp_path):
    argv = launcher_argv(2) + DBS_TRAIN + [
        "--virtual-device", "0:2", "--epochs", "50", "--checkpoint-dir", str(tmp_path)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=rank_environment(), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("ckpt-*.pt")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert list(tmp_path.glob("ckpt-*.pt")), "no checkpoint was written"
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "dbs_hvd.train.cli" in " ".join(p.cmdline())]
        assert len(ranks) == 2
        killed_at = time.monotonic()
        ranks[1].send_signal(signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0, output[-3000:]
        assert time.monotonic() - killed_at < 60
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    from dbs_hvd.train import checkpoint

    assert checkpoint.load_latest(tmp_path)["epoch"] >= 0


def test_an_uncaught_exception_on_one_rank_aborts_the_job_instead_of_hanging():
    script = str(Path(__file__).parent / "mpi" / "uncaught_on_one_rank.py")
    result = run_job([sys.executable, script], np=2, timeout=90)
    assert not result.timed_out, result.describe()
    assert result.returncode != 0
    assert result.seconds < 60, result.describe()
    assert "rank 1 fails on purpose" in "\n".join(result.rank_output.get(1, [])), result.describe()
