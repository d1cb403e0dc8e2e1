"""Batch sizes on a grid of M samples (grid.py): pure plans, then dbs-train under mpirun."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbs_hvd.grid import GridPolicy, unit_bounds
from dbs_hvd.train.metrics import read_jsonl
from dbs_hvd.plan import Bounds, Plan, PlanError, WindowStats
from dbs_hvd.policies import make_policy
from tests.harness import train_or_fail


def window(plan: Plan, seconds_per_sample, overhead=0.0, steps: int = 4) -> WindowStats:
    """A window of ``steps`` steps at ``plan`` on devices of the given costs (synchronous wait)."""
    batch = np.asarray(plan.batch_sizes, dtype=float)
    step = overhead + np.asarray(seconds_per_sample) * batch
    return WindowStats(samples=batch * steps, compute_seconds=step * steps,
                       steps=np.full(len(batch), float(steps)),
                       wait_seconds=(step.max() - step + 0.001) * steps)


def test_bounds_in_units_round_inwards_and_bad_multiples_say_what_to_do():
    assert unit_bounds(128, 8, Bounds(min_batch=1)) == Bounds(1, None)
    assert unit_bounds(128, 8, Bounds(min_batch=9, max_batch=100)) == Bounds(2, 12)
    with pytest.raises(PlanError, match="does not divide the global batch 100.*e.g. 2, 4, 5"):
        unit_bounds(100, 8, Bounds())
    with pytest.raises(PlanError, match="max_batch 4 is below the batch multiple 8"):
        unit_bounds(128, 8, Bounds(max_batch=4))
    with pytest.raises(PlanError, match="positive integer"):
        unit_bounds(128, 0, Bounds())


def test_a_grid_too_coarse_for_the_ranks_is_an_error_in_samples():
    with pytest.raises(PlanError, match="global batch 64 makes 1 multiples for 2 ranks"):
        make_policy("dbs", 64, batch_multiple=64).initial_plan(2)
    with pytest.raises(PlanError, match="between 16 and 16 samples"):
        make_policy("paper", 64, Bounds(min_batch=9, max_batch=20), batch_multiple=8
                    ).initial_plan(2)


def test_the_first_plan_is_on_the_grid_and_an_off_grid_plan_is_snapped():
    policy = make_policy("dbs", 128, batch_multiple=8)
    assert isinstance(policy, GridPolicy) and policy.name == "dbs"
    assert policy.initial_plan(3) == Plan((48, 40, 40))
    assert make_policy("dbs", 128).initial_plan(3) == Plan((43, 43, 42))  # M=1: any size
    static = make_policy("static", 128, batch_multiple=8)
    plan = static.next_plan(window(Plan((43, 43, 42)), [1e-3] * 3), Plan((43, 43, 42)))
    assert plan == Plan((48, 40, 40))


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(["paper", "dbs", "static"]),
       multiple=st.sampled_from([2, 4, 8, 16]),
       ranks=st.integers(2, 6),
       units_per_rank=st.integers(1, 24),
       costs=st.lists(st.floats(1e-4, 1e-2), min_size=6, max_size=6),
       overhead=st.floats(0.0, 0.05),
       min_batch=st.integers(1, 20))
def test_every_plan_is_on_the_grid_sums_to_the_batch_and_keeps_the_bounds(
        name, multiple, ranks, units_per_rank, costs, overhead, min_batch):
    global_batch = multiple * ranks * units_per_rank
    bounds = Bounds(min_batch=min(min_batch, multiple * units_per_rank))
    policy = make_policy(name, global_batch, bounds, batch_multiple=multiple)
    plan = Plan.equal(global_batch, ranks, bounds)  # may be off the grid: the sampler's default
    for _ in range(4):
        plan = policy.next_plan(window(plan, costs[:ranks], overhead), plan)
        assert all(b % multiple == 0 for b in plan.batch_sizes), plan
        assert plan.global_batch == global_batch
        assert min(plan.batch_sizes) >= bounds.min_batch


@settings(max_examples=100, deadline=None)
@given(ranks=st.integers(2, 6), units_per_rank=st.integers(8, 64),
       speeds=st.lists(st.floats(1.0, 4.0), min_size=6, max_size=6))
def test_the_paper_rule_on_a_grid_is_within_one_multiple_of_its_free_plan(
        ranks, units_per_rank, speeds):
    multiple = 8
    global_batch = multiple * ranks * units_per_rank
    costs = [1e-3 / s for s in speeds[:ranks]]
    current = Plan.equal(global_batch, ranks)
    free = make_policy("paper", global_batch).next_plan(window(current, costs), current)
    grid = make_policy("paper", global_batch, batch_multiple=multiple).next_plan(
        window(current, costs), current)
    assert np.abs(np.subtract(grid.batch_sizes, free.batch_sizes)).max() <= multiple


@settings(max_examples=60, deadline=None)
@given(noise=st.lists(st.tuples(st.floats(0.95, 1.05), st.floats(0.95, 1.05)),
                      min_size=10, max_size=30),
       name=st.sampled_from(["paper", "dbs"]))
def test_noise_under_a_grid_step_never_moves_equal_ranks(noise, name):
    # Two equal ranks measured up to 5% apart: speed shares of at most 1.05/2.05,
    # 65.6 of 128 samples, which rounds back to 8 units of 8. Without the grid
    # the paper's rule follows the same noise by a few samples each window.
    policy = make_policy(name, 128, batch_multiple=8)
    plan = Plan((64, 64))
    for a, b in noise:
        plan = policy.next_plan(window(plan, [1e-3 * a, 1e-3 * b]), plan)
        assert plan == Plan((64, 64))


def test_a_policy_object_with_a_multiple_is_refused_with_the_way_to_build_one():
    from dbs_hvd.optim import dynamic_batch_state
    from dbs_hvd.sampler import DynamicBatchSampler

    sampler = DynamicBatchSampler(256, 64, rank=0, world_size=1)
    with pytest.raises(ValueError, match="make_policy"):
        dynamic_batch_state(sampler, make_policy("dbs", 64), None, None, None, batch_multiple=8)


@pytest.mark.mpi
def test_dbs_train_keeps_every_batch_on_the_grid_and_still_balances(tmp_path):
    # Per-sample costs 2 ms and 6 ms: the balance is 48,16 of 64, on the grid of 8.
    log = tmp_path / "run.jsonl"
    train_or_fail(2, "--virtual-device", "0:2,0:6", "--epochs", "2", "--global-batch", "64",
                  "--batch-multiple", "8", "--log", str(log))
    records = read_jsonl(log)
    plans = [plan for record in records for plan in record["plans"]]
    assert all(b % 8 == 0 for plan in plans for b in plan), plans
    assert records[-1]["next_batch_sizes"] == [48, 16], records[-1]
