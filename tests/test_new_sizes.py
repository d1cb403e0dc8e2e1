"""A rank's first step at a batch size is left out of its measured speed (--discount-new-sizes).

On a GPU that step builds kernel plans for the new shapes (13-35 ms more than
the same step once seen, measured on an H200; benchmarks/results/gpu_check.md). Read as
compute, it makes whichever rank just got a new size look slow after every
plan change. The pure parts (timer, stats, emulator, the state's bookkeeping)
are tested here in one process; the whole path under mpirun at the end.
"""
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from dbs_hvd.balancer import Rebalancer
from dbs_hvd.comm import LocalExchange
from dbs_hvd.train.emulate import VirtualDevice, make_emulator, parse_virtual_devices
from dbs_hvd.train.metrics import read_jsonl
from dbs_hvd.optim import DynamicBatchState, resolve_discount_new_sizes
from dbs_hvd.plan import Plan, WindowStats
from dbs_hvd.policies import StaticPolicy
from dbs_hvd.sampler import DynamicBatchSampler
from tests.harness import run_job
from dbs_hvd.timing import StepTimer, WindowTotals


def _timer(step_seconds):
    """A timer whose steps take the given seconds, one after another."""
    now = [0.0]
    durations = iter(step_seconds)

    def clock():
        return now[0]

    timer = StepTimer(clock=clock)
    timer.mark_start()

    def advance():
        now[0] += next(durations)

    return timer, advance


def test_the_timer_counts_a_new_size_step_apart_and_in_the_totals():
    timer, advance = _timer([0.5, 0.1, 0.1])
    for new_size in (True, False, False):
        advance()
        timer.end_step(10, new_size=new_size)
    window = timer.take_window()
    assert (window.steps, window.samples) == (3, 30)
    assert window.compute_seconds == pytest.approx(0.7)
    assert (window.new_size_steps, window.new_size_samples) == (1, 10)
    assert window.new_size_compute_seconds == pytest.approx(0.5)
    assert window.compute_squares == pytest.approx(0.25 + 0.01 + 0.01)
    assert window.new_size_compute_squares == pytest.approx(0.25)
    # The settled steps' spread: the two 0.1 s steps, which do not vary.
    assert WindowStats.from_windows([window]).compute_spread()[0] == pytest.approx(0.0, abs=1e-7)


def test_stats_leave_out_new_size_steps_where_other_steps_remain():
    slowed = {"steps": 3, "samples": 30, "compute_seconds": 0.7, "wait_seconds": 0.3,
              "new_size_steps": 1, "new_size_samples": 10, "new_size_compute_seconds": 0.5,
              "new_size_wait_seconds": 0.0}
    only_new = {"steps": 1, "samples": 10, "compute_seconds": 0.4, "wait_seconds": 0.0,
                "new_size_steps": 1, "new_size_samples": 10, "new_size_compute_seconds": 0.4,
                "new_size_wait_seconds": 0.0}
    plain = {"steps": 2, "samples": 20, "compute_seconds": 0.2, "wait_seconds": 0.1}
    stats = WindowStats.from_records([slowed, only_new, plain])
    np.testing.assert_allclose(stats.steps, [2, 1, 2])
    np.testing.assert_allclose(stats.samples, [20, 10, 20])
    # The slowed rank's speed is that of its settled steps: 100 samples/s, not 43.
    np.testing.assert_allclose(stats.speeds(), [100, 25, 100])
    np.testing.assert_allclose(stats.wait_seconds, [0.3, 0.0, 0.1])
    # Records without squares (a log written before they were kept) give no spread.
    assert stats.compute_spread() is None
    # The typed windows the ranks exchange give the same figures as the log's records.
    typed = WindowStats.from_windows([WindowTotals(**r) for r in (slowed, only_new, plain)])
    for name in ("steps", "samples", "compute_seconds", "wait_seconds"):
        np.testing.assert_allclose(getattr(typed, name), getattr(stats, name))


@given(settled=st.lists(st.tuples(st.integers(1, 512), st.floats(1e-4, 1.0)), min_size=1,
                        max_size=20),
       new=st.lists(st.tuples(st.integers(1, 512), st.floats(1e-4, 1.0)), max_size=5))
