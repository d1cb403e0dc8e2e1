"""benchmarks/external.py: the real-heterogeneity family's plans and arithmetic."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import external


@given(shares=st.lists(st.floats(0.05, 4), min_size=1, max_size=6), batch=st.integers(8, 512))
def test_nominal_plan_sums_to_the_global_batch_and_follows_the_shares(shares, batch):
    scenario = external.ExternalScenario("s", len(shares), [], shares, [], global_batch=batch)
    plan = scenario.nominal_plan()
    assert sum(plan) == batch
    total = sum(shares)
    assert all(abs(b - batch * s / total) < 1 for b, s in zip(plan, shares))


def test_shifted_moves_samples_to_the_first_rank_and_keeps_one():
    assert external.shifted([51, 13], 4) == [55, 9]
    assert external.shifted([62, 2], 4) == [63, 1]
    assert external.shifted([42, 18, 3], 6, source=1) == [48, 12, 3]


def test_every_scenario_compares_plain_horovod_paper_and_dbs_or_is_a_control():
    for scenario in external.scenarios(quick=False):
        assert "horovod" in scenario.policies and "dbs" in scenario.policies
        assert len(scenario.spec) >= 2
    quotas = [s for s in external.scenarios(quick=False) if "--share" in s.spec]
    periods = {s.spec[s.spec.index("--period-ms") + 1] for s in quotas if "--period-ms" in s.spec}
    assert {"10", "100"} <= periods


def run(policy, repeat, seconds, plans=None, cpu=(1.0, 1.0)):
    epochs = [{"seconds": s, "plans": p, "next_batch_sizes": p[-1], "accuracy": 0.9}
              for s, p in zip(seconds, plans or [[[32, 32]]] * len(seconds))]
    return external.Run("s", policy, repeat, epochs, [{"cpu_seconds": c} for c in cpu])


def test_summary_ratios(monkeypatch):
    monkeypatch.setattr(external, "train_size", lambda workload: 640)
    scenario = external.ExternalScenario("s", 2, ["--share", "1,1"], [1, 1],
                                         ["horovod", "dbs", "fixed 40,24"], epochs=2)
    runs = [run("horovod", 0, [2, 2]), run("horovod", 1, [3, 3]),
            run("dbs", 0, [1, 1], [[[32, 32], [40, 24]], [[40, 24]]]), run("dbs", 1, [2, 1]),
            run("fixed 40,24", 0, [1.5, 1.5]), run("fixed 40,24", 1, [1.5, 1.5])]
    rows = external.summarise(scenario, runs, speeds=[320.0, 320.0])
    assert rows["horovod"]["time_vs_horovod"] == 1.0
    assert rows["dbs"]["time_vs_horovod"] == pytest.approx(2.5 / 5)
    assert rows["dbs"]["paired_vs_horovod"] == pytest.approx((2 / 4 + 3 / 6) / 2)
    # ideal: 2 epochs x 640 samples over 640 samples/s = 2 s
    assert rows["dbs"]["time_vs_ideal"] == pytest.approx(2.5 / 2)
    assert rows["dbs"]["time_vs_best_fixed"] == pytest.approx(2.5 / 3)
    assert rows["dbs"]["moves_per_epoch"] == 0.0  # moves after the first epoch only


def test_a_move_at_an_epochs_end_counts_as_a_move():
    assert external.epoch_moves({"plans": [[32, 32]], "next_batch_sizes": [32, 32]}) == 0
    assert external.epoch_moves({"plans": [[32, 32]], "next_batch_sizes": [30, 34]}) == 1
    assert external.epoch_moves({"plans": [[32, 32], [40, 24]], "next_batch_sizes": [41, 23]}) == 2
    assert external.epoch_moves({"plans": [], "batch_sizes": [32, 32], "next_batch_sizes": [32, 32]}) == 0
    moving = run("dbs", 0, [1, 1, 1], [[[32, 32]], [[32, 32]], [[40, 24]]])
    moving.epochs[1]["next_batch_sizes"] = [40, 24]
    assert moving.moves_per_epoch == 0.5  # epochs 1 and 2: one move, at epoch 1's end


def test_merge_joins_jobs_in_scenario_order_and_the_last_part_wins(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(external, "plot", lambda runs, scenarios, path: path.write_bytes(b"png"))
    names = [s.name for s in external.scenarios(quick=False)]
    first, second = names[1], names[0]

    def part(folder, name, seconds):
        scenario = external.ExternalScenario(name, 2, ["--share", "1,1"], [1, 1], ["horovod"])
        row = {"time_vs_horovod": 1.0, "paired_vs_horovod": 1.0, "paired_range": [1.0, 1.0],
               "time_vs_ideal": seconds, "moves_per_epoch": 0.0, "cpu_seconds": [1.0, 2.0],
               "final_plan": [32, 32], "final_accuracy": 0.9, "totals": [seconds]}
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({
            "summary": {name: {"horovod": row}}, "speeds": {name: [1.0, 1.0]},
            "runs": [run("horovod", 0, [seconds]).__dict__ | {"scenario": name}],
            "scenarios": [scenario.__dict__]}))
        return folder

    parts = [part(tmp_path / "a", first, 2.0), part(tmp_path / "b", second, 3.0),
             part(tmp_path / "c", first, 5.0)]
    external.merge(parts, tmp_path / "out")
    merged = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(merged["summary"]) == [second, first]  # the family's order
    assert merged["summary"][first]["horovod"]["time_vs_ideal"] == 5.0  # the last part's
    assert [r["scenario"] for r in merged["runs"]] == [second, first]
    table = (tmp_path / "out" / "results.md").read_text()
    assert table.index(second) < table.index(first) and "1.0, 2.0 |" in table
