"""dbs-plan (dbs_hvd/train/whatif.py): what-if planning from a rebalance log.

Synthetic logs come from a known step-cost model, so the right answer is known;
one test runs dbs-train under mpirun for a real log and runs dbs-plan on it.
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbs_hvd import Bounds
from dbs_hvd.train.whatif import (
    RebalanceLogError,
    StepCostModel,
    best_plan,
    fit_cost_model,
    plan_main,
    read_rebalance_log,
    what_if,
)
from tests.harness import train_or_fail

mpi = pytest.mark.mpi


def window(overhead, per_sample, plan, steps=10):
    """Every rank's window under ``plan`` on devices of a known step cost, noiseless."""
    compute = [a + c * b for a, c, b in zip(overhead, per_sample, plan)]
    step = max(compute)
    return [
        {"samples": b * steps, "compute_seconds": t * steps, "steps": steps,
         "wait_seconds": (step - t) * steps}
        for b, t in zip(plan, compute)
    ]


def synthetic_log(overhead, per_sample, plans, policy=None):
    """One record per plan change, as dbs-train --rebalance-log writes them."""
    records = []
    for epoch, (before, after) in enumerate(zip(plans, plans[1:])):
        records.append({
            "epoch": epoch, "step": 10 * epoch + 9, "ranks": window(overhead, per_sample, before),
            "plan_before": list(before), "plan_after": list(after), "start_step": 10 * epoch + 10,
            "extra": {"interval": None, "policy": policy},
        })
    return records


