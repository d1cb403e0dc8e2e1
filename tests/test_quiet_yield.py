"""dbs_hvd.quiet_yield: a preloaded sched_yield that sleeps where a rank's waits should not spin.

In-process: the mode and when it sleeps, the warning where the library is not
preloaded. In a subprocess with LD_PRELOAD: the library's sched_yield sleeps
once told to and is the system call before. Under mpirun: a rank waiting in an
MPI barrier for a late peer uses little CPU with the sleep on and about the
whole wait with it off; under a real cgroup quota only the throttled rank turns
it on (test_quota.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dbs_hvd import quiet_yield as qy
from dbs_hvd.quota import CpuQuota

LIBRARY = qy.library_path()
needs_library = pytest.mark.skipif(LIBRARY is None, reason="dbs_hvd/_quiet_yield.c was not built")


def test_the_library_is_built_by_the_install():
    assert LIBRARY is not None and LIBRARY.name.startswith("_quiet_yield")


@pytest.mark.parametrize("value, expected", [(None, "auto"), ("", "auto"), ("sleep", "sleep"),
                                             (" SPIN ", "spin"), ("auto", "auto")])
def test_the_mode_comes_from_the_environment(value, expected):
    env = {} if value is None else {qy.MODE_ENV: value}
    assert qy.mode(env) == expected


def test_a_bad_mode_names_the_variable_and_the_choices():
    with pytest.raises(ValueError, match=r"DBS_HVD_MPI_YIELD='poll' is not one of auto, sleep, spin"):
        qy.mode({qy.MODE_ENV: "poll"})


@given(share=st.floats(0.01, 8.0), period=st.floats(0.001, 1.0))
def test_auto_sleeps_exactly_under_a_quota_of_less_than_a_core(tmp_path_factory, share, period):
    quota = CpuQuota(share, period, tmp_path_factory.getbasetemp(), 1)
    assert qy.wants_sleep("auto", quota) is (share < 1)
    assert qy.wants_sleep("sleep", quota) and qy.wants_sleep("sleep", None)
    assert not qy.wants_sleep("spin", quota)
    assert not qy.wants_sleep("auto", None)


def test_without_the_library_it_changes_nothing_and_warns_only_under_mpi(monkeypatch, tmp_path):
    assert not qy.is_preloaded()  # pytest itself runs without LD_PRELOAD
    monkeypatch.setattr(qy, "own_quota", lambda: CpuQuota(0.25, 0.1, tmp_path, 1))
    with pytest.warns(RuntimeWarning, match=r"LD_PRELOAD=\$\(python -m dbs_hvd.preload\)"):
        assert qy.configure({}, under_mpi=True) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert qy.configure({}, under_mpi=False) is None  # a single process: nothing to wait for
        assert qy.configure({qy.MODE_ENV: "spin"}, under_mpi=True) is None  # the user chose polling
    monkeypatch.setattr(qy, "own_quota", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert qy.configure({}, under_mpi=True) is None  # no quota: nothing to save


def test_preload_prints_the_library_path():
    out = subprocess.run([sys.executable, "-m", "dbs_hvd.preload"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(LIBRARY) and out.stderr == ""


# Times 400 calls of os.sched_yield (libc's, so the preloaded one where preloaded)
# after import dbs_hvd has configured it, then with the sleep set to 0, in wall and
# CPU seconds.
_YIELDS = """
import ctypes, os, time
import dbs_hvd
from dbs_hvd import quiet_yield as qy

def timed():
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(400):
        os.sched_yield()
    return time.perf_counter() - wall, time.thread_time() - cpu

configured = qy.sleep_seconds()
first = timed()
if qy.is_preloaded():
    ctypes.CDLL(None).dbs_hvd_set_yield_sleep_ns(ctypes.c_long(0))
print(qy.is_preloaded(), configured, *first, *timed())
"""


def _yields(mode: str, preload: bool) -> list[str]:
    env = dict(os.environ, **{qy.MODE_ENV: mode})
    if preload:
        env["LD_PRELOAD"] = str(LIBRARY)
    out = subprocess.run([sys.executable, "-c", _YIELDS], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@needs_library
def test_preloaded_sched_yield_sleeps_once_configured():
    loaded, configured, wall, cpu, wall_off, _ = _yields("sleep", preload=True)
    assert loaded == "True" and float(configured) == qy.YIELD_SLEEP
    # 400 sleeps of 50 us take at least 20 ms, mostly off the CPU; the system
    # call takes microseconds.
    assert float(wall) >= 400 * qy.YIELD_SLEEP
    assert float(cpu) < float(wall) / 2
    assert float(wall_off) < 400 * qy.YIELD_SLEEP / 2


@needs_library
def test_preloaded_sched_yield_is_the_system_call_unless_configured():
    loaded, configured, wall, *_ = _yields("spin", preload=True)
    assert loaded == "True" and float(configured) == 0.0
    assert float(wall) < 400 * qy.YIELD_SLEEP / 2
    loaded, configured, *_ = _yields("sleep", preload=False)
    assert loaded == "False" and configured == "None"


# Rank 1 reaches an MPI barrier a second after rank 0; rank 0 reports the CPU
# seconds it used waiting, with the preloaded sleep on, then off.
_BARRIER = """
import ctypes, time
import dbs_hvd
from dbs_hvd import quiet_yield as qy
from mpi4py import MPI
comm = MPI.COMM_WORLD
def wait():
    comm.Barrier()
    if comm.rank == 1:
        time.sleep(1.0)
    cpu = time.process_time()
    comm.Barrier()
    return time.process_time() - cpu
sleeping = wait()
ctypes.CDLL(None).dbs_hvd_set_yield_sleep_ns(ctypes.c_long(0))
polling = wait()
print(f"WAITCPU {comm.rank} {qy.sleep_seconds()} {sleeping:.3f} {polling:.3f}", flush=True)
"""


@pytest.mark.mpi
@needs_library
def test_under_mpirun_a_waiting_rank_sleeps_instead_of_polling():
    from tests.harness import run_job

    job = run_job([sys.executable, "-c", _BARRIER], np=2, timeout=120,
                  env={qy.MODE_ENV: "sleep"})
    assert job.ok, job.describe()
    line = next(text for text in job.rank_output[0] if "WAITCPU" in text).split()
    sleeping, polling = float(line[3]), float(line[4])
    assert line[2] == "0.0"  # turned off for the second wait
    assert sleeping < 0.3, line  # a second's wait, mostly asleep
    assert polling > 0.6, line  # the same wait, polling
