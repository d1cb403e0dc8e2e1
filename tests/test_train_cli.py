"""dbs-train end to end under mpirun: plans converge, accuracy, bad input fails alike on all ranks."""
import subprocess
import sys

import numpy as np
import pytest

from dbs_hvd.metrics import read_jsonl
from dbs_hvd.testing import mpmd_argv, run_argv, run_job

pytestmark = pytest.mark.mpi
DBS_TRAIN = [sys.executable, "-m", "dbs_hvd.cli"]


def train(np_, *args, timeout=240):
    result = run_job(DBS_TRAIN + list(args), np=np_, timeout=timeout)
    if not result.ok:
        pytest.fail(result.describe(), pytrace=False)
    return result


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
    done = subprocess.run([sys.executable, "-m", "dbs_hvd.plot", str(log), "-o", str(png)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


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


def test_dbs_answers_a_step_change_within_the_same_epoch(tmp_path):
    # The plan must move inside epoch 0.
    log = tmp_path / "run.jsonl"
    train(2, *STEP_CHANGE_RUN, "--epochs", "1", "--log", str(log))
    (record,) = read_jsonl(log)
    plans = record["plans"]
    assert plans[0] == [32, 32]
    assert len(plans) > 1, plans
    np.testing.assert_allclose(np.array(plans[-1]) / 64, [0.75, 0.25], atol=0.06)


def test_the_rebalance_log_says_when_and_why_the_plan_moved(tmp_path):
    # The step change above, with --rebalance-log: one line per rebalance, in
    # order, each plan following from the one before, and the move that
    # answered the change explained by the costs the policy fitted.
    log, rebalances = tmp_path / "run.jsonl", tmp_path / "rebalances.jsonl"
    train(2, *STEP_CHANGE_RUN, "--epochs", "2", "--log", str(log),
          "--rebalance-log", str(rebalances))
    epochs, records = read_jsonl(log), read_jsonl(rebalances)
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


def test_static_policy_keeps_the_equal_split(tmp_path):
    log = tmp_path / "run.jsonl"
    train(2, "--policy", "static", "--slowdown", "1,3", "--epochs", "2", "--log", str(log))
    assert all(r["next_batch_sizes"] == [32, 32] for r in read_jsonl(log))


def test_static_policy_keeps_a_given_plan(tmp_path):
    log = tmp_path / "run.jsonl"
    train(2, "--policy", "static", "--plan", "48,16", "--slowdown", "1,3", "--epochs", "2",
          "--log", str(log))
    records = read_jsonl(log)
    assert all(r["batch_sizes"] == r["next_batch_sizes"] == [48, 16] for r in records)
    assert records[0]["samples"][0] == 3 * records[0]["samples"][1]


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


@pytest.mark.parametrize("args, message", [
    (["--global-batch", "1"], "smaller than the world size"),
    (["--global-batch", "0"], "positive integer"),
    (["--global-batch", "-8"], "positive integer"),
    (["--global-batch", "2000"], "fewer than the global batch"),
    (["--min-batch", "40"], "exceeds the global batch"),
    (["--max-batch", "10"], "is below the global batch"),
    (["--slowdown", "1,2,3"], "3 factors for 2 ranks"),
    (["--slowdown", "0.5,1"], "factors must be >= 1"),
    (["--virtual-device", "fast,slow"], "OVERHEAD_MS:PER_SAMPLE_MS"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "missing data_batch_1"),
    (["--device", "cuda"], "no CUDA device"),
    (["--policy", "horovod", "--global-batch", "63"], "divisible by the 2 ranks"),
    (["--disturb", "q=0.2"], "--disturb takes"),
    (["--step-change", "5:10:2"], "outside a world of 2"),
    (["--plan", "40,20"], "sums to 60, not the global batch 64"),
    (["--plan", "64"], "plan for 1 ranks in a world of 2"),
    (["--plan", "a,b"], "--plan takes one local batch size per rank"),
    (["--policy", "horovod", "--plan", "32,32"], "--plan needs a DBS policy"),
    (["--policy", "horovod", "--rebalance-log", "r.jsonl"], "plain Horovod has none"),
    (["--rebalance-budget", "2"], "rebalance_budget must be a fraction"),
    (["--rebalance-min-seconds", "-1"], "rebalance_min_seconds must be a number of seconds"),
    (["--warmup-steps", "-1"], "warmup_steps must be a number of steps >= 0"),
    (["--max-deadband", "0.02"], "starts at the deadband 0.03: give at least 0.03"),
    (["--slowdown-clock", "cpu", "--threads", "2"], "--slowdown-clock cpu needs --device cpu"),
    (["--batch-multiple", "24"], "batch multiple 24 does not divide the global batch 64"),
    (["--batch-multiple", "8", "--plan", "60,4"], "not on the grid of --batch-multiple 8"),
    (["--batch-multiple", "64"], "makes 1 multiples for 2 ranks"),
])
def test_bad_input_fails_on_every_rank_without_hanging(args, message):
    result = run_job(DBS_TRAIN + ["--epochs", "1"] + args, np=2, timeout=120)
    _assert_fails_alike(result, message, ranks=2)


@pytest.mark.parametrize("setting, a, b", [("--global-batch", "64", "32"), ("--seed", "1", "2"),
                                            ("--batch-multiple", "8", "16")])
def test_ranks_started_with_different_settings_fail_together(setting, a, b):
    argv = mpmd_argv(DBS_TRAIN + ["--epochs", "1", setting, a],
                     DBS_TRAIN + ["--epochs", "1", setting, b])
    result = run_argv(argv, timeout=120)
    _assert_fails_alike(result, "different settings", ranks=2)


def _params(path):
    import torch

    return torch.load(path, weights_only=True)["model"]


@pytest.mark.parametrize("policy, tolerance", [("static", 0.0), ("dbs", 1e-4)])
def test_resume_continues_as_if_never_interrupted(tmp_path, policy, tolerance):
    """Epoch 2 after a resume equals epoch 2 of an uninterrupted run.

    With a fixed plan the arithmetic is identical (exact equality); with a
    moving plan only the float summation order differs.
    """
    import torch

    common = ["--virtual-device", "0:0.5,0:1", "--global-batch", "64", "--policy", policy]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(2, *common, "--epochs", "2", "--checkpoint-dir", str(whole))
    train(2, *common, "--epochs", "1", "--checkpoint-dir", str(split))
    result = train(2, *common, "--epochs", "2", "--checkpoint-dir", str(split), "--resume")
    assert "resumed from" in "\n".join(result.rank_output.get(0, []))
    a, b = _params(whole / "ckpt-000001.pt"), _params(split / "ckpt-000001.pt")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=tolerance, atol=tolerance,
                                   msg=f"parameter {name}")


def test_resume_refuses_a_different_configuration_and_a_damaged_file(tmp_path):
    folder = tmp_path / "ckpt"
    train(2, "--epochs", "1", "--policy", "static", "--checkpoint-dir", str(folder))
    changed = run_job(DBS_TRAIN + ["--epochs", "2", "--policy", "static", "--seed", "9",
                                   "--checkpoint-dir", str(folder), "--resume"], np=2, timeout=120)
    _assert_fails_alike(changed, "different configuration (seed: checkpoint 0, now 9)", ranks=2)
    (newest,) = folder.glob("ckpt-*.pt")
    newest.write_bytes(newest.read_bytes()[:100])
    damaged = run_job(DBS_TRAIN + ["--epochs", "2", "--policy", "static",
                                   "--checkpoint-dir", str(folder), "--resume"], np=2, timeout=120)
    _assert_fails_alike(damaged, "cannot be read as a dbs_hvd checkpoint", ranks=2)
    missing = run_job(DBS_TRAIN + ["--epochs", "2", "--checkpoint-dir", str(tmp_path / "none"),
                                   "--resume"], np=2, timeout=120)
    _assert_fails_alike(missing, "found no checkpoint", ranks=2)


def test_model_averaging_mode_trains(tmp_path):
    log = tmp_path / "run.jsonl"
    train(2, "--mode", "average", "--average-every", "4", "--slowdown", "1,3", "--epochs", "6",
          "--lr", "0.1", "--log", str(log))
    records = read_jsonl(log)
    assert records[-1]["accuracy"] >= 0.9
    assert all(sum(r["next_batch_sizes"]) == 64 for r in records)
