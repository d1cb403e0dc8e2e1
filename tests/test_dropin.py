"""Drop-in use of dbs_hvd in a Horovod script: schedulers, accumulation, mixed
precision, resuming, BatchNorm, argument errors, options and timing.

The exactness cases run under mpirun (tests/mpi/mpi_dropin.py, every case
against one process on the same global batches with a moving plan); the
argument checks and the pure logic run here, in one process.
"""
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

import dbs_hvd
from dbs_hvd.train.checkpoint import check_config
from dbs_hvd.options import RebalanceOptions, resolve_options
from dbs_hvd.plan import Bounds, Plan, PlanError
from dbs_hvd.sampler import DynamicBatchSampler
from tests.harness import rank_environment, run_job
from dbs_hvd.timing import StepTimer
from dbs_hvd.train.trainer import TrainConfig, flag_names

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MPI_TESTS = ROOT / "tests" / "mpi"


@pytest.mark.mpi
@pytest.mark.parametrize("np", [2, 3])
def test_dropin_cases_under_mpirun(run_mpi_file, np):
    run_mpi_file("mpi_dropin.py", np=np, timeout=420)


@pytest.mark.mpi
def test_the_full_recipe_example_trains_and_resumes_from_its_mid_epoch_checkpoint(tmp_path):
    script = [sys.executable, str(EXAMPLES / "full_recipe.py"), "--checkpoint",
              str(tmp_path / "ckpt.pt")]
    for extra in ([], ["--resume"]):
        result = run_job(script + extra, np=2, timeout=240)
        assert result.ok, result.describe()
        text = "\n".join(result.rank_output.get(0, []))
        accuracy = float(re.search(r"train accuracy ([0-9.]+)", text).group(1))
        assert accuracy >= 0.95, text


def _worker_on(host, launcher, script):
    """The worker processes of ``script`` that horovodrun started on ``host``."""
    found = []
    for proc in launcher.children(recursive=True):
        try:
            if script in proc.cmdline() and proc.environ().get("HOROVOD_HOSTNAME") == host:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.mark.mpi
