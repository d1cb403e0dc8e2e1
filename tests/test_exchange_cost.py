"""benchmarks/exchange_cost.py: the per-call arithmetic, and one tiny real job under mpirun."""
import json

import pytest

from benchmarks.exchange_cost import STEPS, VARIANTS, main, markdown, summarise


def test_extra_time_per_call_is_taken_within_each_round_after_start_up():
    calls = STEPS // 2
    # Round 3 runs twice as slow overall; start-up rounds 0-1 are left out.
    rounds = [{v: 9.0 for v in VARIANTS}] * 2 + [
        {"none": 0.30, "block": 0.30 + calls * 0.002, "poll": 0.30 + calls * 0.0005,
         "poll, no spin": 0.31, "sleep": 0.33},
        {"none": 0.60, "block": 0.60 + calls * 0.002, "poll": 0.60 + calls * 0.0005,
         "poll, no spin": 0.61, "sleep": 0.63},
    ]
    self_timed = {v: [0.0002, 0.0003, 0.0004] for v in VARIANTS}
    summary = summarise(rounds, self_timed)
    assert summary["block"]["extra_ms_per_call"] == pytest.approx(2.0)
    assert summary["poll"]["extra_ms_per_call"] == pytest.approx(0.5)
    assert summary["block"]["self_timed_ms"] == pytest.approx(0.3)
    assert "| block | 2.00 | 0.30 |" in markdown(summary, "header")


@pytest.mark.mpi
def test_a_tiny_job_reports_every_variant(tmp_path):
    assert main(["--rounds", "3", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["summary"]) == set(VARIANTS[1:])
    assert result["default_wait"] in ("block", "poll")
    assert all(row["self_timed_ms"] > 0 for row in result["summary"].values())
