"""dbs-train end to end under mpirun (plans converge, accuracy, bad input fails alike on all
ranks), and its checks of bad input in one process (cli.train_config, trainer.validate)."""
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from dbs_hvd.train.cli import USER_ERRORS, error_line, train_config
from dbs_hvd.train.metrics import read_jsonl
from tests.harness import mpmd_argv, run_argv, run_job
from tests.harness import train_or_fail as train
from dbs_hvd.train.trainer import validate

mpi = pytest.mark.mpi  # every test that launches ranks (make test-fast leaves them out)
DBS_TRAIN = [sys.executable, "-m", "dbs_hvd.train.cli"]


@mpi
@pytest.mark.parametrize("policy", ["paper", "dbs"])
def test_shares_converge_on_virtual_devices_by_the_second_epoch(tmp_path, policy):
    # Per-sample costs 2 ms and 6 ms (ratio 1:3): the balanced shares are 0.75 / 0.25.
    log = tmp_path / "run.jsonl"
    train(2, "--virtual-device", "0:2,0:6", "--epochs", "2", "--global-batch", "64",
          "--policy", policy, "--log", str(log))
    records = read_jsonl(log)
    assert [r["epoch"] for r in records] == [0, 1]
    shares = np.array(records[1]["next_batch_sizes"]) / 64
    np.testing.assert_allclose(shares, [0.75, 0.25], atol=0.05)
    # dbs-plot draws this real log.
    png = tmp_path / "run.png"
    done = subprocess.run([sys.executable, "-m", "dbs_hvd.train.plot", str(log), "-o", str(png)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@mpi
def test_slow_rank_share_falls_below_nominal_bound_with_real_compute(tmp_path):
    log = tmp_path / "run.jsonl"
    train(2, "--model", "cnn", "--slowdown", "1,3", "--epochs", "4", "--global-batch", "64",
          "--log", str(log))
    records = read_jsonl(log)
    slow_shares = [r["next_batch_sizes"][1] / 64 for r in records]
    assert all(share < 0.35 for share in slow_shares), slow_shares


# Equal virtual devices; rank 1 becomes 3x slower at step 10 of the 22-step
# first epoch; dbs rebalances exactly every 5 steps, without budget and floor.
# With them, one CI run kept the equal plan all epoch, most likely because a
# slow early rebalance let the budget stretch the interval until the window
# after the change ran on to the epoch end (not traced; reruns moved at step
# 14-15): the budget as designed, not this test's subject.
STEP_CHANGE_RUN = ["--virtual-device", "0:2,0:2", "--step-change", "1:10:3",
                   "--global-batch", "64", "--policy", "dbs", "--rebalance-every", "5",
                   "--rebalance-budget", "0", "--rebalance-min-seconds", "0"]


@pytest.fixture(scope="module")
def step_change_run(tmp_path_factory):
    """One 2-epoch run of STEP_CHANGE_RUN with --log and --rebalance-log, read by two tests."""
    folder = tmp_path_factory.mktemp("step_change")
    log, rebalances = folder / "run.jsonl", folder / "rebalances.jsonl"
    train(2, *STEP_CHANGE_RUN, "--epochs", "2", "--log", str(log),
          "--rebalance-log", str(rebalances))
    return read_jsonl(log), read_jsonl(rebalances)


@mpi
def test_dbs_answers_a_step_change_within_the_same_epoch(step_change_run):
    # The plan must move inside epoch 0.
    record = step_change_run[0][0]
    assert record["epoch"] == 0
    plans = record["plans"]
    assert plans[0] == [32, 32]
    assert len(plans) > 1, plans
    np.testing.assert_allclose(np.array(plans[-1]) / 64, [0.75, 0.25], atol=0.06)


@mpi
def test_the_rebalance_log_says_when_and_why_the_plan_moved(step_change_run):
    # The step change above, with --rebalance-log: one line per rebalance, in
    # order, each plan following from the one before, and the move that
    # answered the change explained by the costs the policy fitted.
    epochs, records = step_change_run
    assert [r["epoch"] for r in records] == sorted(r["epoch"] for r in records)
    assert {r["epoch"] for r in records} == {0, 1}
    assert records[0]["plan_before"] == [32, 32]
    for before, after in zip(records, records[1:]):
        assert after["plan_before"] == before["plan_after"], (before, after)
    for record in records:
        assert sum(record["plan_after"]) == 64
        assert len(record["ranks"]) == 2 and all(r["steps"] > 0 for r in record["ranks"])
        assert record["extra"]["interval"] >= 1
    last_of_epoch = {r["epoch"]: r["plan_after"] for r in records}
    assert [last_of_epoch[e["epoch"]] for e in epochs] == [e["next_batch_sizes"] for e in epochs]
    answer = next(r for r in records if r["plan_after"][1] < r["plan_before"][1])
    seen = answer["extra"]["policy"]
    per_sample = seen["per_sample_seconds"]
    assert per_sample[1] > 2 * per_sample[0], seen  # rank 1 is 3x slower per sample now
    assert 0.01 <= seen["band"] <= 0.03 and len(seen["misfit"]) == 2, seen


@mpi
def test_static_policy_keeps_the_equal_split(tmp_path):
    log = tmp_path / "run.jsonl"
    train(2, "--policy", "static", "--slowdown", "1,3", "--epochs", "2", "--log", str(log))
    assert all(r["next_batch_sizes"] == [32, 32] for r in read_jsonl(log))


@mpi
def test_static_policy_keeps_a_given_plan(tmp_path):
    log = tmp_path / "run.jsonl"
    train(2, "--policy", "static", "--plan", "48,16", "--slowdown", "1,3", "--epochs", "2",
          "--log", str(log))
    records = read_jsonl(log)
    assert all(r["batch_sizes"] == r["next_batch_sizes"] == [48, 16] for r in records)
    assert records[0]["samples"][0] == 3 * records[0]["samples"][1]


@mpi
def test_a_rank_out_of_memory_retrains_the_step_and_matches_the_run_without(tmp_path, monkeypatch):
    # Rank 2 fails (injected) at 28 samples or more: the run goes on with lower caps,
    # and, trained on the same global batches, ends where a run without failures ends.
    common = ["--policy", "static", "--plan", "12,20,32", "--epochs", "2", "--oom-recovery", "on"]
    clean_log, failing_log = tmp_path / "clean.jsonl", tmp_path / "failing.jsonl"
    train(3, *common, "--log", str(clean_log))
    monkeypatch.setenv("DBS_HVD_INJECT_OOM", "2:28")
    result = train(3, *common, "--log", str(failing_log))
    told = [line for line in result.rank_output[0] if "out of memory" in line]
    assert told == [
        "dbs-train: out of memory on rank 2 at 32 samples (epoch 0, step 0); caps lowered "
        "(rank 2 now 28), step trained again with plan [14, 22, 28]",
        "dbs-train: out of memory on rank 2 at 28 samples (epoch 0, step 0); caps lowered "
        "(rank 2 now 25), step trained again with plan [15, 24, 25]",
    ], result.describe()
    clean, failing = read_jsonl(clean_log), read_jsonl(failing_log)
    assert [r["next_batch_sizes"] for r in failing] == [[15, 24, 25]] * 2
    assert [r["batch_sizes"] for r in clean] == [[12, 20, 32]] * 2
    # Every sample of each epoch trained once: the same counts as the run without failures.
    assert [sum(r["samples"]) for r in failing] == [sum(r["samples"]) for r in clean]
    for a, b in zip(clean, failing):  # only the float summation order differs
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=0.003)


@mpi
def test_a_straggler_left_out_with_zero_samples_changes_nothing_but_the_split(tmp_path):
    # Rank 2 costs 60 ms per step at any batch: --zero-samples leaves it out. Trained on
    # the same global batches, the run ends where the run that keeps it ends.
    common = ["--virtual-device", "0:0.5,0:0.5,60:0.5", "--epochs", "2"]
    kept_log, out_log = tmp_path / "kept.jsonl", tmp_path / "out.jsonl"
    train(3, *common, "--log", str(kept_log))
    train(3, *common, "--zero-samples", "--probe-every", "4", "--log", str(out_log))
    kept, out = read_jsonl(kept_log), read_jsonl(out_log)
    plans = [plan for record in out for plan in record["plans"]]
    assert any(plan[2] == 0 for plan in plans), plans
    assert all(plan[2] > 0 for record in kept for plan in record["plans"])
    for a, b in zip(kept, out):  # only the float summation order differs
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=0.003)
    assert out[-1]["seconds"] < kept[-1]["seconds"]