def test_elastic_state_survives_a_killed_rank_and_ends_as_one_process_would(tmp_path):
    # One machine as two hosts (launch/discover_hosts.sh): ranks 0-1 on
    # localhost, rank 2 on 127.0.0.1, killed in epoch 1; the two survivors
    # restore the last commit, adopt a world of 2 and finish. Every update
    # after the restore is the single-process one on the same global batch,
    # so the final model equals one process trained on all of them. A survivor
    # not connected to the killed rank waits out the Gloo timeout (default 30 s,
    # 10 s here) in its collective before it resets.
    from tests.test_elastic import read_records
    sys.path.insert(0, str(MPI_TESTS))
    import elastic_dropin_train as script
    from problems import make_problem, train_single_process

    path = str(MPI_TESTS / "elastic_dropin_train.py")
    argv = [str(Path(sys.executable).parent / "horovodrun"), "-np", "3", "--min-np", "2",
            "--max-np", "3", "--host-discovery-script", str(ROOT / "launch" / "discover_hosts.sh"),
            "--start-timeout", "30", "--elastic-timeout", "30", "--gloo-timeout-seconds", "10",
            "--blacklist-cooldown-range", "200", "300", sys.executable, path, str(tmp_path)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env=rank_environment(), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any(r["kind"] == "read" and r["epoch"] == 1 and r["step"] >= 6
                   for r in read_records(tmp_path)):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the run never reached the step to kill at:\n"
                        + (proc.communicate(timeout=10)[0] if proc.poll() is not None else ""))
        victims = _worker_on("127.0.0.1", psutil.Process(proc.pid), path)
        assert len(victims) == 1, victims
        victims[0].send_signal(signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, output[-5000:]
    assert "done on 2 ranks" in output, output[-3000:]

    records = read_records(tmp_path)
    reads = [r for r in records if r["kind"] == "read"]
    assert {r["world"] for r in reads if r["epoch"] == 0} == {3}
    assert {r["world"] for r in reads if r["epoch"] == 2} == {2}
    resumed = min(r["step"] for r in reads if r["epoch"] == 1 and r["world"] == 2)
    assert resumed % script.COMMIT_EVERY == 0
    plans = {tuple(c["plan"]) for c in records if c["kind"] == "commit" and c["world"] == 3}
    # The plan moved off the equal split before the failure (the first commit may
    # already hold the moved plan, so the commits need not show two plans).
    equal = (script.GLOBAL_BATCH // 3,) * 3
    assert any(plan != equal for plan in plans), plans

    dataset, reference = make_problem(n=script.SAMPLES)
    stream = DynamicBatchSampler(script.SAMPLES, script.GLOBAL_BATCH, rank=0, world_size=1,
                                 seed=script.SEED)
    train_single_process(reference, dataset, stream, script.EPOCHS)
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    for name, parameter in reference.state_dict().items():
        torch.testing.assert_close(final[name], parameter, rtol=1e-6, atol=1e-9, msg=name)


# -- in one process --------------------------------------------------------------


@pytest.fixture(scope="module")
def hvd():
    import horovod.torch as hvd

    hvd.init()
    return hvd


def test_the_package_exports_the_user_facing_names():
    for name in ("DynamicBatchSampler", "DistributedOptimizer", "ModelAveragingOptimizer",
                 "RebalanceOptions", "make_policy", "POLICIES", "DbsError", "PlanError",
                 "Bounds", "Plan"):
        assert name in dbs_hvd.__all__
        assert getattr(dbs_hvd, name) is not None
    assert "claim_mpi" in dbs_hvd.__doc__


def test_library_defaults_are_dbs_trains():
    config = TrainConfig()
    options = RebalanceOptions()
    assert RebalanceOptions.from_config(vars(config)) == options
    assert options.interval_for("dbs") == 2 and options.interval_for("paper") is None
    assert (options.budget, options.min_seconds) == (config.rebalance_budget,
                                                     config.rebalance_min_seconds)
    schedule = options.schedule_for("dbs")
    assert (schedule.min_steps, schedule.budget, schedule.min_seconds) == (2, 0.02, 0.15)


def test_older_keywords_keep_their_meaning_and_cannot_mix_with_options():
    assert resolve_options(None, None, None, None) == RebalanceOptions()
    exactly_3 = resolve_options(None, 3, None, None)
    assert exactly_3 == RebalanceOptions(every=3, budget=0, min_seconds=0)
    assert exactly_3.schedule_for("dbs").budget is None
    assert resolve_options(None, None, 0.05, None).interval_for("dbs") is None
    with pytest.raises(ValueError, match="not both"):
        resolve_options(RebalanceOptions(), 3, None, None)


@pytest.mark.parametrize("bad,match", [
    ({"every": 0}, r"every=\.\.\.\) must be a positive"),
    ({"every": 2.5}, r"every=\.\.\.\) must be a positive"),
    ({"budget": 1.5}, r"budget=\.\.\.\) must be a fraction"),
    ({"min_seconds": -1}, r"min_seconds=\.\.\.\) must be"),
])
def test_bad_options_name_the_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        RebalanceOptions(**bad)


def test_bad_dbs_train_settings_name_its_settings():
    with pytest.raises(ValueError, match=r"rebalance_budget must be .*--rebalance-budget"):
        RebalanceOptions.from_config({"rebalance_budget": 2})
    with pytest.raises(ValueError, match=r"rebalance_min_seconds must be .*--rebalance-min-seconds"):
        RebalanceOptions.from_config({"rebalance_min_seconds": -1})


def test_a_checkpoint_from_before_the_options_resumes():
    old = {"global_batch": 64, "policy": "dbs", "rebalance_every": None, "rebalance_budget": 0.02}
    now = old | {"rebalance_min_seconds": 0.15, "rebalance_every": 4}
    check_config(old, now)  # no error: the schedule may change on resume
    assert RebalanceOptions.from_config(old) == RebalanceOptions()


def test_sampler_errors_name_the_python_argument_and_dbs_train_its_flag():
    with pytest.raises(PlanError, match=r"global_batch=3 is smaller .* pass global_batch="):
        DynamicBatchSampler(100, 3, rank=0, world_size=4)
    with pytest.raises(PlanError, match=r"\(global_batch=64\).*Pass global_batch= of at most 30"):
        DynamicBatchSampler(30, 64, rank=0, world_size=2)
    try:
        DynamicBatchSampler(30, 64, rank=0, world_size=2)
    except PlanError as error:
        message = flag_names(str(error))
    assert "--global-batch 64" in message and "Pass --global-batch of at most 30" in message
    assert "global_batch=" not in message


def test_optimizer_argument_errors_name_the_python_argument(hvd):
    model = nn.Linear(3, 2)
    sampler = DynamicBatchSampler(40, 8)
    local = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="op= is fixed"):
        dbs_hvd.DistributedOptimizer(local, sampler, op=hvd.Sum)
    with pytest.raises(ValueError, match="backward_passes_per_step= must be"):
        dbs_hvd.DistributedOptimizer(local, sampler, backward_passes_per_step=0)
    with pytest.raises(ValueError, match="average_every= must be"):
        dbs_hvd.ModelAveragingOptimizer(local, sampler, model.named_parameters(),
                                        average_every=0)
    with pytest.raises(ValueError, match="not both"):
        dbs_hvd.DistributedOptimizer(local, sampler, rebalance=RebalanceOptions(),
                                     rebalance_every=2)


def test_lr_schedulers_accept_the_wrapped_optimizers(hvd):
    for wrap in ("gradient", "average"):
        model = nn.Linear(3, 2)
        sampler = DynamicBatchSampler(40, 8)
        local = torch.optim.SGD(model.parameters(), lr=0.1)
        optimizer = (dbs_hvd.DistributedOptimizer(local, sampler,
                                                  named_parameters=model.named_parameters())
                     if wrap == "gradient" else dbs_hvd.ModelAveragingOptimizer(
                         local, sampler, model.named_parameters()))
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()"
            for x in torch.utils.data.DataLoader(torch.randn(40, 3), batch_sampler=sampler):
                optimizer.zero_grad()
                model(x).sum().backward()
                optimizer.step()
                scheduler.step()
        assert optimizer.param_groups[0]["lr"] == 0.1 * 0.5 ** 5


def test_a_batch_norm_model_raises_the_floor_to_two(hvd):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    sampler = DynamicBatchSampler(40, 8)
    dbs_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), sampler,
                                 named_parameters=model.named_parameters(), model=model)
    assert sampler.bounds == Bounds(2, None)
    sampler = DynamicBatchSampler(40, 8)
    plain = nn.Sequential(nn.Linear(3, 4))
    dbs_hvd.DistributedOptimizer(torch.optim.SGD(plain.parameters(), lr=0.1), sampler,
                                 named_parameters=plain.named_parameters(), model=plain)
    assert sampler.bounds.min_batch == 1


