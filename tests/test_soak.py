"""Soak: 200 short epochs with seeded disturbances, no memory growth, valid plans, no stall."""
import pytest

from benchmarks.soak import run_soak

pytestmark = pytest.mark.mpi


def test_200_disturbed_epochs_keep_memory_flat_and_every_plan_valid(tmp_path):
    result = run_soak(epochs=200, np=2, timeout=400, workdir=str(tmp_path))
    assert not result.timed_out and result.returncode == 0, result.output_tail
    assert result.epochs_logged == 200, result.output_tail
    assert result.plan_violations == []
    assert result.distinct_plans >= 10, "the disturbances should keep the plan moving"
    growth = result.growth(warmup=0.1)
    assert len(growth) == 2, f"expected 2 rank processes sampled, got {result.rss_mb.keys()}"
    assert all(value < 0.05 for value in growth.values()), growth