@mpi
def test_main_job_reaches_97_percent_with_heterogeneous_ranks(tmp_path):
    """The README's main job (Makefile DEMO_FLAGS), checked end to end."""
    log = tmp_path / "run.jsonl"
    result = train(4, "--model", "cnn", "--slowdown", "1,1,1,3", "--epochs", "15",
                   "--global-batch", "64", "--lr", "0.1", "--log", str(log), timeout=300)
    records = read_jsonl(log)
    assert len(records) == 15
    assert records[-1]["accuracy"] >= 0.97, result.describe()
    first, last = records[0]["batch_sizes"], records[-1]["next_batch_sizes"]
    assert first == [16, 16, 16, 16]
    assert last[3] < min(last[:3]), last  # the slow rank got the smallest batch


def _assert_fails_alike(result, message, ranks):
    assert not result.timed_out, result.describe()
    assert result.returncode != 0, result.describe()
    for rank in range(ranks):
        text = "\n".join(result.rank_output.get(rank, []))
        assert "dbs-train: error:" in text and message in text, result.describe()


# Bad input, each with the whole message every rank of a 2-rank run prints after
# "dbs-train: error: " (and exits non-zero). Each is checked in one process by
# trainer.validate, which train runs on every rank; LAUNCHED ones under mpirun too.
BAD_INPUT = [
    (["--global-batch", "1"],
     "--global-batch 1 is smaller than the world size 2: every rank needs at least one "
     "sample per step; pass --global-batch of at least 2 or launch fewer ranks"),
    (["--global-batch", "0"],
     "the global batch must be a positive integer, got 0"),
    (["--global-batch", "-8"],
     "the global batch must be a positive integer, got -8"),
    (["--global-batch", "2000"],
     "the data set has 1438 samples, fewer than the global batch (--global-batch 2000): "
     "not one step could run. Pass --global-batch of at most 1438 or use more data"),
    (["--min-batch", "40"],
     "min_batch 40 x 2 ranks = 80 exceeds the global batch 64: lower min_batch to at "
     "most 32"),
    (["--max-batch", "10"],
     "max_batch 10 x 2 ranks = 20 is below the global batch 64: raise max_batch to at "
     "least 32"),
    (["--slowdown", "1,2,3"],
     "--slowdown gives 3 factors for 2 ranks: give one per rank (or a single value for "
     "all)"),
    (["--slowdown", "0.5,1"],
     "--slowdown factor for rank 0 is 0.5: factors must be >= 1"),
    (["--virtual-device", "fast,slow"],
     "--virtual-device takes OVERHEAD_MS:PER_SAMPLE_MS[:NEW_SIZE_MS] per rank, each a "
     "number >= 0, got 'fast'"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent"],
     "/nonexistent is not a CIFAR-10 python folder: missing data_batch_1, data_batch_2, "
     "data_batch_3, data_batch_4, data_batch_5, test_batch (expected the extracted "
     "cifar-10-batches-py directory)"),
    (["--device", "cuda"],
     "--device cuda was asked for, but torch sees no CUDA device here (CPU build of "
     "torch, or no GPU visible): use --device cpu"),
    (["--policy", "horovod", "--global-batch", "63"],
     "the plain Horovod baseline needs a global batch divisible by the 2 ranks, got 63"),
    (["--disturb", "q=0.2"],
     "--disturb takes p=P,factor=F,epochs=E; got 'q=0.2'"),
    (["--step-change", "5:10:2"],
     "--step-change rank 5 is outside a world of 2"),
    (["--plan", "40,20"],
     "plan (40, 20) sums to 60, not the global batch 64"),
    (["--plan", "64"],
     "plan for 1 ranks in a world of 2"),
    (["--plan", "a,b"],
     "--plan takes one local batch size per rank, comma-separated (e.g. 100,28), got "
     "'a,b'"),
    (["--policy", "horovod", "--plan", "32,32"],
     "--plan needs a DBS policy (plain Horovod splits the batch equally); use --policy "
     "static to keep a plan fixed"),
    (["--policy", "horovod", "--rebalance-log", "r.jsonl"],
     "--rebalance-log records DBS rebalances, and plain Horovod has none: use --policy "
     "dbs, paper or static"),
    (["--rebalance-budget", "2"],
     "rebalance_budget must be a fraction of the step time in [0, 1) (0: exactly every "
     "steps), got 2.0 (dbs-train's --rebalance-budget)"),
    (["--rebalance-min-seconds", "-1"],
     "rebalance_min_seconds must be a number of seconds >= 0, got -1.0 (dbs-train's "
     "--rebalance-min-seconds)"),
    (["--warmup-steps", "-1"],
     "warmup_steps must be a number of steps >= 0, got -1 (e.g. 10: the first 10 steps "
     "move the plan only for a 15% gain; 0: no warm-up)"),
    (["--max-deadband", "0.02"],
     "max_deadband (--max-deadband) is the ceiling of a band that starts at the deadband "
     "0.03: give at least 0.03, got 0.02"),
    (["--spread-steps", "-1"],
     "spread_steps (--spread-steps) must be a number of steps >= 0, got -1.0 (e.g. 8: a "
     "rank's spread counts once measured over 8 age-weighted steps)"),
    (["--slowdown-clock", "cpu", "--threads", "2"],
     "--slowdown-clock cpu needs --device cpu and --threads 1: only then is the calling "
     "thread's CPU time the step's work; use --slowdown-clock wall"),
    (["--batch-multiple", "24"],
     "batch multiple 24 does not divide the global batch 64: the local batches could not "
     "sum to it. Choose a multiple that divides it (e.g. 2, 4, 8, 16, 32, 64) or a "
     "global batch that is a multiple of 24"),
    (["--batch-multiple", "8", "--plan", "60,4"],
     "--plan 60,4 is not on the grid of --batch-multiple 8: give sizes that are "
     "multiples of it"),
    (["--batch-multiple", "64"],
     "on a grid of 64 samples the global batch 64 makes 1 multiples for 2 ranks, and "
     "with every rank's batch between 64 and 64 samples (the bounds rounded to the grid) "
     "no plan fits: lower the batch multiple or raise the global batch"),
    (["--max-batch", "20,20"],
     "the per-rank caps --max-batch (20, 20) sum to 40, below the global batch 64: the "
     "ranks cannot hold one global batch together; raise the caps, pass --global-batch "
     "of at most 40, or add ranks"),
    (["--max-batch", "40,40,40"],
     "--max-batch 40,40,40 gives 3 per-rank caps for 2 ranks: give one cap per rank, or "
     "one cap for all"),
    (["--max-batch", "52,12", "--plan", "32,32"],
     "plan (32, 32) gives rank 1 32 samples, outside [1, 12]"),
    (["--oom-recovery", "on", "--policy", "horovod"],
     "--oom-recovery on needs a DBS policy and --mode gradient: it lowers a rank's cap "
     "and trains the step again, which plain Horovod and --mode average cannot"),
    (["--oom-recovery", "on", "--elastic"],
     "--oom-recovery on and per-rank --max-batch caps are not available with --elastic "
     "(the ranks change): give one --max-batch for all ranks, or run without --elastic"),
    (["--zero-samples", "--mode", "average"],
     "--zero-samples needs a DBS policy and --mode gradient, without --elastic: a rank "
     "given 0 samples joins the weighted gradient allreduce with weight 0"),
    # Flag checks that train runs before Horovod starts.
    (["--read-log", "reads"],
     "--read-log records elastic runs: add --elastic (and launch with horovodrun "
     "--host-discovery-script)"),
    (["--resume"],
     "--resume needs --checkpoint-dir (the folder of the run to continue)"),
]