def write_log(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# Rank 1 costs 3x per sample; rank 2 has a large fixed cost per step (the slowest at an
# equal share: 50 + 21 ms against 64 ms).
OVERHEAD, PER_SAMPLE = [0.0, 0.0, 0.050], [0.001, 0.003, 0.001]
PLANS = [(22, 21, 21), (40, 16, 8), (44, 14, 6), (46, 12, 6)]
# The model as the dbs policy logs it (extra.policy of each record).
LOGGED = {"overhead_seconds": OVERHEAD, "per_sample_seconds": PER_SAMPLE}


def test_the_model_is_refitted_from_the_windows_when_the_log_holds_none():
    # A small overhead on rank 2, batch sizes spread enough for the policy's fit to see it.
    overhead = [0.0, 0.0, 0.002]
    model = fit_cost_model(synthetic_log(overhead, PER_SAMPLE, [(22, 21, 21), (40, 14, 10),
                                                                (44, 12, 8)]))
    assert model.source == "refit"
    np.testing.assert_allclose(model.overhead, overhead, atol=1e-9)
    np.testing.assert_allclose(model.per_sample, PER_SAMPLE, rtol=1e-9)


def test_the_policys_logged_model_is_used_unless_refit_is_asked():
    logged = {"overhead_seconds": [0.0, 0.0, 0.0], "per_sample_seconds": [0.002, 0.002, 0.002]}
    records = synthetic_log([0.0] * 3, PER_SAMPLE, PLANS, policy=logged)
    assert fit_cost_model(records).source == "policy"
    assert fit_cost_model(records).per_sample.tolist() == [0.002] * 3
    refit = fit_cost_model(records, refit=True)
    assert refit.source == "refit"
    np.testing.assert_allclose(refit.per_sample, PER_SAMPLE, rtol=1e-9)


def test_a_straggler_with_a_large_fixed_cost_does_not_pay_for_itself():
    answer = what_if(synthetic_log(OVERHEAD, PER_SAMPLE, PLANS, policy=LOGGED))
    names = [s.name for s in answer.scenarios]
    assert names == ["current", "best", "without rank 2", "without rank 1", "without rank 0",
                     "equal split"]
    without_2 = answer.scenario("without rank 2")
    assert without_2.batch_sizes == (48, 16, 0) and without_2.dropped_rank == 2
    # Without rank 2: 1 ms x 48 = 3 ms x 16 = 48 ms; with it, at least its 50 ms + 1 ms.
    assert without_2.step_seconds == pytest.approx(0.048)
    assert answer.scenario("best").step_seconds > without_2.step_seconds
    verdicts = answer.verdicts()
    assert verdicts[0].startswith("rank 2 does not pay for itself"), verdicts
    assert verdicts[1].startswith("rank 1 pays for itself"), verdicts
    report = answer.report()
    for expected in ("rebalance 3 of 3", "without rank 2", "[48, 16, 0]", "equal split",
                     "rank 2 does not pay for itself", "allreduce"):
        assert expected in report, report


def test_the_measured_window_is_reported_beside_the_prediction():
    answer = what_if(synthetic_log(OVERHEAD, PER_SAMPLE, PLANS, policy=LOGGED))
    assert answer.measured.batch_sizes == PLANS[-2]
    # Noiseless windows: the measured compute is the model's prediction for that plan.
    assert answer.measured.compute_seconds == pytest.approx(
        answer.model.step_seconds(PLANS[-2]))
    assert answer.measured.step_seconds == pytest.approx(answer.measured.compute_seconds)


costs = st.tuples(st.sampled_from([0.0, 0.002, 0.01]), st.floats(1e-4, 5e-3))


@settings(max_examples=60, deadline=None)
@given(st.lists(costs, min_size=2, max_size=3), st.integers(3, 18), st.data())
def test_the_best_plan_is_the_shortest_predicted_step_of_all_plans(ranks, global_batch, data):
    # Exhaustive over every plan for a few ranks and small batches.
    world = len(ranks)
    model = StepCostModel(np.array([a for a, _ in ranks]), np.array([c for _, c in ranks]),
                          "refit")
    best = best_plan(model, global_batch)
    assert sum(best) == global_batch and min(best) >= 1
    shortest = min(model.step_seconds(p) for p in itertools.product(
        range(1, global_batch + 1), repeat=world) if sum(p) == global_batch)
    assert model.step_seconds(best) == pytest.approx(shortest, rel=1e-12)
    # Without a rank: that rank gets nothing, the rest share the whole batch.
    dropped = data.draw(st.integers(0, world - 1))
    without = best_plan(model, global_batch, without=dropped)
    assert without[dropped] == 0 and sum(without) == global_batch
    assert all(b >= 1 for r, b in enumerate(without) if r != dropped)


@settings(max_examples=40, deadline=None)
@given(st.lists(costs, min_size=2, max_size=5), st.integers(10, 200), st.integers(1, 3),
       st.integers(0, 5))
def test_every_scenario_splits_the_global_batch_and_best_is_never_slower(
        ranks, global_batch, min_batch, drop):
    world = len(ranks)
    overhead, per_sample = [a for a, _ in ranks], [c for _, c in ranks]
    equal = [global_batch // world + (r < global_batch % world) for r in range(world)]
    plans = [equal, [max(min_batch, b + (-1) ** r * (b // 2)) for r, b in enumerate(equal)]]
    plans[1][0] += global_batch - sum(plans[1])
    if min(plans[1]) < min_batch or min_batch * world > global_batch:
        return
    answer = what_if(synthetic_log(overhead, per_sample, plans), bounds=Bounds(min_batch), drop=drop)
    best = answer.scenario("best")
    dropped = [s for s in answer.scenarios if s.dropped_rank is not None]
    assert len(dropped) == min(drop, world)
    for s in answer.scenarios:
        if s.batch_sizes:
            assert sum(s.batch_sizes) == global_batch and len(s.batch_sizes) == world
        if s.dropped_rank is None:
            assert best.step_seconds <= s.step_seconds * (1 + 1e-12)
        elif s.batch_sizes:
            assert s.batch_sizes[s.dropped_rank] == 0
    assert json.loads(json.dumps(answer.as_dict()))["global_batch"] == global_batch


def test_a_grid_logged_by_the_policy_is_kept():
    logged = {"overhead_seconds": [0.0, 0.0], "per_sample_seconds": [0.001, 0.003],
              "batch_multiple": 8}
    answer = what_if(synthetic_log([0.0, 0.0], [0.001, 0.003], [(32, 32), (48, 16)], logged))
    assert all(b % 8 == 0 for s in answer.scenarios if s.name != "equal split"
               for b in s.batch_sizes)
    assert answer.scenario("best").batch_sizes == (48, 16)
    assert any("grid of 8" in note for note in answer.notes)


def test_the_command_prints_the_table_and_json(tmp_path, capsys):
    log = write_log(tmp_path / "r.jsonl", synthetic_log(OVERHEAD, PER_SAMPLE, PLANS, LOGGED))
    assert plan_main([str(log), "--drop", "1"]) == 0
    text = capsys.readouterr().out
    assert "without rank 2" in text and "without rank 1" not in text
    assert plan_main([str(log), "--json", "--rebalance", "1"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["rebalance"] == 1 and answer["model"]["source"] == "policy"
    assert [s["name"] for s in answer["scenarios"]][:2] == ["current", "best"]


@pytest.mark.parametrize("args, content, message", [
    (["--rebalance", "4"], None, "--rebalance 4: "),
    (["--rebalance", "0"], None, "give 1 to 3, or -1 for the last"),
    (["--max-batch", "10"], None, "--max-batch 10 x 3 ranks = 30 is below the global batch 64"),
    ([], '{"epoch": 0, "loss": 1.0, "next_batch_sizes": [32, 32]}\n',
     "line 1 is an epoch record of dbs-train --log, not a rebalance"),
    ([], "not json\n", "line 1 is not JSON"),
    ([], "\n", "holds no rebalance"),
    ([], '{"ranks": [], "plan_before": [1], "plan_after": [1]}\n', "one window per rank"),
])
def test_bad_input_is_refused_in_one_line_naming_what_to_change(tmp_path, capsys, args, content,
                                                                message):
    log = tmp_path / "r.jsonl"
    if content is None:
        write_log(log, synthetic_log(OVERHEAD, PER_SAMPLE, PLANS))
    else:
        log.write_text(content)
    assert plan_main([str(log), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dbs-plan: error: ") and err.count("\n") == 1 and message in err, err


def test_a_missing_file_is_named(tmp_path, capsys):
    assert plan_main([str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl" in capsys.readouterr().err


def test_read_rebalance_log_raises_for_a_record_without_plans(tmp_path):
    log = tmp_path / "r.jsonl"
    log.write_text('{"ranks": []}\n')
    with pytest.raises(RebalanceLogError, match="needs ranks, plan_before and plan_after"):
        read_rebalance_log(log)


@mpi
def test_dbs_plan_reads_a_real_rebalance_log(tmp_path):
    # Virtual devices: rank 1 costs 3x per sample (2 ms and 6 ms).
    rebalances = tmp_path / "rebalances.jsonl"
    train_or_fail(2, "--virtual-device", "0:2,0:6", "--epochs", "2", "--global-batch", "64",
                  "--policy", "dbs", "--rebalance-log", str(rebalances))
    done = subprocess.run([sys.executable, "-m", "dbs_hvd.train.whatif", str(rebalances)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for expected in ("current", "best", "without rank 1", "without rank 0", "equal split",
                     "pays for itself"):
        assert expected in done.stdout, done.stdout
    done = subprocess.run([sys.executable, "-m", "dbs_hvd.train.whatif", str(rebalances),
                           "--json"], capture_output=True, text=True, timeout=120)
    answer = json.loads(done.stdout)
    assert answer["model"]["source"] == "policy" and answer["world_size"] == 2
    per_sample = answer["model"]["per_sample_seconds"]
    assert per_sample[1] > 2 * per_sample[0], answer["model"]
    steps = {s["name"]: s["step_seconds"] for s in answer["scenarios"]}
    assert steps["best"] < steps["equal split"], steps
    # Rank 1 is slower but still adds speed: without it the step is predicted longer.
    assert steps["without rank 1"] > steps["best"], steps
