"""The hetero benchmark's run order (the pure part; the runs themselves are benchmarks)."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from benchmarks.hetero import HOROVOD_AGAIN, POLICY_FLAGS, rotation, scenarios


@given(n=st.integers(1, 8))
def test_rotation_puts_every_policy_in_every_position_once_per_cycle(n):
    policies = [f"p{i}" for i in range(n)]
    orders = [rotation(policies, repeat) for repeat in range(n)]
    for order in orders:
        assert sorted(order) == policies
    for position in range(n):
        assert sorted(order[position] for order in orders) == policies


def test_no_harm_scenarios_carry_their_noise_floor():
    assert POLICY_FLAGS[HOROVOD_AGAIN] == ["--policy", "horovod"]
    no_harm = [s for s in scenarios(quick=False) if s.name.startswith(("equal", "allreduce"))]
    assert no_harm and all(HOROVOD_AGAIN in s.policies for s in no_harm)