# One check before Horovod starts, one of the world size, one of the data set.
LAUNCHED = [["--policy", "horovod", "--plan", "32,32"], ["--global-batch", "1"],
            ["--global-batch", "2000"]]


def _case_id(args):
    return " ".join(args)


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[_case_id(a) for a, _ in BAD_INPUT])
def test_bad_input_is_refused_with_dbs_trains_message(args, message):
    if args == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    config = train_config(["--epochs", "1", *args])
    with pytest.raises(USER_ERRORS) as caught:  # reported in one line, not a traceback
        validate(config, world_size=2)
    assert error_line(caught.value) == f"dbs-train: error: {message}"


def test_bad_flag_values_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as caught:
        train_config(["--epochs", "0"])
    assert caught.value.code == 2
    assert "dbs-train: error: argument --epochs: must be a positive integer, got 0" in (
        capsys.readouterr().err)


def test_max_batch_takes_one_cap_or_one_per_rank(capsys):
    assert train_config(["--max-batch", "40"]).max_batch == 40
    assert train_config(["--max-batch", "40,24"]).max_batch == "40,24"
    validate(train_config(["--max-batch", "40,24"]), world_size=2)
    with pytest.raises(SystemExit):
        train_config(["--max-batch", "40,0"])
    assert ("argument --max-batch: --max-batch takes one positive cap for every rank (e.g. 64) "
            "or one per rank, comma-separated (e.g. 40,80,80), got '40,0'") in capsys.readouterr().err


