"""quota.py (a process's own cgroup CPU quota) and the timer's use of it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dbs_hvd.plan import WindowStats
from dbs_hvd.quota import CpuQuota, min_window_seconds, own_quota
from dbs_hvd.timing import StepTimer

ROOT = Path(__file__).resolve().parents[1]


def v1_tree(tmp_path: Path, quota: int, period: int, throttled_ns: int = 0) -> tuple[str, str]:
    group = tmp_path / "cpu" / "jobs" / "rank1"
    group.mkdir(parents=True)
    (group / "cpu.cfs_quota_us").write_text("-1\n")  # the rank's own group sets none
    (group / "cpu.cfs_period_us").write_text("100000\n")
    parent = group.parent
    (parent / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (parent / "cpu.cfs_period_us").write_text(f"{period}\n")
    (parent / "cpu.stat").write_text(f"nr_periods 10\nnr_throttled 4\nthrottled_time {throttled_ns}\n")
    mounts = f"cgroup {tmp_path / 'cpu'} cgroup rw,relatime,cpu 0 0\n"
    return "5:cpu:/jobs/rank1\n1:name=systemd:/x\n", mounts


def test_v1_quota_is_found_on_the_nearest_ancestor(tmp_path):
    cgroup, mounts = v1_tree(tmp_path, quota=25000, period=100000, throttled_ns=1_500_000_000)
    quota = own_quota(cgroup, mounts)
    assert quota is not None and quota.version == 1
    assert quota.share == pytest.approx(0.25) and quota.period == pytest.approx(0.1)
    assert quota.throttled_seconds() == pytest.approx(1.5)
    assert min_window_seconds(quota) == pytest.approx(0.3)


def test_v2_cpu_max(tmp_path):
    group = tmp_path / "kubepods" / "pod1"
    group.mkdir(parents=True)
    (group / "cpu.max").write_text("50000 10000\n")
    (group / "cpu.stat").write_text("usage_usec 9\nthrottled_usec 2500000\n")
    quota = own_quota("0::/kubepods/pod1\n", f"cgroup2 {tmp_path} cgroup2 rw 0 0\n")
    assert quota is not None and quota.version == 2
    assert quota.share == pytest.approx(5.0) and quota.period == pytest.approx(0.01)
    assert quota.throttled_seconds() == pytest.approx(2.5)


def test_no_quota_anywhere_is_none(tmp_path):
    group = tmp_path / "a"
    group.mkdir()
    (group / "cpu.max").write_text("max 100000\n")
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert own_quota("0::/a\n", f"cgroup2 {tmp_path} cgroup2 rw 0 0\n") is None
    assert own_quota("0::/a\n", "") is None
    assert min_window_seconds(None) == 0.0


def test_unreadable_stats_read_as_zero(tmp_path):
    assert CpuQuota(0.5, 0.1, tmp_path / "missing", 1).throttled_seconds() == 0.0


class FakeClocks:
    def __init__(self) -> None:
        self.now = 0.0
        self.frozen = 0.0


def test_time_frozen_by_the_own_quota_inside_a_wait_counts_as_compute():
    clocks = FakeClocks()
    timer = StepTimer(clock=lambda: clocks.now, frozen_clock=lambda: clocks.frozen)
    timer.mark_start()
    clocks.now += 0.010  # 10 ms forward and backward
    with timer.waiting():
        clocks.now += 0.030  # 30 ms in the allreduce, 20 of them frozen by the quota
        clocks.frozen += 0.020
    timer.end_step(8)
    window = timer.take_window()
    assert window.wait_seconds == pytest.approx(0.010)
    assert window.compute_seconds == pytest.approx(0.030)


def test_throttling_beyond_the_wait_never_makes_it_negative():
    clocks = FakeClocks()
    timer = StepTimer(clock=lambda: clocks.now, frozen_clock=lambda: clocks.frozen)
    timer.mark_start()
    with timer.waiting():
        clocks.now += 0.005
        clocks.frozen += 0.050  # a group throttled on several CPUs at once
    timer.end_step(4)
    window = timer.take_window()
    assert window.wait_seconds == 0.0 and window.compute_seconds == pytest.approx(0.005)


def _writable_cgroup() -> bool:
    return os.geteuid() == 0 and Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists()


@pytest.mark.skipif(not _writable_cgroup(), reason="needs root and the cgroup v1 cpu controller")
def test_a_rank_under_hetero_ranks_reads_its_quota():
    code = ("from dbs_hvd.quota import own_quota; q = own_quota(); "
            "print(round(q.share, 3), round(q.period, 3))")
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "hetero_ranks.py"), "--rank", "0",
                          "--share", "0.5", "--period-ms", "20", "--", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0.5", "0.02"]


def test_cpu_used_over_the_share_is_a_floor_on_the_windows_compute():
    clocks = FakeClocks()
    cpu = [0.0]
    timer = StepTimer(clock=lambda: clocks.now, cpu_share=0.25, cpu_clock=lambda: cpu[0])
    timer.mark_start()
    for _ in range(4):  # 4 steps of 5 ms at full speed (slack in the quota), 3 ms CPU each
        clocks.now += 0.005
        cpu[0] += 0.003
        timer.end_step(4)
    window = timer.take_window()
    assert window.compute_seconds == pytest.approx(0.012 / 0.25)
    clocks.now += 0.1  # saturated: the wall compute already exceeds CPU over share
    cpu[0] += 0.02
    timer.end_step(4)
    assert timer.take_window().compute_seconds == pytest.approx(0.1)


def test_with_a_work_clock_other_threads_cpu_is_overhead_taken_from_the_share():
    clocks = FakeClocks()
    cpu, work = [0.0], [0.0]
    timer = StepTimer(clock=lambda: clocks.now, cpu_share=0.25, cpu_clock=lambda: cpu[0],
                      work_clock=lambda: work[0])
    timer.mark_start()
    for _ in range(10):  # 10 ms steps, 8 of them waiting: 1 ms of work, 1 of other threads
        clocks.now += 0.002
        with timer.waiting():
            clocks.now += 0.008
        cpu[0] += 0.002
        work[0] += 0.001
        timer.end_step(2)
    window = timer.take_window()
    # overhead 0.1 core, so 0.15 core is left for 10 ms of work
    assert window.compute_seconds == pytest.approx(0.010 / 0.15)


def test_cpu_used_while_waiting_is_not_part_of_the_floor():
    """Polling in a wait (either thread) is the price of slack, not of the rank's work."""
    clocks = FakeClocks()
    cpu, work = [0.0], [0.0]
    timer = StepTimer(clock=lambda: clocks.now, cpu_share=0.25, cpu_clock=lambda: cpu[0],
                      work_clock=lambda: work[0])
    timer.mark_start()
    for _ in range(10):  # 2 ms steps of 1 ms work, then 8 ms waits that burn 2 ms of CPU
        clocks.now += 0.002
        cpu[0] += 0.001
        work[0] += 0.001
        with timer.waiting():
            clocks.now += 0.008
            cpu[0] += 0.002  # 1 ms on the training thread's polls, 1 ms on other threads
            work[0] += 0.001
        timer.end_step(2)
    window = timer.take_window()
    assert window.compute_seconds == pytest.approx(0.010 / 0.25)  # not 0.030 / 0.15