def test_a_batch_norm_model_refuses_a_policy_or_batch_without_room_for_two():
    from dbs_hvd.optim import require_batch_norm_floor

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(PlanError, match="global_batch=3 on 2 ranks"):
        require_batch_norm_floor(model, DynamicBatchSampler(40, 3, rank=0, world_size=2), "dbs")
    with pytest.raises(PlanError, match="Bounds\\(min_batch=2\\)"):
        require_batch_norm_floor(model, DynamicBatchSampler(40, 8, rank=0, world_size=2),
                                 dbs_hvd.make_policy("dbs", 8))
    synced = nn.Sequential(nn.Linear(3, 4), nn.SyncBatchNorm(4))
    sampler = DynamicBatchSampler(40, 3, rank=0, world_size=2)
    require_batch_norm_floor(synced, sampler, "dbs")  # synchronised: one sample is fine
    assert sampler.bounds.min_batch == 1


def test_a_forgotten_set_epoch_moves_on_with_the_newest_plan_and_warns_once():
    sampler = DynamicBatchSampler(40, 8, rank=0, world_size=2, seed=1)
    first = list(sampler)
    sampler.set_plan(Plan((6, 2)))  # learned at the end of the pass
    with pytest.warns(UserWarning, match="set_epoch"):
        second = list(sampler)
    assert sampler.epoch == 1 and [len(b) for b in second] == [6] * 5
    assert second != first[:5]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(sampler)  # warned once only
    assert sampler.epoch == 2
    sampler.set_epoch(2)  # a complete pass then set_epoch of the same epoch: from step 0
    assert len(list(sampler)) == 5


