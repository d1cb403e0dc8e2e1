"""emulate.py: slow devices scale the step's work; disturbances and step changes are seeded."""
import time

import numpy as np
import pytest
import torch

from dbs_hvd.train.emulate import (
    Disturbances, Slowdown, StepChange, VirtualDevice, make_emulator, parse_disturbances,
    parse_factors, parse_step_change,
)
from dbs_hvd.train.trainer import train_step


class FakeClock:
    """Returns the given readings in turn."""

    def __init__(self, *readings):
        self.readings = list(readings)

    def __call__(self):
        return self.readings.pop(0)


def test_a_slowdown_sleeps_f_minus_1_times_the_predicted_forward_and_backward():
    slept = []
    slow = Slowdown(3.0, sleep=slept.append)
    slow.before_backward(32, 0.01)  # backward assumed 2x forward until measured
    assert slept[-1] == pytest.approx(2 * 0.01 * 3)
    for _ in range(50):
        slow.after_backward(0.01, 0.01)  # measured: backward as long as forward
    slow.before_backward(32, 0.01)
    assert slept[-1] == pytest.approx(2 * 0.01 * 2, rel=1e-3)


def test_the_trainer_times_the_step_with_the_emulators_clock():
    # forward 2 s and backward 6 s on the emulator's clock: a 3x device sleeps
    # 2 x (2 + 2 x 2) = 12 s (backward predicted at the assumed ratio 2).
    slept = []
    slow = Slowdown(3.0, sleep=slept.append, clock=FakeClock(0.0, 2.0, 10.0, 16.0))
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(model, torch.nn.CrossEntropyLoss(), optimizer, slow, torch.device("cpu"),
               torch.randn(8, 4), torch.randint(0, 2, (8,)), epoch=0, global_step=0)
    assert slept == [pytest.approx(12.0)]
    assert slow.backward_ratio == pytest.approx(2.0 + 0.2 * (3.0 - 2.0))  # learnt 6 / 2


def test_with_cpu_time_spent_waiting_is_not_scaled():
    # A rank that waits for a core (or sleeps) does no work: the thread's CPU
    # time, which --slowdown-clock cpu scales, does not count it; wall time would.
    assert make_emulator(0, 1, slowdown="4").clock is time.perf_counter  # the default
    emulator = make_emulator(0, 1, slowdown="4", cpu_time=True)
    assert emulator.clock is time.thread_time
    start = emulator.clock()
    time.sleep(0.2)
    assert emulator.clock() - start < 0.05


def test_a_virtual_device_costs_exactly_its_overhead_plus_per_sample_cost():
    device = VirtualDevice(0.01, 0.002, changes=StepChange(0, at_step=5, factor=3.0))
    assert device.delay(10, forward_seconds=99.0) == pytest.approx(0.03)
    device.at(epoch=0, global_step=5)
    assert device.delay(10, forward_seconds=99.0) == pytest.approx(0.09)


def test_disturbances_follow_the_seed_and_the_probability():
    world, epochs = 8, 200
    schedule = Disturbances(world, probability=0.3, factor=3.0, max_epochs=3, seed=7)
    table = np.array([[schedule.factor(r, e, 0) for r in range(world)] for e in range(epochs)])
    assert set(np.unique(table)) == {1.0, 3.0}
    # A spell starts with probability p on an undisturbed epoch and lasts 1-3
    # epochs (2 on average): slowed about 0.3 x 2 / (1 + 0.3 x 2) = 37% of the time.
    assert 0.25 < (table == 3.0).mean() < 0.5
    again = Disturbances(world, probability=0.3, factor=3.0, max_epochs=3, seed=7)
    # Asked out of order (a rank far ahead), the same seed gives the same table:
    # every rank, and every policy of a benchmark, sees the same disturbances.
    assert again.factor(5, 150, 0) == table[150, 5]
    assert all(again.factor(r, e, 0) == table[e, r] for e in range(epochs) for r in range(world))
    other = Disturbances(world, probability=0.3, factor=3.0, max_epochs=3, seed=8)
    assert any(other.factor(r, e, 0) != table[e, r] for e in range(epochs) for r in range(world))
    never = Disturbances(world, probability=0.0, seed=1)
    assert all(never.factor(r, e, 0) == 1.0 for e in range(20) for r in range(world))
    always = Disturbances(world, probability=1.0, factor=2.0, max_epochs=1, seed=1)
    assert all(always.factor(r, e, 0) == 2.0 for e in range(20) for r in range(world))


def test_a_step_change_slows_one_rank_from_its_step_on():
    change = parse_step_change("1:25:4", world_size=2)
    assert change.factor(1, 0, 24) == 1.0
    assert change.factor(1, 2, 25) == 4.0
    assert change.factor(0, 2, 25) == 1.0


@pytest.mark.parametrize("call, message", [
    (lambda: parse_factors("1,x", 2), "comma-separated numbers"),
    (lambda: parse_factors("1,2,3", 2), "3 factors for 2 ranks"),
    (lambda: parse_factors("0.5", 2), "factors must be >= 1"),
    (lambda: parse_disturbances("q=1", 2, 0), "--disturb takes"),
    (lambda: parse_step_change("1:2", 2), "RANK:STEP:FACTOR"),
    (lambda: parse_step_change("3:2:2", 2), "outside a world of 2"),
    (lambda: make_emulator(0, 2, slowdown="1,2", virtual_device="0:1"), "either --slowdown"),
    (lambda: Slowdown(float("inf")), "finite number >= 1"),
])
def test_bad_emulation_settings_say_what_to_write(call, message):
    with pytest.raises(ValueError, match=message):
        call()