def test_the_cycle_slows_with_the_share_and_respects_the_users_setting(tmp_path, monkeypatch):
    from dbs_hvd import quota as q

    assert q.horovod_cycle_ms(None) is None
    assert q.horovod_cycle_ms(CpuQuota(2.0, 0.1, tmp_path, 1)) is None
    assert q.horovod_cycle_ms(CpuQuota(0.25, 0.1, tmp_path, 1)) == pytest.approx(2.0)
    assert q.horovod_cycle_ms(CpuQuota(0.1, 0.1, tmp_path, 1)) == pytest.approx(5.0)
    assert q.horovod_cycle_ms(CpuQuota(0.5, 0.1, tmp_path, 1)) == q.MIN_CYCLE_MS
    assert q.horovod_cycle_ms(CpuQuota(0.9, 0.1, tmp_path, 1)) == q.MIN_CYCLE_MS
    assert q.horovod_cycle_ms(CpuQuota(0.01, 1.0, tmp_path, 1)) == q.MAX_CYCLE_MS
    monkeypatch.setattr(q, "own_quota", lambda: CpuQuota(0.25, 0.1, tmp_path, 1))
    env = {}
    assert q.configure_horovod_cycle(env) == pytest.approx(2.0)
    assert env == {"HOROVOD_CYCLE_TIME": "2"}
    env = {"HOROVOD_CYCLE_TIME": "3"}
    assert q.configure_horovod_cycle(env) is None and env["HOROVOD_CYCLE_TIME"] == "3"


def test_within_a_short_period_the_cycle_is_at_most_half_of_it_but_not_below_the_floor(tmp_path):
    from dbs_hvd import quota as q

    assert q.horovod_cycle_ms(CpuQuota(0.05, 0.01, tmp_path, 1)) == pytest.approx(5.0)
    assert q.horovod_cycle_ms(CpuQuota(0.02, 0.01, tmp_path, 1)) == pytest.approx(5.0)
    assert q.horovod_cycle_ms(CpuQuota(0.05, 0.001, tmp_path, 1)) == q.MIN_CYCLE_MS


def test_the_quiet_waits_sleeps_grow_with_a_smaller_share(tmp_path):
    from dbs_hvd import quota as q

    assert q.wait_max_sleep(None) == q.WAIT_SLEEP_PER_SHARE
    assert q.wait_max_sleep(CpuQuota(2.0, 0.1, tmp_path, 1)) == q.WAIT_SLEEP_PER_SHARE
    assert q.wait_max_sleep(CpuQuota(0.5, 0.1, tmp_path, 1)) == pytest.approx(2 * q.WAIT_SLEEP_PER_SHARE)
    assert q.wait_max_sleep(CpuQuota(0.01, 0.1, tmp_path, 1)) == q.MAX_WAIT_SLEEP