def test_state_dict_records_trained_steps_not_prefetched_ones():
    sampler = DynamicBatchSampler(100, 10, rank=0, world_size=2, seed=5)
    sampler.set_epoch(1)
    iterator = iter(sampler)
    for _ in range(6):  # handed out ahead, as a prefetching DataLoader does
        next(iterator)
    for _ in range(3):
        sampler.mark_trained(sampler.pop_consumed())
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (1, 3)
    resumed = DynamicBatchSampler(100, 10, rank=0, world_size=2, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the loop's call for the resumed epoch keeps the position
    assert list(resumed) == [sampler.indices(step) for step in range(3, 10)]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_step_starts_when_its_batch_is_taken_not_when_the_previous_ended():
    clock = FakeClock()
    timer = StepTimer(clock=clock)
    timer.mark_start()
    clock.now = 5.0  # evaluation between steps: not counted
    timer.activity()  # zero_grad right after the previous step does not start this one ...
    clock.now = 9.0
    timer.taken()  # ... the batch taken after the evaluation does
    clock.now = 9.5
    timer.taken()  # a second micro-batch: the first one counts
    clock.now = 10.0
    timer.end_step([4, 4])
    assert timer.window.steps == 2 and timer.window.samples == 8
    assert timer.window.compute_seconds == pytest.approx(1.0)
    clock.now = 12.0
    timer.activity()  # no batch taken (prefetched at the epoch's end): the first activity
    clock.now = 13.0
    timer.end_step(4)
    assert timer.window.compute_seconds == pytest.approx(2.0)


def test_a_step_closed_late_keeps_the_next_steps_signals():
    clock = FakeClock()
    timer = StepTimer(clock=clock)
    timer.mark_start()
    clock.now = 1.0
    timer.taken()
    clock.now = 2.0  # synchronize returned; step() was skipped (an overflow)
    clock.now = 3.0
    timer.taken()  # the next step's batch
    clock.now = 3.5
    timer.end_step(4, end=2.0)  # the skipped step, closed at the next zero_grad
    assert timer.window.compute_seconds == pytest.approx(1.0)
    clock.now = 4.0
    timer.end_step(4)
    assert timer.window.compute_seconds == pytest.approx(2.0)


@given(sizes=st.lists(st.integers(1, 64), min_size=1, max_size=6),
       wall=st.floats(0.001, 10), wait=st.floats(0, 10))
def test_micro_batches_share_the_step_time_and_count_every_sample(sizes, wall, wait):
    clock = FakeClock()
    timer = StepTimer(clock=clock)
    timer.mark_start()
    with timer.waiting():
        clock.now = min(wait, wall)
    clock.now = wall
    timer.end_step(sizes)
    window = timer.window
    assert window.steps == len(sizes) and window.samples == sum(sizes)
    assert window.compute_seconds + window.wait_seconds == pytest.approx(wall)


def test_each_micro_batch_is_weighted_by_its_own_size_as_it_accumulates():
    from dbs_hvd.balancer import Rebalancer
    from dbs_hvd.comm import LocalExchange
    from dbs_hvd.optim import DynamicBatchState
    from dbs_hvd.policies import StaticPolicy

    sampler = DynamicBatchSampler(32 * 4, 32, rank=0, world_size=2, plan=Plan((20, 12)))
    timer = StepTimer()
    state = DynamicBatchState(sampler, Rebalancer(sampler, StaticPolicy(32), LocalExchange(), timer),
                              timer)
    state.backward_passes_per_step = 2
    model = nn.Linear(3, 1, bias=False)
    state.weight_parameter_gradients(model.parameters())
    iterator = iter(sampler)
    first = next(iterator)
    sampler.set_plan(Plan((8, 24)))  # from the next step: inside this optimizer step
    second = next(iterator)
    inputs = [torch.randn(len(first), 3), torch.randn(len(second), 3)]
    for x in inputs:
        model(x).mean().backward()
    expected = sum(2 * len(x) / 32 * x.mean(0) for x in inputs)
    torch.testing.assert_close(model.weight.grad[0], expected)
    assert state.allreduce_weight() == 1.0  # nothing left for the compressor to scale
    assert [b.batch_size for b in state.step_batches()] == [20, 8]
    assert sampler.peek_consumed() is None
