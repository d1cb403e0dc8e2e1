"""The hetero benchmark's run order (the pure part; the runs themselves are benchmarks)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.hetero import (HOROVOD_AGAIN, POLICY_FLAGS, RunResult, Scenario, markdown,
                               policy_flags, rotation, scenarios, summarise)


@given(n=st.integers(1, 8), start=st.integers(0, 20))
def test_rotation_puts_every_policy_in_every_position_once_per_cycle(n, start):
    # Any n consecutive repeats (or no_harm's rounds) form a full cycle.
    policies = [f"p{i}" for i in range(n)]
    orders = [rotation(policies, start + repeat) for repeat in range(n)]
    for order in orders:
        assert sorted(order) == policies
    for position in range(n):
        assert sorted(order[position] for order in orders) == policies


def test_no_harm_scenarios_carry_their_noise_floor():
    assert POLICY_FLAGS[HOROVOD_AGAIN] == ["--policy", "horovod"]
    no_harm = [s for s in scenarios(quick=False) if s.name.startswith(("equal", "allreduce"))]
    assert no_harm and all(HOROVOD_AGAIN in s.policies for s in no_harm)


def _run(scenario, policy, seconds):
    result = RunResult(scenario.name, policy, 0)
    result.epochs = [{"seconds": seconds, "efficiency": float("nan"), "accuracy": 0.5,
                      "next_batch_sizes": [32, 32]}]
    return result


def test_untimed_scenarios_report_no_time_ratio():
    timed = Scenario("timed", 2, [], ["horovod", "dbs"], epochs=1)
    untimed = Scenario("untimed", 2, [], ["horovod", "dbs"], epochs=1, timed=False)
    results = [_run(s, p, t) for s in (timed, untimed) for p, t in (("horovod", 2.0), ("dbs", 1.0))]
    summary = {s.name: summarise(s, results) for s in (timed, untimed)}
    assert summary["timed"]["dbs"]["time_vs_horovod"] == 0.5
    assert summary["untimed"]["dbs"]["time_vs_horovod"] is None
    table = markdown(summary, [timed, untimed])
    assert "| timed | dbs | 0.500 | 0.500 |" in table
    assert "| untimed | dbs | n/a | n/a |" in table
    assert all(s.timed is False for s in scenarios(quick=False) if s.name.startswith("accuracy"))


def test_paired_ratio_divides_by_the_same_repeat_s_plain_runs():
    scenario = Scenario("s", 2, [], ["horovod", "dbs", HOROVOD_AGAIN], epochs=1)
    # The machine is twice as slow in repeat 1: pairing removes that.
    times = {(0, "horovod"): 1.0, (0, HOROVOD_AGAIN): 1.2, (0, "dbs"): 1.1,
             (1, "horovod"): 2.0, (1, HOROVOD_AGAIN): 2.4, (1, "dbs"): 2.2}
    results = []
    for (repeat, policy), seconds in times.items():
        run = _run(scenario, policy, seconds)
        run.repeat = repeat
        results.append(run)
    rows = summarise(scenario, results)
    assert rows["dbs"]["paired_vs_horovod"] == pytest.approx(1.0)
    assert rows[HOROVOD_AGAIN]["paired_vs_horovod"] == pytest.approx(1.2 / 1.1)
    assert rows["dbs"]["time_vs_horovod"] == pytest.approx(1.65 / 1.5)  # drift included


def test_paired_range_spans_the_repeats_and_reaches_the_table():
    scenario = Scenario("s", 2, [], ["horovod", "dbs"], epochs=1)
    results = []
    for repeat, (plain, dbs) in enumerate([(1.0, 0.9), (2.0, 2.4), (1.0, 1.0)]):
        for policy, seconds in (("horovod", plain), ("dbs", dbs)):
            run = _run(scenario, policy, seconds)
            run.repeat = repeat
            results.append(run)
    rows = summarise(scenario, results)
    assert rows["dbs"]["paired_range"] == pytest.approx([0.9, 1.2])
    assert rows["dbs"]["paired_vs_horovod"] == pytest.approx(1.0)
    assert "| 1.000 | 0.900-1.200 |" in markdown({"s": rows}, [scenario])


def _slowest_step(devices, plan):
    return max(overhead + per_sample * batch
               for (overhead, per_sample, _), batch in zip(devices, plan))


def _balanced_step(devices, global_batch):
    """The shortest step any plan of at least one sample per rank reaches (brute force)."""
    candidates = sorted({overhead + per_sample * batch for overhead, per_sample, _ in devices
                         for batch in range(1, global_batch + 1)})
    for step in candidates:
        if sum(int((step - overhead) / per_sample + 1e-9) for overhead, per_sample, _ in devices
               if step >= overhead + per_sample) >= global_batch:
            return step
    raise AssertionError("no plan fits")


def test_virtual_scenarios_fixed_rows_are_the_balanced_plans():
    # The fixed rows of the sleep-only scenarios stand for the known answer:
    # they must be a plan whose slowest step is the shortest any plan reaches.
    from dbs_hvd.train.emulate import parse_virtual_devices

    with_answer = [s for s in scenarios(quick=False) if "--virtual-device" in s.args
                   and any(policy.startswith("fixed ") for policy in s.policies)]
    assert len(with_answer) >= 2
    for scenario in with_answer:
        devices = parse_virtual_devices(
            scenario.args[scenario.args.index("--virtual-device") + 1], scenario.ranks)
        for policy in (p for p in scenario.policies if p.startswith("fixed ")):
            flags = policy_flags(policy)
            assert flags[:2] == ["--policy", "static"]
            plan = [int(b) for b in flags[flags.index("--plan") + 1].split(",")]
            assert len(plan) == scenario.ranks and sum(plan) == scenario.global_batch
            assert _slowest_step(devices, plan) == pytest.approx(
                _balanced_step(devices, scenario.global_batch)), (scenario.name, policy)