@pytest.mark.mpi
@pytest.mark.skipif(not _writable_cgroup(), reason="needs root and the cgroup v1 cpu controller")
def test_under_mpirun_only_the_throttled_rank_cycles_more_slowly_and_sleeps_in_mpi(monkeypatch):
    from tests.harness import run_job

    monkeypatch.delenv("HOROVOD_CYCLE_TIME", raising=False)
    monkeypatch.delenv("DBS_HVD_MPI_YIELD", raising=False)
    code = ("import os, dbs_hvd; from dbs_hvd.quiet_yield import sleep_seconds; "
            "from mpi4py import MPI; print(f\"CYCLE {MPI.COMM_WORLD.Get_rank()} "
            "{os.environ.get('HOROVOD_CYCLE_TIME')} {sleep_seconds()}\")")
    job = run_job([sys.executable, str(ROOT / "launch" / "hetero_ranks.py"), "--share", "1,0.25",
                   "--", sys.executable, "-c", code], np=2, timeout=120)
    assert job.ok, job.describe()
    cycles = {rank: [line.split() for line in lines if "CYCLE" in line] for rank, lines in job.rank_output.items()}
    # The harness preloads dbs_hvd's sched_yield as the launchers do: only the
    # throttled rank turns its sleep on (dbs_hvd.quiet_yield).
    assert cycles == {0: [["CYCLE", "0", "None", "0.0"]], 1: [["CYCLE", "1", "2", "5e-05"]]}


def _quota_timer():
    """A StepTimer at a quarter core on fake clocks, and the clocks (wall, cpu, work)."""
    clocks, cpu, work = FakeClocks(), [0.0], [0.0]
    timer = StepTimer(clock=lambda: clocks.now, cpu_share=0.25, cpu_clock=lambda: cpu[0],
                      work_clock=lambda: work[0])
    return timer, clocks, cpu, work


def _advance(clocks, cpu, work, seconds, used):
    """``seconds`` of wall time in which the training thread uses ``used`` of CPU."""
    clocks.now += seconds
    cpu[0] += used
    work[0] += used


def _steps(timer, clocks, cpu, work, count):
    """``count`` steps of 5 ms at full speed (slack in the quota), 3 ms of CPU each."""
    for _ in range(count):
        timer.taken()
        _advance(clocks, cpu, work, 0.005, 0.003)
        timer.end_step(4)


def test_cpu_used_between_steps_is_not_part_of_the_floor():
    """An evaluation between two steps is not the training's work (dbs-train evaluates at epoch ends)."""
    timer, clocks, cpu, work = _quota_timer()
    timer.mark_start()
    _steps(timer, clocks, cpu, work, 2)
    _advance(clocks, cpu, work, 0.2, 0.05)  # an evaluation: 0.2 s and 50 ms of CPU
    _steps(timer, clocks, cpu, work, 2)
    assert timer.take_window().compute_seconds == pytest.approx(0.012 / 0.25)  # not (0.012 + 0.05) / 0.25
    # A window that begins between steps: the gap's CPU after take_window is left out too.
    _advance(clocks, cpu, work, 0.1, 0.02)
    _steps(timer, clocks, cpu, work, 1)
    assert timer.take_window().compute_seconds == pytest.approx(0.003 / 0.25)


def test_cpu_used_after_a_rebalance_and_before_the_next_step_is_not_part_of_the_floor():
    """mark_start (a rebalance's end) opens a gap that lasts until the next step's first batch."""
    timer, clocks, cpu, work = _quota_timer()
    timer.mark_start()
    _steps(timer, clocks, cpu, work, 1)
    timer.take_window()  # an epoch-end rebalance...
    timer.mark_start()
    _advance(clocks, cpu, work, 0.3, 0.06)  # ...then an evaluation of 0.3 s and 60 ms of CPU
    _steps(timer, clocks, cpu, work, 2)
    assert timer.take_window().compute_seconds == pytest.approx(0.006 / 0.25)


def test_raised_to_the_floor_the_steps_spread_scales_with_it():
    clocks = FakeClocks()
    cpu = [0.0]
    timer = StepTimer(clock=lambda: clocks.now, cpu_share=0.25, cpu_clock=lambda: cpu[0])
    timer.mark_start()
    for wall in (0.004, 0.006, 0.004, 0.006):  # steps at full speed, 3 ms CPU each
        clocks.now += wall
        cpu[0] += 0.003
        timer.end_step(4)
    window = timer.take_window()
    scale = (0.012 / 0.25) / 0.020
    stats = WindowStats.from_windows([window])
    assert stats.compute_seconds[0] == pytest.approx(0.048)
    assert stats.compute_spread()[0] == pytest.approx(scale * np.std([4, 6, 4, 6], ddof=1) * 1e-3)