def test_plan_for_and_spread_steps_reach_the_dbs_policy():
    from dbs_hvd.train.trainer import make_run_policy

    policy = make_run_policy(train_config(["--plan-for", "mean", "--spread-steps", "3"]))
    assert (policy.spread_aware, policy.spread_steps) == (False, 3.0)
    assert make_run_policy(train_config([])).spread_aware
    with pytest.raises(ValueError, match="--plan-for must be slowest or mean, got 'max'"):
        validate(dataclasses.replace(train_config([]), plan_for="max"), world_size=2)


@pytest.mark.parametrize("field, flag", [("oom_recovery", "--oom-recovery"),
                                         ("discount_new_sizes", "--discount-new-sizes")])
def test_auto_on_off_settings_are_checked_by_name(field, flag):
    # A TrainConfig built in Python (not by the parser) is checked as well.
    with pytest.raises(ValueError, match=f"{flag} must be auto, on or off, got 'yes'"):
        validate(dataclasses.replace(train_config([]), **{field: "yes"}), world_size=2)


def test_good_settings_pass_validation():
    validate(train_config(["--epochs", "1"]), world_size=2)
    validate(train_config(["--policy", "horovod", "--global-batch", "64"]), world_size=4,
             dataset_size=1000)
    validate(train_config(["--batch-multiple", "8", "--plan", "48,16", "--slowdown", "1,3"]),
             world_size=2, dataset_size=1000)


