"""launch/hetero_ranks.py: per-rank CPU quotas, pinning and noisy neighbours from outside.

The spec parsing and the neighbour schedule are tested in-process; the quota
itself under real mpirun (where cgroups are writable: root with a CPU
controller), and the cleanup after SIGKILL on a real process tree.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.harness import run_job

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "launch" / "hetero_ranks.py"
_spec = importlib.util.spec_from_file_location("hetero_ranks", TOOL)
hr = importlib.util.module_from_spec(_spec)
sys.modules["hetero_ranks"] = hr
_spec.loader.exec_module(hr)


def _writable_cpu_cgroup() -> bool:
    try:
        root, _ = hr.find_cpu_controller()
    except hr.SetupError:
        return False
    return os.access(root, os.W_OK)


needs_cgroups = pytest.mark.skipif(not _writable_cpu_cgroup(),
                                   reason="needs root and a writable cgroup CPU controller")


def spec_for(argv: list[str], rank: int) -> "hr.RankSpec":
    return hr.rank_spec(hr.build_parser().parse_args(argv + ["--", "true"]), rank)


def test_each_rank_reads_its_own_entry():
    argv = ["--share", "1,0.25,0.5", "--core", "0,1,1", "--period-ms", "10"]
    assert spec_for(argv, 0) == hr.RankSpec(0, None, 10.0, 0, None)
    assert spec_for(argv, 1) == hr.RankSpec(1, 0.25, 10.0, 1, None)
    assert spec_for(argv, 2).share == 0.5


def test_one_entry_stands_for_every_rank_and_defaults_are_the_kernels():
    spec = spec_for(["--share", "0.5"], 3)
    assert spec.share == 0.5 and spec.period_ms == 100.0 and spec.core is None


@pytest.mark.parametrize("argv, words", [
    (["--share", "1,0.25"], "rank 2 has no entry"),
    (["--share", "1,0.5", "--core", "0,1,1"], "--share has 2 entries but the other lists have 3"),
    (["--share", "0"], "positive number of cores"),
    (["--share", "0.05", "--period-ms", "10"], "kernel's minimum"),
    (["--period-ms", "5000"], "1 to 1000 ms"),
    (["--core", "x"], "a core number or 'any'"),
    (["--core", "4096"], "may run on cores"),
    (["--noise", "p=0.3"], "--noise needs --core"),
    (["--core", "0", "--noise", "q=1"], "unknown keys"),
    (["--core", "0", "--noise", "p=2"], "0 <= p <= 1"),
])
def test_bad_specs_say_what_to_change(argv, words):
    with pytest.raises(hr.SetupError, match=words.replace("(", r"\(")):
        spec_for(argv, 2)


def test_the_rank_comes_from_any_launcher():
    assert hr.launcher_rank({"OMPI_COMM_WORLD_RANK": "3"}) == 3
    assert hr.launcher_rank({"HOROVOD_RANK": "1"}) == 1
    assert hr.launcher_rank({"SLURM_PROCID": "2"}) == 2
    with pytest.raises(hr.SetupError, match="under mpirun, horovodrun or srun"):
        hr.launcher_rank({})


def test_no_command_and_no_cgroups_fail_with_the_fallback(capsys):
    assert hr.main(["--share", "0.5", "--rank", "0"]) == 2
    assert "no command" in capsys.readouterr().err
    with pytest.raises(hr.SetupError, match="--slowdown"):
        hr.find_cpu_controller("cgroup2 /nonexistent cgroup2 rw 0 0\n")


def test_v2_groups_write_cpu_max(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    mounts = f"cgroup2 {tmp_path} cgroup2 rw 0 0\n"
    assert hr.find_cpu_controller(mounts) == (tmp_path, 2)
    (tmp_path / hr.GROUP_PARENT).mkdir()
    (tmp_path / hr.GROUP_PARENT / "cgroup.subtree_control").write_text("")
    group = hr.make_group(tmp_path, 2, "r1-k1")
    group.set_quota(0.25, 10)
    assert (group.path / "cpu.max").read_text() == "2500 10000"
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu"


@settings(max_examples=50, deadline=None)
@given(p=st.floats(0, 1), epochs=st.integers(1, 5), segment=st.floats(0.1, 5),
       seed=st.integers(0, 10**6), rank=st.integers(0, 7))
def test_neighbour_schedule_is_seeded_disjoint_and_on_segments(p, epochs, segment, seed, rank):
    noise = hr.Noise(p=p, loops=2, segment=segment, epochs=epochs, seed=seed)
    spans = hr.noise_schedule(noise, rank, 60.0)
    assert spans == hr.noise_schedule(noise, rank, 60.0)
    for (start, end), after in zip(spans, spans[1:] + [None]):
        length = (end - start) / segment
        assert 1 - 1e-6 <= length <= epochs + 1e-6
        assert abs(length - round(length)) < 1e-6
        if after is not None:
            assert after[0] >= end - 1e-9
    if p == 1:
        assert spans and spans[0][0] == 0


SPIN = ("import time\n"
        "t0 = time.perf_counter(); n = 0\n"
        "while time.perf_counter() - t0 < 1.5:\n"
        "    for _ in range(20000): n += 1\n"
        "print(f'RATE {n / (time.perf_counter() - t0)}', flush=True)\n")  # one write: mpirun tags each


@needs_cgroups
@pytest.mark.mpi
def test_a_quota_slows_the_rank_to_its_share(tmp_path):
    """Two ranks each alone on a core, one at a quarter core: its work rate is about a quarter."""
    script = tmp_path / "spin.py"
    script.write_text(SPIN)
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        pytest.skip("needs two cores")
    job = run_job([sys.executable, str(TOOL), "--share", "1,0.25", "--period-ms", "10",
                   "--core", ",".join(map(str, cores)), "--report", str(tmp_path / "rep"), "--",
                   sys.executable, str(script)], np=2, timeout=90)
    assert job.ok, job.describe()
    rates = {rank: float(next(line.split("RATE")[1] for line in lines if "RATE" in line))
             for rank, lines in job.rank_output.items()}
    assert 0.15 < rates[1] / rates[0] < 0.4, rates
    reports = {r: json.loads((tmp_path / "rep" / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert reports[1]["throttled_periods"] > 0.5 * reports[1]["periods"]
    assert reports[1]["cpu_seconds"] < 0.5 * reports[0]["cpu_seconds"]
    for report in reports.values():  # the spin runs in the main thread
        assert 0.8 * report["cpu_seconds"] < report["main_thread_cpu_seconds"] <= report["cpu_seconds"]
    assert not any(p.name.startswith("r") for p in _group_parent().iterdir() if p.is_dir())


def _group_parent() -> Path:
    root, _ = hr.find_cpu_controller()
    return root / hr.GROUP_PARENT


def _pids_matching(text: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", text], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


@needs_cgroups
def test_sigkill_of_the_wrapper_leaves_no_group_command_or_neighbour(tmp_path):
    marker = f"sleep {600 + os.getpid() % 1000}"
    core = sorted(os.sched_getaffinity(0))[-1]
    wrapper = subprocess.Popen(
        [sys.executable, str(TOOL), "--rank", "0", "--share", "0.5", "--period-ms", "10",
         "--core", str(core), "--noise", "p=1,loops=2,segment=1,epochs=3,seed=1", "--",
         "sh", "-c", marker], start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        groups: list[Path] = []
        while time.monotonic() < deadline and not (groups and _pids_matching(marker)):
            groups = [p for p in _group_parent().iterdir() if p.name.startswith("r0-k")]
            time.sleep(0.1)
        assert groups and _pids_matching(marker), "the rank never started under its quota"
        assert len(_pids_matching("while :; do :; done")) >= 2
    finally:
        wrapper.send_signal(signal.SIGKILL)
        wrapper.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (any(g.exists() for g in groups)
                                           or _pids_matching(marker)):
        time.sleep(0.1)
    assert not any(g.exists() for g in groups)
    assert not _pids_matching(marker)
    assert not _pids_matching("while :; do :; done")


def test_thread_sampler_tells_the_main_thread_from_the_others():
    busy = ("import threading, time\n"
            "def spin():\n"
            "    end = time.process_time() + 0.8\n"
            "    while time.process_time() < end: pass\n"
            "t = threading.Thread(target=spin); t.start(); time.sleep(1.2); t.join()\n")
    child = subprocess.Popen([sys.executable, "-c", busy])
    sampler = hr.ThreadSampler(child.pid, interval=0.05)
    sampler.start()
    child.wait(timeout=30)
    split = sampler.split()
    assert split["other_threads_cpu_seconds"] > 0.4, split
    assert split["main_thread_cpu_seconds"] < split["other_threads_cpu_seconds"], split