def test_the_speed_is_that_of_the_settled_steps_alone(settled, new):
    timer, advance = _timer([seconds for _, seconds in new + settled])
    for (size, _), is_new in zip(new + settled, [True] * len(new) + [False] * len(settled)):
        advance()
        timer.end_step(size, new_size=is_new)
    stats = WindowStats.from_windows([timer.take_window()])
    expected = sum(size for size, _ in settled) / sum(seconds for _, seconds in settled)
    assert stats.speeds()[0] == pytest.approx(expected, rel=1e-6)
    assert stats.steps[0] == len(settled)


def test_the_state_marks_each_ranks_first_step_at_a_size_when_asked():
    for discount in (True, False):
        sampler = DynamicBatchSampler(1000, 10, rank=0, world_size=2, seed=0)
        timer = StepTimer()
        rebalancer = Rebalancer(sampler, StaticPolicy(10), LocalExchange(), timer)
        state = DynamicBatchState(sampler, rebalancer, timer, discount_new_sizes=discount)
        batches = iter(sampler)
        sizes = []
        for step in range(6):
            if step == 2:
                sampler.set_plan(Plan((7, 3)))
            if step == 4:
                sampler.set_plan(Plan((5, 5)))  # back to a size this rank has run
            next(batches)
            batch = state.current_batch()
            sizes.append(batch.batch_size)
            state.finish_step(batch)
        window = timer.take_window()
        assert sizes == [5, 5, 7, 7, 5, 5]
        assert window.steps == 6
        assert window.new_size_steps == (2 if discount else 0)
        assert window.new_size_samples == (12 if discount else 0)


def test_by_default_only_parameters_on_a_gpu_discount_new_sizes():
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    assert resolve_discount_new_sizes(None, optimizer) is False
    assert resolve_discount_new_sizes(True, optimizer) is True
    assert resolve_discount_new_sizes(False, optimizer) is False


def test_a_virtual_device_pays_its_new_size_cost_once_per_batch_size():
    device = VirtualDevice(0.002, 0.001, new_size=0.02)
    assert [device.delay(b, 0.0) for b in (10, 10, 12, 10, 12)] == pytest.approx(
        [0.032, 0.012, 0.034, 0.012, 0.014])
    np.testing.assert_allclose(parse_virtual_devices("2:0.25:20,8:1", 2),
                               [(0.002, 0.00025, 0.02), (0.008, 0.001, 0.0)])
    assert make_emulator(1, 2, virtual_device="2:0.25:20,8:1:5").new_size == pytest.approx(0.005)
    for bad in ("1:2:3:4", "1", "1:-2", "a:b"):
        with pytest.raises(ValueError, match="OVERHEAD_MS:PER_SAMPLE_MS"):
            parse_virtual_devices(bad, 1)


@pytest.mark.mpi
@pytest.mark.parametrize("discount", ["on", "off"])
def test_under_mpirun_the_first_rebalance_finds_the_balance_only_with_new_sizes_left_out(
        tmp_path, discount):
    # Per-sample 2 and 6 ms (balanced at 48,16 of 64), and 300 ms at each new
    # batch size on both ranks. The first window (2 steps at 32,32) holds one
    # such step per rank: counted, the equal 300 ms pulls the ranks' measured
    # speeds together (a first plan near 39,25); left out, the plan is 48,16.
    log = tmp_path / "run.jsonl"
    result = run_job([sys.executable, "-m", "dbs_hvd.train.cli", "--virtual-device",
                      "0:2:300,0:6:300", "--epochs", "1", "--global-batch", "64",
                      "--discount-new-sizes", discount, "--log", str(log)], np=2, timeout=120)
    if not result.ok:
        pytest.fail(result.describe(), pytrace=False)
    plans = read_jsonl(log)[0]["plans"]
    assert plans[0] == [32, 32] and len(plans) >= 2, plans
    first_fast_share = plans[1][0]
    if discount == "on":
        assert abs(first_fast_share - 48) <= 1, plans
    else:
        assert first_fast_share <= 44, plans


def test_the_new_size_cost_benchmark_runs_on_the_cpu(tmp_path, capsys):
    import json

    from benchmarks.new_size_cost import main

    out = tmp_path / "rows.json"
    assert main(["--device", "cpu", "--image-size", "8", "--sizes", "1,3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["batch"] for row in rows] == [1, 3]
    assert all(row[key] > 0 for row in rows
               for key in ("first_ms", "again_ms", "seen_after_others_ms"))
    assert "| 3 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--sizes", "2,2"])