@mpi
@pytest.mark.parametrize("args", LAUNCHED, ids=[_case_id(a) for a in LAUNCHED])
def test_bad_input_fails_on_every_rank_without_hanging(args):
    message = dict((_case_id(a), m) for a, m in BAD_INPUT)[_case_id(args)]
    result = run_job(DBS_TRAIN + ["--epochs", "1"] + args, np=2, timeout=120)
    _assert_fails_alike(result, message, ranks=2)
    for rank in range(2):
        errors = [line for line in result.rank_output.get(rank, [])
                  if line.startswith("dbs-train: error:")]
        assert errors == [f"dbs-train: error: {message}"], result.describe()


@mpi
def test_ranks_started_with_different_settings_fail_together():
    # One launch, three settings that differ: every rank names each of them.
    differing = [("--global-batch", "64", "32"), ("--seed", "1", "2"), ("--batch-multiple", "8", "16")]
    argv = mpmd_argv(DBS_TRAIN + ["--epochs", "1"] + [v for f, a, _ in differing for v in (f, a)],
                     DBS_TRAIN + ["--epochs", "1"] + [v for f, _, b in differing for v in (f, b)])
    result = run_argv(argv, timeout=120)
    _assert_fails_alike(result, "different settings", ranks=2)
    for flag, a, b in differing:
        key = flag.removeprefix("--").replace("-", "_")
        _assert_fails_alike(result, f"{key}: rank 0={int(a)!r}, rank 1={int(b)!r}", ranks=2)


