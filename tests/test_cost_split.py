"""benchmarks/cost_split.py runs both variants interleaved under mpirun and reports them."""
import json
import math
import sys

import pytest

from tests.harness import run_job

pytestmark = pytest.mark.mpi


def test_cost_split_benchmark_reports_both_variants_in_alternating_order(tmp_path):
    out = tmp_path / "cost_split.json"
    command = [sys.executable, "-m", "benchmarks.cost_split", "--rounds", "3", "--steps", "3",
               "--samples", "512", "--max-len", "48", "--global-batch", "16",
               "--slowdown", "1,2", "--out", str(out)]
    result = run_job(command, np=2, timeout=300)
    assert result.ok, result.describe()
    report = json.loads(out.read_text())
    order = [(row["round"], row["variant"]) for row in report["rows"]]
    assert order == [(0, "count"), (0, "cost"), (1, "cost"), (1, "count"), (2, "count"), (2, "cost")]
    for row in report["rows"]:
        assert row["seconds"] > 0 and 0 <= row["wait_share"] < 1, row
        assert sum(row["plan"]) == 16 and math.isfinite(row["loss"]), row
    ratios = report["summary"]["ratios"]
    assert len(ratios) == 2 and all(r > 0 for r in ratios)
    assert report["summary"]["cost_over_count"] == pytest.approx(sum(ratios) / 2)  # median of two
    text = "\n".join(result.rank_output.get(0, []))
    assert "cost / count, median over rounds 1-2" in text, text
