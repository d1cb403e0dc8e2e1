"""benchmarks/no_harm.py: ratios, copies by name, and one real (tiny) job under mpirun."""
import json

import pytest

from benchmarks.no_harm import (
    CONTROL, GRID_8, PLAIN, Setup, markdown, parse_copies, run_setup, summarise,
)

# The rotation of copies from round to round is hetero.rotation, tested in test_hetero.py.


def test_ratios_are_taken_within_each_round_after_the_first():
    # The machine is twice as slow in round 2: a ratio within the round removes that.
    rounds = [{PLAIN: 9.0, CONTROL: 1.0, "dbs": 1.0},  # start-up round: left out
              {PLAIN: 1.0, CONTROL: 1.1, "dbs": 1.0},
              {PLAIN: 2.0, CONTROL: 2.0, "dbs": 2.2},
              {PLAIN: 1.0, CONTROL: 0.9, "dbs": 1.05}]
    summary = summarise(rounds)
    assert list(summary) == [PLAIN, CONTROL, "dbs"]
    assert summary["dbs"]["median"] == pytest.approx(1.05)
    assert summary[CONTROL]["median"] == pytest.approx(1.0)
    assert summary[PLAIN]["median"] == 1.0 and summary["dbs"]["rounds"] == 3
    assert summary["dbs"]["q1"] <= summary["dbs"]["median"] <= summary["dbs"]["q3"]
    table = markdown({"s": {"summary": summary}})
    assert "| s | dbs | 1.050 |" in table


@pytest.mark.mpi
def test_a_tiny_job_trains_every_copy_in_every_round(tmp_path):
    setup = Setup("tiny MLP", 2, ["--model", "mlp", "--hidden", "16", "--samples", "640"],
                  rounds=3, copies=(PLAIN, CONTROL, "static", "dbs", GRID_8,
                                    "static every 5 steps"))
    result = run_setup(setup, tmp_path, timeout=120)
    assert len(result["rounds"]) == 3
    for times in result["rounds"]:
        assert set(times) == set(setup.copies) and all(t > 0 for t in times.values())
    assert set(result["summary"]) == set(setup.copies)
    json.dumps(result)  # what main() writes


def test_copies_are_chosen_by_name_with_plain_horovod_first():
    assert parse_copies("static, dbs,static every 2 steps") == \
        (PLAIN, "static", "dbs", "static every 2 steps")
    assert parse_copies(f"dbs,{PLAIN}") == (PLAIN, "dbs")
    with pytest.raises(SystemExit, match=r"unknown copies \['dbs2'\].*static on the dbs schedule"):
        parse_copies("static,dbs2")
    with pytest.raises(SystemExit, match="a copy named twice"):
        parse_copies("dbs,dbs")