def _params(path):
    import torch

    return torch.load(path, weights_only=True)["model"]


RESUME_RUN = ["--virtual-device", "0:0.5,0:1", "--global-batch", "64"]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """The checkpoint folder of one uninterrupted 2-epoch run of RESUME_RUN per policy.

    Its ckpt-000000.pt is also what a run stopped after its first epoch leaves:
    the first epoch does not depend on the epoch count (constant learning rate),
    and the count may change between a run and its resumption (checkpoint.
    RESUMABLE_CHANGES; the refusal test below resumes with --epochs 3).
    """
    folders = {}

    def run(policy):
        if policy not in folders:
            folder = tmp_path_factory.mktemp(f"whole_{policy}")
            train(2, *RESUME_RUN, "--policy", policy, "--epochs", "2", "--checkpoint-dir",
                  str(folder))
            folders[policy] = folder
        return folders[policy]

    return run


@mpi
@pytest.mark.parametrize("policy, tolerance", [("static", 0.0), ("dbs", 1e-4)])
def test_resume_continues_as_if_never_interrupted(tmp_path, uninterrupted_run, policy, tolerance):
    """Epoch 2 after a resume equals epoch 2 of an uninterrupted run.

    The interrupted run is the uninterrupted one's first epoch: its epoch-0
    checkpoint alone, in a folder of its own, resumed to 2 epochs. With a fixed
    plan the arithmetic is identical (exact equality); with a moving plan only
    the float summation order differs.
    """
    import shutil

    import torch

    whole, split = uninterrupted_run(policy), tmp_path / "split"
    split.mkdir()
    shutil.copy(whole / "ckpt-000000.pt", split / "ckpt-000000.pt")
    result = train(2, *RESUME_RUN, "--policy", policy, "--epochs", "2", "--checkpoint-dir",
                   str(split), "--resume")
    assert "resumed from" in "\n".join(result.rank_output.get(0, []))
    assert "at epoch 1" in "\n".join(result.rank_output.get(0, []))
    a, b = _params(whole / "ckpt-000001.pt"), _params(split / "ckpt-000001.pt")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=tolerance, atol=tolerance,
                                   msg=f"parameter {name}")


@mpi
def test_resume_refuses_a_different_configuration_and_a_damaged_file(tmp_path, uninterrupted_run):
    import shutil

    from dbs_hvd.train import checkpoint

    folder = tmp_path / "ckpt"
    shutil.copytree(uninterrupted_run("static"), folder)
    static = [*RESUME_RUN, "--policy", "static", "--epochs", "3", "--checkpoint-dir", str(folder),
              "--resume"]
    changed = run_job(DBS_TRAIN + static + ["--seed", "9"], np=2, timeout=120)
    _assert_fails_alike(changed, "different configuration (seed: checkpoint 0, now 9)", ranks=2)
    newest = checkpoint.list_checkpoints(folder)[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    damaged = run_job(DBS_TRAIN + static, np=2, timeout=120)
    _assert_fails_alike(damaged, "cannot be read as a dbs_hvd checkpoint", ranks=2)
    # No checkpoint at all, in one process: the call dbs-train's --resume makes
    # (load_latest, read on rank 0 and its error shared with every rank, as the
    # two launched cases show) and the one-line error dbs-train prints for it.
    with pytest.raises(USER_ERRORS) as caught:
        checkpoint.load_latest(tmp_path / "none")
    assert error_line(caught.value).startswith("dbs-train: error: --resume found no checkpoint")


@mpi
def test_model_averaging_mode_trains(tmp_path):
    log = tmp_path / "run.jsonl"
    train(2, "--mode", "average", "--average-every", "4", "--slowdown", "1,3", "--epochs", "6",
          "--lr", "0.1", "--log", str(log))
    records = read_jsonl(log)
    assert records[-1]["accuracy"] >= 0.9
    assert all(sum(r["next_batch_sizes"]) == 64 for r in records)
